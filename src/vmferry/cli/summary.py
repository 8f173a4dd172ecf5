"""A summary of a stream, built from its events (no I/O).

:class:`StreamSummary` collects what ``vmferry inspect`` prints: the machine
type and capabilities, every section with its id, instance, version and
size, the RAM blocks with their page and zero-page counts, and the commands.
It consumes events one at a time, so it works on any size of stream.

It also tells which QEMU wrote the stream when the content says so
(:class:`WriterGuess`, spec section 11): a SWITCHOVER_START command or a
10.0 machine type means QEMU >= 10.0, a ``block`` section or COMPRESS_PAGE
records QEMU <= 9.0, and so on.  Only evidence seen in real streams or
stated by the spec counts; when nothing tells, the guess says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..events import (
    CMD_SWITCHOVER_START,
    RAM_COMPRESS_PAGE,
    RAM_MULTIFD_FLUSH,
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
from ..serialize.qemu_vmdesc import has_neighbours

Version = tuple[int, int]

#: The release after 7.2 (QEMU numbered 7.2 -> 8.0).
_AFTER_7_2 = (8, 0)
_MACHINE_VERSION = r"^pc-(?:i440fx|q35)-(\d+)\.(\d+)$"


def _fmt(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


@dataclass
class WriterGuess:
    """Which QEMU wrote a stream, as far as its content tells: a version range and why.

    ``low``/``high`` are inclusive bounds (None: unbounded); ``evidence``
    lists each clue as ``(text, low, high)``.
    """

    evidence: list[tuple[str, Version | None, Version | None]] = field(default_factory=list)

    def note(self, text: str, low: Version | None = None, high: Version | None = None) -> None:
        if all(e[0] != text for e in self.evidence):
            self.evidence.append((text, low, high))

    @property
    def low(self) -> Version | None:
        lows = [e[1] for e in self.evidence if e[1] is not None]
        return max(lows) if lows else None

    @property
    def high(self) -> Version | None:
        highs = [e[2] for e in self.evidence if e[2] is not None]
        return min(highs) if highs else None

    @property
    def known(self) -> bool:
        """Whether the content bounds the writer at all."""
        return bool(self.evidence)

    @property
    def consistent(self) -> bool:
        low, high = self.low, self.high
        return low is None or high is None or low <= high

    def range_text(self) -> str:
        low, high = self.low, self.high
        if not self.evidence:
            return "cannot tell"
        if not self.consistent:
            return "contradictory"
        if low is not None and high is not None:
            return f"QEMU {_fmt(low)}" if low == high else f"QEMU {_fmt(low)} .. {_fmt(high)}"
        return f"QEMU >= {_fmt(low)}" if low is not None else f"QEMU <= {_fmt(high)}"  # type: ignore[arg-type]

    @property
    def text(self) -> str:
        """One line for ``vmferry inspect``."""
        if not self.evidence:
            return "cannot tell from the content (no machine type, no version-specific record)"
        clues = "; ".join(e[0] for e in self.evidence)
        tail = ""
        if self.high is None and len(self.evidence) == 1 and self.evidence[0][0].startswith("machine type"):
            tail = "; nothing else in the stream tells which QEMU wrote it"
        return f"{self.range_text()} ({clues}{tail})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "min": _fmt(self.low) if self.low else None,
            "max": _fmt(self.high) if self.high else None,
            "text": self.text,
            "evidence": [e[0] for e in self.evidence],
        }


def vmdesc_clues(guess: WriterGuess, text: bytes) -> None:
    """Add what the shape of a vmdesc tells (spec 11.8; absent from every 7.2 stream, seen in 10.0's)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return
    if not isinstance(doc, dict):
        return
    if "configuration" in doc:
        guess.note("vmdesc with a configuration object (newer than 7.2)", _AFTER_7_2)
    if has_neighbours(doc.get("devices"), lambda a, b: "index" in a and "index" not in b):
        guess.note("vmdesc arrays without the last index (newer than 7.2)", _AFTER_7_2)
    # ---- QEMU 5.2 and 11.1 (issue 13): seen in every real 5.2.0 / 11.1.2 stream, never in 7.2's or 10.0's
    if text.startswith(b"{ "):
        guess.note("vmdesc in QJSON spacing (replaced in 6.0)", None, (5, 2))
    if has_neighbours(doc.get("devices"), lambda a, b: "index" not in a and "index" not in b):
        guess.note("vmdesc arrays without any index (newer than 10.0)", (10, 1))


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
    #: which QEMU wrote the stream, as far as its content tells
    writer: WriterGuess = field(default_factory=WriterGuess)
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
            if ev.flags & RAM_COMPRESS_PAGE:
                self.writer.note("COMPRESS_PAGE records (removed in 9.1)", None, (9, 0))
            if ev.flags & RAM_MULTIFD_FLUSH:
                self.writer.note("MULTIFD_FLUSH records (newer than 7.2)", _AFTER_7_2)
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
            if idstr == "block":
                self.writer.note("a block section (removed in 9.1)", None, (9, 0))
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
            if ev.idstr == "block":
                self.writer.note("a block section (removed in 9.1)", None, (9, 0))
        elif isinstance(ev, Configuration):
            self.machine = ev.machine
            self.capabilities = ev.capabilities
            uuid = ev.state.get("configuration/uuid", {}).get("uuid")
            if uuid is not None:
                h = bytes(uuid).hex()
                self.uuid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
            m = re.match(_MACHINE_VERSION, self.machine)
            if m:
                self.writer.note(f"machine type {self.machine}", (int(m[1]), int(m[2])))
            if "mapped-ram" in self.capabilities:
                self.writer.note("mapped-ram capability (new in 9.0)", (9, 0))
        elif isinstance(ev, Command):
            self.commands.append(ev.name)
            if ev.cmd == CMD_SWITCHOVER_START:  # new in 10.0 (7.2: "MIG_CMD 0xb unknown")
                self.writer.note("SWITCHOVER_START (new in 10.0)", (10, 0))
            for sub in ev.packaged or ():
                self.add(sub)
        elif isinstance(ev, Header):
            self.version = ev.version
        elif isinstance(ev, Eof):
            self.has_eof = True
        elif isinstance(ev, Vmdesc):
            self.vmdesc_size = len(ev.text)
            vmdesc_clues(self.writer, ev.text)

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
            "writer": self.writer.as_dict(),
        }


