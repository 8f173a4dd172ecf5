"""The event stream that every layer exchanges.

A migration stream, whatever its encoding, is a sequence of these events in
stream order.  Decoders yield them one at a time and encoders consume them one
at a time, so memory stays bounded by the size of one event however large the
guest is.  RAM data stays in ``memoryview`` slices of the decoder's input
buffers; nothing here copies guest pages.

Record types follow QEMU's savevm format (``QEMU_VM_*`` in QEMU's
``migration/savevm.c``; see the stream spec §0-§6).  The events are enough to
rebuild the original bytes exactly: section ids, footers, the block-naming
pattern of RAM records (CONTINUE) and the vmdesc text are all kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Union

from .serialize.schema import Vmsd

# QEMU_VM_* record type bytes (migration/savevm.c).
EOF_TYPE = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E

SECTION_KIND_NAMES = {SECTION_START: "start", SECTION_PART: "part", SECTION_END: "end", SECTION_FULL: "full"}
SECTION_KINDS = {name: kind for kind, name in SECTION_KIND_NAMES.items()}

# RAM_SAVE_FLAG_* (migration/ram.c); they live in the low page bits of the address word.
RAM_FULL = 0x001
RAM_ZERO = 0x002
RAM_MEM_SIZE = 0x004
RAM_PAGE = 0x008
RAM_EOS = 0x010
RAM_CONTINUE = 0x020
RAM_XBZRLE = 0x040
RAM_HOOK = 0x080
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200

# QEMU_VM_COMMAND numbers (enum qemu_vm_cmd, migration/savevm.c).
COMMAND_NAMES = {
    0: "invalid",
    1: "open-return-path",
    2: "ping",
    3: "postcopy-advise",
    4: "postcopy-listen",
    5: "postcopy-run",
    6: "postcopy-ram-discard",
    7: "packaged",
    8: "enable-colo",
    9: "postcopy-resume",
    10: "recv-bitmap",
    11: "switchover-start",
}
CMD_PACKAGED = 7
#: QEMU 10.0's marker of the start of switchover (spec 11.4): empty payload, sent once by
#: machine types >= 10.0 between the last ram PART and the ram END.
CMD_SWITCHOVER_START = 11

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3


@dataclass(slots=True)
class Header:
    """``QEVM`` magic and the stream version (3 for every supported QEMU)."""

    version: int = QEMU_VM_FILE_VERSION


@dataclass(slots=True)
class Configuration:
    """The ``QEMU_VM_CONFIGURATION`` record: a VMState of vmsd ``configuration``.

    ``state`` holds ``len``, ``name`` and any subsections sent
    (``configuration/capabilities``, ``configuration/uuid``, ...).
    """

    state: dict[str, Any]

    @property
    def machine(self) -> str:
        """The machine type name ("" when the tree holds no byte string there: decoders refuse such trees)."""
        name = self.state.get("name", b"")
        return bytes(name).decode("ascii", "replace") if isinstance(name, (bytes, bytearray, memoryview)) else ""

    @property
    def capabilities(self) -> list[str]:
        caps = self.state.get("configuration/capabilities", {})
        listed = caps.get("capabilities", []) if isinstance(caps, dict) else []
        return [bytes(c).decode("ascii", "replace") for c in listed if isinstance(c, (bytes, bytearray))] \
            if isinstance(listed, list) else []


@dataclass(slots=True)
class Command:
    """A ``QEMU_VM_COMMAND`` record.  PACKAGED carries its nested records in ``packaged``.

    A live postcopy migration sends no vmdesc, so without schemas given ahead
    the device sections inside PACKAGED cannot be read: ``packaged_raw`` then
    holds the nested records' exact bytes instead (``packaged`` is None).
    """

    cmd: int
    payload: bytes = b""
    packaged: list["Event"] | None = None
    packaged_raw: bytes | None = None

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.cmd, f"cmd-{self.cmd:#x}")


@dataclass(slots=True)
class DeviceSection:
    """A FULL section of a VMState device, decoded into a tree.

    ``desc`` is the section's description in QEMU's vmdesc form (the schema
    serialised), ``schema`` the parsed :class:`Vmsd`.  ``size`` is the body
    size in bytes as decoded (0 when unknown).
    """

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    state: dict[str, Any]
    schema: Vmsd
    desc: dict[str, Any]
    footer: bool = True
    size: int = 0


@dataclass(slots=True)
class OpaqueSection:
    """A section carried as raw bytes (an old-style handler, or no schema wanted)."""

    kind: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    body: bytes
    footer: bool = True
    desc: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass(slots=True)
class IterBegin:
    """Start of a START/PART/END section of an iterative handler (``ram``).

    ``idstr``, ``instance_id`` and ``version_id`` are present for START only.
    Records of the body follow, then :class:`IterEnd`.
    """

    kind: int
    section_id: int
    idstr: str = ""
    instance_id: int = 0
    version_id: int = 0


@dataclass(slots=True)
class IterEnd:
    """End of an iterative section body; ``footer`` says whether a footer followed."""

    section_id: int
    footer: bool = True


@dataclass(frozen=True, slots=True)
class RamBlock:
    """One entry of the MEM_SIZE list (spec §5.2)."""

    name: str
    length: int
    page_size: int | None = None  # only with postcopy-ram and a non-host page size
    gpa: int | None = None  # only with x-ignore-shared


@dataclass(slots=True)
class RamMemSize:
    """The MEM_SIZE record: ``total`` and the RAMBlock list."""

    total: int
    blocks: list[RamBlock]


@dataclass(slots=True)
class RamPages:
    """A run of PAGE records: ``count`` pages of one block at consecutive offsets.

    The first record names the block iff ``named``; the others carry CONTINUE.
    The pages are available either as ``data`` (``count * page_size``
    contiguous bytes) or as ``legacy`` (the exact QEMU record bytes of the run,
    headers included); decoders fill whichever they have without copying.
    ``at`` is where ``legacy`` starts in the decoded input, when it is a slice
    of it (the proxy forwards such runs without copying them); a transform
    that changes the records must not keep it.
    """

    block: str
    offset: int
    count: int
    named: bool
    page_size: int = 4096
    data: memoryview | bytes | None = None
    legacy: memoryview | bytes | None = None
    at: int | None = field(default=None, compare=False, repr=False)

    def page(self, i: int) -> memoryview:
        """Page ``i`` of the run, as a view (no copy)."""
        ps = self.page_size
        if self.data is not None:
            return memoryview(self.data)[i * ps:(i + 1) * ps]
        assert self.legacy is not None
        start = self.page_start(i)
        return memoryview(self.legacy)[start:start + ps]

    def page_start(self, i: int) -> int:
        """Where page ``i``'s data starts in ``legacy`` (the run's QEMU record bytes)."""
        head = 8 + (1 + len(self.block.encode("latin-1")) if self.named else 0)
        if i == 0:
            return head
        return head + self.page_size + (i - 1) * (8 + self.page_size) + 8

    def pages(self):
        for i in range(self.count):
            yield self.page(i)

    def contiguous(self) -> memoryview | bytes:
        """All page data as one buffer (copies only when the run came as legacy records)."""
        if self.data is not None:
            return self.data
        return b"".join(self.pages())


@dataclass(slots=True)
class RamZeros:
    """A run of ZERO records at consecutive offsets of one block.

    ``fill`` holds the fill byte of each record when any is not 0 (QEMU always
    writes 0; other values are kept so that odd streams re-encode exactly).
    """

    block: str
    offset: int
    count: int
    named: bool
    page_size: int = 4096
    fill: bytes | None = None


@dataclass(slots=True)
class RamRecord:
    """Any other RAM record, kept exactly: XBZRLE, COMPRESS_PAGE, MULTIFD_FLUSH, HOOK.

    ``block`` is empty and ``named`` False for records that carry no block.
    ``payload`` is everything after the address word and the block name.
    """

    flags: int
    offset: int
    block: str = ""
    named: bool = False
    payload: bytes = b""


@dataclass(slots=True)
class RamEos:
    """End-of-section record (RAM_SAVE_FLAG_EOS)."""


@dataclass(slots=True)
class Eof:
    """``QEMU_VM_EOF``."""


@dataclass(slots=True)
class Flush:
    """The input paused: whoever holds output back to batch it should write it now.

    Decoders emit it only when their input says it has nothing more ready
    (an empty chunk: the live proxy's socket readers send one before they
    block), so that a page a postcopy destination asked for goes on at once
    instead of waiting in a batch.  It carries nothing; encoders write
    nothing for it but an empty chunk, which tells their writer to flush.
    """


@dataclass(slots=True)
class Vmdesc:
    """The JSON VM description that follows EOF, as its exact bytes."""

    text: bytes


@dataclass(slots=True)
class UnknownFrame:
    """A ferry frame this reader does not know and that may be skipped (docs/format.md §6).

    It travels through the record formats as a ``frame`` record and is
    written back unchanged by the ferry encoder; QEMU's stream cannot carry it.
    """

    type: int
    flags: int
    body: bytes


Event = Union[
    Header,
    Configuration,
    Command,
    DeviceSection,
    OpaqueSection,
    IterBegin,
    IterEnd,
    RamMemSize,
    RamPages,
    RamZeros,
    RamRecord,
    RamEos,
    Eof,
    Vmdesc,
    Flush,
]

RAM_EVENTS = (RamMemSize, RamPages, RamZeros, RamRecord, RamEos)

_BE64 = struct.Struct(">Q")


@dataclass(slots=True)
class StreamTotals:
    """What a stream carried, counted from its events (for summaries and checks)."""

    sections: int = 0
    pages: int = 0
    zero_pages: int = 0
    other_records: int = 0
    page_bytes: int = 0
    blocks: dict[str, list[int]] = field(default_factory=dict)  # name -> [pages, zeros]

    def add(self, event: Event) -> None:
        if isinstance(event, RamPages):
            self.pages += event.count
            self.page_bytes += event.count * event.page_size
            self.blocks.setdefault(event.block, [0, 0])[0] += event.count
        elif isinstance(event, RamZeros):
            self.zero_pages += event.count
            self.blocks.setdefault(event.block, [0, 0])[1] += event.count
        elif isinstance(event, RamRecord):
            self.other_records += 1
        elif isinstance(event, (DeviceSection, OpaqueSection, IterBegin)):
            self.sections += 1
