"""QEMU's own savevm/migration stream, byte for byte (spec §0-§6).

:func:`decode` turns an iterable of byte chunks into events;
:func:`encode` turns events back into chunks.  Decoding then encoding a
stream QEMU wrote gives back the same bytes.

Device sections (FULL) need a schema.  It comes from the ``schemas``
argument (a vmdesc found by the caller at the end of a seekable file, or a
``--schema`` file), or from the stream itself: when the decoder meets a
device section before it has schemas, it buffers the rest of the stream
(device sections, EOF and the vmdesc are small) and reads the vmdesc at its
end.  RAM is never buffered: page runs are handed out as views of the input
chunks.

Whatever the bytes, :func:`decode` raises only
:class:`~vmferry.errors.DecodeError` (with offset and path).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from ..caps import Cap
from ..errors import DecodeError, EncodeError, FerryError, SchemaError, TruncatedError
from ..events import (
    CMD_PACKAGED,
    COMMAND,
    CONFIGURATION,
    EOF_TYPE,
    QEMU_VM_FILE_MAGIC,
    RAM_COMPRESS_PAGE,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_HOOK,
    RAM_MEM_SIZE,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_XBZRLE,
    RAM_ZERO,
    SECTION_END,
    SECTION_FOOTER,
    SECTION_FULL,
    SECTION_KIND_NAMES,
    SECTION_PART,
    SECTION_START,
    VMDESCRIPTION,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Flush,
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
from ..serialize.drive import visit_vmsd
from ..serialize.qemu_vmdesc import load_json, schemas_from_vmdesc
from ..serialize.schema import SchemaSet, Vmsd
from ..serialize.visitor import LegacyReader, LegacyWriter
from .configuration import CONFIGURATION_VMSD
from . import limits
from .limits import MAX_GUEST_RAM, MAX_VMDESC, check_event, check_page_size
from .scan import leading_pages, leading_zeros, zero_records
from .window import Window

NAME = "legacy"
CAP = Cap.NONE  # QEMU's own stream: what a peer with mask 0 speaks
MAGIC = b"QEVM"

BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")

RAM_IDSTR = "ram"
RAM_VERSION = 4
MAX_BUFFERED_TAIL = 256 << 20  # device sections + vmdesc held while waiting for the vmdesc
MAX_SECTION = 64 << 20  # largest VMState body we are willing to buffer
MAX_PACKAGED = 256 << 20


_RECORD_TYPES = (SECTION_START, SECTION_PART, SECTION_END, SECTION_FULL, COMMAND, EOF_TYPE)


def sniff(head: bytes) -> bool:
    return head[:4] == MAGIC


@dataclass
class DecodeOptions:
    """What the decoder cannot learn from the stream itself."""

    schemas: SchemaSet | None = None  # schemas to use instead of the stream's own vmdesc
    fallback_schemas: SchemaSet | None = None  # schemas for a stream that turns out to have no vmdesc
    page_size: int = 4096  # target page size (x86: 4096); a vmdesc's page_size wins
    chunk_hint: int = 1 << 22
    # A live migration may pause without ending: the device sections inside a postcopy PACKAGED command are read
    # with the schemas given (``schemas``, else ``fallback_schemas``), or kept raw, never by waiting for a vmdesc
    # (postcopy sends none).
    live: bool = False


@dataclass
class _RamState:
    """What RAM records depend on from earlier in the stream."""

    block: str | None = None  # block of the previous page record (CONTINUE)
    ignore_shared: bool = False  # configuration announced x-ignore-shared: GPA per block
    postcopy_psize: int | None = None  # POSTCOPY_ADVISE pagesize summary, when sent
    mapped_ram: bool = False  # configuration announced mapped-ram (QEMU >= 9.0): not supported


@dataclass
class _State:
    opts: DecodeOptions
    schemas: SchemaSet | None
    page_size: int
    ram: _RamState = field(default_factory=_RamState)
    handlers: dict[int, str] = field(default_factory=dict)  # section id -> idstr (START/FULL seen)
    tail_loaded: bool = False
    footers: bool | None = None  # whether this stream's sections end with footers, once known
    retained: int = 0  # estimated memory of every tree decoded so far (limits.COST_PER_BYTE)


def find_vmdesc(tail: bytes | memoryview, tail_offset: int = 0) -> tuple[int, bytes] | None:
    """Locate the vmdesc at the end of ``tail`` (the last bytes of a stream), spec §4.7.

    Returns (absolute offset of the 0x06 byte, JSON bytes) or None.
    """
    view = memoryview(tail)
    n = len(view)
    p = bytes(view).rfind(b"\x06", 0, n)
    data = bytes(view)
    while p >= 0:
        if p + 6 <= n and data[p + 5:p + 6] == b"{" and BE32.unpack_from(data, p + 1)[0] == n - p - 5:
            return tail_offset + p, data[p + 5:]
        p = data.rfind(b"\x06", 0, p)
    return None


def parse_vmdesc(text: bytes, offset: int | None = None) -> SchemaSet:
    cost = limits.json_cost(text)
    if cost > limits.VMDESC_COST_PER_BYTE * len(text) + limits.COST_SLACK:
        raise DecodeError(f"a {len(text)}-byte vmdesc that may build about {cost} bytes of Python objects (QEMU's "
                          f"take under {limits.VMDESC_COST_PER_BYTE} per byte)", offset, "$.vmdesc")
    try:
        return schemas_from_vmdesc(load_json(text, "vmdesc"), "vmdesc")
    except SchemaError as e:
        raise DecodeError(f"bad vmdesc: {e}", offset, "$.vmdesc") from None


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: DecodeOptions | None = None) -> Iterator[Event]:
    """Decode a QEMU stream.  Raises only :class:`DecodeError`."""
    opts = options or DecodeOptions()
    w = Window(chunks)
    st = _State(opts, opts.schemas, opts.schemas.page_size if opts.schemas else opts.page_size)
    try:
        yield from _decode_stream(w, st)
    except FerryError as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(str(e), w.offset, "$") from None
    except (ValueError, IndexError, KeyError, struct.error, UnicodeError, OverflowError, RecursionError) as e:
        # A bug's last line of defence: hostile bytes must never escape as another exception.
        raise DecodeError(f"malformed input ({type(e).__name__}: {e})", w.offset, "$") from None


def _u8(w: Window, what: str) -> int:
    w.need(1, what)
    b = w.buf[w.pos]
    w.pos += 1
    return b


def _uint(w: Window, codec: struct.Struct, what: str) -> int:
    """The next big-endian unsigned integer of ``codec``'s size, consumed."""
    w.need(codec.size, what)
    (v,) = codec.unpack_from(w.buf, w.pos)
    w.pos += codec.size
    return v


