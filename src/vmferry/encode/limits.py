"""What QEMU allows in each event: the value checks every decoder applies.

A decoder that hands out an event promises that every encoder can write it
and every consumer can use it without meeting a value QEMU's stream cannot
hold: :func:`check_event` checks field widths (section ids, instance and
version ids are u32 on QEMU's wire, command numbers and payload lengths u16,
frame types u8), names (idstrs and RAM block names are counted strings of at
most 255 latin-1 bytes), RAM geometry (page sizes, page-aligned offsets,
runs inside the guest) and RAM block lengths, bounded by
:data:`MAX_GUEST_RAM`.  :func:`check_state` checks a configuration or
device tree against its schema by writing it as QEMU's VMState bytes
(what the legacy encoder will do), so that a decoded tree always encodes.

Errors are :class:`~vmferry.errors.DecodeError` naming the field path; the
decoder that calls these fills in the input offset of the record.
"""

from __future__ import annotations

from typing import Any

from ..errors import DecodeError, EncodeError
from ..events import (
    CMD_PACKAGED,
    RAM_COMPRESS_PAGE,
    RAM_CONTINUE,
    RAM_HOOK,
    RAM_MULTIFD_FLUSH,
    RAM_XBZRLE,
    SECTION_FULL,
    SECTION_KIND_NAMES,
    SECTION_START,
    QEMU_VM_FILE_VERSION,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Header,
    IterBegin,
    IterEnd,
    OpaqueSection,
    RamEos,
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
    UnknownFrame,
    Vmdesc,
)
from ..serialize.schema import Vmsd

#: The largest guest RAM vmferry accepts, per block and in total: 64 TiB, the physical address space of an
#: x86-64 guest with 4-level paging (46 bits, Linux's MAX_PHYSMEM_BITS).  A guest cannot use RAM it cannot
#: address, and QEMU's x86 CPUs announce fewer physical address bits than that by default (TCG: 40).  The
#: bound keeps a length read from the input from sizing runs of billions of pages.
MAX_GUEST_RAM = 1 << 46
#: RAM page sizes: QEMU's smallest target page is 1 KiB (TARGET_PAGE_BITS_MIN 10); the record flags live in
#: the low 10 bits of an address word (RAM_SAVE_FLAG_*, up to 0x200), so a smaller page would collide with them.
MIN_PAGE_SIZE = 1 << 10
MAX_PAGE_SIZE = 1 << 21
#: The longest vmdesc read (QEMU's are ~100 KB; analyze-migration.py reads at most 10 MiB).
MAX_VMDESC = 64 << 20
#: QEMU writes idstrs and RAM block names as one length byte and the bytes (qemu_put_counted_string).
MAX_NAME = 255
#: The machine type name of the configuration section: QEMU compares it with its own machine types,
#: whose names are short identifiers ("pc-i440fx-7.2"); no QEMU machine type name comes near this.
MAX_MACHINE_NAME = 256
#: Fill bytes of ZERO records and the payload of XBZRLE (u16 length) and COMPRESS_PAGE (u32 length) records.
MAX_U8, MAX_U16, MAX_U32, MAX_U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1
#: QEMU's largest PACKAGED blob (MAX_VM_CMD_PACKAGED_SIZE, migration/savevm.c: 1 << 24 in 7.2; vmferry's
#: legacy decoder reads up to 256 MiB).  Bounds what the records nested in a PACKAGED command may expand to.
MAX_PACKAGED = 256 << 20
#: What a decoder may build, as estimated bytes of Python objects per byte of input: 4, and COST_SLACK for
#: every record (a device section, a configuration) besides.  QEMU's real device sections are small (the
#: largest in the test corpus builds ~1.4 MB), so the slack covers them whatever their density, while a
#: large hostile input cannot make a consumer hold much more than it: an empty map, one byte of MessagePack,
#: is 72 bytes of Python objects (ten megabytes of them were 1.45 GB); a one-byte struct of a vmdesc'd
#: array is a 184-byte dict.  Consumers may copy what they hold once more (``inspect --json``, a JSON
#: encoder), so a 10 MB input stays well under 200 MB.  Both the objects of one record (checked before the
#: format's library builds them) and the trees a whole stream holds (checked as they come, against the
#: input read so far) are bounded; no record builds more than MAX_RECORD_COST.
COST_PER_BYTE = 4
COST_SLACK = 8 << 20
MAX_RECORD_COST = 128 << 20
# Estimated sizes (CPython 3.11, 64-bit) of what the format libraries build, a slot in the parent included.
COST_SCALAR = 36  # an int outside the small-int cache, a float (32)
COST_SMALL = 8  # None, a bool, a cached small int: only the slot
COST_STR = 57  # plus one per byte
COST_BYTES = 41  # plus one per byte
COST_LIST = 64  # plus 8 per element
COST_MAP = 184  # a dict with its first keys (an empty one: 72), plus 40 per entry beyond