# --- the text ``vmferry inspect`` prints ---------------------------------------------------------------------------


def text_table(title: str, columns: list[tuple[str, str]], rows: list[list[str]]) -> list[str]:
    """A table in box-drawing characters (the look of rich's default box), one string per line.

    ``columns`` are (heading, "left" or "right"); plain string formatting, no terminal needed.
    """
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, (h, _) in enumerate(columns)]

    def line(cells: list[str], sep: str, edge: tuple[str, str]) -> str:
        parts = [f" {c.rjust(w) if just == 'right' else c.ljust(w)} "
                 for c, w, (_, just) in zip(cells, widths, columns)]
        return edge[0] + sep.join(parts) + edge[1]

    def rule(left: str, mid: str, right: str, fill: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    out = [title, rule("┏", "┳", "┓", "━"), line([h for h, _ in columns], "┃", ("┃", "┃")),
           rule("┡", "╇", "┩", "━")]
    out += [line(r, "│", ("│", "│")) for r in rows]
    out.append(rule("└", "┴", "┘", "─"))
    return out


def _shown(text: str) -> str:
    """``text`` as printed: names from a stream may hold control characters, which a terminal would obey."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def summary_lines(s: StreamSummary, heading: str) -> list[str]:
    """What ``vmferry inspect`` prints: ``heading``, the stream's lines, its sections and its RAM blocks."""
    footers = {True: "yes", False: "no", None: "n/a"}[s.footers]
    vmdesc = f"{s.vmdesc_size:,} bytes" if s.vmdesc_size is not None else "absent"
    out = [_shown(heading),
           f"machine type: {_shown(s.machine or '(no configuration section)')}",
           f"capabilities: {_shown(', '.join(s.capabilities)) or 'none announced'}"]
    if s.uuid:
        out.append(f"uuid: {s.uuid}")
    out.append(f"section footers: {footers}   vmdesc: {vmdesc}   EOF: {'yes' if s.has_eof else 'no'}")
    if s.commands:
        out.append(f"commands: {', '.join(s.commands)}")
    out.append(f"written by: {_shown(s.writer.text)}")
    rows = []
    for row in s.sections:
        started = row.kind in ("start", "full")
        rows.append([str(row.section_id), row.kind, _shown(row.idstr), str(row.instance_id) if started else "",
                     str(row.version_id) if started else "", f"{row.size:,}" if row.size else ""])
    out += text_table(f"{len(s.sections)} sections", [("id", "right"), ("kind", "left"), ("idstr", "left"),
                                                      ("inst", "right"), ("ver", "right"), ("size", "right")], rows)
    if s.blocks:
        rows = [[_shown(b.name), f"{b.length:#x}", f"{b.pages:,}", f"{b.zero_pages:,}", f"{b.other_records:,}"]
                for b in s.blocks.values()]
        out += text_table(f"RAM: {s.total_pages:,} pages, {s.total_zero_pages:,} zero pages",
                          [("block", "left"), ("length", "right"), ("pages", "right"), ("zero pages", "right"),
                           ("other records", "right")], rows)
    return out