def _be16(w: Window, what: str) -> int:
    return _uint(w, BE16, what)


def _be32(w: Window, what: str) -> int:
    return _uint(w, BE32, what)


def _be64(w: Window, what: str) -> int:
    return _uint(w, BE64, what)


def _cstr(w: Window, what: str) -> str:
    n = _u8(w, what)
    return bytes(w.take(n, what)).decode("latin-1")


def _decode_stream(w: Window, st: _State) -> Iterator[Event]:
    w.path = "$.header"
    w.need(8, "header")
    magic, version = struct.unpack_from(">II", w.buf, w.pos)
    if magic != QEMU_VM_FILE_MAGIC:
        raise DecodeError(f"not a QEMU migration stream (magic {magic:#010x}, expected 0x5145564d 'QEVM')", w.offset,
                          "$.header")
    if version != 3:
        raise DecodeError(f"unsupported stream version {version} (only 3 is supported)", w.offset + 4, "$.header")
    w.pos += 8
    yield Header(version)

    first = True
    while True:
        w.path = "$"
        if w.idle():
            yield Flush()
        start = w.offset
        t = _u8(w, "record type")
        if t == CONFIGURATION and first:
            w.path = "$.configuration"
            yield _decode_configuration(w, st)
        elif t in (SECTION_START, SECTION_FULL, SECTION_PART, SECTION_END):
            yield from _decode_section(w, st, t, start)
        elif t == COMMAND:
            yield _decode_command(w, st)
        elif t == EOF_TYPE:
            yield Eof()
            yield from _decode_trailer(w, st)
            return
        else:
            raise DecodeError(f"unknown record type {t:#04x}", start, "$")
        first = False


def _decode_configuration(w: Window, st: _State) -> Configuration:
    start = w.offset
    state = _read_vmstate(w, CONFIGURATION_VMSD, 1, "$.configuration", st)
    _checked(Configuration(state), start, "$.configuration")
    caps = [bytes(c) for c in state.get("configuration/capabilities", {}).get("capabilities", [])]
    st.ram.ignore_shared = b"x-ignore-shared" in caps
    st.ram.mapped_ram = b"mapped-ram" in caps
    return Configuration(state)


