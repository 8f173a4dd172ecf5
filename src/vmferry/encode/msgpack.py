"""MessagePack: the stream as a sequence of MessagePack maps, one record each (docs/format.md §7).

The records are those of docs/json.md with byte strings as ``bin`` and the
schema table (``schema`` records, devices refer to them by number).  The
first record is ``{"t": "stream", "format": "vmferry-msgpack", "version": 1}``,
the last ``{"t": "fin", "records": N}``.  Decoding is incremental (the
MessagePack unpacker is fed chunk by chunk) and bounded per record.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..caps import Cap
from ..errors import DecodeError, FerryError
from ..events import Event
from .limits import (COST_BYTES, COST_PER_BYTE, COST_SCALAR, COST_SLACK, COST_SMALL, COST_STR, MAX_RECORD_COST,
                     container_cost, record_budget)
from .records import NATIVE, RecordStreamDecoder, encode_records, stream_record, walked_records

NAME = "msgpack"
CAP = Cap.CODEC_MSGPACK
FEATURES = Cap.SELF_DESCRIBING
REQUIRES = ("msgpack",)


def _lib() -> Any:
    try:
        import msgpack

        return msgpack
    except ImportError:
        raise FerryError("the msgpack format needs the msgpack package (pip install 'vmferry[msgpack]')") from None


def _first() -> bytes:
    # Packed by hand so that sniffing works without the msgpack package.
    rec = stream_record(NAME)
    out = bytearray([0x80 | len(rec)])
    for k, v in rec.items():
        for s in (k, v):
            if isinstance(s, str):
                b = s.encode()
                out.append(0xA0 | len(b))
                out += b
            else:
                out.append(s)
    return bytes(out)


FIRST = _first()


def sniff(head: bytes) -> bool:
    n = min(len(head), len(FIRST))
    return n >= 8 and head[:n] == FIRST[:n]


def encode(events: Iterable[Event]) -> Iterator[bytes]:
    """Encode events as a MessagePack stream of records."""
    packer = _lib().Packer(use_bin_type=True)
    for rec in encode_records(events, NAME, NATIVE):
        yield packer.pack(rec)


class _Scan:
    """Walks one MessagePack value without building it (resumable as input arrives): where it ends and
    an estimate of the Python objects unpacking it would build (vmferry.encode.limits costs)."""

    __slots__ = ("start", "pos", "pending", "cost")

    def __init__(self, start: int) -> None:
        self.start = self.pos = start
        self.pending = 1  # values still to walk
        self.cost = 0

    def walk(self, buf: bytearray | memoryview, base: int) -> int | None:
        """The end of the value in ``buf``, or None when ``buf`` ends first.  ``base`` is the input offset of
        ``buf[0]``, for errors."""
        p, pending, cost, n = self.pos, self.pending, self.cost, len(buf)
        budget = MAX_RECORD_COST
        while pending:
            if p >= n:
                break
            b = buf[p]
            if b <= 0x7F or b >= 0xE0 or 0xC0 <= b <= 0xC3:  # fixint, nil, bool
                p += 1
                cost += COST_SMALL
            elif b <= 0x8F or 0x90 <= b <= 0x9F:  # fixmap, fixarray
                k = b & 0x0F
                is_map = b <= 0x8F
                p += 1
                pending += 2 * k if is_map else k
                cost += container_cost(is_map, k)
            elif b <= 0xBF:  # fixstr
                k = b & 0x1F
                p += 1 + k
                cost += COST_STR + k
            else:
                head = _HEADS.get(b)
                if head is None:
                    raise DecodeError(f"MessagePack type byte {b:#04x} (ext types and 0xc1 are not part of "
                                      "vmferry records)", base + p, "$")
                width, kind = head
                if p + 1 + width > n:
                    break
                k = int.from_bytes(buf[p + 1:p + 1 + width], "big") if kind != "num" else 0
                p += 1 + width
                if kind == "num":
                    cost += COST_SCALAR
                elif kind == "bin" or kind == "str":
                    p += k
                    cost += (COST_BYTES if kind == "bin" else COST_STR) + k
                else:
                    pending += 2 * k if kind == "map" else k
                    cost += container_cost(kind == "map", k)
            pending -= 1
            if cost > budget or cost > COST_PER_BYTE * (p - self.start) + COST_SLACK:
                raise DecodeError(f"a record that would build over {cost} bytes of Python objects from its first "
                                  f"{p - self.start} bytes (what only a hostile input does)", base + self.start, "$")
        self.pos, self.pending, self.cost = p, pending, cost
        if pending or p > n:
            return None
        return p


def check_cost(body: Any, offset: int, path: str) -> None:
    """Bound what unpacking the one MessagePack value ``body`` would build, before it is built (ferry's
    structured frames); a value that does not end where ``body`` does is left to the unpacker to refuse."""
    scan = _Scan(0)
    scan.walk(body, offset)
    if scan.cost > record_budget(len(body)):
        raise DecodeError(f"a {len(body)}-byte record that would build about {scan.cost} bytes of Python objects "
                          "(what only a hostile input does)", offset, path)


# type byte -> (bytes of length or value that follow, kind)
_HEADS: dict[int, tuple[int, str]] = {
    0xC4: (1, "bin"), 0xC5: (2, "bin"), 0xC6: (4, "bin"),
    0xCA: (4, "num"), 0xCB: (8, "num"),
    0xCC: (1, "num"), 0xCD: (2, "num"), 0xCE: (4, "num"), 0xCF: (8, "num"),
    0xD0: (1, "num"), 0xD1: (2, "num"), 0xD2: (4, "num"), 0xD3: (8, "num"),
    0xD9: (1, "str"), 0xDA: (2, "str"), 0xDB: (4, "str"),
    0xDC: (2, "array"), 0xDD: (4, "array"), 0xDE: (2, "map"), 0xDF: (4, "map"),
}


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: Any = None) -> Iterator[Event]:
    """Decode a MessagePack record stream.  Raises only :class:`DecodeError`.

    Each record is walked first (:class:`_Scan`): its end found and the objects it would build estimated
    and bounded (:func:`vmferry.encode.limits.record_budget`) before the MessagePack library builds any.
    """
    lib = _lib()
    return walked_records(chunks, RecordStreamDecoder(NAME, NATIVE), _Scan,
                          lambda view: lib.unpackb(view, raw=False, strict_map_key=True, use_list=True), "MessagePack")
