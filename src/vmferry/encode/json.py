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

import base64
import binascii
import json
from typing import Any, Iterable, Iterator

from ..errors import DecodeError, EncodeError, FerryError, SchemaError
from ..events import (
    SECTION_FULL,
    SECTION_KIND_NAMES,
    SECTION_KINDS,
    SECTION_START,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Header,
    IterBegin,
    IterEnd,
    OpaqueSection,
    RamBlock,
    RamEos,
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
    Vmdesc,
)
from ..serialize.qemu_vmdesc import vmsd_from_desc

NAME = "json"
FORMAT = "vmferry-json"
FORMAT_VERSION = 1
FIRST_LINE = b'{"format": "vmferry-json", "version": 1, "records": ['
PAGES_PER_RECORD = 256
MAX_LINE = 64 << 20
MAX_WHOLE_DOCUMENT = 512 << 20
SECTIONS_PLACEHOLDER = "@sections"


def sniff(head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


# ---------------------------------------------------------------------------
# Trees <-> JSON values
# ---------------------------------------------------------------------------


def tree_to_json(value: Any) -> Any:
    """A state tree as JSON values: bytes become hex strings."""
    if isinstance(value, dict):
        return {k: tree_to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [tree_to_json(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return value


def tree_from_json(value: Any, path: str = "$") -> Any:
    """Inverse of :func:`tree_to_json`; raises DecodeError naming the path."""
    if isinstance(value, dict):
        return {k: tree_from_json(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [tree_from_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise DecodeError(f"buffer is not a hex string: {value[:40]!r}", None, path) from None
    if value is None or isinstance(value, (int, float)):
        return value
    raise DecodeError(f"unexpected JSON value {value!r}", None, path)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def event_to_record(ev: Event, sections: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The JSON record(s) of one event.  ``sections`` collects device descs for the vmdesc record."""
    if isinstance(ev, RamPages):
        out = []
        for start in range(0, ev.count, PAGES_PER_RECORD):
            n = min(PAGES_PER_RECORD, ev.count - start)
            data = b"".join(ev.page(i) for i in range(start, start + n))
            out.append({"t": "pages", "block": ev.block, "offset": ev.offset + start * ev.page_size, "count": n,
                        "named": ev.named and start == 0, "data": base64.b64encode(data).decode()})
        return out
    if isinstance(ev, RamZeros):
        rec: dict[str, Any] = {"t": "zeros", "block": ev.block, "offset": ev.offset, "count": ev.count,
                               "named": ev.named}
        if ev.fill is not None:
            rec["fill"] = ev.fill.hex()
        return [rec]
    if isinstance(ev, RamRecord):
        rec = {"t": "record", "flags": ev.flags, "offset": ev.offset}
        if ev.block:
            rec["block"] = ev.block
            rec["named"] = ev.named
        rec["payload"] = ev.payload.hex()
        return [rec]
    if isinstance(ev, RamEos):
        return [{"t": "eos"}]
    if isinstance(ev, RamMemSize):
        blocks = []
        for b in ev.blocks:
            entry: dict[str, Any] = {"name": b.name, "length": b.length}
            if b.page_size is not None:
                entry["page_size"] = b.page_size
            if b.gpa is not None:
                entry["gpa"] = b.gpa
            blocks.append(entry)
        return [{"t": "mem_size", "total": ev.total, "blocks": blocks}]
    if isinstance(ev, IterBegin):
        rec = {"t": "begin", "kind": SECTION_KIND_NAMES[ev.kind], "id": ev.section_id}
        if ev.kind in (SECTION_START, SECTION_FULL):
            rec.update(idstr=ev.idstr, instance=ev.instance_id, version=ev.version_id)
        return [rec]
    if isinstance(ev, IterEnd):
        return [{"t": "end", "id": ev.section_id, "footer": ev.footer}]
    if isinstance(ev, DeviceSection):
        if sections is not None:
            sections.append(ev.desc)
        return [{"t": "device", "id": ev.section_id, "idstr": ev.idstr, "instance": ev.instance_id,
                 "version": ev.version_id, "footer": ev.footer, "state": tree_to_json(ev.state), "desc": ev.desc}]
    if isinstance(ev, OpaqueSection):
        if sections is not None and ev.desc is not None:
            sections.append(ev.desc)
        rec = {"t": "opaque", "kind": SECTION_KIND_NAMES[ev.kind], "id": ev.section_id}
        if ev.kind in (SECTION_START, SECTION_FULL):
            rec.update(idstr=ev.idstr, instance=ev.instance_id, version=ev.version_id)
        rec.update(footer=ev.footer, body=ev.body.hex())
        if ev.desc is not None:
            rec["desc"] = ev.desc
        return [rec]
    if isinstance(ev, Header):
        return [{"t": "header", "version": ev.version}]
    if isinstance(ev, Configuration):
        return [{"t": "configuration", "state": tree_to_json(ev.state)}]
    if isinstance(ev, Command):
        rec = {"t": "command", "cmd": ev.cmd, "name": ev.name, "payload": ev.payload.hex()}
        if ev.packaged is not None:
            nested: list[dict[str, Any]] = []
            for sub in ev.packaged:
                nested.extend(event_to_record(sub, sections))
            rec["packaged"] = nested
        return [rec]
    if isinstance(ev, Eof):
        return [{"t": "eof"}]
    if isinstance(ev, Vmdesc):
        return [_vmdesc_record(ev.text, sections or [])]
    raise EncodeError(f"cannot encode {type(ev).__name__} as JSON")


def _vmdesc_record(text: bytes, sections: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("devices") == sections:
        slim = {k: (SECTIONS_PLACEHOLDER if k == "devices" else v) for k, v in obj.items()}
        if _rebuild_vmdesc(slim, sections) == text:
            return {"t": "vmdesc", "object": slim}
    return {"t": "vmdesc", "text": text.decode("latin-1")}


def _rebuild_vmdesc(slim: dict[str, Any], sections: list[dict[str, Any]]) -> bytes:
    return json.dumps({k: (sections if v == SECTIONS_PLACEHOLDER else v) for k, v in slim.items()}).encode()


def encode(events: Iterable[Event]) -> Iterator[bytes]:
    """Encode events as the JSON document, one record per line."""
    yield FIRST_LINE + b"\n"
    sections: list[dict[str, Any]] = []
    has_vmdesc = False
    pending: bytes | None = None
    for ev in events:
        has_vmdesc |= isinstance(ev, Vmdesc)
        for rec in event_to_record(ev, sections):
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
    state = _Decoder()
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
    for chunk in chunks:
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


def _field(rec: Any, key: str, kind: type | tuple[type, ...], path: str, default: Any = ...) -> Any:
    if not isinstance(rec, dict):
        raise DecodeError("expected an object", None, path)
    if key not in rec:
        if default is ...:
            raise DecodeError(f"missing {key!r}", None, path)
        return default
    v = rec[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise DecodeError(f"{key!r} should be {getattr(kind, '__name__', kind)}, got {type(v).__name__}", None,
                          f"{path}.{key}")
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        raise DecodeError(f"{key!r} is negative", None, f"{path}.{key}")
    return v


def _hex(rec: Any, key: str, path: str, default: Any = ...) -> bytes:
    v = _field(rec, key, str, path, default)
    if v is None or isinstance(v, bytes):
        return v
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise DecodeError(f"{key!r} is not hex", None, f"{path}.{key}") from None


def _kind(rec: Any, path: str) -> int:
    name = _field(rec, "kind", str, path)
    if name not in SECTION_KINDS:
        raise DecodeError(f"unknown section kind {name!r}", None, f"{path}.kind")
    return SECTION_KINDS[name]


class _Decoder:
    """Turns records back into events; tracks device descs for the vmdesc record."""

    def __init__(self) -> None:
        self.sections: list[dict[str, Any]] = []
        self.page_size = 4096
        self.seen_header = False

    def finish(self) -> None:
        if not self.seen_header:
            raise DecodeError("no header record", None, "$.records")

    def record(self, rec: Any, offset: int | None, path: str) -> Iterator[Event]:
        try:
            yield from self._record(rec, path)
        except DecodeError as e:
            if e.offset is None and offset is not None:
                e.offset = offset
            raise

    def _record(self, rec: Any, path: str) -> Iterator[Event]:
        t = _field(rec, "t", str, path)
        ps = self.page_size
        if t == "pages":
            count = _field(rec, "count", int, path)
            try:
                data = base64.b64decode(_field(rec, "data", str, path), validate=True)
            except (binascii.Error, ValueError):
                raise DecodeError("page data is not base64", None, f"{path}.data") from None
            if len(data) != count * ps:
                raise DecodeError(f"{len(data)} bytes of page data for {count} pages", None, f"{path}.data")
            yield RamPages(_field(rec, "block", str, path), _field(rec, "offset", int, path), count,
                           _field(rec, "named", bool, path), ps, data=data)
        elif t == "zeros":
            count = _field(rec, "count", int, path)
            fill = _hex(rec, "fill", path, None)
            if fill is not None and len(fill) != count:
                raise DecodeError(f"{len(fill)} fill bytes for {count} pages", None, f"{path}.fill")
            yield RamZeros(_field(rec, "block", str, path), _field(rec, "offset", int, path), count,
                           _field(rec, "named", bool, path), ps, fill)
        elif t == "record":
            yield RamRecord(_field(rec, "flags", int, path), _field(rec, "offset", int, path),
                            _field(rec, "block", str, path, ""), _field(rec, "named", bool, path, False),
                            _hex(rec, "payload", path))
        elif t == "eos":
            yield RamEos()
        elif t == "mem_size":
            blocks = []
            for i, b in enumerate(_field(rec, "blocks", list, path)):
                bp = f"{path}.blocks[{i}]"
                blocks.append(RamBlock(_field(b, "name", str, bp), _field(b, "length", int, bp),
                                       _field(b, "page_size", int, bp, None), _field(b, "gpa", int, bp, None)))
            yield RamMemSize(_field(rec, "total", int, path), blocks)
        elif t == "begin":
            kind = _kind(rec, path)
            if kind in (SECTION_START, SECTION_FULL):
                yield IterBegin(kind, _field(rec, "id", int, path), _field(rec, "idstr", str, path),
                                _field(rec, "instance", int, path), _field(rec, "version", int, path))
            else:
                yield IterBegin(kind, _field(rec, "id", int, path))
        elif t == "end":
            yield IterEnd(_field(rec, "id", int, path), _field(rec, "footer", bool, path))
        elif t == "device":
            yield self._device(rec, path)
        elif t == "opaque":
            kind = _kind(rec, path)
            desc = _field(rec, "desc", dict, path, None)
            if desc is not None:
                self.sections.append(desc)
            yield OpaqueSection(kind, _field(rec, "id", int, path), _field(rec, "idstr", str, path, ""),
                                _field(rec, "instance", int, path, 0), _field(rec, "version", int, path, 0),
                                _hex(rec, "body", path), _field(rec, "footer", bool, path), desc)
        elif t == "header":
            self.seen_header = True
            yield Header(_field(rec, "version", int, path))
        elif t == "configuration":
            state = tree_from_json(_field(rec, "state", dict, path), f"{path}.state")
            yield Configuration(state)
        elif t == "command":
            packaged = None
            if "packaged" in rec:
                packaged = []
                for i, sub in enumerate(_field(rec, "packaged", list, path)):
                    packaged.extend(self._record(sub, f"{path}.packaged[{i}]"))
            yield Command(_field(rec, "cmd", int, path), _hex(rec, "payload", path), packaged)
        elif t == "eof":
            yield Eof()
        elif t == "vmdesc":
            if "text" in rec:
                yield Vmdesc(_field(rec, "text", str, path).encode("latin-1"))
            else:
                yield Vmdesc(_rebuild_vmdesc(_field(rec, "object", dict, path), self.sections))
        else:
            raise DecodeError(f"unknown record type {t!r}", None, f"{path}.t")

    def _device(self, rec: Any, path: str) -> DeviceSection:
        desc = _field(rec, "desc", dict, path)
        try:
            schema = vmsd_from_desc(desc, f"{path}.desc", 0, old_style="size" in desc and "vmsd_name" not in desc)
        except SchemaError as e:
            raise DecodeError(f"bad schema: {e}", None, f"{path}.desc") from None
        self.sections.append(desc)
        state = tree_from_json(_field(rec, "state", dict, path), f"{path}.state")
        return DeviceSection(_field(rec, "id", int, path), _field(rec, "idstr", str, path),
                             _field(rec, "instance", int, path), _field(rec, "version", int, path), state, schema,
                             desc, _field(rec, "footer", bool, path))
