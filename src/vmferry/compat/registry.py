"""The transform registry: register transforms, plan a path between two releases, apply it.

A *release* is a name for one version of a device model or a machine, for
example ``pc-i440fx-2.12``.  A *transform* converts state from one release to
a neighbouring one.  It is registered either

* for one section (:meth:`Registry.section`): a function from a
  :class:`~vmferry.events.DeviceSection` (and the whole :class:`Machine`, to
  read values from elsewhere in the stream) to a new section, applied to
  every section of that vmsd name; or
* for the whole machine (:meth:`Registry.machine`): a function from a
  :class:`Machine` to a new one, which may add, drop, rename, split or merge
  sections.  A machine transform may also rename RAM blocks (``ram``) and
  ask to see the first bytes of some RAM blocks (``peek``); or
* for the stream (:meth:`Registry.stream`): a generator from events to
  events, for what lies outside the device sections: commands (QEMU 10.0's
  ``SWITCHOVER_START``), the configuration section, the vmdesc.  RAM must
  pass through it untouched and unbuffered.

Transforms are registered apart from the serializers, one small function
each, and every one declares whether it is *lossless*: whether the
transforms registered for the opposite step give back exactly what it was
given.  The planner (:meth:`Registry.plan`) finds the chain of steps between
any two releases, in either direction.  It refuses two different paths
(ambiguous) and a missing step (a gap), naming them.  Releases are declared
in ordered *lines* (:meth:`Registry.line`) so that a gap can be named as the
missing step between two neighbours.

A release is a machine type *of one QEMU version*: ``pc-i440fx-7.2`` is the
machine type run by QEMU 7.2, its home; the same machine type run by QEMU
10.0 is ``pc-i440fx-7.2@10.0``.  :meth:`Registry.resolve` turns a machine type
and an optional QEMU version into a release name.

This module does no I/O; :func:`apply` is a pure function of a
:class:`Machine`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from ..errors import CompatError
from ..events import DeviceSection, Event, RamBlock
from .ops import Machine

__all__ = ["Change", "Plan", "Registry", "Release", "Step", "StreamFn", "Transform", "apply"]

SectionFn = Callable[[DeviceSection, Machine], DeviceSection]
MachineFn = Callable[[Machine], Machine]
RamFn = Callable[[Sequence[RamBlock]], Mapping[str, str]]
StreamFn = Callable[[Iterator[Event]], Iterator[Event]]

#: Paths explored before the planner gives up (a guard against pathological graphs).
MAX_EXPANSIONS = 100_000


@dataclass(frozen=True)
class Release:
    """One release and what its streams look like at the top level.

    ``configuration``, ``footers`` and ``vmdesc`` say whether its streams
    carry the configuration section, section footers and the vmdesc
    (spec §1.2, §2.4, §4.6).  ``machine`` is the machine type QEMU names in
    the configuration section (default: ``name``) and ``qemu`` the QEMU
    version that runs it (None: not a QEMU release).
    """

    name: str
    line: str
    configuration: bool = True
    footers: bool = True
    vmdesc: bool = True
    machine: str = ""
    qemu: str | None = None

    def __post_init__(self) -> None:
        if not self.machine:
            object.__setattr__(self, "machine", self.name)


@dataclass(frozen=True)
class Change:
    """One difference between the schemas of two releases that a transform takes care of.

    ``kind`` is one of the kinds :mod:`vmferry.compat.check` reports
    (``section-added``, ``section-removed``, ``field-added``,
    ``field-removed``, ``field-resized``, ``subsection-added``,
    ``subsection-removed``, ``version``, ``ram-block-renamed``); ``section`` is a vmsd name
    and ``item`` the field or subsection concerned (a ``/``-joined path for
    nested ones, e.g. ``kbd/pckbd/extended_state``).  Changes are stated in
    the direction of the transform.
    """

    kind: str
    section: str
    item: str = ""


@dataclass(frozen=True)
class Transform:
    """One registered transform.  See the module docstring."""

    name: str
    source: str
    target: str
    lossless: bool
    mirrors: str
    section: str | None = None
    section_fn: SectionFn | None = None
    machine_fn: MachineFn | None = None
    stream_fn: StreamFn | None = None
    ram: RamFn | None = None
    peek: tuple[str, ...] = ()
    changes: tuple[Change, ...] = ()

    @property
    def kind(self) -> str:
        if self.stream_fn is not None:
            return "stream"
        return "section" if self.section is not None else "machine"

    def __str__(self) -> str:
        where = f"section {self.section!r}" if self.section else self.kind
        return f"{self.name} ({where}, {self.source} -> {self.target}, {'lossless' if self.lossless else 'lossy'})"


@dataclass(frozen=True)
class Step:
    """One step of a plan: the transforms from one release to the next, in registration order."""

    source: str
    target: str
    transforms: tuple[Transform, ...]

    @property
    def lossless(self) -> bool:
        return all(t.lossless for t in self.transforms)


@dataclass(frozen=True)
class Plan:
    """The steps from ``source`` to ``target`` (none when they are equal)."""

    source: str
    target: str
    steps: tuple[Step, ...]
    releases: Mapping[str, Release] = field(default_factory=dict)

    @property
    def lossless(self) -> bool:
        return all(s.lossless for s in self.steps)

    @property
    def path(self) -> list[str]:
        return [self.source] + [s.target for s in self.steps]

    @property
    def transforms(self) -> list[Transform]:
        return [t for s in self.steps for t in s.transforms]

    def stream_fns(self) -> list[StreamFn]:
        """The stream transforms of every step, in order."""
        return [t.stream_fn for t in self.transforms if t.stream_fn is not None]

    def peek_blocks(self) -> set[str]:
        """RAM blocks whose first bytes some transform wants to read."""
        return {b for t in self.transforms for b in t.peek}

    def rename_blocks(self, blocks: Sequence[RamBlock]) -> dict[str, str]:
        """How the plan renames the blocks of a MEM_SIZE list: original name -> final name."""
        names = {b.name: b.name for b in blocks}  # original -> current
        current = list(blocks)
        for t in self.transforms:
            if t.ram is None:
                continue
            ren = dict(t.ram(tuple(current)))
            if not ren:
                continue
            current = [dataclasses.replace(b, name=ren.get(b.name, b.name)) for b in current]
            names = {orig: ren.get(cur, cur) for orig, cur in names.items()}
        return {k: v for k, v in names.items() if k != v}

    def __str__(self) -> str:
        return " -> ".join(self.path)


class Registry:
    """Transforms between releases, and the planner that chains them."""

    def __init__(self) -> None:
        self._releases: dict[str, Release] = {}
        self._lines: dict[str, list[str]] = {}
        self._edges: dict[tuple[str, str], list[Transform]] = {}

    # ------------------------------------------------------------ releases

    def line(self, name: str, releases: Iterable[str | Release]) -> None:
        """Declare a line of releases, oldest first (e.g. every ``pc-i440fx-X.Y``)."""
        order: list[str] = []
        for r in releases:
            rel = r if isinstance(r, Release) else Release(r, name)
            if rel.line != name:
                rel = dataclasses.replace(rel, line=name)
            if rel.name in self._releases:
                raise CompatError(f"release {rel.name!r} is declared twice")
            self._releases[rel.name] = rel
            order.append(rel.name)
        self._lines.setdefault(name, []).extend(order)

    def release(self, name: str) -> Release:
        """The release ``name``; ``MACHINE@QEMU`` also names a release at its home QEMU version."""
        try:
            return self._releases[name]
        except KeyError:
            pass
        machine, _, qemu = name.partition("@")
        if qemu:
            for r in self._releases.values():
                if r.machine == machine and r.qemu == qemu:
                    return r
        raise CompatError(f"unknown release {name!r} (known: {self._known()})") from None

    def resolve(self, machine: str, qemu: str | None = None) -> str:
        """The release of machine type ``machine`` run by QEMU ``qemu``.

        Without ``qemu``: the release named by the machine type alone (its
        home QEMU in the catalogue: ``pc-i440fx-5.2`` is QEMU 7.2's,
        ``pc-i440fx-10.0`` QEMU 10.0's), else the oldest QEMU version that
        has it.  A name with ``@`` is taken as it is (then ``qemu`` must agree).
        """
        if "@" in machine:
            rel = self.release(machine)
            if qemu is not None and rel.qemu != qemu:
                raise CompatError(f"{machine} names QEMU {rel.qemu}, but QEMU {qemu} was given")
            return rel.name
        found = [r for r in self._releases.values() if r.machine == machine]
        if not found:
            return self.release(machine).name  # raises, listing the known releases
        if qemu is None:
            home = [r for r in found if r.name == machine]
            return (home or [min(found, key=lambda r: _version(r.qemu))])[0].name
        for r in found:
            if r.qemu == qemu:
                return r.name
        have = ", ".join(sorted({r.qemu or "?" for r in found}))
        on = []
        for names in self._lines.values():
            ms = [self._releases[n].machine for n in names if self._releases[n].qemu == qemu]
            if ms:
                on.append(f"{ms[0]} .. {ms[-1]}" if len(ms) > 2 else ", ".join(ms))
        hint = f"; QEMU {qemu} has here: {'; '.join(on)}" if on else f"; no QEMU {qemu} releases here"
        family = machine.rsplit("-", 1)[0]
        newest = [r.machine for names in self._lines.values() for n in names
                  for r in (self._releases[n],) if r.qemu == qemu and r.machine.rsplit("-", 1)[0] == family]
        if newest:
            hint += f" (a stream converts to any of them, e.g. --machine {newest[-1]} --qemu-version {qemu})"
        raise CompatError(f"no release of {machine} for QEMU {qemu} (it has QEMU {have}){hint}")

    @property
    def releases(self) -> list[str]:
        return list(self._releases)

    def lines(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._lines.items()}

    def _known(self) -> str:
        parts = []
        for line, names in self._lines.items():
            parts.append(f"{names[0]} .. {names[-1]}" if len(names) > 2 else ", ".join(names))
        return "; ".join(parts) or "none"

    # ---------------------------------------------------------- registering

    def _add(self, t: Transform) -> Transform:
        for r in (t.source, t.target):
            self.release(r)
        if t.source == t.target:
            raise CompatError(f"transform {t.name!r} goes from {t.source!r} to itself")
        self._edges.setdefault((t.source, t.target), []).append(t)
        return t

    def section(self, section: str, source: str, target: str, fn: SectionFn, *, lossless: bool, mirrors: str,
                name: str | None = None, changes: Iterable[Change] = (), peek: Iterable[str] = ()) -> Transform:
        """Register ``fn`` for every section of vmsd ``section`` on the step ``source -> target``.

        ``peek`` names RAM blocks whose first bytes ``fn`` reads (``Machine.ram_head``).
        """
        return self._add(Transform(name or section, source, target, lossless, mirrors, section=section,
                                   section_fn=fn, peek=tuple(peek), changes=tuple(changes)))

    def machine(self, source: str, target: str, fn: MachineFn | None = None, *, lossless: bool, mirrors: str,
                name: str, ram: RamFn | None = None, peek: Iterable[str] = (),
                changes: Iterable[Change] = ()) -> Transform:
        """Register a whole-machine transform on the step ``source -> target``.

        ``fn`` may be None for a step that changes nothing a stream carries
        (the step must still be registered: the planner never assumes one).
        """
        return self._add(Transform(name, source, target, lossless, mirrors, machine_fn=fn or (lambda m: m),
                                   ram=ram, peek=tuple(peek), changes=tuple(changes)))

    def stream(self, source: str, target: str, fn: StreamFn, *, lossless: bool, mirrors: str, name: str,
               changes: Iterable[Change] = ()) -> Transform:
        """Register a stream transform on the step ``source -> target``: ``fn(events) -> events``.

        It sees the stream after the device sections were transformed (the
        configuration already renamed, the vmdesc regenerated) and must pass
        RAM events on as they come.
        """
        return self._add(Transform(name, source, target, lossless, mirrors, stream_fn=fn, changes=tuple(changes)))

    def transforms(self, source: str | None = None, target: str | None = None) -> list[Transform]:
        """Registered transforms, optionally only those of one step."""
        return [t for (s, d), ts in self._edges.items() for t in ts
                if (source is None or s == source) and (target is None or d == target)]

    def steps(self) -> list[tuple[str, str]]:
        return list(self._edges)

    # ------------------------------------------------------------- planning

    def plan(self, source: str, target: str) -> Plan:
        """The unique chain of steps from ``source`` to ``target``.

        Raises :class:`CompatError` for an unknown release, for a gap (naming
        the first missing step along the line) and for two different paths
        (naming both).
        """
        src, dst = self.release(source), self.release(target)
        source, target = src.name, dst.name
        if source == target:
            return Plan(source, target, (), dict(self._releases))
        paths = self._paths(source, target, limit=2)
        if not paths:
            raise CompatError(self._gap(src, dst))
        if len(paths) > 1:
            shown = "; ".join(" -> ".join(p) for p in paths)
            raise CompatError(f"ambiguous: more than one path from {source} to {target}: {shown} "
                              f"(register transforms so that exactly one chain connects them)")
        path = paths[0]
        steps = tuple(Step(a, b, tuple(self._edges[(a, b)])) for a, b in zip(path, path[1:]))
        return Plan(source, target, steps, dict(self._releases))

    def _paths(self, source: str, target: str, limit: int) -> list[list[str]]:
        succ: dict[str, list[str]] = {}
        for a, b in self._edges:
            succ.setdefault(a, []).append(b)
        found: list[list[str]] = []
        expansions = 0
        stack: list[tuple[str, list[str]]] = [(source, [source])]
        while stack and len(found) < limit:
            node, path = stack.pop()
            expansions += 1
            if expansions > MAX_EXPANSIONS:
                raise CompatError(f"too many candidate paths from {source} to {target}")
            for nxt in reversed(succ.get(node, [])):
                if nxt in path:
                    continue
                if nxt == target:
                    found.append(path + [nxt])
                    if len(found) >= limit:
                        break
                else:
                    stack.append((nxt, path + [nxt]))
        return found

    def _gap(self, src: Release, dst: Release) -> str:
        if src.line != dst.line:
            return (f"no path from {src.name} to {dst.name}: they belong to different lines ({src.line}, "
                    f"{dst.line}) and no transform connects them (missing step: {src.name} -> {dst.name})")
        order = self._lines[src.line]
        i, j = order.index(src.name), order.index(dst.name)
        step = 1 if j > i else -1
        reach = {src.name}
        reach.update(p[-1] for p in self._reachable(src.name))
        for k in range(i, j, step):
            a, b = order[k], order[k + step]
            if (a, b) not in self._edges:
                if a in reach:
                    return (f"no path from {src.name} to {dst.name}: missing step {a} -> {b} "
                            f"(no transform is registered for it)")
        return f"no path from {src.name} to {dst.name} (missing step: none of the routes reaches {dst.name})"

    def _reachable(self, source: str) -> list[list[str]]:
        succ: dict[str, list[str]] = {}
        for a, b in self._edges:
            succ.setdefault(a, []).append(b)
        seen = {source}
        out = []
        frontier = [[source]]
        while frontier:
            path = frontier.pop()
            for nxt in succ.get(path[-1], []):
                if nxt not in seen:
                    seen.add(nxt)
                    out.append(path + [nxt])
                    frontier.append(path + [nxt])
        return out


def apply(plan: Plan, machine: Machine) -> Machine:
    """Apply every step of ``plan`` to ``machine`` (which must be in ``plan.source``).

    Section transforms run on every section of their vmsd; machine
    transforms on the whole machine; both in registration order.  The
    result is in ``plan.target``.
    """
    if machine.release != plan.source:
        raise CompatError(f"the plan starts at {plan.source}, but the state is in {machine.release}")
    m = machine
    for step in plan.steps:
        for t in step.transforms:
            m = _apply_one(t, m)
        m = dataclasses.replace(m, release=step.target)
    return m


def _version(v: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")) if v else (0,)


#: What a transform raises when a tree lacks a field it reads or holds a value of another type there (a
#: stream whose vmdesc describes the device otherwise than QEMU's VMSD): refused as a CompatError.
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def _apply_one(t: Transform, m: Machine) -> Machine:
    if t.stream_fn is not None:
        return m  # runs on the event stream (vmferry.compat.stream)
    if t.machine_fn is not None:
        try:
            out = t.machine_fn(m)
        except CompatError as e:
            raise CompatError(f"{t.name} ({t.source} -> {t.target}): {e}") from None
        except _SHAPE_ERRORS as e:
            raise CompatError(f"{t.name} ({t.source} -> {t.target}): the machine's sections are not as QEMU "
                              f"writes them for {t.source} ({type(e).__name__}: {e})") from e
        if not isinstance(out, Machine):
            raise CompatError(f"transform {t.name!r} returned {type(out).__name__}, not a Machine")
        return out
    assert t.section is not None and t.section_fn is not None
    for sec in m.find(t.section):
        try:
            new = t.section_fn(sec, m)
        except CompatError as e:
            raise CompatError(f"{t.name} ({t.source} -> {t.target}) on {sec.idstr!r}: {e}") from None
        except _SHAPE_ERRORS as e:
            raise CompatError(f"{t.name} ({t.source} -> {t.target}) on {sec.idstr!r}: the section is not as QEMU "
                              f"writes it for {t.source} ({type(e).__name__}: {e})") from e
        if not isinstance(new, DeviceSection):
            raise CompatError(f"transform {t.name!r} returned {type(new).__name__}, not a DeviceSection")
        if new is not sec:
            m = m.replace(sec, new)
    return m
