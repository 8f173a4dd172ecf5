"""CBOR: the stream as a CBOR sequence (RFC 8742) of records (docs/format.md §7).

The records are those of docs/json.md with byte strings as CBOR byte
strings and the schema table.  The first record,
``{"t": "stream", "format": "vmferry-cbor", "version": 1}``, carries the
self-described CBOR tag 55799 (``d9 d9 f7``), by which the format is
sniffed; the last is ``{"t": "fin", "records": N}``.  The decoder reads one
item at a time from a bounded buffer.
"""

from __future__ import annotations

import io
from typing import Any, Iterable, Iterator

from ..caps import Cap
from ..errors import DecodeError, FerryError, TruncatedError
from ..events import Event
from .records import NATIVE_BYTES, RecordStreamDecoder, encode_records, pieces

NAME = "cbor"
CAP = Cap.CODEC_CBOR
FEATURES = Cap.SELF_DESCRIBING
REQUIRES = ("cbor2",)
SELF_DESCRIBED = b"\xd9\xd9\xf7"
MAX_RECORD = 64 << 20


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


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: Any = None) -> Iterator[Event]:
    """Decode a CBOR record stream.  Raises only :class:`DecodeError`."""
    lib = _lib()
    stream = RecordStreamDecoder(NAME, NATIVE_BYTES)
    buf = b""
    base = 0  # absolute offset of buf[0]
    pos = 0  # position in buf of the next item
    try:
        for chunk in pieces(chunks):
            buf = buf[pos:] + bytes(chunk)
            base += pos
            pos = 0
            fp = io.BytesIO(buf)
            while pos < len(buf):
                fp.seek(pos)
                try:
                    rec = lib.CBORDecoder(fp, max_depth=100).decode()
                except lib.CBORDecodeEOF:
                    break
                yield from stream.record(_plain(rec), base + pos)
                pos = fp.tell()
            if len(buf) - pos > MAX_RECORD:
                raise DecodeError(f"a record longer than {MAX_RECORD} bytes", base + pos, "$")
        if pos != len(buf):
            raise TruncatedError(f"the stream ends inside a record ({len(buf) - pos} bytes of it arrived)",
                                 base + pos, "$")
        stream.finish(base + pos)
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), base + pos, "$") from None
    except Exception as e:  # noqa: BLE001 - cbor2 and its semantic decoders raise many types
        raise DecodeError(f"malformed CBOR ({type(e).__name__}: {e})", base + pos, "$") from None
