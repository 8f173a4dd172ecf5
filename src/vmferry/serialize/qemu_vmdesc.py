"""Schemas from QEMU's own descriptions: a stream's vmdesc and ``-dump-vmstate``.

:func:`schemas_from_vmdesc` turns the JSON that follows a stream's EOF
(spec §4) into a :class:`SchemaSet`.  It is exact: the vmdesc describes what
is on the wire, element sizes and sent subsections included.  Types it does
not know, and the list types whose vmdesc is ambiguous (``qtailq``,
``qlist``, ``gtree``), become opaque buffers of their described size.

:func:`schemas_from_dump_vmstate` reads ``-dump-vmstate`` output (spec
§7.4).  That is a class-level schema without types or array counts, so it
decodes only sections whose every field is one fixed-size element; the
stream decoder checks that the result ends exactly at the section's footer
and reports the section otherwise.

Both raise :class:`~vmferry.errors.SchemaError` naming the JSON path on
malformed input.  :func:`has_neighbours` looks for two neighbouring
entries of one name in a vmdesc's ``fields`` lists (how array elements
are spelled tells which QEMU wrote it).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ..errors import SchemaError
from .schema import INT_TYPES, STRUCT_TYPES, Field, SchemaSet, Subsection, Vmsd

MAX_DESC_DEPTH = 64
_DUPLICATE_KEYS = "\0duplicate-keys"


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            out[_DUPLICATE_KEYS] = True  # qtailq/qlist/gtree inline their element vmsds repeatedly
        out[k] = v
    return out


def load_json(text: bytes | str, what: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_pairs_hook)
    except (ValueError, RecursionError) as e:
        raise SchemaError(f"{what} is not valid JSON: {e}") from None


def is_vmdesc(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("devices"), list)


def has_neighbours(node: Any, test: Callable[[dict[str, Any], dict[str, Any]], bool]) -> bool:
    """Whether some ``fields`` list below ``node`` has two neighbours of one name for which ``test`` holds
    (walked without recursion)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
        elif isinstance(n, dict):
            fields = n.get("fields")
            if isinstance(fields, list):
                for a, b in zip(fields, fields[1:]):
                    if isinstance(a, dict) and isinstance(b, dict) and a.get("name") is not None \
                            and a.get("name") == b.get("name") and test(a, b):
                        return True
            stack.extend(v for v in n.values() if isinstance(v, (list, dict)))
    return False


def is_dump_vmstate(obj: Any) -> bool:
    return isinstance(obj, dict) and "vmschkmachine" in obj


