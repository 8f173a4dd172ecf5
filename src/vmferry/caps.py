"""Capability bits: named bits of a 64-bit mask, and how to combine masks.

A mask says what an endpoint, a codec or a stream supports (or uses).  Two
endpoints agree on the intersection of their masks; mask 0 means today's
QEMU protocol, which needs nothing.  The bit numbers are part of the ferry
format (its header carries a mask, docs/format.md §4), so a bit, once
assigned, keeps its number for ever.

Layout: bits 0..15 are stream features, bits 16..31 name the codecs,
bits 32..47 are live-migration features between endpoints (return path,
device versions, transforms at the receiver); 48..63 are reserved.

A real QEMU has no mask (mask 0); it has its own named capabilities
(``query-migrate-capabilities``).  The end of this module maps between the
two: a vmferry endpoint shows its bits in QEMU's list form (QEMU's own name
where one means the same, ``x-vmferry-NAME`` otherwise), and a management
tool intersects two QEMU lists by name.

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
    FRAME_GROUPS = 1 << 5  # ferry GROUP frames: runs of frames compressed together (docs/format.md §2.4)
    X86_FILTER = 1 << 6  # ferry PAGES frames whose data went through xz's x86 branch filter (§2.2)
    PAGE_COPIES = 1 << 7  # ferry PAGES frames in a GROUP may name pages as copies of earlier ones (§2.5)
    PAGE_PLANES = 1 << 8  # ferry PAGES frames in a GROUP may carry pages as their byte planes (§2.6)
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
    # --- live migration between endpoints (32..47)
    RETURN_PATH = 1 << 32  # the destination answers the source's hello (mask, device versions) and acks the load
    RECEIVER_TRANSFORMS = 1 << 33  # the destination converts device sections of other versions itself
    DEVICE_VERSIONS = 1 << 34  # the source saves each device at the version the destination asked for


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
    return Cap(int(required) & ~int(supported))


def unknown(mask: int) -> Cap:
    """Bits of ``mask`` that this vmferry does not know."""
    return Cap(int(mask) & ~int(ALL_KNOWN))


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


# ---------------------------------------------------------------------------
# Live migration, and QEMU's own capability names
# ---------------------------------------------------------------------------

#: Bits 32..47: what two endpoints agree on for a live migration.
LIVE = Cap(0xFFFF_0000_0000) & ALL_KNOWN

#: QEMU 7.2's migration capabilities, in the order ``query-migrate-capabilities``
#: lists them (spec §7.2; ``MigrationCapability`` in QEMU's qapi/migration.json).
QEMU_7_2_CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram", "x-colo",
    "release-ram", "block", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt",
)

#: vmferry bits for which QEMU has a capability of the same meaning.
QEMU_NAME_OF: dict[Cap, str] = {Cap.RETURN_PATH: "return-path"}
#: The prefix of the QEMU-style name of every other vmferry bit (``x-vmferry-zstd``).
QEMU_PREFIX = "x-vmferry-"


def qemu_name(cap: int) -> str:
    """The QEMU-style capability name of one vmferry bit."""
    c = Cap(cap)
    return QEMU_NAME_OF.get(c) or QEMU_PREFIX + name(c)


def from_qemu_name(qemu: str) -> Cap | None:
    """The vmferry bit a QEMU-style name stands for, or None (a QEMU capability of its own)."""
    for c, n in QEMU_NAME_OF.items():
        if n == qemu:
            return c
    if qemu.startswith(QEMU_PREFIX):
        return _BY_NAME.get(qemu[len(QEMU_PREFIX):])
    return None


def to_qemu_list(supported: int, enabled: int) -> list[dict[str, object]]:
    """A vmferry mask as QEMU's ``query-migrate-capabilities`` answer: one entry per supported bit."""
    return [{"capability": qemu_name(c), "state": bool(enabled & c)} for c in bits(supported)]


def parse_qemu_list(items: object) -> dict[str, bool]:
    """QEMU's ``query-migrate-capabilities`` answer (or ``migrate-set-capabilities`` argument) as name -> state.

    Raises ValueError on anything but a list of ``{"capability": str, "state": bool}``.
    """
    if not isinstance(items, list):
        raise ValueError("capabilities must be a list")
    out: dict[str, bool] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("capability"), str) \
                or not isinstance(item.get("state"), bool):
            raise ValueError(f"capabilities[{i}] must be an object with a string 'capability' and a bool 'state'")
        out[item["capability"]] = item["state"]
    return out


def mask_from_qemu(states: dict[str, bool]) -> tuple[Cap, Cap]:
    """(bits switched on, bits switched off) by QEMU-style names; names of QEMU's own are ignored."""
    on, off = Cap(0), Cap(0)
    for qemu, state in states.items():
        c = from_qemu_name(qemu)
        if c is None:
            continue
        if state:
            on |= c
        else:
            off |= c
    return on, off


def qemu_plan(source: dict[str, bool], dest: dict[str, bool], requested: Iterable[str] = ()) -> dict[str, bool]:
    """Which of QEMU's own capabilities to switch on, intersected by name.

    A capability is used when both sides have it and it was ``requested`` or is
    already on at both; one that is on at one side only is not used.  The
    answer gives the wanted state of every QEMU capability either side has
    (vmferry's ``x-vmferry-*`` names excluded: the mask covers those).
    """
    wanted = set(requested)
    plan: dict[str, bool] = {}
    for qemu in list(source) + [n for n in dest if n not in source]:
        if qemu.startswith(QEMU_PREFIX):
            continue
        both = qemu in source and qemu in dest
        plan[qemu] = both and (qemu in wanted or (source[qemu] and dest[qemu]))
    return plan


def split_requested(items: Iterable[str], qemu_names: Iterable[str] = ()) -> tuple[Cap, list[str]]:
    """Split user-given names into vmferry bits and QEMU capability names.

    A vmferry name (``zstd``) or its QEMU-style spelling (``x-vmferry-zstd``)
    becomes a bit; a name in ``qemu_names`` stays a QEMU name (``return-path``
    is both).  Raises ValueError for a name that is neither.
    """
    known_qemu = set(qemu_names) | set(QEMU_7_2_CAPABILITIES)
    mask, qemu = Cap(0), []
    for item in items:
        c = _BY_NAME.get(item) or from_qemu_name(item)
        if c is not None:
            mask |= c
        if item in known_qemu:
            qemu.append(item)
        elif c is None:
            raise ValueError(f"unknown capability {item!r}: neither a vmferry capability "
                             f"({', '.join(sorted(_BY_NAME))}) nor one of QEMU's")
    return mask, qemu


__all__ = ["ALL_KNOWN", "CODECS", "Cap", "FEATURES", "LIVE", "QEMU_7_2_CAPABILITIES", "QEMU_NAME_OF", "QEMU_PREFIX",
           "bits", "from_bytes", "from_names", "from_qemu_name", "intersect", "mask_from_qemu", "missing", "name",
           "names", "parse_qemu_list", "qemu_name", "qemu_plan", "restrict", "split_requested", "to_bytes",
           "to_qemu_list", "union", "unknown"]
