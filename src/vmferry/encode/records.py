"""Events <-> records: the codec-neutral mapping behind every record format.

A *record* is a dict of plain values (str keys; ints, bools, strings, bytes,
lists, dicts) that says what one event says; docs/json.md lists them.  The
JSON document, JSON lines, CBOR, MessagePack, ASN.1 and the structured
frames of ferry all use these records and differ only in how they spell
bytes (a :class:`Spelling`: hex and base64 strings in JSON, native byte
strings elsewhere) and in how they put records on the wire.

:class:`RecordEncoder` turns events into records, optionally with a schema
table (each device description sent once as a ``schema`` record, devices
referring to it by number).  :class:`RecordDecoder` turns records back into
events and accepts both spellings of a device's schema.  Both keep only
what the vmdesc record needs (the list of device descriptions), so memory
stays bounded by the stream's device state, never by its RAM.

Decoding raises only :class:`~vmferry.errors.DecodeError`, naming the
record's path (``$.records[12].state``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..errors import DecodeError, EncodeError, FerryError, SchemaError, TruncatedError
from ..events import (
    UnknownFrame,
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
from . import limits
from .configuration import CONFIGURATION_VMSD
from ..serialize.schema import Vmsd

PAGES_PER_RECORD = 256
DEFAULT_PAGE_SIZE = 4096
SECTIONS_PLACEHOLDER = "@sections"
STREAM_VERSION = 1
MAX_DEPTH = 64  # nesting of trees and schemas; QEMU's deepest is under 10


# ---------------------------------------------------------------------------
# Spellings of bytes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spelling:
    """How a format spells byte strings.

    ``blob``/``unblob`` for buffers in trees and small fields (payloads,
    bodies, fill bytes); ``bulk``/``unbulk`` for page data; ``native`` says
    whether the format has byte strings of its own (then strings never
    appear in trees).
    """

    name: str
    blob: Callable[[Any], Any]
    unblob: Callable[[Any], bytes]  # raises ValueError/TypeError on a bad spelling
    bulk: Callable[[Any], Any]
    unbulk: Callable[[Any], bytes]
    native: bool


def _hex_from(v: Any) -> bytes:
    if not isinstance(v, str):
        raise TypeError("expected a hex string")
    return bytes.fromhex(v)


def _b64_from(v: Any) -> bytes:
    if not isinstance(v, str):
        raise TypeError("expected a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from None


def _native_from(v: Any) -> bytes:
    if not isinstance(v, (bytes, bytearray)):
        raise TypeError("expected a byte string")
    return bytes(v)


def _bytes_of(v: Any) -> bytes:
    return v if type(v) is bytes else bytes(v)


JSON_TEXT = Spelling("json", lambda b: bytes(b).hex(), _hex_from, lambda b: base64.b64encode(b).decode(),
                     _b64_from, native=False)
# Native byte strings; page data may stay a memoryview (msgpack packs buffers as they are).
NATIVE = Spelling("native", _bytes_of, _native_from, lambda b: b, _native_from, native=True)
# Native, but every buffer a real ``bytes`` (cbor2 and asn1tools want bytes).
NATIVE_BYTES = Spelling("native-bytes", _bytes_of, _native_from, _bytes_of, _native_from, native=True)


# ---------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------


def tree_out(value: Any, sp: Spelling) -> Any:
    """A state tree spelt for a format: buffers through ``sp.blob``."""
    if isinstance(value, dict):
        return {k: tree_out(v, sp) for k, v in value.items()}
    if isinstance(value, list):
        return [tree_out(v, sp) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return sp.blob(value)
    return value


def tree_in(value: Any, sp: Spelling, path: str = "$", depth: int = 0, in_place: bool = False) -> Any:
    """Inverse of :func:`tree_out`, checking every value; raises DecodeError naming the path.

    ``in_place``: convert the containers of ``value`` themselves instead of copying them (a decoder's own
    record, which nobody else holds: its objects are not built twice)."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"tree nested deeper than {MAX_DEPTH}", None, path)
    if isinstance(value, dict):
        out = value if in_place else {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DecodeError(f"field name {k!r} is not a string", None, path)
            if v is None or type(v) is int or type(v) is bool:
                if not in_place:
                    out[k] = v
                continue
            out[k] = tree_in(v, sp, f"{path}.{k}", depth + 1, in_place)
        return out
    if isinstance(value, list):
        if not in_place:
            return [tree_in(v, sp, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        for i, v in enumerate(value):
            if not (v is None or type(v) is int or type(v) is bool):
                value[i] = tree_in(v, sp, f"{path}[{i}]", depth + 1, True)
        return value
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value
    if sp.native and isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not sp.native and isinstance(value, str):
        try:
            return sp.unblob(value)
        except (ValueError, TypeError):
            raise DecodeError(f"buffer is not a hex string: {value[:40]!r}", None, path) from None
    raise DecodeError(f"unexpected value of type {type(value).__name__} in a tree", None, path)


def plain_in(value: Any, path: str, depth: int = 0) -> Any:
    """Check a JSON-like value (a schema description, a vmdesc object): no bytes, no cycles, integers that
    every format can carry."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"value nested deeper than {MAX_DEPTH}", None, path)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise DecodeError(f"key {k!r} is not a string", None, path)
            plain_in(v, f"{path}.{k}", depth + 1)
        return value
    if isinstance(value, list):
        for i, v in enumerate(value):
            plain_in(v, f"{path}[{i}]", depth + 1)
        return value
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
        raise DecodeError(f"integer {value} does not fit 64 bits (MessagePack and ferry could not carry it)", None,
                          path)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise DecodeError(f"unexpected value of type {type(value).__name__}", None, path)


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1  # what every format spells (MessagePack's widest integers)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def stream_record(fmt: str) -> dict[str, Any]:
    """The first record of a record stream (``fmt`` is the codec name)."""
    return {"t": "stream", "format": f"vmferry-{fmt}", "version": STREAM_VERSION}


class RecordEncoder:
    """Events -> records for one stream.

    ``schema_table``: send each distinct device description once as a
    ``schema`` record and refer to it by number (``"schema": id``); without
    it every device record carries its ``desc`` (the JSON document's form).
    """

    def __init__(self, spelling: Spelling, schema_table: bool = False) -> None:
        self.sp = spelling
        self.schema_table = schema_table
        self.sections: list[dict[str, Any]] = []  # descs of device (and described opaque) records, in order
        self._schema_ids: dict[str, int] = {}

    def _desc(self, desc: dict[str, Any], rec: dict[str, Any], out: list[dict[str, Any]]) -> None:
        self.sections.append(desc)
        if not self.schema_table:
            rec["desc"] = desc
            return
        key = json.dumps(desc)
        sid = self._schema_ids.get(key)
        if sid is None:
            sid = self._schema_ids[key] = len(self._schema_ids)
            out.append({"t": "schema", "id": sid, "desc": desc})
        rec["schema"] = sid

    def records(self, ev: Any) -> list[dict[str, Any]]:
        """The record(s) of one event (schema records come before the device that needs them)."""
        sp = self.sp
        if isinstance(ev, RamPages):
            return list(self._pages(ev))
        if isinstance(ev, RamZeros):
            rec: dict[str, Any] = {"t": "zeros", "block": ev.block, "offset": ev.offset, "count": ev.count,
                                   "named": ev.named}
            if ev.page_size != DEFAULT_PAGE_SIZE:
                rec["page_size"] = ev.page_size
            if ev.fill is not None:
                rec["fill"] = sp.blob(ev.fill)
            return [rec]
        if isinstance(ev, RamRecord):
            rec = {"t": "record", "flags": ev.flags, "offset": ev.offset}
            if ev.block:
                rec["block"] = ev.block
                rec["named"] = ev.named
            rec["payload"] = sp.blob(ev.payload)
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
            out: list[dict[str, Any]] = []
            rec = {"t": "device", "id": ev.section_id, "idstr": ev.idstr, "instance": ev.instance_id,
                   "version": ev.version_id, "footer": ev.footer, "state": tree_out(ev.state, sp)}
            self._desc(ev.desc, rec, out)
            out.append(rec)
            return out
        if isinstance(ev, OpaqueSection):
            out = []
            rec = {"t": "opaque", "kind": SECTION_KIND_NAMES[ev.kind], "id": ev.section_id}
            if ev.kind in (SECTION_START, SECTION_FULL):
                rec.update(idstr=ev.idstr, instance=ev.instance_id, version=ev.version_id)
            rec.update(footer=ev.footer, body=sp.blob(ev.body))
            if ev.desc is not None:
                self._desc(ev.desc, rec, out)
            out.append(rec)
            return out
        if isinstance(ev, Header):
            return [{"t": "header", "version": ev.version}]
        if isinstance(ev, Configuration):
            return [{"t": "configuration", "state": tree_out(ev.state, sp)}]
        if isinstance(ev, Command):
            out = []
            rec = {"t": "command", "cmd": ev.cmd, "name": ev.name, "payload": sp.blob(ev.payload)}
            if ev.packaged is not None:
                nested: list[dict[str, Any]] = []
                for sub in ev.packaged:
                    for r in self.records(sub):
                        # schema records of nested devices go before the command itself
                        (out if r["t"] == "schema" else nested).append(r)
                rec["packaged"] = nested
            if ev.packaged_raw is not None:
                rec["packaged_raw"] = sp.blob(ev.packaged_raw)
            out.append(rec)
            return out
        if isinstance(ev, Eof):
            return [{"t": "eof"}]
        if isinstance(ev, Vmdesc):
            return [vmdesc_record(ev.text, self.sections)]
        if isinstance(ev, UnknownFrame):
            return [{"t": "frame", "type": ev.type, "flags": ev.flags, "body": sp.blob(ev.body)}]
        raise EncodeError(f"cannot encode {type(ev).__name__} as a record")

    def _pages(self, ev: RamPages) -> Iterator[dict[str, Any]]:
        ps = ev.page_size
        whole = memoryview(ev.data) if ev.data is not None else None
        for start in range(0, ev.count, PAGES_PER_RECORD):
            n = min(PAGES_PER_RECORD, ev.count - start)
            if whole is not None:
                data: Any = whole[start * ps:(start + n) * ps]
            else:
                data = b"".join([ev.page(i) for i in range(start, start + n)])
            rec = {"t": "pages", "block": ev.block, "offset": ev.offset + start * ps, "count": n,
                   "named": ev.named and start == 0}
            if ps != DEFAULT_PAGE_SIZE:
                rec["page_size"] = ps
            rec["data"] = self.sp.bulk(data)
            yield rec


def vmdesc_record(text: bytes, sections: list[dict[str, Any]]) -> dict[str, Any]:
    """The vmdesc record: ``object`` with the ``@sections`` placeholder when that rebuilds ``text`` exactly."""
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("devices") == sections:
        slim = {k: (SECTIONS_PLACEHOLDER if k == "devices" else v) for k, v in obj.items()}
        if rebuild_vmdesc(slim, sections) == text:
            return {"t": "vmdesc", "object": slim}
    return {"t": "vmdesc", "text": text.decode("latin-1")}


def rebuild_vmdesc(slim: dict[str, Any], sections: list[dict[str, Any]]) -> bytes:
    return json.dumps({k: (sections if v == SECTIONS_PLACEHOLDER else v) for k, v in slim.items()}).encode()


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def field(rec: Any, key: str, kind: type | tuple[type, ...], path: str, default: Any = ...) -> Any:
    """``rec[key]`` checked to be of ``kind`` (ints must not be negative or bools)."""
    if not isinstance(rec, dict):
        raise DecodeError("expected a record (a map)", None, path)
    if key not in rec:
        if default is ...:
            raise DecodeError(f"missing {key!r}", None, path)
        return default
    v = rec[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        want = getattr(kind, "__name__", None) or "/".join(k.__name__ for k in kind)  # type: ignore[union-attr]
        raise DecodeError(f"{key!r} should be {want}, got {type(v).__name__}", None, f"{path}.{key}")
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        raise DecodeError(f"{key!r} is negative", None, f"{path}.{key}")
    return v


def _kind(rec: Any, path: str) -> int:
    name = field(rec, "kind", str, path)
    if name not in SECTION_KINDS:
        raise DecodeError(f"unknown section kind {name!r}", None, f"{path}.kind")
    return SECTION_KINDS[name]


def _parse_desc(desc: Any, path: str) -> Vmsd:
    plain_in(desc, path)
    if not isinstance(desc, dict):
        raise DecodeError("a schema description must be a map", None, path)
    try:
        return vmsd_from_desc(desc, path, 0, old_style="size" in desc and "vmsd_name" not in desc)
    except SchemaError as e:
        raise DecodeError(f"bad schema: {e}", None, path) from None


class RecordDecoder:
    """Records -> events for one stream.

    Every event is checked with :func:`vmferry.encode.limits.check_event` and every tree with
    :func:`~vmferry.encode.limits.check_state` before it is handed out, so a decoded stream always encodes
    in any format (QEMU's included) and never makes a consumer allocate for a value the input merely states.
    """

    MAX_PAGE_SIZE = limits.MAX_PAGE_SIZE
    #: A vmdesc rebuilt from the device records (``"devices": "@sections"``) repeats a shared schema once per
    #: device; its text may be at most as long as the input read so far, or VMDESC_FLOOR bytes (QEMU's are
    #: ~100 KB; 255 vCPUs sharing one 15 KB description make 4 MB), since its consumers parse it again.
    VMDESC_EXPANSION = 1
    VMDESC_FLOOR = 4 << 20

    def __init__(self, spelling: Spelling) -> None:
        self.sp = spelling
        self.sections: list[dict[str, Any]] = []
        self.schemas: dict[int, tuple[dict[str, Any], Vmsd]] = {}
        self.seen_header = False
        self.block_lengths: dict[str, int] = {}  # from the MEM_SIZE records
        self._sections_text = 0  # what json.dumps(self.sections) would take, as the records come
        self._desc_text: dict[int, int] = {}  # id(desc) -> len(json.dumps(desc)), for descs shared by devices
        self._offset = 0
        self._end = 0  # where the record being decoded ends in the input (its start when unknown)
        self.retained = 0  # estimated memory of every tree and description decoded so far
        self.order = limits.StreamOrder()

    def check_run(self, block: str, offset: int, count: int, ps: int, path: str, at: int | None = None) -> None:
        """A run of pages must lie inside a RAM block the stream sized: a count read from the input can then
        never make a consumer (an encoder, a loader) write or allocate more than that block holds.  ``at`` is
        the input offset an error names."""
        try:
            limits.check_run(block, offset, count, ps, path)
        except DecodeError as e:
            e.offset = at
            raise
        length = self.block_lengths.get(block)
        if length is None:
            raise DecodeError(f"RAM pages of block {block!r}, which no MEM_SIZE record sized", at, path)
        if offset + count * ps > length:
            raise DecodeError(f"{count} pages at {offset:#x} do not fit block {block!r} ({length:#x} bytes)", at,
                              path)

    def finish(self, offset: int | None = None) -> None:
        if not self.seen_header:
            raise DecodeError("no header record", offset, "$.records")
        self.order.finish("$", offset)

    def sequence(self, ev: Event, path: str, at: int | None) -> None:
        """Check where ``ev`` (made by the caller, e.g. ferry's RAM frames) comes in the stream."""
        try:
            self.order.step(ev, path)
        except DecodeError as e:
            e.offset = at
            raise

    def record(self, rec: Any, offset: int | None, path: str, size: int = 0) -> Iterator[Event]:
        """The events of one record; errors carry ``offset`` (the record's place in the input); ``size`` is
        the record's length in the input, when the codec knows it."""
        if offset is not None:
            self._offset = offset
            self._end = max(self._end, offset + size)
        try:
            yield from self._checked(rec, path)
        except DecodeError as e:
            if e.offset is None and offset is not None:
                e.offset = offset
            raise

    def _checked(self, rec: Any, path: str, order: limits.StreamOrder | None = None) -> Iterator[Event]:
        order = order or self.order
        for ev in self._record(rec, path):
            limits.check_event(ev, path)
            order.step(ev, path)
            yield ev

    def _blob(self, rec: Any, key: str, path: str, default: Any = ...) -> Any:
        if not isinstance(rec, dict):
            raise DecodeError("expected a record (a map)", None, path)
        if key not in rec:
            if default is ...:
                raise DecodeError(f"missing {key!r}", None, path)
            return default
        try:
            return self.sp.unblob(rec[key])
        except (ValueError, TypeError) as e:
            raise DecodeError(f"{key!r}: {e}", None, f"{path}.{key}") from None

    def _page_size(self, rec: Any, path: str) -> int:
        ps = field(rec, "page_size", int, path, DEFAULT_PAGE_SIZE)
        limits.check_page_size(ps, f"{path}.page_size")
        return ps

    def _desc_of(self, rec: dict[str, Any], path: str, required: bool) -> tuple[dict[str, Any], Vmsd] | None:
        if "schema" in rec:
            sid = field(rec, "schema", int, path)
            if sid not in self.schemas:
                raise DecodeError(f"schema {sid} was never sent", None, f"{path}.schema")
            return self.schemas[sid]
        if "desc" in rec or required:
            desc = field(rec, "desc", dict, path)
            return desc, _parse_desc(desc, f"{path}.desc")
        return None

    def _section_desc(self, desc: dict[str, Any], path: str) -> None:
        """Keep a device's description for the vmdesc, bounding the text a rebuilt vmdesc would take."""
        size = self._desc_text.get(id(desc))
        if size is None:
            try:
                size = len(json.dumps(desc)) + 2
            except (ValueError, TypeError) as e:
                raise DecodeError(f"schema description: {e}", None, path) from None
            self._desc_text[id(desc)] = size
        self._sections_text += size
        self.sections.append(desc)

    def _retain(self, value: Any, path: str) -> None:
        """Count a tree or a description against what the input read so far may build (limits.COST_PER_BYTE):
        consumers may hold every one of them (``inspect --json``, the machine-type transforms)."""
        budget = limits.COST_PER_BYTE * self._end + limits.COST_SLACK
        self.retained += limits.value_cost(value, budget - self.retained)
        if self.retained > budget:
            raise DecodeError(f"the stream's device trees and descriptions would take over {budget} bytes of "
                              f"memory for {self._end} bytes of input", None, path)

    def _vmdesc_limit(self) -> int:

        return min(limits.MAX_VMDESC, max(self.VMDESC_FLOOR, self.VMDESC_EXPANSION * self._offset))

    def _record(self, rec: Any, path: str) -> Iterator[Event]:
        t = field(rec, "t", str, path)
        if t == "pages":
            ps = self._page_size(rec, path)
            count = field(rec, "count", int, path)
            if "data" not in rec:
                raise DecodeError("missing 'data'", None, path)
            try:
                data = self.sp.unbulk(rec["data"])
            except (ValueError, TypeError) as e:
                raise DecodeError(f"page data: {e}", None, f"{path}.data") from None
            if len(data) != count * ps or count == 0:
                raise DecodeError(f"{len(data)} bytes of page data for {count} pages", None, f"{path}.data")
            block, offset = field(rec, "block", str, path), field(rec, "offset", int, path)
            self.check_run(block, offset, count, ps, path)
            yield RamPages(block, offset, count, field(rec, "named", bool, path), ps, data=data)
        elif t == "zeros":
            ps = self._page_size(rec, path)
            count = field(rec, "count", int, path)
            if count <= 0:
                raise DecodeError("a run of zero pages", None, f"{path}.count")
            block, offset = field(rec, "block", str, path), field(rec, "offset", int, path)
            self.check_run(block, offset, count, ps, path)
            fill = self._blob(rec, "fill", path, None)
            if fill is not None and len(fill) != count:
                raise DecodeError(f"{len(fill)} fill bytes for {count} pages", None, f"{path}.fill")
            yield RamZeros(block, offset, count, field(rec, "named", bool, path), ps, fill)
        elif t == "record":
            yield RamRecord(field(rec, "flags", int, path), field(rec, "offset", int, path),
                            field(rec, "block", str, path, ""), field(rec, "named", bool, path, False),
                            self._blob(rec, "payload", path))
        elif t == "eos":
            yield RamEos()
        elif t == "mem_size":
            blocks = []
            for i, b in enumerate(field(rec, "blocks", list, path)):
                bp = f"{path}.blocks[{i}]"
                blocks.append(RamBlock(field(b, "name", str, bp), field(b, "length", int, bp),
                                       field(b, "page_size", int, bp, None), field(b, "gpa", int, bp, None)))
            ev = RamMemSize(field(rec, "total", int, path), blocks)
            limits.check_mem_size(ev, path)
            self.block_lengths.update((b.name, b.length) for b in blocks)
            yield ev
        elif t == "begin":
            kind = _kind(rec, path)
            if kind in (SECTION_START, SECTION_FULL):
                yield IterBegin(kind, field(rec, "id", int, path), field(rec, "idstr", str, path),
                                field(rec, "instance", int, path), field(rec, "version", int, path))
            else:
                yield IterBegin(kind, field(rec, "id", int, path))
        elif t == "end":
            yield IterEnd(field(rec, "id", int, path), field(rec, "footer", bool, path))
        elif t == "schema":
            sid = field(rec, "id", int, path)
            if sid in self.schemas:
                raise DecodeError(f"schema {sid} sent twice", None, f"{path}.id")
            desc = field(rec, "desc", dict, path)
            self._retain(desc, f"{path}.desc")
            self.schemas[sid] = (desc, _parse_desc(desc, f"{path}.desc"))
        elif t == "device":
            found = self._desc_of(rec, path, True)
            assert found is not None
            desc, schema = found
            version = field(rec, "version", int, path)
            if "desc" in rec:
                self._retain(desc, f"{path}.desc")
            state = tree_in(field(rec, "state", dict, path), self.sp, f"{path}.state", in_place=True)
            self._retain(state, f"{path}.state")
            limits.check_state(state, schema, version, f"{path}.state")
            self._section_desc(desc, path)
            yield DeviceSection(field(rec, "id", int, path), field(rec, "idstr", str, path),
                                field(rec, "instance", int, path), version, state, schema, desc,
                                field(rec, "footer", bool, path))
        elif t == "opaque":
            kind = _kind(rec, path)
            found = self._desc_of(rec, path, False)
            desc_or_none = found[0] if found is not None else None
            if desc_or_none is not None:
                if "desc" in rec:
                    self._retain(desc_or_none, f"{path}.desc")
                self._section_desc(desc_or_none, path)
            yield OpaqueSection(kind, field(rec, "id", int, path), field(rec, "idstr", str, path, ""),
                                field(rec, "instance", int, path, 0), field(rec, "version", int, path, 0),
                                self._blob(rec, "body", path), field(rec, "footer", bool, path), desc_or_none)
        elif t == "header":
            self.seen_header = True
            yield Header(field(rec, "version", int, path))
        elif t == "configuration":
            state = tree_in(field(rec, "state", dict, path), self.sp, f"{path}.state", in_place=True)
            self._retain(state, f"{path}.state")
            limits.check_state(state, CONFIGURATION_VMSD, 1, f"{path}.state")
            yield Configuration(state)
        elif t == "command":
            packaged: list[Event] | None = None
            if "packaged" in rec:
                packaged = []
                inner = limits.StreamOrder(nested=True, started=self.order.started)
                for i, sub in enumerate(field(rec, "packaged", list, path)):
                    sp = f"{path}.packaged[{i}]"
                    if field(sub, "t", str, sp) in ("stream", "fin", "header", "vmdesc", "eof", "schema",
                                                    "configuration", "frame"):
                        raise DecodeError("record not allowed inside a PACKAGED command", None, sp)
                    packaged.extend(self._checked(sub, sp, inner))
                inner.finish(f"{path}.packaged")
            raw = self._blob(rec, "packaged_raw", path) if "packaged_raw" in rec else None
            yield Command(field(rec, "cmd", int, path), self._blob(rec, "payload", path), packaged, raw)
        elif t == "eof":
            yield Eof()
        elif t == "vmdesc":
            if "text" in rec:
                try:
                    yield Vmdesc(field(rec, "text", str, path).encode("latin-1"))
                except UnicodeEncodeError:
                    raise DecodeError("vmdesc text is not latin-1", None, f"{path}.text") from None
            else:
                slim = plain_in(field(rec, "object", dict, path), f"{path}.object")
                self._retain(slim, f"{path}.object")
                limit = self._vmdesc_limit()
                if self._sections_text > limit:
                    raise DecodeError(f"the vmdesc rebuilt from {len(self.sections)} device records would take "
                                      f"{self._sections_text} bytes, over {limit} (the input read so far: "
                                      f"{self._offset})", None, f"{path}.object")
                try:
                    text = rebuild_vmdesc(slim, self.sections)
                except ValueError as e:
                    raise DecodeError(f"vmdesc object: {e}", None, f"{path}.object") from None
                if len(text) > limit:
                    raise DecodeError(f"vmdesc object of {len(text)} bytes, over {limit}", None, f"{path}.object")
                yield Vmdesc(text)
        elif t == "frame":
            ftype = field(rec, "type", int, path)
            flags = field(rec, "flags", int, path)
            if ftype > 0xFF or flags > 0xFF:
                raise DecodeError("frame type and flags are bytes", None, path)
            yield UnknownFrame(ftype, flags, self._blob(rec, "body", path))  # type: ignore[misc]
        else:
            raise DecodeError(f"unknown record type {t!r}", None, f"{path}.t")


# ---------------------------------------------------------------------------
# Record streams: a first "stream" record, the records, a last "fin" record
# ---------------------------------------------------------------------------

PIECE = 4 << 20


def pieces(chunks: Iterable[Any], size: int = PIECE) -> Iterator[memoryview]:
    """The input in views of at most ``size`` bytes (a mapped 32 MiB window is not copied whole)."""
    for chunk in chunks:
        view = memoryview(chunk)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        for i in range(0, len(view), size):
            yield view[i:i + size]


def regrouped(events: Iterable[Event]) -> Iterator[Event]:
    """``events`` with page runs cut every :data:`PAGES_PER_RECORD` pages however the decoder cut them
    (:mod:`vmferry.encode.runs`), so that a file and a pipe give the same records."""
    from .runs import PageGroup, regroup

    for ev in regroup(events, PAGES_PER_RECORD):
        yield ev.as_event() if isinstance(ev, PageGroup) else ev


def encode_records(events: Iterable[Event], fmt: str, spelling: Spelling) -> Iterator[dict[str, Any]]:
    """The records of a record stream: ``stream``, the events' records (schema table on), ``fin``."""
    enc = RecordEncoder(spelling, schema_table=True)
    yield stream_record(fmt)
    n = 0
    for ev in regrouped(events):
        for rec in enc.records(ev):
            n += 1
            yield rec
    yield {"t": "fin", "records": n}


class RecordStreamDecoder:
    """Checks the framing records of a record stream and decodes the others into events."""

    def __init__(self, fmt: str, spelling: Spelling) -> None:
        self.fmt = fmt
        self.dec = RecordDecoder(spelling)
        self.index = -1  # records seen, the stream record being -1... then 0, 1, ...
        self.done = False

    def record(self, rec: Any, offset: int | None, size: int = 0) -> Iterator[Event]:
        if self.done:
            raise DecodeError("data after the fin record", offset, "$")
        if self.index < 0:
            path = "$.stream"
            if not isinstance(rec, dict) or rec.get("t") != "stream":
                raise DecodeError(f"not a vmferry-{self.fmt} stream (no stream record first)", offset, path)
            if rec.get("format") != f"vmferry-{self.fmt}":
                raise DecodeError(f"stream record names format {rec.get('format')!r}, expected "
                                  f"'vmferry-{self.fmt}'", offset, path)
            if rec.get("version") != STREAM_VERSION:
                raise DecodeError(f"unsupported vmferry-{self.fmt} version {rec.get('version')!r} "
                                  f"(this reader knows {STREAM_VERSION})", offset, path)
            self.index = 0
            return
        path = f"$.records[{self.index}]"
        if isinstance(rec, dict) and rec.get("t") == "fin":
            try:
                n = field(rec, "records", int, path)
            except DecodeError as e:
                e.offset = offset
                raise
            if n != self.index:
                raise DecodeError(f"fin record counts {n} records, the stream had {self.index}", offset, path)
            self.done = True
            return
        self.index += 1
        yield from self.dec.record(rec, offset, path, size)

    def finish(self, offset: int | None) -> None:
        if self.index < 0:
            raise DecodeError("empty stream", offset, "$")
        if not self.done:
            raise TruncatedError(f"the stream ends after {self.index} records without its fin record (truncated?)",
                                 offset, "$")
        self.dec.finish(offset)


#: The longest record a binary record stream (CBOR, MessagePack) may hold.
MAX_RECORD = 64 << 20


def walked_records(chunks: Iterable[Any], stream: RecordStreamDecoder, scanner: Callable[[int], Any],
                   build: Callable[[memoryview], Any], label: str, *, prefix: bytes = b"") -> Iterator[Event]:
    """The events of a stream of self-delimiting binary records, each walked before it is built.

    ``scanner(start)`` gives an object whose ``walk(buf, base)`` finds the end of the record at ``start``
    (None: more input needed) and counts in ``cost`` the objects it would build; a record is built by
    ``build`` (the format library) only when that cost fits :func:`vmferry.encode.limits.record_budget`.
    ``prefix`` may stand before the first record (CBOR's self-described tag).  Consumed input is dropped
    every :data:`PIECE` bytes.  Raises only :class:`DecodeError`, naming the record's offset; ``label``
    names the format in it.
    """
    buf = bytearray()
    base = 0  # absolute offset of buf[0]
    start = 0  # where the next record starts in buf
    scan: Any = None
    look_for_prefix = bool(prefix)
    try:
        for chunk in pieces(chunks):
            buf += chunk
            if look_for_prefix:
                if len(buf) < len(prefix) and prefix.startswith(bytes(buf)):
                    continue
                if buf.startswith(prefix):
                    start = len(prefix)
                look_for_prefix = False
            while start < len(buf):
                if scan is None:
                    scan = scanner(start)
                end = scan.walk(buf, base)
                if end is None:
                    if len(buf) - start > MAX_RECORD:
                        raise DecodeError(f"a record longer than {MAX_RECORD} bytes", base + start, "$")
                    break
                if scan.cost > limits.record_budget(end - start):
                    raise DecodeError(f"a record of {end - start} bytes that would build about {scan.cost} bytes "
                                      "of Python objects (what only a hostile input does)", base + start, "$")
                scan = None
                rec = build(memoryview(buf)[start:end])
                yield from stream.record(rec, base + start, end - start)
                start = end
            if start and (start == len(buf) or start > PIECE):
                del buf[:start]
                base += start
                if scan is not None:
                    scan.start -= start
                    scan.pos -= start
                start = 0
        if start != len(buf):
            raise TruncatedError(f"the stream ends inside a record ({len(buf) - start} bytes of it arrived)",
                                 base + start, "$")
        stream.finish(base + start)
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), base + start, "$") from None
    except Exception as e:  # noqa: BLE001 - the format libraries raise many types
        raise DecodeError(f"malformed {label} ({type(e).__name__}: {e})", base + start, "$") from None
