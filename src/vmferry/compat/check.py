"""The static diff of two schema sets: what a stream of one would need to load as the other.

A better ``vmstate-static-checker.py`` (spec §7.5).  Each side is a
:class:`Schemas`: the device descriptions of a stream (its vmdesc, plus what
the stream's head says: configuration, footers, RAM blocks), of a vmdesc
JSON, or of QEMU's ``-dump-vmstate`` JSON.  :func:`diff` lists every
incompatibility:

* ``section-added`` / ``section-removed``;
* ``field-added`` / ``field-removed``, ``field-resized`` (size or element
  count), ``field-changed`` (type, since-version, field test);
* ``version`` (a section or nested VMState whose version the other side
  cannot load: out of ``minimum_version_id .. version_id`` where the
  description says, otherwise simply different);
* ``subsection-added`` / ``subsection-removed`` / ``subsection-changed``;
* for streams: ``configuration-added``/``-removed``, ``footers-added``/
  ``-removed``, ``machine`` (the machine name QEMU compares),
  ``ram-block-added``/``-removed``/``-renamed``/``-resized``,
  ``command-added``/``-removed`` (e.g. QEMU 10.0's ``switchover-start``);
* for vmdescs: ``vmdesc-configuration-added``/``-removed`` (QEMU 10.0
  describes the configuration section in the vmdesc).

Each difference says whether a registered transform covers it: the planner
finds the path between the two sides' machine types and the transforms on
it declare what they change (:class:`~vmferry.compat.registry.Change`).

Items inside nested VMStates are named by their path, ``/``-joined:
``kbd/pckbd/extended_state`` is subsection ``pckbd/extended_state`` of the
struct field ``kbd``.  Pure functions: the caller reads the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..errors import CompatError, SchemaError
from ..events import RamBlock
from ..serialize.qemu_vmdesc import is_dump_vmstate, is_vmdesc
from .machines.vmdesc import writer_qemu_of
from .registry import Change, Registry
from .stream import source_release, without_configuration


__all__ = ["Difference", "FieldDesc", "Report", "Schemas", "SectionDesc", "VmsdDesc", "diff", "from_dump_vmstate",
           "from_vmdesc"]


# ---------------------------------------------------------------------------
# A normal form for descriptions of either kind
# ---------------------------------------------------------------------------


@dataclass
class VmsdDesc:
    """A VMState as described: name, version (and minimum, when known), fields, subsections."""

    name: str
    version: int
    minimum: int | None = None
    fields: list[FieldDesc] = field(default_factory=list)
    subsections: list[VmsdDesc] = field(default_factory=list)


@dataclass
class FieldDesc:
    """A field as described.  ``type`` and ``count`` are unknown (None) in ``-dump-vmstate``;
    ``since`` and ``test`` are known only there."""

    name: str
    type: str | None
    size: int
    count: int | None = 1
    struct: VmsdDesc | None = None
    since: int | None = None
    test: bool | None = None


@dataclass
class SectionDesc:
    key: str
    idstr: str
    instance_id: int | None
    vmsd: VmsdDesc


@dataclass
class Schemas:
    """One side of a diff.

    ``kind`` is ``stream``, ``vmdesc`` or ``dump-vmstate``; ``machine`` the
    machine type if the input names one, ``qemu`` the QEMU version that
    wrote it where the input shows it (a vmdesc that describes the
    configuration section comes from QEMU 10.0, spec §11.8, one without
    array indexes from 11.1, one in QJSON spacing from 5.2) and ``qemus``
    every version it may come from, most likely first.  The
    stream-only facts are None when unknown: ``commands`` the names of the
    commands the stream carries, ``vmdesc_configuration`` whether its vmdesc
    describes the configuration section.
    """

    origin: str
    kind: str
    sections: dict[str, SectionDesc]
    machine: str | None = None
    configuration: bool | None = None
    footers: bool | None = None
    ram: list[RamBlock] | None = None
    qemu: str | None = None
    commands: set[str] | None = None
    vmdesc_configuration: bool | None = None
    qemus: list[str] = field(default_factory=list)
    classes: dict[str, SectionDesc] | None = None  # -dump-vmstate: every device class, by class name

    @property
    def class_level(self) -> bool:
        return self.kind == "dump-vmstate"


def _int(obj: Mapping[str, Any], key: str, path: str, default: int | None = None) -> int:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise SchemaError(f"{path}: expected an integer {key!r}")
    return v


def _str(obj: Mapping[str, Any], key: str, path: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise SchemaError(f"{path}: expected a string {key!r}")
    return v


def _vmdesc_vmsd(d: Mapping[str, Any], path: str, name: str | None = None, version: int | None = None) -> VmsdDesc:
    if not isinstance(d, Mapping):
        raise SchemaError(f"{path}: expected an object")
    out = VmsdDesc(name if name is not None else _str(d, "vmsd_name", path),
                   version if version is not None else _int(d, "version", path))
    entries = d.get("fields", [])
    if not isinstance(entries, list):
        raise SchemaError(f"{path}.fields: expected a list")
    by_name: dict[str, FieldDesc] = {}
    prev_name = None  # the name of the previous entry
    for i, e in enumerate(entries):
        p = f"{path}.fields[{i}]"
        if not isinstance(e, Mapping):
            raise SchemaError(f"{p}: expected an object")
        fname = _str(e, "name", p)
        t = _str(e, "type", p)
        size = _int(e, "size", p)
        struct = None
        if t == "struct" and isinstance(e.get("struct"), Mapping):
            struct = _vmdesc_vmsd(e["struct"], f"{p}.struct")
        elif t in ("tmp", "vstruct") and "fields" in e:
            struct = _vmdesc_vmsd(e, p)
        # One more element of an array described element by element.  QEMU 7.2 writes an
        # "index" on every element, 10.0 leaves it out on the last one (spec §11.8), 11.1
        # writes none: an entry named like the one before it is the next element.
        more = fname in by_name and ("index" in e or fname == prev_name)
        prev_name = fname
        if more:
            prev = by_name[fname]
            prev.count = (prev.count or 1) + 1
            continue
        f = FieldDesc(fname, t, size, _int(e, "array_len", p, 1), struct)
        by_name[fname] = f
        out.fields.append(f)
    subs = d.get("subsections", [])
    if not isinstance(subs, list):
        raise SchemaError(f"{path}.subsections: expected a list")
    out.subsections = [_vmdesc_vmsd(s, f"{path}.subsections[{j}]") for j, s in enumerate(subs)]
    return out


def from_vmdesc(obj: Any, origin: str, kind: str = "vmdesc", machine: str | None = None) -> Schemas:
    """The descriptions of a vmdesc object (a stream's, or a vmdesc JSON file)."""
    if not is_vmdesc(obj):
        raise SchemaError(f"{origin}: not a vmdesc (no 'devices' list)")
    sections: dict[str, SectionDesc] = {}
    for i, dev in enumerate(obj["devices"]):
        path = f"$.devices[{i}]"
        if not isinstance(dev, Mapping):
            raise SchemaError(f"{path}: expected an object")
        idstr = _str(dev, "name", path)
        inst = _int(dev, "instance_id", path)
        if "vmsd_name" in dev:
            vmsd = _vmdesc_vmsd(dev, path)
        else:  # an old-style section: one opaque buffer
            vmsd = VmsdDesc(idstr, 0, None, [FieldDesc("data", "buffer", _int(dev, "size", path))])
        key = idstr if inst == 0 else f"{idstr}#{inst}"
        sections[key] = SectionDesc(key, idstr, inst, vmsd)
    has_config = isinstance(obj.get("configuration"), Mapping)
    qemus = writer_qemu_of(obj)
    return Schemas(origin, kind, sections, machine, qemu=qemus[0], vmdesc_configuration=has_config, qemus=qemus)


def _dump_vmsd(d: Mapping[str, Any], path: str) -> VmsdDesc:
    if not isinstance(d, Mapping):
        raise SchemaError(f"{path}: expected an object")
    out = VmsdDesc(_str(d, "name", path), _int(d, "version_id", path), _int(d, "minimum_version_id", path, 0))
    seen: dict[str, int] = {}
    raw = d.get("Fields", [])
    if not isinstance(raw, list):
        raise SchemaError(f"{path}.Fields: expected a list")
    names = [f.get("field") if isinstance(f, Mapping) else None for f in raw]
    for i, f in enumerate(raw):
        p = f"{path}.Fields[{i}]"
        if not isinstance(f, Mapping):
            raise SchemaError(f"{p}: expected an object")
        fname = _str(f, "field", p)
        if names.count(fname) > 1:  # QEMU's vmdesc spelling of repeated names
            k = seen.get(fname, 0)
            seen[fname] = k + 1
            fname = f"{fname}[{k}]"
        struct = _dump_vmsd(f["Description"], f"{p}.Description") if "Description" in f else None
        out.fields.append(FieldDesc(fname, "struct" if struct else None, _int(f, "size", p), None, struct,
                                    _int(f, "version_id", p, 0), bool(f.get("field_exists", False))))
    subs = d.get("Subsections", [])
    if not isinstance(subs, list):
        raise SchemaError(f"{path}.Subsections: expected a list")
    out.subsections = [_dump_vmsd(s, f"{path}.Subsections[{j}]") for j, s in enumerate(subs)]
    return out


def from_dump_vmstate(obj: Any, origin: str) -> Schemas:
    """The descriptions of a ``-dump-vmstate`` file, one per device class, keyed by vmsd name."""
    if not is_dump_vmstate(obj):
        raise SchemaError(f"{origin}: not a -dump-vmstate file (no 'vmschkmachine')")
    machine = obj["vmschkmachine"].get("Name") if isinstance(obj["vmschkmachine"], Mapping) else None
    sections: dict[str, SectionDesc] = {}
    classes: dict[str, SectionDesc] = {}
    for key, entry in obj.items():
        if key == "vmschkmachine" or not isinstance(entry, Mapping) or "Description" not in entry:
            continue
        vmsd = _dump_vmsd(entry["Description"], f"$[{key!r}].Description")
        sections.setdefault(vmsd.name, SectionDesc(vmsd.name, vmsd.name, None, vmsd))
        classes[key] = SectionDesc(key, key, None, vmsd)  # several classes may share a vmsd
    return Schemas(origin, "dump-vmstate", sections, machine if isinstance(machine, str) else None, classes=classes)


def _by_vmsd_name(s: Schemas, other: Schemas) -> dict[str, SectionDesc]:
    """One description per vmsd name; where several classes share one (7.2's serial-mm and isa-serial),
    the class the other side has too, so that like is compared with like."""
    mine, theirs = s.classes or s.sections, other.classes or other.sections
    shared = {k for k, sec in mine.items() if k in theirs and theirs[k].vmsd.name == sec.vmsd.name}
    out: dict[str, SectionDesc] = {}
    for key, sec in sorted(mine.items(), key=lambda kv: kv[0] not in shared):
        out.setdefault(sec.vmsd.name, SectionDesc(sec.vmsd.name, sec.vmsd.name, None, sec.vmsd))
    return out


# ---------------------------------------------------------------------------
# The diff
# ---------------------------------------------------------------------------


@dataclass
class Difference:
    """One incompatibility between the two sides, stated from A to B."""

    kind: str
    section: str  # the section key (idstr, or vmsd name for class-level input); "stream"/"ram" for those
    vmsd: str  # the vmsd name (what transforms are registered for)
    item: str = ""
    detail: str = ""
    covered_by: list[str] = field(default_factory=list)

    @property
    def covered(self) -> bool:
        return bool(self.covered_by)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "section": self.section, "vmsd": self.vmsd, "item": self.item,
                "detail": self.detail, "covered": self.covered, "covered_by": list(self.covered_by)}


