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
from ..errors import DecodeError, FerryError, TruncatedError
from ..events import Event, Vmdesc
from . import limits
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
    where = [0]  # the offset of the record being decoded (errors name it)
    try:
        for offset, index, rec, size in _records(chunks, where):
            where[0] = offset
            yield from state.record(rec, offset, f"$.records[{index}]", size)
        state.finish(where[0])
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), where[0], "$") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError, IndexError) as e:
        raise DecodeError(f"malformed JSON stream ({type(e).__name__}: {e})", where[0], "$") from None


def check_cost(text: bytes, offset: int, path: str) -> None:
    """Bound what ``json.loads(text)`` may build, before it builds it (:func:`vmferry.encode.limits.json_cost`)."""
    cost = limits.json_cost(text)
    if cost > limits.record_budget(len(text)):
        raise DecodeError(f"a record of {len(text)} bytes that may build about {cost} bytes of Python objects "
                          "(what only a hostile input does)", offset, path)


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


def _records(chunks: Iterable[bytes | bytearray | memoryview],
             where: list[int]) -> Iterator[tuple[int, int, Any, int]]:
    """(offset, index, record, size) of each record; ``where[0]`` follows the input as it is read."""
    lines = _lines(chunks)
    first = next(lines, None)
    if first is None:
        raise DecodeError("empty input", 0, "$")
    if first[1].strip() != FIRST_LINE:
        yield from _whole_document(first, lines, where)
        return
    index = 0
    for offset, line in lines:
        where[0] = offset
        text = line.strip()
        if text.startswith(b"]"):
            try:
                tail = json.loads(b"{" + text[1:].lstrip(b", ")) if text[1:].strip(b" ,}") else {}
            except ValueError as e:
                raise DecodeError(f"malformed document end: {e}", offset, "$") from None
            if not isinstance(tail, dict):
                raise DecodeError("malformed document end", offset, "$")
            return
        if text.endswith(b","):
            text = text[:-1]
        if not text:
            continue
        check_cost(text, offset, f"$.records[{index}]")
        try:
            rec = json.loads(text)
        except ValueError as e:
            raise DecodeError(f"record is not valid JSON: {e}", offset, f"$.records[{index}]") from None
        yield offset, index, rec, len(line) + 1
        index += 1
    raise TruncatedError("document ends before its records list is closed (truncated?)", where[0], "$")


class _Document:
    """A reformatted document (``jq`` and the like), read value by value with ``raw_decode``: each record is
    parsed on its own, so only one is held at a time, and each error names its byte offset."""

    def __init__(self, data: bytes) -> None:
        try:
            self.text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DecodeError(f"not UTF-8 text: {e.reason}", e.start, "$") from None
        self.ascii = self.text.isascii()
        self.dec = json.JSONDecoder()
        self._at = (0, 0)  # (character, byte) of the last conversion

    def offset(self, i: int) -> int:
        """The byte offset of character ``i``."""
        if self.ascii:
            return i
        c, b = self._at
        if i < c:
            c, b = 0, 0
        b += len(self.text[c:i].encode("utf-8"))
        self._at = (i, b)
        return b

    def ws(self, i: int) -> int:
        text = self.text
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def expect(self, i: int, chars: str, what: str) -> tuple[str, int]:
        i = self.ws(i)
        if i >= len(self.text):
            raise TruncatedError(f"the document ends where {what} should be (truncated?)", self.offset(i), "$")
        if self.text[i] not in chars:
            raise DecodeError(f"expected {what}, found {self.text[i]!r}", self.offset(i), "$")
        return self.text[i], i + 1

    def value(self, i: int, path: str) -> tuple[Any, int]:
        i = self.ws(i)
        try:
            return self.dec.raw_decode(self.text, i)
        except ValueError as e:
            raise DecodeError(f"not valid JSON: {e}", self.offset(i), path) from None

    def members(self, on_records: Any) -> dict[str, Any]:
        """The top-level members other than ``records``; ``on_records(i)`` reads that array from ``i`` and
        returns where it ends."""
        _, i = self.expect(0, "{", "the document's '{'")
        out: dict[str, Any] = {}
        c, j = self.expect(i, '"}', "a member name or '}'")
        if c == "}":
            self.end(j)
            return out
        while True:
            key, i = self.value(j - 1, "$")
            _, i = self.expect(i, ":", "':'")
            if key == "records":
                i = on_records(self.ws(i))
                out[key] = True
            else:
                out[key], i = self.value(i, f"$.{key}")
            c, i = self.expect(i, ",}", "',' or '}'")
            if c == "}":
                self.end(i)
                return out
            _, j = self.expect(i, '"', "a member name")

    def end(self, i: int) -> None:
        i = self.ws(i)
        if i != len(self.text):
            raise DecodeError("data after the document", self.offset(i), "$")

    def records(self, i: int, end: list[int]) -> Iterator[tuple[int, int, Any, int]]:
        """(offset, index, record, size) of the records array at ``i`` (its '['); ``end[0]`` is set to where
        the array ends."""
        _, i = self.expect(i, "[", "the records list")
        index = 0
        while True:
            at = self.ws(i)
            if index == 0 and self.text[at:at + 1] == "]":
                end[0] = at + 1
                return
            rec, i = self.value(at, f"$.records[{index}]")
            yield self.offset(at), index, rec, i - at
            index += 1
            c, i = self.expect(i, ",]", "',' or ']'")
            if c == "]":
                end[0] = i
                return


def _whole_document(first: tuple[int, bytes], lines: Iterator[tuple[int, bytes]],
                    where: list[int]) -> Iterator[tuple[int, int, Any, int]]:
    parts = [first[1]]
    size = len(first[1])
    for _, line in lines:
        size += len(line) + 1
        if size > MAX_WHOLE_DOCUMENT:
            raise DecodeError(f"reformatted JSON document over {MAX_WHOLE_DOCUMENT} bytes; keep vmferry's "
                              "one-record-per-line layout to stream it", size, "$")
        parts.append(line)
    data = b"\n".join(parts)
    del parts
    check_cost(data, 0, "$")
    doc = _Document(data)
    del data
    # First pass: the members, the records only checked for syntax (one at a time), and where they start;
    # a reformatted document may put "format" and "version" after the records (jq -S sorts the keys).
    found: list[int] = []

    def skip(i: int) -> int:
        found.append(i)
        end = [i]
        for _ in doc.records(i, end):
            pass
        return end[0]

    head = doc.members(skip)
    if head.get("format") != FORMAT:
        raise DecodeError(f"not a {FORMAT} document", 0, "$.format")
    if head.get("version") != FORMAT_VERSION:
        raise DecodeError(f"unsupported {FORMAT} version {head.get('version')!r}", 0, "$.version")
    if not found:
        raise DecodeError("missing records list", 0, "$.records")
    # Second pass: the records, one at a time.
    for offset, index, rec, size in doc.records(found[-1], [0]):
        where[0] = offset
        yield offset, index, rec, size
