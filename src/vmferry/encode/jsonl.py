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
import re
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


#: the stream record's format, however a filter re-spaced or re-ordered the first line
_FORMAT = re.compile(rb'"format"\s*:\s*"vmferry-jsonl("|$)')


def sniff(head: bytes) -> bool:
    """Whether ``head`` starts a JSON-lines stream: its first line parses to the stream record.

    The line is parsed, not compared byte for byte, so that ``jq -c`` output (no spaces, keys in any order)
    is recognised; when ``head`` ends inside the first line, its text must name the format.
    """
    line, newline, _ = head.partition(b"\n")
    if not line.lstrip().startswith(b"{"):
        return False
    try:
        rec = json.loads(line)
    except ValueError:
        return not newline and _FORMAT.search(line) is not None
    return isinstance(rec, dict) and rec.get("t") == "stream" and rec.get("format") == f"vmferry-{NAME}"


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