def _get(obj: Any, key: str, kind: type | tuple[type, ...], path: str, default: Any = ...) -> Any:
    if not isinstance(obj, dict):
        raise SchemaError(f"{path}: expected an object")
    if key not in obj:
        if default is ...:
            raise SchemaError(f"{path}: missing {key!r}")
        return default
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise SchemaError(f"{path}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise SchemaError(f"{path}.{key}: negative value {value}")
    return value


# ---------------------------------------------------------------------------
# vmdesc
# ---------------------------------------------------------------------------


def schemas_from_vmdesc(obj: Any, origin: str = "vmdesc") -> SchemaSet:
    """Parse a vmdesc object (already loaded with :func:`load_json`)."""
    if not is_vmdesc(obj):
        raise SchemaError(f"{origin}: not a vmdesc (no 'devices' list)")
    out = SchemaSet(origin=origin, page_size=_get(obj, "page_size", int, "$", 4096))
    for i, dev in enumerate(obj["devices"]):
        path = f"$.devices[{i}]"
        name = _get(dev, "name", str, path)
        instance = _get(dev, "instance_id", int, path)
        vmsd = vmsd_from_desc(dev, path, 0, old_style="size" in dev and "vmsd_name" not in dev)
        out.sections[(name, instance)] = vmsd
        out.descs[(name, instance)] = dev
        out.by_vmsd_name.setdefault(vmsd.name, vmsd)
    return out


def vmsd_from_desc(desc: Any, path: str, depth: int, old_style: bool = False) -> Vmsd:
    if depth > MAX_DESC_DEPTH:
        raise SchemaError(f"{path}: nested more than {MAX_DESC_DEPTH} levels")
    if old_style:
        name = _get(desc, "name", str, path)
        version = 0
    else:
        name = _get(desc, "vmsd_name", str, path)
        version = _get(desc, "version", int, path)
    fields = _fields_from_desc(_get(desc, "fields", list, path), f"{path}.fields", depth)
    subs = tuple(
        Subsection(vmsd_from_desc(s, f"{path}.subsections[{j}]", depth + 1))
        for j, s in enumerate(_get(desc, "subsections", list, path, []))
    )
    return Vmsd(name, version, 0, tuple(fields), subs, old_style)


def _element_from_desc(e: Any, path: str, depth: int) -> Field:
    name = _get(e, "name", str, path)
    t = _get(e, "type", str, path)
    size = _get(e, "size", int, path)
    if e.get(_DUPLICATE_KEYS):
        return Field(name, t, size)  # list types: an opaque blob of the measured size
    if t in STRUCT_TYPES:
        inner = e.get("struct") if t == "struct" else e
        if isinstance(inner, dict) and "fields" in inner:
            return Field(name, t, size, struct=vmsd_from_desc(inner, f"{path}.struct", depth + 1))
        return Field(name, "buffer", size)
    if t in INT_TYPES and INT_TYPES[t][0] != size:
        return Field(name, "buffer", size)  # unexpected width: keep it as bytes
    return Field(name, t, size)


def _fields_from_desc(entries: list[Any], path: str, depth: int) -> list[Field]:
    """The fields of a vmdesc ``fields`` list.

    An array that is not compressed (``array_len``) is described element by
    element, one entry per element with the same name.  QEMU 7.2 gives every
    element an ``index``, 10.0 every one but the last, 11.1 none: so entries
    are grouped by name (QEMU makes field names unique within a vmsd), and
    ``index`` only marks a group of one.
    """
    fields: list[Field] = []
    group: list[Field] = []
    indexed = False

    def flush() -> None:
        nonlocal group, indexed
        if len(group) > 1 or indexed:
            fields.append(Field(group[0].name, group[0].type, group[0].size, struct=group[0].struct,
                                elements=tuple(group)))
        elif group:
            fields.append(group[0])
        group, indexed = [], False

    for i, e in enumerate(entries):
        p = f"{path}[{i}]"
        f = _element_from_desc(e, p, depth)
        has_index = "index" in e
        if has_index:
            _get(e, "index", int, p)
        if group and group[0].name == f.name and "array_len" not in e:
            group.append(f)  # one more element of the same array
            indexed = indexed or has_index
            continue
        flush()
        if "array_len" in e:
            n = _get(e, "array_len", int, p)
            fields.append(Field(f.name, f.type, f.size, count=n, struct=f.struct, array=True))
            continue
        group, indexed = [f], has_index
    flush()
    seen: set[str] = set()
    for f in fields:
        if f.name in seen:  # QEMU makes names unique; a repeat would make two fields share one tree key
            raise SchemaError(f"{path}: field {f.name!r} appears twice")
        seen.add(f.name)
    return fields


# ---------------------------------------------------------------------------
# -dump-vmstate
# ---------------------------------------------------------------------------

_SIZED_INTS = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def schemas_from_dump_vmstate(obj: Any, origin: str = "-dump-vmstate") -> SchemaSet:
    """Parse ``-dump-vmstate`` output into schemas keyed by vmsd name."""
    if not is_dump_vmstate(obj):
        raise SchemaError(f"{origin}: not a -dump-vmstate file (no 'vmschkmachine')")
    out = SchemaSet(origin=origin)
    for key, entry in obj.items():
        if key == "vmschkmachine" or not isinstance(entry, dict) or "Description" not in entry:
            continue
        vmsd = _vmsd_from_dump(entry["Description"], f"$[{key!r}].Description", 0)
        out.by_vmsd_name.setdefault(vmsd.name, vmsd)
    return out


def _vmsd_from_dump(d: Any, path: str, depth: int) -> Vmsd:
    if depth > MAX_DESC_DEPTH:
        raise SchemaError(f"{path}: nested more than {MAX_DESC_DEPTH} levels")
    name = _get(d, "name", str, path)
    fields: list[Field] = []
    seen: dict[str, int] = {}
    for i, f in enumerate(_get(d, "Fields", list, path, [])):
        p = f"{path}.Fields[{i}]"
        fname = _get(f, "field", str, p)
        size = _get(f, "size", int, p)
        since = _get(f, "version_id", int, p, 0)
        count = seen.get(fname, 0)
        seen[fname] = count + 1
        if "Description" in f:
            fields.append(Field(fname, "struct", size, struct=_vmsd_from_dump(f["Description"], p, depth + 1),
                                since=since))
        else:
            fields.append(Field(fname, _SIZED_INTS.get(size, "buffer"), size, since=since))
    # Several fields with one name (e.g. "unused") get QEMU's vmdesc spelling "name[k]".
    dups = {n for n, c in seen.items() if c > 1}
    if dups:
        k: dict[str, int] = {}
        renamed = []
        for f in fields:
            if f.name in dups:
                idx = k.get(f.name, 0)
                k[f.name] = idx + 1
                f = Field(f"{f.name}[{idx}]", f.type, f.size, struct=f.struct, since=f.since)
            renamed.append(f)
        fields = renamed
    subs = tuple(Subsection(_vmsd_from_dump(s, f"{path}.Subsections[{j}]", depth + 1))
                 for j, s in enumerate(_get(d, "Subsections", list, path, [])))
    return Vmsd(name, _get(d, "version_id", int, path), _get(d, "minimum_version_id", int, path, 0),
                tuple(fields), subs)
