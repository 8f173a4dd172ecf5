"""CBOR: the stream as a CBOR sequence (RFC 8742) of records (docs/format.md §7).

The records are those of docs/json.md with byte strings as CBOR byte
strings and the schema table.  The first record,
``{"t": "stream", "format": "vmferry-cbor", "version": 1}``, carries the
self-described CBOR tag 55799 (``d9 d9 f7``), by which the format is
sniffed; the last is ``{"t": "fin", "records": N}``.  The decoder reads one
item at a time from a bounded buffer, each walked and bounded before cbor2
builds it (definite lengths, no tags).
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Iterator

from ..caps import Cap
from ..errors import DecodeError, FerryError
from ..events import Event
from .limits import (COST_BYTES, COST_PER_BYTE, COST_SCALAR, COST_SLACK, COST_SMALL, COST_STR, MAX_RECORD_COST,
                     container_cost)
from .records import NATIVE_BYTES, RecordStreamDecoder, encode_records, walked_records

NAME = "cbor"
CAP = Cap.CODEC_CBOR
FEATURES = Cap.SELF_DESCRIBING
REQUIRES = ("cbor2",)
SELF_DESCRIBED = b"\xd9\xd9\xf7"


def _lib() -> Any:
    try:
        import cbor2

        return cbor2
    except ImportError:
        raise FerryError("the cbor format needs the cbor2 package (pip install 'vmferry[cbor]')") from None


def sniff(head: bytes) -> bool:
    return head[:3] == SELF_DESCRIBED


def encode(events: Iterable[Event]) -> Iterator[bytes]:
    """Encode events as a CBOR sequence of records."""
    lib = _lib()
    first = True
    for rec in encode_records(events, NAME, NATIVE_BYTES):
        if first:
            yield SELF_DESCRIBED + lib.dumps(rec)
            first = False
        else:
            yield lib.dumps(rec)


def _plain(v: Any) -> Any:
    """cbor2 may hand back immutable mappings; records are dicts."""
    from collections.abc import Mapping

    if isinstance(v, Mapping) and not isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class _Scan:
    """Walks one CBOR data item without building it (resumable as input arrives): where it ends and an
    estimate of the Python objects decoding it would build (vmferry.encode.limits costs).  vmferry's records
    use definite lengths and no tags (the self-described tag before the first record aside): cbor2 would
    otherwise build any semantic object a tag names, or share one object under many references."""

    __slots__ = ("start", "pos", "pending", "cost")

    def __init__(self, start: int) -> None:
        self.start = self.pos = start
        self.pending = 1
        self.cost = 0

    def walk(self, buf: bytearray, base: int) -> int | None:
        p, pending, cost, n = self.pos, self.pending, self.cost, len(buf)
        while pending:
            if p >= n:
                break
            b = buf[p]
            major, ai = b >> 5, b & 0x1F
            if ai < 24:
                k, width = ai, 0
            elif ai <= 27:
                width = 1 << (ai - 24)
                if p + 1 + width > n:
                    break
                k = int.from_bytes(buf[p + 1:p + 1 + width], "big")
            else:
                what = "indefinite lengths" if ai == 31 else f"additional information {ai}"
                raise DecodeError(f"CBOR {what} (vmferry's records have definite lengths)", base + p, "$")
            p += 1 + width
            if major <= 1:
                cost += COST_SMALL if k <= 256 else COST_SCALAR
            elif major == 2 or major == 3:
                p += k
                cost += (COST_BYTES if major == 2 else COST_STR) + k
            elif major == 4:
                pending += k
                cost += container_cost(False, k)
            elif major == 5:
                pending += 2 * k
                cost += container_cost(True, k)
            elif major == 6:
                raise DecodeError(f"CBOR tag {k} inside a record (vmferry's records use none)", base + p - 1 - width,
                                  "$")
            else:
                cost += COST_SCALAR if ai >= 25 else COST_SMALL
            pending -= 1
            if cost > MAX_RECORD_COST or cost > COST_PER_BYTE * (p - self.start) + COST_SLACK:
                raise DecodeError(f"a record that would build over {cost} bytes of Python objects from its first "
                                  f"{p - self.start} bytes (what only a hostile input does)", base + self.start, "$")
        self.pos, self.pending, self.cost = p, pending, cost
        if pending or p > n:
            return None
        return p


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: Any = None) -> Iterator[Event]:
    """Decode a CBOR record stream.  Raises only :class:`DecodeError`.

    Each record is walked first (:class:`_Scan`): its end found and the objects it would build estimated
    and bounded (:func:`vmferry.encode.limits.record_budget`) before cbor2, which has no limits of its own,
    builds any.
    """
    lib = _lib()
    return walked_records(chunks, RecordStreamDecoder(NAME, NATIVE_BYTES), _Scan,
                          lambda view: _plain(lib.CBORDecoder(io.BytesIO(view), max_depth=100).decode()), "CBOR", prefix=SELF_DESCRIBED)
