"""Reusable operations that transforms are made of.

Each operation is a small pure function.  The value operations take a
:class:`Node` (a VMState's schema and its tree, which always change together:
the schema is what the encoder writes the tree with and what the vmdesc is
regenerated from) and return a new one; the section operations take a
:class:`~vmferry.events.DeviceSection` and return a new one; the machine
operations take a :class:`Machine` (every device section of a stream, with
the RAM block list) and return a new one.  Nothing is modified in place:
the dicts along the path to a change are copied and everything else is
shared, so a transform costs what it changes, not the size of the state.

``path`` arguments lead into nested VMStates: each element is a key of the
tree that holds a nested VMState, that is the name of a struct field
(``"kbd"``) or of a subsection (``"ich9_pm/pcihp"``).  Field names may contain
dots (``"acpi_pci_hotplug.acpi_index"`` is one QEMU field name), which is why a
path is a tuple and never a dotted string.

Every operation refuses what it cannot do with a
:class:`~vmferry.errors.CompatError` that names the section and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import CompatError
from ..events import DeviceSection, OpaqueSection, RamBlock
from ..serialize.schema import Field, Subsection, Vmsd

__all__ = [
    "Machine",
    "Node",
    "Part",
    "add_field",
    "add_section",
    "add_subsection",
    "drop_field",
    "drop_sections",
    "drop_subsection",
    "get",
    "has_field",
    "merge",
    "merge_sections",
    "new_section",
    "node",
    "on_section",
    "refuse_subsections",
    "rename_field",
    "rename_section",
    "renaming",
    "set_field",
    "set_version",
    "split",
    "split_section",
    "with_node",
]

Path = tuple[str, ...]
Section = DeviceSection | OpaqueSection


# ---------------------------------------------------------------------------
# Values: one VMState's schema and tree
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """A VMState value: its schema and its tree (treated as read-only)."""

    vmsd: Vmsd
    tree: Mapping[str, Any]


def _where(n: Node, path: Path) -> str:
    return "/".join((n.vmsd.name, *path)) if path else n.vmsd.name


def _descend(n: Node, key: str) -> Node:
    """The nested VMState stored under ``key`` (a struct field or a subsection)."""
    if "/" in key:
        sub = n.vmsd.subsection(key)
        if sub is None:
            raise CompatError(f"{n.vmsd.name}: the schema has no subsection {key!r}")
        value = n.tree.get(key)
        if not isinstance(value, Mapping):
            raise CompatError(f"{n.vmsd.name}: subsection {key!r} is not in the state")
        return Node(sub.vmsd, value)
    try:
        f = n.vmsd.field(key)
    except KeyError:
        raise CompatError(f"{n.vmsd.name}: no field {key!r}") from None
    if f.struct is None or f.is_array:
        raise CompatError(f"{n.vmsd.name}: field {key!r} is not a single nested struct")
    value = n.tree.get(key)
    if not isinstance(value, Mapping):
        raise CompatError(f"{n.vmsd.name}: field {key!r} is not in the state")
    return Node(f.struct, value)


def _replace_child(n: Node, key: str, child: Node) -> Node:
    tree = dict(n.tree)
    tree[key] = child.tree
    if "/" in key:
        subs = tuple(Subsection(child.vmsd, s.needed) if s.vmsd.name == key else s for s in n.vmsd.subsections)
        return Node(dataclasses.replace(n.vmsd, subsections=subs), tree)
    fields = tuple(dataclasses.replace(f, struct=child.vmsd) if f.name == key else f for f in n.vmsd.fields)
    return Node(dataclasses.replace(n.vmsd, fields=fields), tree)


def at(n: Node, path: Sequence[str], op: Callable[[Node], Node]) -> Node:
    """Apply ``op`` to the nested VMState at ``path`` and rebuild the parents around the result."""
    path = tuple(path)
    if not path:
        return op(n)
    child = _descend(n, path[0])
    return _replace_child(n, path[0], at(child, path[1:], op))


def get(n: Node, name: str, path: Sequence[str] = ()) -> Any:
    """The value of field (or subsection) ``name`` at ``path``."""
    target = n
    for key in path:
        target = _descend(target, key)
    if name not in target.tree:
        raise CompatError(f"{_where(n, tuple(path))}: no value for {name!r}")
    return target.tree[name]


def has_field(n: Node, name: str, path: Sequence[str] = ()) -> bool:
    """Whether the tree holds field (or subsection) ``name`` at ``path`` (False where ``path`` is missing)."""
    tree: Any = n.tree
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
    return isinstance(tree, Mapping) and name in tree


def _index(vmsd: Vmsd, name: str) -> int:
    for i, f in enumerate(vmsd.fields):
        if f.name == name:
            return i
    raise CompatError(f"{vmsd.name}: no field {name!r}")


def add_field(n: Node, f: Field, value: Any, *, after: str | None = None, before: str | None = None,
              path: Sequence[str] = ()) -> Node:
    """Add field ``f`` holding ``value``.

    ``value`` may be a callable: it is given the tree of the VMState the field
    goes into and returns the value (a value computed from the other fields;
    a transform that needs values from elsewhere in the stream computes them
    from the :class:`Machine` and passes the result).  The field goes after
    ``after``, before ``before``, or at the end.
    """

    def op(m: Node) -> Node:
        if any(x.name == f.name for x in m.vmsd.fields) or f.name in m.tree:
            raise CompatError(f"{_where(n, tuple(path))}: field {f.name!r} already exists")
        if after is not None:
            i = _index(m.vmsd, after) + 1
        elif before is not None:
            i = _index(m.vmsd, before)
        else:
            i = len(m.vmsd.fields)
        fields = m.vmsd.fields[:i] + (f,) + m.vmsd.fields[i:]
        v = value(m.tree) if callable(value) else value
        # Keep the tree in wire order: fields in schema order, then the subsections.
        tree: dict[str, Any] = {}
        for x in fields:
            if x.name == f.name:
                tree[x.name] = v
            elif x.name in m.tree:
                tree[x.name] = m.tree[x.name]
        for k, val in m.tree.items():
            if k not in tree:
                tree[k] = val
        return Node(dataclasses.replace(m.vmsd, fields=fields), tree)

    return at(n, path, op)


def drop_field(n: Node, name: str, *, path: Sequence[str] = ()) -> Node:
    """Remove field ``name`` (its value is lost)."""

    def op(m: Node) -> Node:
        i = _index(m.vmsd, name)
        for other in m.vmsd.fields:
            if name in (other.count_field, other.size_field):
                raise CompatError(f"{_where(n, tuple(path))}: field {name!r} holds the length of {other.name!r}; "
                                  f"drop that first")
        tree = {k: v for k, v in m.tree.items() if k != name}
        return Node(dataclasses.replace(m.vmsd, fields=m.vmsd.fields[:i] + m.vmsd.fields[i + 1:]), tree)

    return at(n, path, op)


def rename_field(n: Node, old: str, new: str, *, path: Sequence[str] = ()) -> Node:
    """Rename field ``old`` to ``new``; the value and the wire bytes stay the same."""

    def op(m: Node) -> Node:
        i = _index(m.vmsd, old)
        if any(x.name == new for x in m.vmsd.fields):
            raise CompatError(f"{_where(n, tuple(path))}: field {new!r} already exists")

        def ref(r: str | None) -> str | None:
            return new if r == old else r

        fields = tuple(
            dataclasses.replace(x, name=new) if j == i else
            dataclasses.replace(x, count_field=ref(x.count_field), size_field=ref(x.size_field))
            for j, x in enumerate(m.vmsd.fields))
        tree = {(new if k == old else k): v for k, v in m.tree.items()}
        return Node(dataclasses.replace(m.vmsd, fields=fields), tree)

    return at(n, path, op)


def set_field(n: Node, name: str, value: Any, *, path: Sequence[str] = ()) -> Node:
    """Change the value of an existing field (``value`` may be a callable of the tree)."""

    def op(m: Node) -> Node:
        _index(m.vmsd, name)
        tree = dict(m.tree)
        tree[name] = value(m.tree) if callable(value) else value
        return Node(m.vmsd, tree)

    return at(n, path, op)


def add_subsection(n: Node, sub: Vmsd, tree: Mapping[str, Any], *, before: str | None = None,
                   path: Sequence[str] = ()) -> Node:
    """Add subsection ``sub`` with ``tree`` (before subsection ``before``, or last).

    QEMU writes subsections in declaration order and matches them by name on
    load, so ``before`` only matters for a byte-exact result.
    """

    def op(m: Node) -> Node:
        if m.vmsd.subsection(sub.name) is not None or sub.name in m.tree:
            raise CompatError(f"{_where(n, tuple(path))}: subsection {sub.name!r} already exists")
        subs = list(m.vmsd.subsections)
        names = [s.vmsd.name for s in subs]
        i = names.index(before) if before in names else len(subs)
        subs.insert(i, Subsection(sub))
        new_tree = {k: v for k, v in m.tree.items() if "/" not in k}
        for s in subs:
            if s.vmsd.name == sub.name:
                new_tree[sub.name] = dict(tree)
            elif s.vmsd.name in m.tree:
                new_tree[s.vmsd.name] = m.tree[s.vmsd.name]
        for k, v in m.tree.items():  # subsections the schema does not list stay where they were
            new_tree.setdefault(k, v)
        return Node(dataclasses.replace(m.vmsd, subsections=tuple(subs)), new_tree)

    return at(n, path, op)


def drop_subsection(n: Node, name: str, *, path: Sequence[str] = (), missing_ok: bool = True) -> Node:
    """Remove subsection ``name`` from the schema and the tree (nothing to do if absent and ``missing_ok``)."""

    def op(m: Node) -> Node:
        if m.vmsd.subsection(name) is None and name not in m.tree:
            if missing_ok:
                return m
            raise CompatError(f"{_where(n, tuple(path))}: no subsection {name!r}")
        subs = tuple(s for s in m.vmsd.subsections if s.vmsd.name != name)
        tree = {k: v for k, v in m.tree.items() if k != name}
        return Node(dataclasses.replace(m.vmsd, subsections=subs), tree)

    return at(n, path, op)


def set_vmsd_version(n: Node, version: int, *, path: Sequence[str] = ()) -> Node:
    """Change the version of a nested VMState (a subsection's version is on the wire)."""
    return at(n, path, lambda m: Node(dataclasses.replace(m.vmsd, version_id=version), m.tree))


@dataclass(frozen=True)
class Part:
    """One piece of a split VMState: which fields and subsections go where.

    ``idstr``/``instance_id`` name the section the piece becomes (used by
    :func:`split_section`); ``vmsd_name`` and ``version`` are its schema's.
    """

    vmsd_name: str
    version: int
    fields: tuple[str, ...] = ()
    subsections: tuple[str, ...] = ()
    idstr: str = ""
    instance_id: int = 0


def split(n: Node, parts: Sequence[Part]) -> list[Node]:
    """Split one VMState into several: every field and subsection goes to exactly one part.

    A count or size field must go with the field it counts.  Subsections
    named by a part but absent (not sent) are fine.  Inverse: :func:`merge`.
    """
    owner: dict[str, int] = {}
    for i, p in enumerate(parts):
        for name in (*p.fields, *p.subsections):
            if name in owner:
                raise CompatError(f"{n.vmsd.name}: {name!r} is given to two parts of the split")
            owner[name] = i
    known = {f.name for f in n.vmsd.fields} | {s.vmsd.name for s in n.vmsd.subsections} | set(n.tree)
    unplaced = sorted(known - set(owner))
    if unplaced:
        raise CompatError(f"{n.vmsd.name}: the split places no part for {', '.join(map(repr, unplaced))}")
    unknown = sorted(x for x in set(owner) - known if "/" not in x)  # a subsection may simply not be sent
    if unknown:
        raise CompatError(f"{n.vmsd.name}: the split names unknown {', '.join(map(repr, unknown))}")
    out = []
    for i, p in enumerate(parts):
        fields = tuple(f for f in n.vmsd.fields if owner[f.name] == i)
        for f in fields:
            for ref in (f.count_field, f.size_field):
                if ref is not None and owner.get(ref) != i:
                    raise CompatError(f"{n.vmsd.name}: {f.name!r} and its length field {ref!r} must go to the "
                                      f"same part")
        subs = tuple(s for s in n.vmsd.subsections if owner[s.vmsd.name] == i)
        names = {f.name for f in fields} | {s.vmsd.name for s in subs}
        tree = {k: v for k, v in n.tree.items() if k in names}
        out.append(Node(Vmsd(p.vmsd_name, p.version, min(p.version, n.vmsd.minimum_version_id), fields, subs), tree))
    return out


def merge(nodes: Sequence[Node], vmsd_name: str, version: int, *, order: Sequence[str] | None = None,
          minimum_version: int = 0) -> Node:
    """Merge several VMStates into one (the inverse of :func:`split`).

    Fields are concatenated in the order of ``nodes``, or in ``order`` (field
    and subsection names) when given; names must not repeat.
    """
    fields: list[Field] = []
    subs: list[Subsection] = []
    tree: dict[str, Any] = {}
    for nd in nodes:
        for f in nd.vmsd.fields:
            if any(x.name == f.name for x in fields):
                raise CompatError(f"merging into {vmsd_name}: field {f.name!r} comes from two sections")
            fields.append(f)
        subs.extend(nd.vmsd.subsections)
        tree.update(nd.tree)
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        missing = [f.name for f in fields if f.name not in rank] + [s.vmsd.name for s in subs if s.vmsd.name not in rank]
        if missing:
            raise CompatError(f"merging into {vmsd_name}: {', '.join(map(repr, missing))} not in the given order")
        fields.sort(key=lambda f: rank[f.name])
        subs.sort(key=lambda s: rank[s.vmsd.name])
    ordered = {f.name: tree[f.name] for f in fields if f.name in tree}
    ordered.update({s.vmsd.name: tree[s.vmsd.name] for s in subs if s.vmsd.name in tree})
    return Node(Vmsd(vmsd_name, version, minimum_version, tuple(fields), tuple(subs)), ordered)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------


def node(sec: DeviceSection) -> Node:
    """The section's top-level VMState."""
    return Node(sec.schema, sec.state)


def with_node(sec: DeviceSection, n: Node, *, version: int | None = None) -> DeviceSection:
    """A copy of ``sec`` holding ``n`` (and at ``version``, when given)."""
    v = sec.version_id if version is None else version
    vmsd = n.vmsd if n.vmsd.version_id == v else dataclasses.replace(n.vmsd, version_id=v)
    return dataclasses.replace(sec, schema=vmsd, state=dict(n.tree), version_id=v, desc={}, size=0)


def on_section(sec: DeviceSection, op: Callable[..., Node], *args: Any, **kwargs: Any) -> DeviceSection:
    """Apply a value operation to a section: ``on_section(sec, add_field, Field(...), 0)``."""
    return with_node(sec, op(node(sec), *args, **kwargs))


def set_version(sec: DeviceSection, version: int) -> DeviceSection:
    """Change a section's version (the one in its header and its vmdesc entry)."""
    if version < 0 or version > 0xFFFFFFFF:
        raise CompatError(f"{sec.idstr}: version {version} out of range")
    return with_node(sec, node(sec), version=version)


def new_section(idstr: str, instance_id: int, n: Node, *, version: int | None = None) -> DeviceSection:
    """A FULL section for ``n`` (its section id is assigned by :func:`add_section`)."""
    v = n.vmsd.version_id if version is None else version
    return DeviceSection(-1, idstr, instance_id, v, dict(n.tree), n.vmsd, {}, True, 0)


def renaming(old: str, new: str, path: Sequence[str] = ()) -> Callable[[DeviceSection, Machine], DeviceSection]:
    """A section transform (as ``Registry.section`` takes it): field ``old`` at ``path`` renamed ``new``
    (:func:`rename_field`); a section without it passes unchanged."""

    def fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        n = node(sec)
        return with_node(sec, rename_field(n, old, new, path=path)) if has_field(n, old, path) else sec

    return fn


def refuse_subsections(names: Sequence[str], why: str) -> Callable[[DeviceSection, Machine], DeviceSection]:
    """A section transform that passes a section holding none of the subsections ``names`` and refuses one that
    holds any: CompatError ``<the ones it holds>: <why>``."""

    def fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        found = [s for s in names if s in sec.state]
        if found:
            raise CompatError(f"{', '.join(found)}: {why}")
        return sec

    return fn


# ---------------------------------------------------------------------------
# The machine: every section of a stream
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What machine transforms work on: the device sections of one stream, in stream order.

    ``release`` is the release the state is in (it changes as the steps of a
    plan apply).  ``ram`` is the MEM_SIZE block list (after any renames) and
    ``ram_head`` the first bytes of the blocks a transform asked to look at
    (e.g. the ACPI RSDP), so that transforms can derive values from guest
    memory.  ``footers`` says whether sections end with a footer, and
    ``other_ids`` holds the ids of the iterative sections (``ram``), which new
    sections must not reuse.
    """

    release: str
    sections: tuple[Section, ...] = ()
    ram: tuple[RamBlock, ...] = ()
    ram_head: Mapping[str, bytes] = field(default_factory=dict)
    footers: bool = True
    other_ids: frozenset[int] = frozenset()  # section ids of the stream's iterative sections (ram)

    def free_section_id(self) -> int:
        """A section id no section of the stream uses (one above every id in use)."""
        used = [s.section_id for s in self.sections] + list(self.other_ids)
        return max(used, default=-1) + 1

    def find(self, vmsd_name: str) -> list[DeviceSection]:
        """The device sections whose vmsd is ``vmsd_name``."""
        return [s for s in self.sections if isinstance(s, DeviceSection) and s.schema.name == vmsd_name]

    def one(self, vmsd_name: str) -> DeviceSection | None:
        """The only section of vmsd ``vmsd_name`` (None if absent; an error if several)."""
        found = self.find(vmsd_name)
        if len(found) > 1:
            raise CompatError(f"{len(found)} sections of vmsd {vmsd_name!r}, expected at most one")
        return found[0] if found else None

    def get(self, idstr: str, instance_id: int = 0) -> Section | None:
        for s in self.sections:
            if s.idstr == idstr and s.instance_id == instance_id:
                return s
        return None

    def block(self, name: str) -> RamBlock | None:
        for b in self.ram:
            if b.name == name:
                return b
        return None

    def replace(self, old: Section, new: Section) -> Machine:
        return dataclasses.replace(self, sections=tuple(new if s is old else s for s in self.sections))


def _vmsd_name(s: Section) -> str:
    return s.schema.name if isinstance(s, DeviceSection) else s.idstr


def add_section(m: Machine, sec: Section, *, after: str | None = None, before: str | None = None) -> Machine:
    """Add ``sec`` after (or before) the last section of vmsd ``after`` (or the first of ``before``).

    Without an anchor (or when the anchor is absent) the section goes last,
    ahead of ``globalstate`` (which QEMU always writes last).  A section id is
    assigned when ``sec`` has none (a negative id): one above every id in use,
    the iterative sections' included.
    QEMU matches sections by idstr and instance id and accepts any order.
    """
    if m.get(sec.idstr, sec.instance_id) is not None:
        raise CompatError(f"section {sec.idstr!r} instance {sec.instance_id} already exists")
    if sec.section_id < 0:
        sec = dataclasses.replace(sec, section_id=m.free_section_id())
    sec = dataclasses.replace(sec, footer=m.footers)
    sections = list(m.sections)
    pos = None
    if after is not None:
        hits = [i for i, s in enumerate(sections) if _vmsd_name(s) == after]
        pos = hits[-1] + 1 if hits else None
    elif before is not None:
        hits = [i for i, s in enumerate(sections) if _vmsd_name(s) == before]
        pos = hits[0] if hits else None
    if pos is None:
        last = [i for i, s in enumerate(sections) if _vmsd_name(s) == "globalstate"]
        pos = last[0] if last else len(sections)
    sections.insert(pos, sec)
    return dataclasses.replace(m, sections=tuple(sections))


def drop_sections(m: Machine, which: str | Callable[[Section], bool]) -> Machine:
    """Remove every section of vmsd ``which`` (or for which the predicate holds)."""
    pred = (lambda s: _vmsd_name(s) == which) if isinstance(which, str) else which
    return dataclasses.replace(m, sections=tuple(s for s in m.sections if not pred(s)))


def rename_section(m: Machine, vmsd_name: str, *, idstr: Callable[[str], str] | None = None,
                   new_vmsd_name: str | None = None) -> Machine:
    """Rename every section of vmsd ``vmsd_name``: its idstr (through ``idstr``) and/or its vmsd name.

    A new vmsd name also renames the subsections that carry the old one as
    their prefix (QEMU's ``parent/child`` convention).
    """
    out = m
    for sec in m.find(vmsd_name):
        new = sec
        if idstr is not None:
            new = dataclasses.replace(new, idstr=idstr(sec.idstr), desc={}, size=0)
        if new_vmsd_name is not None:
            n = _rename_vmsd(node(new), vmsd_name, new_vmsd_name)
            new = with_node(new, n)
        out = out.replace(sec, new)
    return out


def _rename_vmsd(n: Node, old: str, new: str) -> Node:
    def ren(name: str) -> str:
        return new + name[len(old):] if name == old or name.startswith(old + "/") else name

    def walk(vmsd: Vmsd, tree: Mapping[str, Any]) -> tuple[Vmsd, dict[str, Any]]:
        subs = []
        out = {}
        for k, v in tree.items():
            out[ren(k) if "/" in k else k] = v
        for s in vmsd.subsections:
            sv, st = walk(s.vmsd, tree.get(s.vmsd.name, {}))
            subs.append(Subsection(sv, s.needed))
            if s.vmsd.name in tree:
                out[ren(s.vmsd.name)] = st
        return dataclasses.replace(vmsd, name=ren(vmsd.name), subsections=tuple(subs)), out

    vmsd, tree = walk(n.vmsd, n.tree)
    return Node(vmsd, tree)


def split_section(m: Machine, idstr: str, instance_id: int, parts: Sequence[Part], *,
                  version: int | None = None) -> Machine:
    """Replace one section by several (see :func:`split`); each part names its new idstr and instance.

    The new sections take the place of the old one, in the order of ``parts``;
    the first keeps the old section id.  ``version`` (default: each part's
    own) is the version written in each new section's header.
    """
    sec = m.get(idstr, instance_id)
    if not isinstance(sec, DeviceSection):
        raise CompatError(f"split: no device section {idstr!r} instance {instance_id}")
    nodes = split(node(sec), parts)
    used = m.free_section_id() - 1
    new: list[Section] = []
    for i, (p, nd) in enumerate(zip(parts, nodes)):
        sid = sec.section_id if i == 0 else used + i
        v = p.version if version is None else version
        new.append(DeviceSection(sid, p.idstr or idstr, p.instance_id, v, dict(nd.tree), nd.vmsd, {}, sec.footer, 0))
    keys = [(s.idstr, s.instance_id) for s in new]
    if len(set(keys)) != len(keys):
        raise CompatError(f"split of {idstr!r}: the parts must have distinct idstr/instance pairs")
    sections: list[Section] = []
    for s in m.sections:
        if s is sec:
            sections.extend(new)
        elif (s.idstr, s.instance_id) in keys:
            raise CompatError(f"split of {idstr!r}: section {s.idstr!r} instance {s.instance_id} already exists")
        else:
            sections.append(s)
    return dataclasses.replace(m, sections=tuple(sections))


def merge_sections(m: Machine, keys: Sequence[tuple[str, int]], idstr: str, instance_id: int, vmsd_name: str,
                   version: int, *, order: Sequence[str] | None = None) -> Machine:
    """Replace the sections ``keys`` ((idstr, instance) pairs) by one (see :func:`merge`).

    The merged section takes the place and the section id of the first of them.
    """
    found: list[DeviceSection] = []
    for key in keys:
        s = m.get(*key)
        if not isinstance(s, DeviceSection):
            raise CompatError(f"merge: no device section {key[0]!r} instance {key[1]}")
        found.append(s)
    merged = merge([node(s) for s in found], vmsd_name, version, order=order)
    first = found[0]
    sec = DeviceSection(first.section_id, idstr, instance_id, version, dict(merged.tree), merged.vmsd, {},
                        first.footer, 0)
    sections: list[Section] = []
    for s in m.sections:
        if s is first:
            sections.append(sec)
        elif not any(s is f for f in found):
            sections.append(s)
    return dataclasses.replace(m, sections=tuple(sections))


def rename_blocks(blocks: Iterable[RamBlock], renames: Mapping[str, str]) -> tuple[RamBlock, ...]:
    """The MEM_SIZE list with blocks renamed."""
    return tuple(dataclasses.replace(b, name=renames.get(b.name, b.name)) for b in blocks)
