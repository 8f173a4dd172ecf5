"""The whole stream as an editable JSON document, lossless.

Layout (one record per line, so that huge guests stream in constant memory
and a person can still edit a value with any editor)::

    {"format": "vmferry-json", "version": 1, "records": [
    {"t": "header", "version": 3},
    {"t": "configuration", "state": {"len": 13, "name": "70632d..."}},
    {"t": "begin", "kind": "start", "id": 2, "idstr": "ram", "instance": 0, "version": 4},
    {"t": "mem_size", "total": 67641344, "blocks": [{"name": "pc.ram", "length": 67108864}, ...]},
    {"t": "zeros", "block": "pc.ram", "offset": 0, "count": 16, "named": true},
    {"t": "pages", "block": "pc.ram", "offset": 65536, "count": 2, "named": false, "data": "<base64>"},
    {"t": "eos"},
    {"t": "end", "id": 2, "footer": true},
    {"t": "device", "id": 5, "idstr": "cpu", "instance": 0, "version": 12, "footer": true,
     "state": {"env.regs": [0, ...], "env.eip": 65520, ...}, "desc": {... vmdesc entry ...}},
    {"t": "eof"},
    {"t": "vmdesc", "object": {"page_size": 4096, "devices": "@sections"}}
    ], "has_vmdesc": true}

Device state keeps QEMU's field names; integers are numbers, buffers are
hex strings (a tree holds no other strings), subsections are objects under
their ``parent/name`` key.  Each device record carries its schema as its
vmdesc entry (``desc``).  The vmdesc record stores only what the device
records do not already say; when the original text cannot be rebuilt from
them exactly it is stored whole (``text``).

A document reformatted by another tool (``jq`` and the like) still decodes,
by a whole-document parse bounded to :data:`MAX_WHOLE_DOCUMENT` bytes.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from ..caps import Cap
from ..errors import DecodeError, FerryError
from ..events import Event, Vmdesc
from .records import (
    JSON_TEXT,
    RecordDecoder,
    RecordEncoder,
    pieces,
    regrouped,
    tree_in,
    tree_out,
)

NAME = "json"
CAP = Cap.CODEC_JSON
FEATURES = Cap.SELF_DESCRIBING
REQUIRES: tuple[str, ...] = ()
FORMAT = "vmferry-json"
FORMAT_VERSION = 1
FIRST_LINE = b'{"format": "vmferry-json", "version": 1, "records": ['
MAX_LINE = 64 << 20
MAX_WHOLE_DOCUMENT = 512 << 20


def sniff(head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


# ---------------------------------------------------------------------------
# Trees <-> JSON values, records (the mapping itself lives in encode.records)
# ---------------------------------------------------------------------------


def tree_to_json(value: Any) -> Any:
    """A state tree as JSON values: bytes become hex strings."""
    return tree_out(value, JSON_TEXT)


def tree_from_json(value: Any, path: str = "$") -> Any:
    """Inverse of :func:`tree_to_json`; raises DecodeError naming the path."""
    return tree_in(value, JSON_TEXT, path)


def event_to_record(ev: Event, sections: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The JSON record(s) of one event.  ``sections`` collects device descs for the vmdesc record."""
    enc = RecordEncoder(JSON_TEXT)
    if sections is not None:
        enc.sections = sections
    return enc.records(ev)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def encode(events: Iterable[Event]) -> Iterator[bytes]:
    """Encode events as the JSON document, one record per line."""
    yield FIRST_LINE + b"\n"
    enc = RecordEncoder(JSON_TEXT)
    has_vmdesc = False
    pending: bytes | None = None
    for ev in regrouped(events):
        has_vmdesc |= isinstance(ev, Vmdesc)
        for rec in enc.records(ev):
            line = json.dumps(rec).encode()
            if pending is not None:
                yield pending + b",\n"
            pending = line
    if pending is not None:
        yield pending + b"\n"
    yield b'], "has_vmdesc": ' + (b"true" if has_vmdesc else b"false") + b"}\n"


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: Any = None) -> Iterator[Event]:
    """Decode the JSON document.  Raises only :class:`DecodeError`."""
    state = RecordDecoder(JSON_TEXT)
    try:
        for offset, index, rec in _records(chunks):
            yield from state.record(rec, offset, f"$.records[{index}]")
        state.finish()
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), None, "$") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError, IndexError) as e:
        raise DecodeError(f"malformed JSON stream ({type(e).__name__}: {e})", None, "$") from None


def _lines(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[tuple[int, bytes]]:
    buf = b""
    offset = 0
    for chunk in pieces(chunks):
        buf += bytes(chunk)
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            yield offset + start, buf[start:nl]
            start = nl + 1
        offset += start
        buf = buf[start:]
        if len(buf) > MAX_LINE:
            raise DecodeError(f"line longer than {MAX_LINE} bytes", offset, "$")
    if buf:
        yield offset, buf


def _records(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[tuple[int | None, int, Any]]:
    lines = _lines(chunks)
    first = next(lines, None)
    if first is None:
        raise DecodeError("empty input", 0, "$")
    if first[1].strip() != FIRST_LINE:
        yield from _whole_document(first, lines)
        return
    index = 0
    for offset, line in lines:
        text = line.strip()
        if text.startswith(b"]"):
            tail = json.loads(b"{" + text[1:].lstrip(b", ")) if text[1:].strip(b" ,}") else {}
            if not isinstance(tail, dict):
                raise DecodeError("malformed document end", offset, "$")
            return
        if text.endswith(b","):
            text = text[:-1]
        if not text:
            continue
        try:
            rec = json.loads(text)
        except ValueError as e:
            raise DecodeError(f"record is not valid JSON: {e}", offset, f"$.records[{index}]") from None
        yield offset, index, rec
        index += 1
    raise DecodeError("document ends before its records list is closed (truncated?)", None, "$")


def _whole_document(first: tuple[int, bytes], lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[None, int, Any]]:
    parts = [first[1]]
    size = len(first[1])
    for _, line in lines:
        size += len(line) + 1
        if size > MAX_WHOLE_DOCUMENT:
            raise DecodeError(f"reformatted JSON document over {MAX_WHOLE_DOCUMENT} bytes; keep vmferry's "
                              "one-record-per-line layout to stream it", None, "$")
        parts.append(line)
    try:
        doc = json.loads(b"\n".join(parts))
    except ValueError as e:
        raise DecodeError(f"not valid JSON: {e}", None, "$") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DecodeError(f"not a {FORMAT} document", 0, "$.format")
    if doc.get("version") != FORMAT_VERSION:
        raise DecodeError(f"unsupported {FORMAT} version {doc.get('version')!r}", None, "$.version")
    records = doc.get("records")
    if not isinstance(records, list):
        raise DecodeError("missing records list", None, "$.records")
    for i, rec in enumerate(records):
        yield None, i, rec