@dataclass
class Report:
    a: Schemas
    b: Schemas
    differences: list[Difference]
    plan: list[str] | None = None  # the releases the path goes through, when one was found
    plan_error: str | None = None

    @property
    def uncovered(self) -> list[Difference]:
        return [d for d in self.differences if not d.covered]

    def as_dict(self) -> dict[str, Any]:
        return {"a": {"origin": self.a.origin, "kind": self.a.kind, "machine": self.a.machine, "qemu": self.a.qemu},
                "b": {"origin": self.b.origin, "kind": self.b.kind, "machine": self.b.machine, "qemu": self.b.qemu},
                "plan": self.plan, "plan_error": self.plan_error,
                "differences": [d.as_dict() for d in self.differences],
                "uncovered": len(self.uncovered)}


def diff(a: Schemas, b: Schemas, registry: Registry | None = None, *, source: str | None = None,
         target: str | None = None, source_qemu: str | None = None, target_qemu: str | None = None) -> Report:
    """Every incompatibility of a stream described by ``a`` loaded as ``b``, and what covers it.

    ``source``/``target`` name the machine types when the inputs do not
    (a vmdesc JSON); they override what the inputs say, as ``source_qemu``/
    ``target_qemu`` override the QEMU versions the inputs show.  A stream
    without a configuration section gets the one release of the catalogue
    that sends none.
    """
    out: list[Difference] = []
    class_level = a.class_level or b.class_level
    sa = _by_vmsd_name(a, b) if class_level else a.sections
    sb = _by_vmsd_name(b, a) if class_level else b.sections
    for key, sec in sa.items():
        if key not in sb:
            out.append(Difference("section-removed", key, sec.vmsd.name, "", f"{sec.vmsd.name} v{sec.vmsd.version}"))
    for key, sec in sb.items():
        if key not in sa:
            out.append(Difference("section-added", key, sec.vmsd.name, "", f"{sec.vmsd.name} v{sec.vmsd.version}"))
    for key, sec in sa.items():
        if key in sb:
            _vmsd_diff(sec.vmsd, sb[key].vmsd, key, sec.vmsd.name, "", out)
    out.extend(_stream_diff(a, b))

    plan: list[str] | None = None
    plan_error = None
    src, dst = source or a.machine, target or b.machine
    if registry is not None:
        for side, name in ((a, src), (b, dst)):
            if not name and side.kind == "stream" and side.configuration is False \
                    and len(without_configuration(registry, side.qemus)) == 1:
                name = without_configuration(registry, side.qemus)[0]
                if side is a:
                    src = name
                else:
                    dst = name
    if registry is not None and src and dst:
        try:
            src = _resolve(registry, src, source_qemu, None if source else a.qemus)
            dst = _resolve(registry, dst, target_qemu, None if target else b.qemus)
            p = registry.plan(src, dst)
            plan = p.path
            _cover(out, p.transforms, src != dst)
        except CompatError as e:
            plan_error = str(e)
    elif registry is not None:
        plan_error = "the machine types are unknown (give them with --from-machine/--to-machine)"
    return Report(a, b, out, plan, plan_error)


