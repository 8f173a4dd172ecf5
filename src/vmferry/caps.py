"""Capability bits: named bits of a 64-bit mask, and how to combine masks.

A mask says what an endpoint, a codec or a stream supports (or uses).  Two
endpoints agree on the intersection of their masks; mask 0 means today's
QEMU protocol, which needs nothing.  The bit numbers are part of the ferry
format (its header carries a mask, docs/format.md §4), so a bit, once
assigned, keeps its number for ever.

Layout: bits 0..15 are stream features, bits 16..31 name the codecs,
bits 32..63 are reserved for later additions (return path, transforms at
the receiver, QEMU capability mapping).

Pure: no I/O, no imports of the codecs.
"""

from __future__ import annotations

import enum
from typing import Iterable


class Cap(enum.IntFlag, boundary=enum.KEEP):
    """One capability bit (combine with ``|``; unknown bits are kept, not dropped)."""

    NONE = 0
    # --- stream features (0..15)
    FERRY_FRAMING = 1 << 0  # sized frames with types and must-understand flags
    FRAME_CRC32C = 1 << 1  # every frame checksummed with CRC32C
    ZSTD = 1 << 2  # zstd-compressed frames
    LZ4 = 1 << 3  # lz4-compressed frames
    SELF_DESCRIBING = 1 << 4  # device sections carry field names; schemas travel once
    # --- codecs (16..31); QEMU's own stream needs no bit
    CODEC_FERRY = 1 << 16
    CODEC_JSON = 1 << 17
    CODEC_JSONL = 1 << 18
    CODEC_CBOR = 1 << 19
    CODEC_MSGPACK = 1 << 20
    CODEC_ASN1_BER = 1 << 21
    CODEC_ASN1_DER = 1 << 22
    CODEC_ASN1_PER = 1 << 23
    CODEC_ASN1_XER = 1 << 24


MASK_BITS = 64
ALL_KNOWN = Cap(0)
for _c in Cap:
    ALL_KNOWN |= _c
FEATURES = Cap(0xFFFF) & ALL_KNOWN
CODECS = Cap(0xFFFF_0000) & ALL_KNOWN

# Human names, as printed by `vmferry formats` and accepted by from_names().
_NAMES: dict[Cap, str] = {c: c.name.lower().replace("_", "-") for c in Cap if c.name and c is not Cap.NONE}
_NAMES[Cap.FRAME_CRC32C] = "frame-crc32c"
_BY_NAME = {v: k for k, v in _NAMES.items()}


def bits(mask: int) -> list[Cap]:
    """The single bits set in ``mask``, lowest first (unknown bits included, as bare Caps)."""
    return [Cap(1 << i) for i in range(MASK_BITS) if mask >> i & 1]


def name(cap: int) -> str:
    """The name of one bit (``bit-N`` for a bit vmferry does not know)."""
    c = Cap(cap)
    return _NAMES.get(c) or f"bit-{c.bit_length() - 1}"


def names(mask: int) -> list[str]:
    """The names of the bits set in ``mask``."""
    return [name(c) for c in bits(mask)]


def from_names(items: Iterable[str]) -> Cap:
    """The mask of named bits; raises ValueError for an unknown name."""
    out = Cap(0)
    for item in items:
        try:
            out |= _BY_NAME[item]
        except KeyError:
            raise ValueError(f"unknown capability {item!r}; known: {', '.join(sorted(_BY_NAME))}") from None
    return out


def intersect(*masks: int) -> Cap:
    """What every party supports: the AND of the masks (no masks: nothing)."""
    if not masks:
        return Cap(0)
    out = masks[0]
    for m in masks[1:]:
        out &= m
    return Cap(out)


def union(*masks: int) -> Cap:
    out = 0
    for m in masks:
        out |= m
    return Cap(out)


def missing(required: int, supported: int) -> Cap:
    """The bits of ``required`` that ``supported`` lacks."""
    return Cap(required & ~supported)


def unknown(mask: int) -> Cap:
    """Bits of ``mask`` that this vmferry does not know."""
    return Cap(mask & ~ALL_KNOWN)


def restrict(mask: int, allowed: int) -> Cap:
    """``mask`` limited to ``allowed`` (what ``set-migration-capabilities`` does)."""
    return Cap(mask & allowed)


def to_bytes(mask: int) -> bytes:
    """The mask as the 8 big-endian bytes of the ferry header."""
    return int(mask).to_bytes(8, "big")


def from_bytes(data: bytes) -> Cap:
    if len(data) != 8:
        raise ValueError("a capability mask is 8 bytes")
    return Cap(int.from_bytes(data, "big"))


__all__ = ["ALL_KNOWN", "CODECS", "Cap", "FEATURES", "bits", "from_bytes", "from_names", "intersect", "missing",
           "name", "names", "restrict", "to_bytes", "union", "unknown"]
