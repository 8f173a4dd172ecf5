"""JSON lines: one record per line, no wrapper, for pipes (docs/format.md §7).

Each line is a complete JSON value, so ``jq -c``, ``grep`` or a script can
filter the stream a record at a time.  The records and their spelling are
those of the JSON document (docs/json.md: hex buffers, base64 page data),
plus the schema table; the first line is
``{"t": "stream", "format": "vmferry-jsonl", "version": 1}`` and the last
``{"t": "fin", "records": N}``, so a cut stream is reported as truncated.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from ..caps import Cap
from ..errors import DecodeError, FerryError
from ..events import Event
from .json import _lines, check_cost
from .records import JSON_TEXT, RecordStreamDecoder, encode_records

NAME = "jsonl"
CAP = Cap.CODEC_JSONL
FEATURES = Cap.SELF_DESCRIBING
REQUIRES: tuple[str, ...] = ()
FIRST = b'{"t": "stream", "format": "vmferry-jsonl"'


def sniff(head: bytes) -> bool:
    n = min(len(head), len(FIRST))
    return n >= 8 and head[:n] == FIRST[:n]


def encode(events: Iterable[Event]) -> Iterator[bytes]:
    """Encode events as JSON lines."""
    for rec in encode_records(events, NAME, JSON_TEXT):
        yield json.dumps(rec).encode() + b"\n"


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: Any = None) -> Iterator[Event]:
    """Decode JSON lines.  Raises only :class:`DecodeError`."""
    stream = RecordStreamDecoder(NAME, JSON_TEXT)
    offset = 0
    try:
        for offset, line in _lines(chunks):
            if not line.strip():
                continue
            check_cost(line, offset, "$")
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DecodeError(f"line is not valid JSON: {e}", offset, "$") from None
            yield from stream.record(rec, offset, len(line) + 1)
        stream.finish(offset)
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), offset, "$") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError, IndexError) as e:
        raise DecodeError(f"malformed JSON lines ({type(e).__name__}: {e})", offset, "$") from None