def _resolve(registry: Registry, machine: str, qemu: str | None, shown: list[str] | None) -> str:
    """The release of ``machine``: of QEMU ``qemu`` if given, else of the first QEMU the input shows that has it."""
    if qemu is not None:
        return registry.resolve(machine, qemu)
    return source_release(None, machine, registry, shown or None)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _vmsd_diff(va: VmsdDesc, vb: VmsdDesc, key: str, vmsd: str, prefix: str, out: list[Difference],
               on_wire: bool = True) -> None:
    """Compare two VMStates; ``on_wire`` is False for nested structs, whose version QEMU never sends."""
    if va.name != vb.name:
        out.append(Difference("field-changed" if prefix else "section-changed", key, vmsd, prefix,
                              f"VMState {va.name!r} became {vb.name!r}"))
        return
    if on_wire and (va.version != vb.version or (vb.minimum is not None and va.version < vb.minimum)):
        loadable = vb.minimum is not None and vb.minimum <= va.version <= vb.version
        if not loadable:
            rng = f"{vb.minimum}..{vb.version}" if vb.minimum is not None else str(vb.version)
            out.append(Difference("version", key, vmsd, prefix, f"version {va.version}, the other side loads {rng}"))
    fa = {f.name: f for f in va.fields}
    fb = {f.name: f for f in vb.fields}
    for f in va.fields:
        if f.name not in fb:
            out.append(Difference("field-removed", key, vmsd, _join(prefix, f.name), _fdesc(f)))
    for f in vb.fields:
        if f.name not in fa:
            out.append(Difference("field-added", key, vmsd, _join(prefix, f.name), _fdesc(f)))
    for f in va.fields:
        g = fb.get(f.name)
        if g is None:
            continue
        item = _join(prefix, f.name)
        if f.struct is not None and g.struct is not None:
            if f.count != g.count and f.count is not None and g.count is not None:
                out.append(Difference("field-resized", key, vmsd, item, f"{f.count} -> {g.count} elements"))
            _vmsd_diff(f.struct, g.struct, key, vmsd, item, out, on_wire=False)
            continue
        retyped = f.type is not None and g.type is not None and f.type != g.type
        if f.size != g.size or (f.count is not None and g.count is not None and f.count != g.count):
            types = f" ({f.type} -> {g.type})" if retyped else ""
            out.append(Difference("field-resized", key, vmsd, item, f"{_fsize(f)} -> {_fsize(g)}{types}"))
        elif retyped:
            out.append(Difference("field-changed", key, vmsd, item, f"type {f.type} -> {g.type}"))
        if f.since is not None and g.since is not None and f.since != g.since:
            out.append(Difference("field-changed", key, vmsd, item, f"since version {f.since} -> {g.since}"))
        if f.test is not None and g.test is not None and f.test != g.test:
            out.append(Difference("field-changed", key, vmsd, item,
                                  "gained a field test" if g.test else "lost its field test"))
    sa = {s.name: s for s in va.subsections}
    sb = {s.name: s for s in vb.subsections}
    for s in va.subsections:
        if s.name not in sb:
            out.append(Difference("subsection-removed", key, vmsd, _join(prefix, s.name), f"version {s.version}"))
    for s in vb.subsections:
        if s.name not in sa:
            out.append(Difference("subsection-added", key, vmsd, _join(prefix, s.name), f"version {s.version}"))
    for s in va.subsections:
        t = sb.get(s.name)
        if t is not None:
            sub_out: list[Difference] = []
            _vmsd_diff(s, t, key, vmsd, _join(prefix, s.name), sub_out)
            for d in sub_out:
                if d.kind == "version" and d.item == _join(prefix, s.name):
                    d.kind = "subsection-changed"
            out.extend(sub_out)


