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
from ..errors import DecodeError, FerryError, TruncatedError
from ..events import Event
from .records import NATIVE, RecordStreamDecoder, encode_records, stream_record

NAME = "msgpack"
CAP = Cap.CODEC_MSGPACK
FEATURES = Cap.SELF_DESCRIBING
REQUIRES = ("msgpack",)
MAX_RECORD = 64 << 20
FEED = 4 << 20


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


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: Any = None) -> Iterator[Event]:
    """Decode a MessagePack record stream.  Raises only :class:`DecodeError`."""
    lib = _lib()
    unpacker = lib.Unpacker(raw=False, strict_map_key=True, use_list=True, max_buffer_size=MAX_RECORD + FEED)
    stream = RecordStreamDecoder(NAME, NATIVE)
    fed = 0
    pos = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            for i in range(0, len(view), FEED):
                piece = view[i:i + FEED]
                unpacker.feed(piece)
                fed += len(piece)
                while True:
                    try:
                        rec = unpacker.unpack()
                    except lib.OutOfData:
                        break
                    yield from stream.record(rec, pos)
                    pos = unpacker.tell()
                if fed - pos > MAX_RECORD:
                    raise DecodeError(f"a record longer than {MAX_RECORD} bytes", pos, "$")
        if fed != pos:
            raise TruncatedError(f"the stream ends inside a record ({fed - pos} bytes of it arrived)", pos, "$")
        stream.finish(pos)
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), pos, "$") from None
    except Exception as e:  # noqa: BLE001 - msgpack raises ValueError, TypeError, its own errors, ...
        raise DecodeError(f"malformed MessagePack ({type(e).__name__}: {e})", pos, "$") from None
