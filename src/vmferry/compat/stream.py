"""Apply a plan to an event stream, with memory bounded by the device state.

:func:`transform_events` takes the events of a stream of one release and
yields the events of the same state in another release.  RAM events pass
through as they come (only block names are rewritten where a step renames
a block, and the first bytes of blocks a transform asked for are kept);
the device sections, which are small, are held until ``Eof`` and then
transformed together, so that a transform can read any section.  The
configuration section is rewritten for the target (the machine name is
what QEMU compares: spec §1.2), footers follow the target release, and the
vmdesc is regenerated from the transformed sections so that it keeps
describing exactly what is on the wire (and written for a target release
whose streams carry one when the source had none).  Last, the plan's stream
transforms run over the result, in order: they handle what lies outside the
device sections (commands such as QEMU 10.0's ``SWITCHOVER_START``, the
shape of the vmdesc).

Nothing here does I/O; this is a generator from events to events.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..encode.configuration import configuration_state
from ..errors import CompatError, EncodeError
from ..events import (
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
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
    Vmdesc,
)
from ..serialize.describe import describe_section
from .ops import Machine
from .registry import Plan, Registry, apply

__all__ = ["PEEK_BYTES", "source_release", "transform_events", "without_configuration"]

#: How many bytes of a peeked RAM block are kept (enough for any ACPI RSDP).
PEEK_BYTES = 64
#: The x86 target page size, for a vmdesc written where the source had none.
DEFAULT_PAGE_SIZE = 4096


def source_release(configuration: Configuration | None, given: str | None, registry: Registry | None = None,
                   qemu: str | Sequence[str] | None = None) -> str:
    """The release a stream is in: its configuration's machine name, or ``given`` if it has none.

    With a ``registry``, the machine type is resolved to a release of QEMU
    ``qemu`` (``given`` may name one, ``pc-i440fx-7.2@10.0``); ``qemu`` may
    also list the QEMU versions the stream may come from, most likely first
    (what its vmdesc shows, :func:`~vmferry.compat.machines.vmdesc.writer_qemu`):
    the first that has the machine type is taken.

    A stream without a configuration section (machine types up to
    ``pc-i440fx-2.3``) and without ``given`` is in the one release of the
    catalogue whose streams have none (of QEMU ``qemu`` where given); when
    there is more than one, or none, the error lists them and names
    ``--from-machine``.
    """
    found = configuration.machine if configuration is not None else None
    given_machine = registry.release(given).machine if registry is not None and given else given
    if found and given_machine and found != given_machine:
        raise CompatError(f"the stream says it is {found}, but {given} was given as its machine type")
    name = given or found
    versions = [qemu] if isinstance(qemu, str) else list(qemu or [])
    if not name:
        if registry is None:
            raise CompatError("the stream has no configuration section to name its machine type "
                              "(machine types up to 2.3 send none): give the source machine type "
                              "(vmferry transform --from-machine)")
        return _infer(registry, versions)
    if registry is None:
        return name
    if isinstance(qemu, str) or not versions:  # given, or nothing shown: that QEMU (or the home release)
        return registry.resolve(name, versions[0] if versions else None)
    for v in versions:
        try:
            return registry.resolve(name, v)
        except CompatError:
            continue
    registry.release(name)  # an unknown machine type: say so, with what the catalogue knows
    have = sorted({registry.release(n).qemu or "?" for n in registry.releases if registry.release(n).machine == name})
    raise CompatError(f"the stream is {name}, written by QEMU {' or '.join(versions)} as far as its vmdesc shows, "
                      f"but the catalogue has {name} for QEMU {', '.join(have)} only; if one of those wrote it, "
                      f"say so (--from-qemu-version)")


def without_configuration(registry: Registry, qemu: Sequence[str] = ()) -> list[str]:
    """The releases of the catalogue whose streams carry no configuration section (of QEMU ``qemu``)."""
    names = [n for n in registry.releases if not registry.release(n).configuration]
    if qemu:
        names = [n for n in names if registry.release(n).qemu in qemu]
    return names


def _infer(registry: Registry, qemu: Sequence[str]) -> str:
    found = without_configuration(registry, qemu)
    if len(found) == 1:
        return found[0]
    every = without_configuration(registry)
    listed = ", ".join(f"{n} (QEMU {registry.release(n).qemu})" for n in (found or every)) or "none"
    of = f" of QEMU {' or '.join(qemu)}" if qemu else ""
    what = f"it could be any of: {listed}" if found else f"no machine type{of} in the catalogue sends none " \
        f"(those of other QEMU versions: {listed})"
    raise CompatError(f"the stream has no configuration section to name its machine type; {what}: give the "
                      f"source machine type (vmferry transform --from-machine)")


def transform_events(events: Iterable[Event], registry: Registry, target: str,
                     source: str | None = None, source_qemu: str | Sequence[str] | None = None,
                     on_plan: Callable[[Plan], None] | None = None) -> Iterator[Event]:
    """The events of ``events`` (a stream of ``source``, or of the machine its configuration names,
    run by QEMU ``source_qemu``: one version, or candidates as for :func:`source_release`) converted to
    release ``target``.

    ``on_plan`` is handed the plan once it is made (before any event is).
    Raises :class:`CompatError` when no unique path exists or a transform refuses.
    """
    it = iter(events)
    first = next(it, None)
    if first is None:
        return
    head: list[Event] = [first]
    second = next(it, None) if isinstance(first, Header) else None
    if second is not None:
        head.append(second)
    config = second if isinstance(second, Configuration) else None
    # Plan before anything is handed out: a stream that cannot be converted yields nothing.
    plan = registry.plan(source_release(config, source, registry, source_qemu), target)
    if on_plan is not None:
        on_plan(plan)
    out: Iterator[Event] = _run(plan, registry, head, it)
    for fn in plan.stream_fns():
        out = fn(out)
    yield from out


def _run(plan: Plan, registry: Registry, first: list[Event], rest: Iterator[Event]) -> Iterator[Event]:
    """The device-section part of :func:`transform_events`: ``first`` are the events read to plan."""
    it = itertools.chain(first, rest)
    first_ev = next(it, None)
    if first_ev is None:
        return
    head: list[Event] = []
    pending: list[Event] = []
    if isinstance(first_ev, Header):
        head.append(first_ev)
        second = next(it, None)
        config = second if isinstance(second, Configuration) else None
        if second is not None and config is None:
            pending.append(second)
    else:
        config = None
        pending.append(first_ev)
    runner = _Runner(plan, registry)
    yield from head
    if plan.steps or config is not None:
        out_config = runner.configuration(config)
        if out_config is not None:
            yield out_config
    for ev in pending:
        yield from runner.event(ev)
    for ev in it:
        yield from runner.event(ev)
    yield from runner.finish()


class _Runner:
    def __init__(self, plan: Plan, registry: Registry) -> None:
        self.plan = plan
        self.identity = not plan.steps
        self.src = registry.release(plan.source)
        self.dst = registry.release(plan.target)
        self.footers = self.dst.footers
        self.renames: dict[str, str] = {}
        self.blocks: tuple[RamBlock, ...] = ()
        self.peek = plan.peek_blocks()
        self.heads: dict[str, bytes] = {}
        self.sections: list[DeviceSection | OpaqueSection] = []
        self.iter_ids: set[int] = set()
        self.vmdesc: Vmdesc | None = None
        self.done = False
        self.postcopy = False  # the device state came in a PACKAGED command: no vmdesc follows the EOF
        self.result: Machine | None = None

    # ------------------------------------------------------------- records

    def configuration(self, config: Configuration | None) -> Configuration | None:
        if self.identity:
            return config
        if not self.dst.configuration:
            if config is not None and any(k != "len" and k != "name" for k in config.state):
                extra = ", ".join(k for k in config.state if k not in ("len", "name"))
                raise CompatError(f"{self.dst.name} streams have no configuration section, so {extra} "
                                  f"cannot be carried over")
            return None
        state = dict(config.state) if config is not None else configuration_state(self.dst.machine)
        name = self.dst.machine.encode("ascii")
        state["len"], state["name"] = len(name), name
        # keep the fields first and the subsections after them, as on the wire
        ordered = {"len": state.pop("len"), "name": state.pop("name")}
        ordered.update(state)
        return Configuration(ordered)

    def event(self, ev: Event) -> Iterator[Event]:
        if self.identity:
            yield ev
            return
        if isinstance(ev, (DeviceSection, OpaqueSection)):
            if self.done:
                raise CompatError(f"section {ev.idstr!r} after the end of the stream")
            self.sections.append(ev)
            return
        if isinstance(ev, Eof):
            if not self.postcopy:
                yield from self._flush()
            yield ev
            return
        if isinstance(ev, Vmdesc):
            self.vmdesc = ev
            if self.dst.vmdesc:
                yield self._vmdesc(ev)
            return
        if isinstance(ev, RamMemSize):
            self.renames = self.plan.rename_blocks(ev.blocks)
            blocks = [dataclasses.replace(b, name=self.renames.get(b.name, b.name)) for b in ev.blocks]
            self.blocks = tuple(blocks)
            yield RamMemSize(ev.total, blocks)
            return
        if isinstance(ev, (RamPages, RamZeros, RamRecord)):
            yield self._ram(ev)
            return
        if isinstance(ev, IterEnd):
            yield dataclasses.replace(ev, footer=self.footers)
            return
        if isinstance(ev, IterBegin):
            self.iter_ids.add(ev.section_id)
        if isinstance(ev, Command) and ev.packaged_raw is not None:
            raise CompatError("the device state of this postcopy migration (its PACKAGED command) can only be "
                              "converted with the source's schemas: give a stream or vmdesc that the source QEMU "
                              "wrote under the same machine type and devices (--schema)")
        if isinstance(ev, Command) and ev.packaged:
            yield self._package(ev)
            return
        yield ev

    def _package(self, ev: Command) -> Command:
        """A postcopy PACKAGED command: the device state it carries (all of it: postcopy sends no other)
        converted like the sections before an EOF, its commands (LISTEN, PING, RUN) where they were."""
        assert ev.packaged is not None
        self.postcopy = True
        for x in ev.packaged:
            if isinstance(x, (DeviceSection, OpaqueSection)):
                self.sections.append(x)
        before = [x for x in itertools.takewhile(lambda x: not isinstance(x, (DeviceSection, OpaqueSection)),
                                                 ev.packaged)]
        after = [x for x in ev.packaged[len(before):] if not isinstance(x, (DeviceSection, OpaqueSection))]
        return Command(ev.cmd, ev.payload, [*before, *self._flush(), *after])

    def _ram(self, ev: RamPages | RamZeros | RamRecord) -> Event:
        if isinstance(ev, RamPages) and ev.offset == 0:
            name = self.renames.get(ev.block, ev.block)
            if name in self.peek:
                self.heads[name] = bytes(ev.page(0)[:PEEK_BYTES])
        new = self.renames.get(ev.block)
        if new is None:
            return ev
        if isinstance(ev, RamPages) and ev.legacy is not None:
            # The record bytes name the old block: carry the pages as data instead.
            return RamPages(new, ev.offset, ev.count, ev.named, ev.page_size, data=ev.contiguous())
        return dataclasses.replace(ev, block=new)

    # ---------------------------------------------------------- the sections

    def _flush(self) -> Iterator[Event]:
        if self.done:
            raise CompatError("two EOF records in one stream")
        self.done = True
        footers = self.sections[0].footer if self.sections else self.src.footers
        m = Machine(self.plan.source, tuple(self.sections), self.blocks, dict(self.heads), footers,
                    frozenset(self.iter_ids))
        m = apply(self.plan, m)
        m = dataclasses.replace(m, footers=self.footers)
        out = []
        for sec in m.sections:
            if sec.footer != self.footers:
                sec = dataclasses.replace(sec, footer=self.footers)
            if isinstance(sec, DeviceSection) and not sec.desc:
                sec = _described(sec)
            out.append(sec)
        self.result = dataclasses.replace(m, sections=tuple(out))
        yield from out

    def _vmdesc(self, ev: Vmdesc | None) -> Vmdesc:
        if self.result is None:
            raise CompatError("a vmdesc before the stream's EOF")
        try:
            obj: dict[str, Any] = json.loads(ev.text) if ev is not None else {"page_size": DEFAULT_PAGE_SIZE}
        except ValueError:
            obj = {"page_size": DEFAULT_PAGE_SIZE}
        devices = []
        for sec in self.result.sections:
            if isinstance(sec, DeviceSection):
                devices.append(sec.desc)
            elif sec.desc is not None:
                devices.append(sec.desc)
            else:
                devices.append({"name": sec.idstr, "instance_id": sec.instance_id, "size": sec.size,
                                "fields": [{"name": "data", "size": sec.size, "type": "buffer"}]})
        out = {k: v for k, v in obj.items() if k != "devices"}
        if "configuration" in out and isinstance(out["configuration"], dict):
            out["configuration"] = _configuration_desc(out["configuration"], self.dst.machine)
        out["devices"] = devices
        return Vmdesc(json.dumps(out).encode())

    def finish(self) -> Iterator[Event]:
        if self.identity:
            return
        if not self.done:
            # A stream cut before EOF: still hand out what was transformed.
            yield from self._flush()
        elif self.vmdesc is None and self.dst.vmdesc and not self.postcopy:
            # The source sent none (suppress-vmdesc) but the target's streams carry one: QEMU
            # only warns without it, but a description of what is on the wire costs nothing.
            yield self._vmdesc(None)


def _described(sec: DeviceSection) -> DeviceSection:
    try:
        desc = describe_section(sec.schema, sec.state, sec.idstr, sec.instance_id, sec.version_id)
    except EncodeError as e:
        raise CompatError(f"section {sec.idstr!r} does not fit its schema after the transforms: {e}") from None
    size = _desc_size(desc)
    return dataclasses.replace(sec, desc=desc, size=size)


def _desc_size(desc: dict[str, Any]) -> int:
    total = 0
    for f in desc.get("fields", []):
        total += f["size"] * f.get("array_len", 1)
    for s in desc.get("subsections", []):
        total += 2 + len(s["vmsd_name"]) + 4 + _desc_size(s)
    return total


def _configuration_desc(desc: dict[str, Any], machine: str) -> dict[str, Any]:
    out = dict(desc)
    fields = desc.get("fields", [])
    if isinstance(fields, list):  # a vmdesc is the input's JSON: anything may stand anywhere
        out["fields"] = [dict(f, size=len(machine)) if isinstance(f, dict) and f.get("name") == "name" else f
                         for f in fields]
    return out