class _BoundedReader(LegacyReader):
    """A LegacyReader that counts the objects of the tree it builds (vmferry.encode.limits costs) and stops
    past ``COST_PER_BYTE`` per byte read (and ``COST_SLACK``): a vmdesc may describe a million one-byte
    structs, which one megabyte of input then fills with a million dicts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = self.pos
        self.cost = 0

    def _spend(self, n: int) -> None:
        self.cost += n
        if self.cost > limits.COST_PER_BYTE * (self.pos - self.start) + limits.COST_SLACK:
            raise DecodeError(f"the section's tree would take over {self.cost} bytes of memory for its "
                              f"{self.pos - self.start} bytes (what only a hostile schema and input do)",
                              self.base + self.pos, self.path)

    def integer(self, name: str, value: int, type_name: str) -> int:
        out = super().integer(name, value, type_name)
        if not -5 <= out <= 256:
            self._spend(limits.COST_SCALAR)
        return out

    def buffer(self, name: str, value: bytes | None, size: int, type_name: str = "buffer") -> bytes:
        out = super().buffer(name, value, size, type_name)
        self._spend(limits.COST_BYTES + size)
        return out

    def struct(self, name, value, fn, vmsd_name, version, type_name="struct"):  # type: ignore[no-untyped-def]
        out = super().struct(name, value, fn, vmsd_name, version, type_name)
        self._spend(limits.container_cost(True, len(out) if isinstance(out, dict) else 0))
        return out

    def array(self, name, values, count, fn, compressible=True):  # type: ignore[no-untyped-def]
        self._spend(limits.COST_LIST)

        def element(v: Any, elem: str, item: Any) -> Any:
            out = fn(v, elem, item)
            self._spend(8)  # its slot in the list
            return out

        return super().array(name, values, count, element, compressible)

    def subsection(self, name, version, needed, fn, value):  # type: ignore[no-untyped-def]
        out = super().subsection(name, version, needed, fn, value)
        if out is not None:
            self._spend(limits.container_cost(True, len(out) if isinstance(out, dict) else 0))
        return out


def _read_vmstate(w: Window, vmsd: Vmsd, version: int, path: str, st: _State | None = None) -> dict[str, Any]:
    """Decode one VMState body at the window position, pulling more input until it fits.

    It asks for no byte beyond the body's own and the one after it (a subsection marker or not): a live
    source may send the rest only once the destination has answered (multifd's sync waits for the main
    channel's records to be loaded), so reading ahead could wait forever.  The trees a stream holds stay
    bounded too (``st.retained``): consumers may keep them all."""
    w.fill(1)
    while True:
        reader = _BoundedReader(w.view, w.pos, len(w.buf), w.base, more_follows=not w.eof)
        reader._path = [path]
        try:
            state = visit_vmsd(reader, vmsd, None, version)
        except TruncatedError:
            if w.eof or w.available >= MAX_SECTION:
                raise
            w.grow()  # at the end of the input, the next try knows that nothing follows
            continue
        w.pos = reader.pos
        if st is not None:
            st.retained += reader.cost
            budget = limits.COST_PER_BYTE * w.offset + limits.COST_SLACK
            if st.retained > budget:
                raise DecodeError(f"the stream's device trees would take over {budget} bytes of memory for its "
                                  f"{w.offset} bytes", w.offset, path)
        return state


def _decode_footer(w: Window, section_id: int, idstr: str) -> bool:
    """Consume a footer if one follows; return whether it did."""
    if not w.fill(1) or w.buf[w.pos] != SECTION_FOOTER:
        return False
    w.need(5, "section footer")
    (fid,) = BE32.unpack_from(w.buf, w.pos + 1)
    if fid != section_id:
        raise DecodeError(f"footer of section {idstr!r} has id {fid}, expected {section_id}", w.offset, w.path)
    w.pos += 5
    return True


def _decode_section(w: Window, st: _State, kind: int, start: int) -> Iterator[Event]:
    kind_name = SECTION_KIND_NAMES[kind]
    section_id = _be32(w, "section id")
    if kind in (SECTION_START, SECTION_FULL):
        idstr = _cstr(w, "section idstr")
        instance_id = _be32(w, "instance id")
        version_id = _be32(w, "version id")
        st.handlers[section_id] = idstr
    else:
        if section_id not in st.handlers:
            raise DecodeError(f"{kind_name} of section id {section_id} that was never started", start, "$")
        idstr = st.handlers[section_id]
        instance_id = version_id = 0
    w.path = f"$.{idstr}" if instance_id == 0 else f"$.{idstr}[{instance_id}]"

    if idstr == RAM_IDSTR:
        if kind in (SECTION_START, SECTION_FULL) and version_id != RAM_VERSION:
            raise DecodeError(f"ram section version {version_id}, expected {RAM_VERSION}", start, w.path)
        yield IterBegin(kind, section_id, idstr, instance_id, version_id)
        yield from _decode_ram(w, st)
        if w.idle():
            # A live source may send the footer only once the destination has loaded the section (multifd's
            # sync after EOS): the writers must not hold the section back waiting for it.
            yield Flush()
        footer = _decode_footer(w, section_id, idstr)
        if st.footers and not footer:
            raise DecodeError(f"section {idstr!r} lacks its footer", w.offset, w.path)
        st.footers = footer
        yield IterEnd(section_id, footer)
        return
    if kind != SECTION_FULL:
        raise DecodeError(f"iterative section {idstr!r} is not supported (only 'ram' is)", start, w.path)

    found = st.schemas.lookup(idstr, instance_id) if st.schemas is not None else None
    if found is None and st.schemas is None and not st.tail_loaded:
        # The vmdesc, if any, is at the very end: hold the rest of the stream and read it.
        st.tail_loaded = True
        _load_trailing_vmdesc(w, st, idstr, instance_id)
        found = st.schemas.lookup(idstr, instance_id) if st.schemas is not None else None
    if found is None and st.schemas is not None:
        vmsd = st.schemas.by_vmsd_name.get(idstr.rsplit("/", 1)[-1])
        if vmsd is not None:
            found = (vmsd, {})
    if found is None:
        where = "the stream has no vmdesc; pass --schema FILE" if st.schemas is None else \
            f"the schema ({st.schemas.origin}) does not describe it"
        raise DecodeError(f"no schema for section {idstr!r} instance {instance_id}: {where}", start, w.path)
    vmsd, desc = found
    body_start = w.offset
    state = _read_vmstate(w, vmsd, version_id, w.path, st)
    size = w.offset - body_start
    footer = _decode_footer(w, section_id, idstr)
    if not footer and (st.footers or w.fill(1) and w.buf[w.pos] not in _RECORD_TYPES):
        nxt = f"{w.buf[w.pos]:#04x}" if w.fill(1) else "the end of the stream"
        raise DecodeError(f"section {idstr!r} does not end where its schema ({vmsd.name!r}) says: expected "
                          f"{'its footer' if st.footers else 'a record'}, found {nxt}", w.offset, w.path)
    st.footers = footer
    if not desc:
        from ..serialize.describe import describe_section  # a schema without vmdesc entry: describe it

        desc = describe_section(vmsd, state, idstr, instance_id, version_id)
    yield DeviceSection(section_id, idstr, instance_id, version_id, state, vmsd, desc, footer, size)


def _ends_with_vmdesc(data: bytes) -> bool:
    """Whether ``data`` ends with EOF and a complete vmdesc: a live source that waits for the destination's
    answer on its return path stops there without closing the stream."""
    found = find_vmdesc(data)
    if found is None or found[0] == 0 or data[found[0] - 1] != EOF_TYPE:
        return False
    try:
        load_json(found[1], "vmdesc")
    except SchemaError:
        return False
    return True


def _load_trailing_vmdesc(w: Window, st: _State, idstr: str, instance_id: int) -> None:
    w.read_all(MAX_BUFFERED_TAIL, f"waiting for the vmdesc to decode section {idstr!r}", _ends_with_vmdesc)
    found = find_vmdesc(w.view[w.pos:], w.offset)
    if found is None:
        st.schemas = st.opts.fallback_schemas
        return
    offset, text = found
    st.schemas = parse_vmdesc(text, offset)
    st.page_size = st.schemas.page_size


def _decode_command(w: Window, st: _State) -> Command:
    w.path = "$.command"
    cmd = _be16(w, "command")
    n = _be16(w, "command length")
    payload = bytes(w.take(n, "command payload"))
    if cmd == 3 and n == 16:  # POSTCOPY_ADVISE: pagesize summary, target page size
        st.ram.postcopy_psize = BE64.unpack_from(payload, 0)[0]
    if cmd != CMD_PACKAGED:
        return Command(cmd, payload)
    if n != 4:
        raise DecodeError(f"PACKAGED command with a {n}-byte payload, expected 4", w.offset - n, w.path)
    (length,) = BE32.unpack(payload)
    if length > MAX_PACKAGED:
        raise DecodeError(f"PACKAGED blob of {length} bytes exceeds {MAX_PACKAGED}", w.offset, w.path)
    base = w.offset
    blob = bytes(w.take(length, "packaged records"))
    if st.opts.live and st.schemas is None:
        if st.opts.fallback_schemas is None:
            return Command(cmd, payload, None, blob)
        st.schemas = st.opts.fallback_schemas
    return Command(cmd, payload, _decode_packaged(blob, st, base))


def _decode_packaged(blob: bytes, st: _State, base: int) -> list[Event]:
    inner = Window([blob], "$.packaged")
    inner.base = base
    nested: list[Event] = []
    while not inner.at_end():
        start = inner.offset
        t = _u8(inner, "record type")
        if t in (SECTION_START, SECTION_FULL, SECTION_PART, SECTION_END):
            nested.extend(_decode_section(inner, st, t, start))
        elif t == COMMAND:
            nested.append(_decode_command(inner, st))
        else:
            raise DecodeError(f"record type {t:#04x} inside a PACKAGED command", start, "$.packaged")
    return nested


def unpack(ev: Command, schemas: SchemaSet) -> Command:
    """A PACKAGED command kept raw (``packaged_raw``), its records decoded with ``schemas``."""
    if ev.packaged_raw is None:
        return ev
    st = _State(DecodeOptions(schemas=schemas), schemas, schemas.page_size)
    try:
        return Command(ev.cmd, ev.payload, _decode_packaged(ev.packaged_raw, st, 0))
    except (ValueError, IndexError, KeyError, struct.error, UnicodeError, OverflowError, RecursionError) as e:
        raise DecodeError(f"malformed PACKAGED records ({type(e).__name__}: {e})", None, "$.packaged") from None


def _decode_trailer(w: Window, st: _State) -> Iterator[Event]:
    # A live source that waits for its return path sends nothing after the vmdesc, nor closes the stream:
    # what is not there when the input pauses is not coming.
    if w.idle() or w.at_end():
        return
    w.path = "$.vmdesc"
    start = w.offset
    t = _u8(w, "vmdesc")
    if t != VMDESCRIPTION:
        raise DecodeError(f"expected the vmdesc (0x06) or the end after EOF, got {t:#04x}", start, w.path)
    n = _be32(w, "vmdesc length")
    if n > MAX_VMDESC:
        raise DecodeError(f"vmdesc of {n} bytes exceeds the {MAX_VMDESC}-byte limit", start + 1, w.path)
    text = bytes(w.take(n, "vmdesc"))
    if not w.idle() and not w.at_end():
        raise DecodeError("unexpected bytes after the vmdesc", w.offset, w.path)
    yield Vmdesc(text)


# --- RAM -------------------------------------------------------------------


def _decode_ram(w: Window, st: _State) -> Iterator[Event]:
    ps = st.page_size
    _checked_page_size(ps, w)
    mask = ps - 1
    ram = st.ram
    while True:
        if w.idle():
            yield Flush()
        w.need(8, "ram record")
        (addr,) = BE64.unpack_from(w.buf, w.pos)
        flags = addr & mask
        offset = addr & ~mask
        kind = flags & ~RAM_CONTINUE
        if kind == RAM_EOS:
            if flags != RAM_EOS or offset:
                raise DecodeError(f"malformed EOS record {addr:#x}", w.offset, w.path)
            w.pos += 8
            yield RamEos()
            return
        if kind == RAM_PAGE or kind == RAM_ZERO:
            yield _decode_page_run(w, st, addr, ps)
        elif kind == RAM_MEM_SIZE:
            w.pos += 8
            yield _decode_mem_size(w, ram, offset)
        elif kind in (RAM_XBZRLE, RAM_COMPRESS_PAGE):
            w.pos += 8
            named, block = _record_block(w, ram, flags)
            if kind == RAM_XBZRLE:
                enc = _u8(w, "xbzrle encoding")
                n = _be16(w, "xbzrle length")
                if n > ps:
                    raise DecodeError(f"XBZRLE payload of {n} bytes exceeds the page size", w.offset - 2, w.path)
                payload = bytes([enc]) + BE16.pack(n) + bytes(w.take(n, "xbzrle data"))
            else:
                n = _be32(w, "compressed length")
                if n > 2 * ps + 64:
                    raise DecodeError(f"compressed page of {n} bytes is implausibly large", w.offset - 4, w.path)
                payload = BE32.pack(n) + bytes(w.take(n, "compressed page"))
            yield RamRecord(flags, offset, block, named, payload)
        elif kind in (RAM_MULTIFD_FLUSH, RAM_HOOK) and not flags & RAM_CONTINUE:
            w.pos += 8
            yield RamRecord(flags, offset)
        else:
            raise DecodeError(f"unknown RAM record flags {flags:#x}", w.offset, w.path)


def _record_block(w: Window, ram: _RamState, flags: int) -> tuple[bool, str]:
    if flags & RAM_CONTINUE:
        if ram.block is None:
            raise DecodeError("RAM record continues a block, but no block was named before", w.offset - 8, w.path)
        return False, ram.block
    ram.block = _cstr(w, "ram block name")
    return True, ram.block


def _decode_page_run(w: Window, st: _State, addr: int, ps: int) -> RamPages | RamZeros:
    mask = ps - 1
    flags = addr & mask
    kind = flags & ~RAM_CONTINUE
    body = ps if kind == RAM_PAGE else 1
    # Make the whole first record available before taking positions: filling rebases the window.
    head = 8
    if not flags & RAM_CONTINUE:
        w.need(9, "ram block name")
        head = 9 + w.buf[w.pos + 8]
    w.need(head + body, "ram page")
    rec_start = w.pos
    w.pos += 8
    named, block = _record_block(w, st.ram, flags)
    buf = w.buf
    offset = addr & ~mask
    pos = w.pos + body
    count = 1
    expect = offset + ps
    step = 8 + body
    end = len(buf)
    follow = kind | RAM_CONTINUE
    unpack = BE64.unpack_from
    # All the whole records the buffer holds, checked at once (vmferry.encode.scan): the headers are read through
    # a strided view, so page data is never touched, and a socket's short chunks are handled the same way.
    if (n := (end - pos) // step) > 0:
        first = expect | follow
        if kind == RAM_PAGE:
            m = leading_pages(w.view, pos, n, step, first, ps)
        else:
            m = 0 if fill_seen(buf, w.pos) else leading_zeros(w.view, pos, n, first, ps)
        pos += m * step
        expect += m * ps
        count += m
    if kind == RAM_PAGE:
        while pos + step <= end and unpack(buf, pos)[0] == expect | follow:
            pos += step
            expect += ps
            count += 1
        run: RamPages | RamZeros = RamPages(block, offset, count, named, ps, legacy=w.view[rec_start:pos],
                                            at=w.base + rec_start)
    else:
        first_fill = buf[w.pos]
        fill = bytearray([first_fill]) if first_fill else None
        if fill is not None:
            fill += bytes(count - 1)  # batched records all had fill 0
        while pos + step <= end and unpack(buf, pos)[0] == expect | follow:
            b = buf[pos + 8]
            if b or fill is not None:
                if fill is None:
                    fill = bytearray(count)
                fill.append(b)
            pos += step
            expect += ps
            count += 1
        run = RamZeros(block, offset, count, named, ps, bytes(fill) if fill is not None else None)
    w.pos = pos
    return run


def fill_seen(buf: bytes | memoryview, first_fill_at: int) -> bool:
    """Whether the first record of a zero run had a non-zero fill byte (then no batching)."""
    return buf[first_fill_at] != 0


def _checked_page_size(ps: int, w: Window) -> None:
    try:
        check_page_size(ps, "$.vmdesc.page_size")
    except DecodeError as e:
        e.message += " (the page size the vmdesc or the options give)"
        e.offset = w.offset
        raise


def _checked(ev: Event, offset: int, path: str) -> None:
    """The value checks every decoder applies (:func:`vmferry.encode.limits.check_event`), at ``offset``."""
    try:
        check_event(ev, path)
    except DecodeError as e:
        e.offset = offset
        raise


def _decode_mem_size(w: Window, ram: _RamState, total: int) -> RamMemSize:
    start = w.offset - 8
    if total > MAX_GUEST_RAM:
        raise DecodeError(f"MEM_SIZE announces {total:#x} bytes of RAM, over {MAX_GUEST_RAM:#x} (64 TiB), the "
                          "largest guest vmferry accepts", start, w.path)
    blocks: list[RamBlock] = []
    remaining = total
    psize_field = ram.postcopy_psize is not None and ram.postcopy_psize != 4096
    while remaining > 0:
        name = _cstr(w, "ram block name")
        length = _be64(w, "ram block length")
        if length > remaining:
            raise DecodeError(f"ram block {name!r} of {length:#x} bytes exceeds the announced total {total:#x}",
                              w.offset - 8, w.path)
        remaining -= length
        page_size = gpa = None
        if psize_field:
            w.need(8, "ram block page size")
            (peek,) = BE64.unpack_from(w.buf, w.pos)
            if peek and peek & 0xFFF == 0 and peek & (peek - 1) == 0:
                page_size = peek
                w.pos += 8
        if ram.ignore_shared:
            gpa = _be64(w, "ram block address")
        if ram.mapped_ram:
            raise DecodeError(f"ram block {name!r}: a mapped-ram file (QEMU >= 9.0, spec 11.6) keeps RAM pages at "
                              "fixed file offsets, not as stream records; vmferry does not read that layout",
                              w.offset, w.path)
        blocks.append(RamBlock(name, length, page_size, gpa))
    ev = RamMemSize(total, blocks)
    _checked(ev, start, w.path)
    return ev


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

FLUSH_AT = 1 << 16


def encode(events: Iterable[Event]) -> Iterator[bytes | memoryview]:
    """Encode events as a QEMU stream; yields chunks (big page runs as views, uncopied)."""
    for piece in encode_pieces(events):
        yield piece.legacy if isinstance(piece, RamPages) else piece  # type: ignore[misc]


def encode_pieces(events: Iterable[Event]) -> Iterator[bytes | RamPages]:
    """Like :func:`encode`, but a page run that carries its QEMU records comes out as the event itself, for a
    writer that can forward those bytes another way (the proxy splices them).

    Memory stays bounded whatever the events say: a run of zero pages comes out in pieces of about
    :data:`FLUSH_AT` bytes, however many pages it counts.  A value QEMU's stream cannot hold raises
    :class:`~vmferry.errors.EncodeError`.
    """
    out = bytearray()
    try:
        for ev in events:
            if isinstance(ev, Flush):
                if out:
                    yield bytes(out)
                    out.clear()
                yield b""  # tells the writer to write what it holds
                continue
            if isinstance(ev, RamPages):
                if ev.legacy is not None:
                    if out:
                        yield bytes(out)
                        out.clear()
                    yield ev
                    continue
                _encode_pages(out, ev)
            elif isinstance(ev, RamZeros):
                for piece in _zeros_pieces(ev):
                    out += piece
                    if len(out) >= FLUSH_AT:
                        yield bytes(out)
                        out.clear()
            else:
                encode_event(out, ev)
            if len(out) >= FLUSH_AT:
                yield bytes(out)
                out.clear()
    except (struct.error, OverflowError, UnicodeEncodeError) as e:
        raise EncodeError(f"a value QEMU's stream cannot hold ({type(e).__name__}: {e})") from None
    if out:
        yield bytes(out)


def encode_event(out: bytearray, ev: Event) -> None:
    """Append the legacy bytes of one event to ``out``."""
    if isinstance(ev, RamZeros):
        _encode_zeros(out, ev)
    elif isinstance(ev, RamPages):
        if ev.legacy is not None:
            out += ev.legacy
        else:
            _encode_pages(out, ev)
    elif isinstance(ev, RamRecord):
        out += BE64.pack(ev.offset | ev.flags)
        if ev.named:
            _put_cstr(out, ev.block, "$.ram")
        out += ev.payload
    elif isinstance(ev, RamEos):
        out += BE64.pack(RAM_EOS)
    elif isinstance(ev, RamMemSize):
        out += BE64.pack(ev.total | RAM_MEM_SIZE)
        for b in ev.blocks:
            _put_cstr(out, b.name, "$.ram")
            out += BE64.pack(b.length)
            if b.page_size is not None:
                out += BE64.pack(b.page_size)
            if b.gpa is not None:
                out += BE64.pack(b.gpa)
    elif isinstance(ev, IterBegin):
        _section_head(out, ev.kind, ev.section_id, ev.idstr, ev.instance_id, ev.version_id)
    elif isinstance(ev, IterEnd):
        _section_foot(out, ev.footer, ev.section_id)
    elif isinstance(ev, DeviceSection):
        _section_head(out, SECTION_FULL, ev.section_id, ev.idstr, ev.instance_id, ev.version_id)
        writer = LegacyWriter(out)
        writer._path = [f"$.{ev.idstr}"]
        visit_vmsd(writer, ev.schema, ev.state, ev.version_id)
        _section_foot(out, ev.footer, ev.section_id)
    elif isinstance(ev, OpaqueSection):
        _section_head(out, ev.kind, ev.section_id, ev.idstr, ev.instance_id, ev.version_id)
        out += ev.body
        _section_foot(out, ev.footer, ev.section_id)
    elif isinstance(ev, Header):
        out += BE32.pack(QEMU_VM_FILE_MAGIC)
        out += BE32.pack(ev.version)
    elif isinstance(ev, Configuration):
        out.append(CONFIGURATION)
        writer = LegacyWriter(out)
        writer._path = ["$.configuration"]
        visit_vmsd(writer, CONFIGURATION_VMSD, ev.state)
    elif isinstance(ev, Command):
        _encode_command(out, ev)
    elif isinstance(ev, Eof):
        out.append(EOF_TYPE)
    elif isinstance(ev, Vmdesc):
        out.append(VMDESCRIPTION)
        out += BE32.pack(len(ev.text))
        out += ev.text
    elif isinstance(ev, Flush):
        pass  # nothing on the wire
    else:
        raise EncodeError(f"cannot encode {type(ev).__name__} as a QEMU stream")


def _put_cstr(out: bytearray, s: str, path: str) -> None:
    data = s.encode("latin-1")
    if len(data) > 255:
        raise EncodeError(f"name {s[:40]!r}... is longer than 255 bytes", path)
    out.append(len(data))
    out += data


def _encode_command(out: bytearray, ev: Command) -> None:
    payload = ev.payload
    nested = b""
    if ev.cmd == CMD_PACKAGED and ev.packaged is not None:
        inner = bytearray()
        for sub in ev.packaged:
            encode_event(inner, sub)
        nested = bytes(inner)
        payload = BE32.pack(len(nested))
    elif ev.cmd == CMD_PACKAGED and ev.packaged_raw is not None:
        nested = ev.packaged_raw
        payload = BE32.pack(len(nested))
    if len(payload) > 0xFFFF:
        raise EncodeError(f"command payload of {len(payload)} bytes (at most 65535)", "$.command")
    out.append(COMMAND)
    out += BE16.pack(ev.cmd)
    out += BE16.pack(len(payload))
    out += payload
    out += nested


def _encode_pages(out: bytearray, ev: RamPages) -> None:
    ps = ev.page_size
    parts: list[bytes | memoryview] = []
    for i in range(ev.count):
        first = i == 0 and ev.named
        header = BE64.pack((ev.offset + i * ps) | RAM_PAGE | (0 if first else RAM_CONTINUE))
        if first:
            name = bytearray()
            _put_cstr(name, ev.block, "$.ram")
            header += bytes(name)
        parts.append(header)
        parts.append(ev.page(i))
    out += b"".join(parts)


def _section_head(out: bytearray, kind: int, section_id: int, idstr: str, instance_id: int, version_id: int) -> None:
    """A section's type byte and id; START and FULL add idstr, instance and version (spec §4)."""
    out.append(kind)
    out += BE32.pack(section_id)
    if kind in (SECTION_START, SECTION_FULL):
        _put_cstr(out, idstr, "$")
        out += BE32.pack(instance_id)
        out += BE32.pack(version_id)


def _section_foot(out: bytearray, footer: bool, section_id: int) -> None:
    if footer:
        out.append(SECTION_FOOTER)
        out += BE32.pack(section_id)


def _encode_zeros(out: bytearray, ev: RamZeros) -> None:
    for piece in _zeros_pieces(ev):
        out += piece


ZERO_RECORDS_PER_PIECE = FLUSH_AT // 9


def _zeros_pieces(ev: RamZeros) -> Iterator[bytes]:
    """The ZERO records of a run (spec §5.1: address word, fill byte), in pieces of at most
    :data:`ZERO_RECORDS_PER_PIECE` records; all but a named first record are built at their fixed stride
    by a few C-level slice copies instead of a call per record."""
    ps = ev.page_size
    fill = ev.fill
    aligned = ps > 0 and not ps & (ps - 1) and not ev.offset % ps and ev.offset + ev.count * ps <= 1 << 64
    start = 0
    if ev.named and ev.count:
        head = bytearray(BE64.pack(ev.offset | RAM_ZERO))
        _put_cstr(head, ev.block, "$.ram")
        head.append(fill[0] if fill is not None else 0)
        yield bytes(head)
        start = 1
    flag = RAM_ZERO | RAM_CONTINUE
    while start < ev.count:
        n = min(ZERO_RECORDS_PER_PIECE, ev.count - start)
        fills = fill[start:start + n] if fill is not None else None
        if aligned and (fills is None or len(fills) == n):
            yield zero_records((ev.offset + start * ps) | flag, ps, n, fills)
        else:
            piece = bytearray()
            for i in range(start, start + n):
                piece += BE64.pack((ev.offset + i * ps) | flag)
                piece.append(fill[i] if fill is not None else 0)
            yield bytes(piece)
        start += n


def vmdesc_text(obj: Any, *, qjson: bool = False) -> bytes:
    """QEMU's vmdesc JSON text for an object (identical to QEMU's writer for ASCII content).

    ``qjson``: the spacing of QEMU 5.2 and older (``migration/qjson.c``,
    replaced by the JSON writer of 6.0 that 7.2 and later use):
    ``{ "page_size" : 4096, "devices" : [ { "name" : ... } ] }``.
    """
    if not qjson:
        return json.dumps(obj).encode()
    out: list[str] = []
    _qjson(obj, out)
    return "".join(out).encode()


def _qjson(value: Any, out: list[str]) -> None:
    # QJSON neither escapes strings nor names; json.dumps does for what needs it, which
    # QEMU's names and type names never do.
    if isinstance(value, dict):
        out.append("{ ")
        for i, (k, v) in enumerate(value.items()):
            out.append(f'{", " if i else ""}{json.dumps(k)} : ')
            _qjson(v, out)
        out.append(" }")
    elif isinstance(value, list):
        out.append("[ ")
        for i, v in enumerate(value):
            if i:
                out.append(", ")
            _qjson(v, out)
        out.append(" ]")
    else:
        out.append(json.dumps(value))
