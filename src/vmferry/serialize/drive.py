"""Drive any visitor from a declarative schema.

:func:`visit_vmsd` walks a :class:`~vmferry.serialize.schema.Vmsd` in wire
order, QEMU's way (``vmstate_save_state_v`` / ``vmstate_load_state``):
fields whose since-version is above the section version, or whose
``field_exists`` test fails, are skipped; counts and buffer sizes taken from
other fields are looked up in the tree read so far; subsections follow the
fields.  It returns the tree, whichever direction the visitor goes.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import DecodeError, EncodeError
from .schema import FLOAT_TYPES, INT_TYPES, Field, Vmsd
from .visitor import LegacyReader, Visitor


def visit_vmsd(v: Visitor, vmsd: Vmsd, state: dict[str, Any] | None, version: int | None = None) -> dict[str, Any]:
    """Visit ``state`` (ignored when loading) as ``vmsd`` at ``version`` (default: the vmsd's own)."""
    version = vmsd.version_id if version is None else version
    src: dict[str, Any] = {} if v.loading or state is None else state
    if not v.loading and not isinstance(state, dict):
        raise EncodeError(f"expected an object for {vmsd.name!r}, got {type(state).__name__}", v.path)
    out: dict[str, Any] = {}
    for f in vmsd.fields:
        if f.exists is not None:
            if not f.exists(out if v.loading else src, version):
                continue
        elif f.since > version:
            continue
        value = None if v.loading else _require(v, src, f.name)
        out[f.name] = _visit_field(v, f, value, out)
    for sub in vmsd.subsections:
        name = sub.vmsd.name
        if v.loading:
            needed = True
        elif sub.needed is not None:
            needed = sub.needed(src)
        else:
            needed = name in src
        got = v.subsection(name, sub.vmsd.version_id, needed, _subsection_visitor(sub.vmsd), src.get(name))
        if got is not None:
            out[name] = got
    v.end_subsections(vmsd.name)
    if not v.loading and len(src) > len(out):
        unknown = [k for k in src if k not in out and not _skipped(vmsd, k)]
        if unknown:
            raise EncodeError(f"unknown field {unknown[0]!r} for {vmsd.name!r} (a misspelt name would be lost)",
                              v.path)
    return out


def _skipped(vmsd: Vmsd, key: str) -> bool:
    """A key the schema knows but did not visit (field version or test, subsection not needed)."""
    return any(f.name == key for f in vmsd.fields) or vmsd.subsection(key) is not None


def _subsection_visitor(sub: Vmsd) -> Callable[[Visitor, Any], dict[str, Any]]:
    return lambda v, state: visit_vmsd(v, sub, state)


def _require(v: Visitor, src: dict[str, Any], name: str) -> Any:
    if name not in src:
        raise EncodeError(f"missing field {name!r}", v.path)
    return src[name]


def _int_from_tree(v: Visitor, tree: dict[str, Any], name: str, what: str) -> int:
    n = tree.get(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        offset = v.base + v.pos if isinstance(v, LegacyReader) else None
        raise DecodeError(f"{what} field {name!r} holds {n!r}, not a count", offset, v.path)
    return n


def _visit_field(v: Visitor, f: Field, value: Any, tree: dict[str, Any]) -> Any:
    if f.elements is not None:
        elements = iter(f.elements)
        return v.array(f.name, value, len(f.elements),
                       lambda vv, name, item: _visit_one(vv, next(elements), item, tree, name), compressible=False)
    if not f.is_array:
        return _visit_one(v, f, value, tree, f.name)
    count = _int_from_tree(v, tree, f.count_field, "count") if f.count_field else f.count
    compressible = f.exists is None and not (f.struct is not None and f.struct.subsections)
    return v.array(f.name, value, count, lambda vv, name, item: _visit_one(vv, f, item, tree, name), compressible)


def _visit_one(v: Visitor, f: Field, value: Any, tree: dict[str, Any], name: str) -> Any:
    t = f.type
    if t == "nullptr" or (f.pointers and value is None and not v.loading):
        return v.null(name, t)
    if t in INT_TYPES and INT_TYPES[t][0] == f.size:
        return v.integer(name, value, t)
    if t == "bool" and f.size == 1:
        return v.bool(name, value)
    if t in FLOAT_TYPES and f.size == FLOAT_TYPES[t]:
        return v.float64(name, value)
    if f.struct is not None:
        sub = f.struct
        return v.struct(name, value, lambda vv, s: visit_vmsd(vv, sub, s), sub.name, sub.version_id, t)
    if t == "capability":
        return v.cstr(name, value, t)
    size = f.size
    if f.size_field is not None:
        size = _int_from_tree(v, tree, f.size_field, "size") * f.size_multiplier
    return v.buffer(name, value, size, t)