def _fsize(f: FieldDesc) -> str:
    n = f.count if f.count is not None else 1
    return f"{n} x {f.size} bytes" if n != 1 else f"{f.size} bytes"


def _fdesc(f: FieldDesc) -> str:
    return f"{f.type or 'field'} of {_fsize(f)}"


def _stream_diff(a: Schemas, b: Schemas) -> list[Difference]:
    out: list[Difference] = []
    if a.configuration is not None and b.configuration is not None and a.configuration != b.configuration:
        kind = "configuration-added" if b.configuration else "configuration-removed"
        out.append(Difference(kind, "stream", "configuration", "", "the configuration section (machine name)"))
    if a.footers is not None and b.footers is not None and a.footers != b.footers:
        out.append(Difference("footers-added" if b.footers else "footers-removed", "stream", "stream", "",
                              "section footers"))
    if a.configuration and b.configuration and a.machine and b.machine and a.machine != b.machine:
        out.append(Difference("machine", "stream", "configuration", "name", f"{a.machine} -> {b.machine}"))
    if a.commands is not None and b.commands is not None:
        for name in sorted(a.commands - b.commands):
            out.append(Difference("command-removed", "stream", "stream", name, f"QEMU_VM_COMMAND {name}"))
        for name in sorted(b.commands - a.commands):
            out.append(Difference("command-added", "stream", "stream", name, f"QEMU_VM_COMMAND {name}"))
    if a.vmdesc_configuration is not None and b.vmdesc_configuration is not None \
            and a.vmdesc_configuration != b.vmdesc_configuration:
        kind = "vmdesc-configuration-added" if b.vmdesc_configuration else "vmdesc-configuration-removed"
        out.append(Difference(kind, "vmdesc", "vmdesc", "configuration",
                              "the vmdesc's description of the configuration section"))
    if a.ram is not None and b.ram is not None:
        ra = {r.name: r for r in a.ram}
        rb = {r.name: r for r in b.ram}
        gone = [r for r in a.ram if r.name not in rb]
        new = [r for r in b.ram if r.name not in ra]
        for r in list(gone):
            base = r.name.rsplit("/", 1)[-1]
            twin = [n for n in new if n.name.rsplit("/", 1)[-1] == base and n.length == r.length]
            if len(twin) == 1:
                out.append(Difference("ram-block-renamed", "ram", "ram", base, f"{r.name} -> {twin[0].name}"))
                gone.remove(r)
                new.remove(twin[0])
        for r in gone:
            out.append(Difference("ram-block-removed", "ram", "ram", r.name, f"{r.length:#x} bytes"))
        for r in new:
            out.append(Difference("ram-block-added", "ram", "ram", r.name, f"{r.length:#x} bytes"))
        for name, r in ra.items():
            if name in rb and rb[name].length != r.length:
                out.append(Difference("ram-block-resized", "ram", "ram", name,
                                      f"{r.length:#x} -> {rb[name].length:#x} bytes"))
    return out


_ALWAYS = {"machine"}  # what every plan takes care of (the stream runner rewrites the name)


def _cover(diffs: Sequence[Difference], transforms: Iterable[Any], moving: bool) -> None:
    changes: list[tuple[Change, str]] = [(c, t.name) for t in transforms for c in t.changes]
    for d in diffs:
        if d.kind in _ALWAYS and moving:
            d.covered_by.append("configuration rewrite")
            continue
        for c, name in changes:
            if c.kind == d.kind and c.section == d.vmsd and (not c.item or c.item == d.item):
                if name not in d.covered_by:
                    d.covered_by.append(name)