def record_budget(nbytes: int) -> int:
    """The estimated Python objects one record of ``nbytes`` bytes may build."""
    return min(COST_PER_BYTE * nbytes + COST_SLACK, MAX_RECORD_COST)


def json_cost(text: bytes | memoryview) -> int:
    """What ``json.loads(text)`` may build, estimated before it builds it from a count of the characters that
    open values: every '{' or '[' may be a container, every '"' half a string, every ',' a value.  Strings
    holding such characters make the estimate high, never low."""
    data = bytes(text)
    return (COST_MAP * data.count(b"{") + COST_LIST * data.count(b"[") + (COST_STR // 2) * data.count(b'"')
            + 2 * COST_SMALL * data.count(b","))


#: A vmdesc is JSON dense in small objects: QEMU's estimate 8.7 by json_cost (6 bytes of objects per byte of
#: text, measured over every stream of the test corpus); a hostile one made of empty objects, 66.
VMDESC_COST_PER_BYTE = 12


def container_cost(is_map: bool, n: int) -> int:
    return (COST_MAP + 40 * max(0, n - 1) if n else 72) if is_map else COST_LIST + 8 * n


def value_cost(value: Any, limit: int) -> int:
    """The estimated memory of a decoded value (a tree, a description), walked without recursion; stops
    counting past ``limit``."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, dict):
            total += container_cost(True, len(v))
            stack.extend(v.values())
            total += COST_STR * len(v)  # the keys (repeated keys are shared, which this ignores)
        elif isinstance(v, list):
            total += container_cost(False, len(v))
            stack.extend(v)
        elif isinstance(v, (bytes, bytearray, str)):
            total += (COST_STR if isinstance(v, str) else COST_BYTES) + len(v)
        elif v is None or isinstance(v, bool) or (isinstance(v, int) and -5 <= v <= 256):
            total += COST_SMALL
        else:
            total += COST_SCALAR
    return total


_RECORD_KINDS = {RAM_XBZRLE, RAM_COMPRESS_PAGE, RAM_MULTIFD_FLUSH, RAM_HOOK}
_PACKAGED_TYPES = (IterBegin, IterEnd, DeviceSection, OpaqueSection, Command, RamMemSize, RamPages, RamZeros,
                   RamRecord, RamEos)


def _fail(message: str, path: str) -> None:
    raise DecodeError(message, None, path)


def _uint(value: Any, limit: int, what: str, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        shown = repr(value) if not isinstance(value, int) else str(value)
        _fail(f"{what} {shown[:40]} is not an integer in [0, {limit:#x}]", path)


def check_name(name: Any, what: str, path: str, empty: bool = False) -> None:
    """An idstr or RAM block name: a str of 1..255 latin-1 characters (``empty``: 0 allowed)."""
    if not isinstance(name, str):
        _fail(f"{what} is not a string", path)
    if not name and not empty:
        _fail(f"empty {what}", path)
    if len(name) > MAX_NAME:
        _fail(f"{what} {name[:40]!r}... is longer than {MAX_NAME} bytes", path)
    try:
        name.encode("latin-1")
    except UnicodeEncodeError:
        _fail(f"{what} {name[:40]!r} is not latin-1 (QEMU's names are byte strings)", path)


def check_page_size(ps: Any, path: str) -> None:
    if isinstance(ps, bool) or not isinstance(ps, int) or ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
        _fail(f"implausible page size {ps!r} (a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}])", path)


def check_run(block: Any, offset: Any, count: Any, ps: Any, path: str) -> None:
    """A run of pages: a named block, page-aligned, at least one page, inside the largest guest."""
    check_name(block, "RAM block name", path)
    check_page_size(ps, path)
    _uint(offset, MAX_GUEST_RAM, "page offset", path)
    _uint(count, MAX_GUEST_RAM // MIN_PAGE_SIZE, "page count", path)
    if offset % ps:
        _fail(f"page offset {offset:#x} is not a multiple of the page size {ps}", path)
    if count == 0:
        _fail("a run of no pages", path)
    if offset + count * ps > MAX_GUEST_RAM:
        _fail(f"{count} pages at {offset:#x} end beyond {MAX_GUEST_RAM:#x}, the largest guest RAM", path)


def check_mem_size(ev: RamMemSize, path: str) -> None:
    """MEM_SIZE: blocks of 1 byte..MAX_GUEST_RAM whose lengths add up to the total (QEMU's ram_load reads
    blocks until the total is used up, so any other sum misreads the records that follow)."""
    _uint(ev.total, MAX_GUEST_RAM, "RAM total", path)
    if ev.total % MIN_PAGE_SIZE:
        _fail(f"RAM total {ev.total:#x} is not a multiple of {MIN_PAGE_SIZE} (its low bits carry the flags)", path)
    if not isinstance(ev.blocks, list):
        _fail("the block list is not a list", path)
    total = 0
    for i, b in enumerate(ev.blocks):
        bp = f"{path}.blocks[{i}]"
        check_name(b.name, "RAM block name", bp)
        _uint(b.length, MAX_GUEST_RAM, "RAM block length", bp)
        if b.length == 0:
            _fail(f"RAM block {b.name!r} of length 0", bp)
        if b.page_size is not None:
            _uint(b.page_size, MAX_U64, "RAM block page size", bp)
        if b.gpa is not None:
            _uint(b.gpa, MAX_U64, "RAM block address", bp)
        total += b.length
    if total != ev.total:
        _fail(f"the blocks' lengths add up to {total:#x}, the record's total is {ev.total:#x}", path)


def _check_record(ev: RamRecord, path: str) -> None:
    _uint(ev.flags, MIN_PAGE_SIZE - 1, "RAM record flags", path)
    _uint(ev.offset, MAX_U64, "RAM record offset", path)
    if ev.offset % MIN_PAGE_SIZE:
        _fail(f"RAM record offset {ev.offset:#x} is not page-aligned", path)
    kind = ev.flags & ~RAM_CONTINUE
    if kind not in _RECORD_KINDS:
        _fail(f"RAM record flags {ev.flags:#x} name no record kind vmferry carries", path)
    payload = ev.payload
    if not isinstance(payload, (bytes, bytearray)):
        _fail("RAM record payload is not bytes", path)
    if kind in (RAM_MULTIFD_FLUSH, RAM_HOOK):
        if ev.flags & RAM_CONTINUE or ev.block or ev.named or payload:
            _fail(f"a {'MULTIFD_FLUSH' if kind == RAM_MULTIFD_FLUSH else 'HOOK'} record carries nothing", path)
        return
    check_name(ev.block, "RAM block name", path)
    if ev.named == bool(ev.flags & RAM_CONTINUE):
        _fail("a RAM record names its block iff it does not carry CONTINUE", path)
    if kind == RAM_XBZRLE:
        n = int.from_bytes(payload[1:3], "big") if len(payload) >= 3 else -1
        if n < 0 or len(payload) != 3 + n or n > MAX_PAGE_SIZE:
            _fail("XBZRLE payload is not an encoding byte, a u16 length and that many bytes", path)
    else:
        n = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else -1
        if n < 0 or len(payload) != 4 + n or n > 2 * MAX_PAGE_SIZE + 64:
            _fail("COMPRESS_PAGE payload is not a u32 length and that many bytes", path)


def _check_section_head(kind: int, section_id: Any, idstr: Any, instance_id: Any, version_id: Any,
                        path: str) -> None:
    if kind not in SECTION_KIND_NAMES:
        _fail(f"section kind {kind!r}", path)
    _uint(section_id, MAX_U32, "section id", path)
    if kind in (SECTION_START, SECTION_FULL):
        check_name(idstr, "section idstr", path)
        _uint(instance_id, MAX_U32, "instance id", path)
        _uint(version_id, MAX_U32, "version id", path)


def legacy_size(ev: Event) -> int:
    """An upper bound of the bytes ``ev`` takes in QEMU's stream, for the events of a PACKAGED command."""
    if isinstance(ev, RamZeros):
        return ev.count * (9 + MAX_NAME)
    if isinstance(ev, RamPages):
        return ev.count * (ev.page_size + 9 + MAX_NAME)
    if isinstance(ev, Command) and ev.packaged is not None:
        return 8 + sum(legacy_size(sub) for sub in ev.packaged)
    if isinstance(ev, RamRecord):
        return 9 + MAX_NAME + len(ev.payload)
    if isinstance(ev, OpaqueSection):
        return 32 + MAX_NAME + len(ev.body)
    if isinstance(ev, RamMemSize):
        return 8 + len(ev.blocks) * (1 + MAX_NAME + 24)
    return 32 + MAX_NAME + (ev.size if isinstance(ev, DeviceSection) else len(ev.payload)
                            if isinstance(ev, Command) else 0)


def check_event(ev: Event, path: str = "$") -> None:
    """Raise :class:`DecodeError` (at ``path``) if ``ev`` holds a value QEMU's stream cannot carry.

    Device and configuration trees are checked against their schema by :func:`check_state`, which the
    record decoders call where they build them.
    """
    if isinstance(ev, (RamPages, RamZeros)):
        check_run(ev.block, ev.offset, ev.count, ev.page_size, path)
        if not isinstance(ev.named, bool):
            _fail("'named' is not a bool", path)
        if isinstance(ev, RamZeros) and ev.fill is not None and len(ev.fill) != ev.count:
            _fail(f"{len(ev.fill)} fill bytes for {ev.count} zero pages", path)
    elif isinstance(ev, RamRecord):
        _check_record(ev, path)
    elif isinstance(ev, RamMemSize):
        check_mem_size(ev, path)
    elif isinstance(ev, IterBegin):
        _check_section_head(ev.kind, ev.section_id, ev.idstr, ev.instance_id, ev.version_id, path)
    elif isinstance(ev, IterEnd):
        _uint(ev.section_id, MAX_U32, "section id", path)
    elif isinstance(ev, DeviceSection):
        _check_section_head(SECTION_FULL, ev.section_id, ev.idstr, ev.instance_id, ev.version_id, path)
    elif isinstance(ev, OpaqueSection):
        _check_section_head(ev.kind, ev.section_id, ev.idstr, ev.instance_id, ev.version_id, path)
    elif isinstance(ev, Command):
        _uint(ev.cmd, MAX_U16, "command number", path)
        if ev.packaged_raw is not None:
            if ev.cmd != CMD_PACKAGED:
                _fail(f"command {ev.cmd} carries packaged bytes; only PACKAGED ({CMD_PACKAGED}) does", path)
            if len(ev.packaged_raw) > MAX_PACKAGED:
                _fail(f"packaged bytes of {len(ev.packaged_raw)} bytes, more than {MAX_PACKAGED}", path)
        if ev.packaged is None:
            if ev.cmd == CMD_PACKAGED and ev.packaged_raw is None:
                _fail("a PACKAGED command without its packaged records", path)
            if ev.cmd == CMD_PACKAGED:
                return  # undecoded records (no schemas for them), handed on byte for byte
            if len(ev.payload) > MAX_U16:
                _fail(f"command payload of {len(ev.payload)} bytes (QEMU's length is a u16)", path)
            return
        if ev.cmd != CMD_PACKAGED:
            _fail(f"command {ev.cmd} carries packaged records; only PACKAGED ({CMD_PACKAGED}) does", path)
        size = 0
        for i, sub in enumerate(ev.packaged):
            if not isinstance(sub, _PACKAGED_TYPES):
                _fail(f"{type(sub).__name__} inside a PACKAGED command", f"{path}.packaged[{i}]")
            size += legacy_size(sub)
            if size > MAX_PACKAGED:
                _fail(f"the packaged records take more than {MAX_PACKAGED} bytes", f"{path}.packaged[{i}]")
    elif isinstance(ev, Header):
        if ev.version != QEMU_VM_FILE_VERSION:
            _fail(f"stream version {ev.version!r}; QEMU reads only {QEMU_VM_FILE_VERSION}", path)
    elif isinstance(ev, Configuration):
        name = ev.state.get("name") if isinstance(ev.state, dict) else None
        if isinstance(name, (bytes, bytearray)) and len(name) > MAX_MACHINE_NAME:
            _fail(f"machine type name of {len(name)} bytes (QEMU's are short identifiers; at most "
                  f"{MAX_MACHINE_NAME})", f"{path}.name")
    elif isinstance(ev, Vmdesc):
        _uint(len(ev.text), MAX_U32, "vmdesc length", path)
    elif not isinstance(ev, (RamEos, Eof)):
        if isinstance(ev, UnknownFrame):
            _uint(ev.type, MAX_U8, "frame type", path)
            _uint(ev.flags, MAX_U8, "frame flags", path)


def check_state(state: Any, schema: Vmsd, version: int, path: str) -> None:
    """A configuration or device tree fits ``schema`` at ``version``: every field there, of its type and
    range, arrays as long as their counts, nothing unknown (the legacy encoder's own checks, run on a
    scratch buffer that is dropped)."""
    from ..serialize.drive import visit_vmsd
    from ..serialize.visitor import LegacyWriter

    writer = LegacyWriter(bytearray())
    writer._path = [path]
    try:
        visit_vmsd(writer, schema, state, version)
    except EncodeError as e:
        raise DecodeError(e.message, None, e.path) from None


class StreamOrder:
    """The order QEMU's stream gives its records (spec §1-§6, QEMU's qemu_loadvm_state_main), checked
    event by event: the header first, the configuration right after it, RAM records only inside a ``ram``
    section and up to its EOS, every PART/END section of a section id a START opened, EOF once, then at most
    the vmdesc.  QEMU's own decoder gets this from the format itself; the record formats and ferry can say
    anything in any order, and a consumer (the machine-type transforms, a loader) must not meet that.

    ``nested``: the records of a PACKAGED command (sections and commands only); it shares ``started``
    with the stream around it.  Skippable unknown ferry frames may come anywhere.
    """

    def __init__(self, nested: bool = False, started: dict[int, str] | None = None) -> None:
        self.nested = nested
        self.state = "body" if nested else "start"
        self.started: dict[int, str] = {} if started is None else started
        self.open: int | None = None  # the section id of the open iterative section
        self.eos = False

    def step(self, ev: Event, path: str) -> None:
        if isinstance(ev, UnknownFrame):
            return
        state = self.state
        if state == "start":
            if not isinstance(ev, Header):
                _fail(f"the stream starts with {type(ev).__name__}, not its header", path)
            self.state = "header"
            return
        if isinstance(ev, Header):
            _fail("a second header", path)
        if isinstance(ev, Configuration):
            if state != "header":
                _fail("the configuration comes once, right after the header", path)
            self.state = "body"
            return
        if state == "eof":
            if not isinstance(ev, Vmdesc):
                _fail(f"{type(ev).__name__} after EOF (only the vmdesc may follow it)", path)
            self.state = "vmdesc"
            return
        if state == "vmdesc":
            _fail(f"{type(ev).__name__} after the vmdesc", path)
        self.state = "body"
        if isinstance(ev, Vmdesc):
            _fail("the vmdesc comes after EOF", path)
        if self.open is not None:
            if isinstance(ev, (RamMemSize, RamPages, RamZeros, RamRecord, RamEos)):
                if self.eos:
                    _fail(f"{type(ev).__name__} after the EOS of RAM section {self.open}", path)
                self.eos = isinstance(ev, RamEos)
                return
            if isinstance(ev, IterEnd):
                if ev.section_id != self.open:
                    _fail(f"end of section {ev.section_id} inside section {self.open}", path)
                if not self.eos:
                    _fail(f"RAM section {self.open} ends without its EOS record", path)
                self.open = None
                return
            _fail(f"{type(ev).__name__} inside RAM section {self.open} (before its end)", path)
        if isinstance(ev, (RamMemSize, RamPages, RamZeros, RamRecord, RamEos)):
            _fail(f"{type(ev).__name__} outside a RAM section", path)
        if isinstance(ev, IterEnd):
            _fail(f"end of section {ev.section_id}, which did not begin", path)
        if isinstance(ev, IterBegin):
            if ev.kind in (SECTION_START, SECTION_FULL):
                self.started[ev.section_id] = ev.idstr
            idstr = self.started.get(ev.section_id)
            if idstr is None:
                _fail(f"{SECTION_KIND_NAMES.get(ev.kind, '?')} of section {ev.section_id}, which no START opened",
                      path)
            if idstr != "ram":
                _fail(f"iterative section {idstr!r}: only 'ram' is one (others travel as opaque sections)", path)
            self.open, self.eos = ev.section_id, False
            return
        if isinstance(ev, OpaqueSection) and ev.kind in (SECTION_START, SECTION_FULL):
            self.started[ev.section_id] = ev.idstr
        if isinstance(ev, Eof):
            if self.nested:
                _fail("EOF inside a PACKAGED command", path)
            self.state = "eof"

    def finish(self, path: str, offset: int | None = None) -> None:
        if self.open is not None:
            raise DecodeError(f"the stream ends inside RAM section {self.open}", offset, path)
