"""What differs between the *values* of two streams: device fields, and RAM pages (no I/O).

``vmferry diff A B`` compares schemas (:mod:`vmferry.compat.check`); this
module compares what the guests hold.  :class:`StreamValues` consumes one
stream's events one at a time and keeps

* each device section's state tree (a few hundred KiB for a whole machine),
* for each RAM block, an 8-byte BLAKE2b digest per page of the page as the
  stream's last record of it left it (a page never sent counts as zero, as
  on QEMU's destination): 2 MiB per GiB of guest RAM, never the RAM itself.

:func:`compare` then lists the device fields whose values differ, sections
present on one side only, and per RAM block the ranges of differing pages.
So two 1 GiB guests are compared in a few MiB, each stream read once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..events import DeviceSection, Event, OpaqueSection, RamMemSize, RamPages, RamRecord, RamZeros

__all__ = ["RamDiff", "StreamValues", "ValueDiff", "compare", "flatten"]

DIGEST = 8
PAGE = 4096


def _digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


@dataclass
class _Block:
    length: int
    page_size: int
    digests: bytearray
    pages: int

    @classmethod
    def new(cls, length: int, page_size: int) -> _Block:
        pages = (length + page_size - 1) // page_size
        return cls(length, page_size, bytearray(_digest(bytes(page_size)) * pages), pages)


@dataclass
class StreamValues:
    """The values one stream leaves: device trees by section, and a digest per RAM page."""

    devices: dict[str, Any] = field(default_factory=dict)
    blocks: dict[str, _Block] = field(default_factory=dict)
    #: pages whose content the stream gives only as a delta (XBZRLE): their digest is unknown
    unknown_pages: dict[str, set[int]] = field(default_factory=dict)

    def add(self, ev: Event) -> None:
        if isinstance(ev, DeviceSection):
            self.devices[f"{ev.idstr}/{ev.instance_id}"] = ev.state
        elif isinstance(ev, OpaqueSection) and ev.kind == 4:  # a FULL section without a schema: its bytes
            self.devices[f"{ev.idstr}/{ev.instance_id}"] = {"(opaque)": bytes(ev.body)}
        elif isinstance(ev, RamMemSize):
            for b in ev.blocks:
                if b.name not in self.blocks:
                    self.blocks[b.name] = _Block.new(b.length, b.page_size or PAGE)
        elif isinstance(ev, (RamPages, RamZeros)):
            block = self.blocks.get(ev.block)
            if block is None:
                return
            first = ev.offset // ev.page_size
            for i in range(ev.count):
                self._set(block, ev.block, first + i, _page_digest(ev, i))
        elif isinstance(ev, RamRecord) and ev.block:
            pages = self.unknown_pages.setdefault(ev.block, set())
            block = self.blocks.get(ev.block)
            if block is not None:
                pages.add(ev.offset // block.page_size)

    def _set(self, block: _Block, name: str, index: int, digest: bytes) -> None:
        if 0 <= index < block.pages:
            block.digests[index * DIGEST:(index + 1) * DIGEST] = digest
            unknown = self.unknown_pages.get(name)
            if unknown:
                unknown.discard(index)


def _page_digest(ev: RamPages | RamZeros, i: int) -> bytes:
    """The digest of page ``i`` of a run of pages or of zero (fill) pages."""
    if isinstance(ev, RamPages):
        return _digest(ev.page(i))
    return _zero_digest(ev.page_size, ev.fill[i] if ev.fill is not None else 0)


_ZERO: dict[tuple[int, int], bytes] = {}


def _zero_digest(page_size: int, fill: int) -> bytes:
    key = (page_size, fill)
    if key not in _ZERO:
        _ZERO[key] = _digest(bytes([fill]) * page_size)
    return _ZERO[key]


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` for every leaf of a state tree: ``env.regs[3]``, ``cpu/poll_control_msr.msr``."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


@dataclass
class RamDiff:
    """The pages of one block that differ: ``ranges`` of page indexes, end exclusive."""

    block: str
    page_size: int
    pages: int
    ranges: list[tuple[int, int]]
    length_a: int | None = None
    length_b: int | None = None

    @property
    def differing(self) -> int:
        return sum(e - s for s, e in self.ranges)


@dataclass
class ValueDiff:
    fields: list[tuple[str, str, Any, Any]] = field(default_factory=list)  # section, field path, a, b
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    ram: list[RamDiff] = field(default_factory=list)
    unknown_pages: int = 0

    @property
    def empty(self) -> bool:
        return not (self.fields or self.only_a or self.only_b or any(r.ranges for r in self.ram)
                    or any(r.length_a != r.length_b for r in self.ram))

    def as_dict(self, max_ranges: int = 10_000) -> dict[str, Any]:
        return {
            "devices": [{"section": s, "field": f, "a": _json(a), "b": _json(b)} for s, f, a, b in self.fields],
            "only_in_a": self.only_a,
            "only_in_b": self.only_b,
            "ram": [{"block": r.block, "page_size": r.page_size, "pages": r.pages, "differing_pages": r.differing,
                     "ranges": [[s, e] for s, e in r.ranges[:max_ranges]],
                     "ranges_truncated": len(r.ranges) > max_ranges,
                     "length_a": r.length_a, "length_b": r.length_b} for r in self.ram],
            "pages_given_as_deltas": self.unknown_pages,
        }


def _json(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    return v


def compare(a: StreamValues, b: StreamValues) -> ValueDiff:
    """What differs between the values of ``a`` and ``b`` (see the module doc)."""
    out = ValueDiff()
    for key, tree in a.devices.items():
        other = b.devices.get(key)
        if other is None:
            out.only_a.append(key)
            continue
        theirs = dict(flatten(other))
        for path, value in flatten(tree):
            if path in theirs and not _same(value, theirs[path]):
                out.fields.append((key, path, value, theirs[path]))
    out.only_b = [k for k in b.devices if k not in a.devices]
    for name in dict.fromkeys([*a.blocks, *b.blocks]):
        ba, bb = a.blocks.get(name), b.blocks.get(name)
        if ba is None or bb is None or ba.page_size != bb.page_size:
            known = ba or bb
            assert known is not None
            out.ram.append(RamDiff(name, known.page_size, known.pages, [(0, known.pages)],
                                   ba.length if ba else None, bb.length if bb else None))
            continue
        n = min(ba.pages, bb.pages)
        ranges: list[tuple[int, int]] = []
        da, db = memoryview(ba.digests), memoryview(bb.digests)
        if da[:n * DIGEST] != db[:n * DIGEST]:
            start = None
            for i in range(n):
                differ = da[i * DIGEST:(i + 1) * DIGEST] != db[i * DIGEST:(i + 1) * DIGEST]
                if differ and start is None:
                    start = i
                elif not differ and start is not None:
                    ranges.append((start, i))
                    start = None
            if start is not None:
                ranges.append((start, n))
        if ba.pages != bb.pages:
            ranges.append((n, max(ba.pages, bb.pages)))
        out.ram.append(RamDiff(name, ba.page_size, max(ba.pages, bb.pages), ranges, ba.length, bb.length))
    out.unknown_pages = sum(len(p) for p in a.unknown_pages.values()) + sum(len(p) for p in b.unknown_pages.values())
    return out


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, (bytes, bytearray, memoryview)) and isinstance(y, (bytes, bytearray, memoryview)):
        return bytes(x) == bytes(y)
    return bool(x == y) and type(x) is type(y) or (isinstance(x, (int, float)) and isinstance(y, (int, float))
                                                   and not isinstance(x, bool) and not isinstance(y, bool) and x == y)
