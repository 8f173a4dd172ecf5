"""A summary of a stream, built from its events (no I/O).

:class:`StreamSummary` collects what ``vmferry inspect`` prints: the machine
type and capabilities, every section with its id, instance, version and
size, the RAM blocks with their page and zero-page counts, and the commands.
It consumes events one at a time, so it works on any size of stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .events import (
    SECTION_KIND_NAMES,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Header,
    IterBegin,
    IterEnd,
    OpaqueSection,
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
    Vmdesc,
)


@dataclass
class SectionRow:
    kind: str
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    size: int
    footer: bool


@dataclass
class BlockRow:
    name: str
    length: int
    pages: int = 0
    zero_pages: int = 0
    other_records: int = 0


@dataclass
class StreamSummary:
    version: int = 0
    machine: str | None = None
    capabilities: list[str] = field(default_factory=list)
    uuid: str | None = None
    sections: list[SectionRow] = field(default_factory=list)
    blocks: dict[str, BlockRow] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    has_eof: bool = False
    vmdesc_size: int | None = None
    footers: bool | None = None
    _iter: dict[int, SectionRow] = field(default_factory=dict, repr=False)

    def feed(self, events: Iterable[Event]) -> "StreamSummary":
        for ev in events:
            self.add(ev)
        return self

    def _block(self, name: str) -> BlockRow:
        row = self.blocks.get(name)
        if row is None:
            row = self.blocks[name] = BlockRow(name, 0)
        return row

    def add(self, ev: Event) -> None:
        if isinstance(ev, RamPages):
            self._block(ev.block).pages += ev.count
        elif isinstance(ev, RamZeros):
            self._block(ev.block).zero_pages += ev.count
        elif isinstance(ev, RamRecord):
            if ev.block:
                self._block(ev.block).other_records += 1
        elif isinstance(ev, RamMemSize):
            for b in ev.blocks:
                self._block(b.name).length = b.length
        elif isinstance(ev, IterBegin):
            idstr = ev.idstr
            if not idstr:
                first = next((s for s in self.sections if s.section_id == ev.section_id and s.idstr), None)
                idstr = first.idstr if first else "?"
            row = SectionRow(SECTION_KIND_NAMES[ev.kind], ev.section_id, idstr, ev.instance_id, ev.version_id, 0, False)
            self.sections.append(row)
            self._iter[ev.section_id] = row
        elif isinstance(ev, IterEnd):
            started = self._iter.get(ev.section_id)
            if started is not None:
                started.footer = ev.footer
            self.footers = ev.footer if self.footers is None else self.footers
        elif isinstance(ev, DeviceSection):
            self.sections.append(SectionRow("full", ev.section_id, ev.idstr, ev.instance_id, ev.version_id, ev.size,
                                            ev.footer))
            self.footers = ev.footer if self.footers is None else self.footers
        elif isinstance(ev, OpaqueSection):
            self.sections.append(SectionRow(SECTION_KIND_NAMES[ev.kind], ev.section_id, ev.idstr, ev.instance_id,
                                            ev.version_id, ev.size, ev.footer))
        elif isinstance(ev, Configuration):
            self.machine = ev.machine
            self.capabilities = ev.capabilities
            uuid = ev.state.get("configuration/uuid", {}).get("uuid")
            if uuid is not None:
                h = bytes(uuid).hex()
                self.uuid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        elif isinstance(ev, Command):
            self.commands.append(ev.name)
            for sub in ev.packaged or ():
                self.add(sub)
        elif isinstance(ev, Header):
            self.version = ev.version
        elif isinstance(ev, Eof):
            self.has_eof = True
        elif isinstance(ev, Vmdesc):
            self.vmdesc_size = len(ev.text)

    @property
    def total_pages(self) -> int:
        return sum(b.pages for b in self.blocks.values())

    @property
    def total_zero_pages(self) -> int:
        return sum(b.zero_pages for b in self.blocks.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "machine": self.machine,
            "capabilities": self.capabilities,
            "uuid": self.uuid,
            "footers": self.footers,
            "commands": self.commands,
            "sections": [s.__dict__ for s in self.sections],
            "ram_blocks": [b.__dict__ for b in self.blocks.values()],
            "eof": self.has_eof,
            "vmdesc_bytes": self.vmdesc_size,
        }
