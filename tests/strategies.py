"""Hypothesis strategies: random VMState schemas and trees that fit them."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from vmferry.serialize.schema import INT_TYPES, Field, Subsection, Vmsd

_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z][a-z0-9_]{0,4})?", fullmatch=True)
_INT_NAMES = sorted(INT_TYPES)


def _unique(fields: list[Field]) -> list[Field]:
    seen: set[str] = set()
    out = []
    for f in fields:
        if f.name not in seen:
            seen.add(f.name)
            out.append(f)
    return out


@st.composite
def vmsds(draw: Any, depth: int = 0, prefix: str = "dev") -> Vmsd:
    """A random vmsd: ints, bools, buffers, fixed arrays, counted arrays and buffers, structs, subsections."""
    fields: list[Field] = []
    for i in range(draw(st.integers(0, 6))):
        name = f"{draw(_names)}{i}"
        kind = draw(st.sampled_from(["int", "bool", "buffer", "array", "varray", "vbuffer", "float", "struct"]
                                    if depth < 2 else ["int", "bool", "buffer", "array", "float"]))
        if kind == "int":
            t = draw(st.sampled_from(_INT_NAMES))
            fields.append(Field(name, t, INT_TYPES[t][0]))
        elif kind == "bool":
            fields.append(Field(name, "bool", 1))
        elif kind == "float":
            fields.append(Field(name, "float64", 8))
        elif kind == "buffer":
            fields.append(Field(name, draw(st.sampled_from(["buffer", "unused_buffer", "pci config"])),
                                draw(st.integers(0, 40))))
        elif kind == "array":
            t = draw(st.sampled_from(_INT_NAMES))
            fields.append(Field(name, t, INT_TYPES[t][0], count=draw(st.integers(0, 5)), array=True))
        elif kind == "varray":
            fields.append(Field(f"{name}_n", "uint8", 1))
            fields.append(Field(name, "uint16", 2, count_field=f"{name}_n"))
        elif kind == "vbuffer":
            fields.append(Field(f"{name}_len", "uint32", 4))
            fields.append(Field(name, "buffer", 0, size_field=f"{name}_len"))
        else:
            inner = draw(vmsds(depth + 1, f"{prefix}_{name}"))
            fields.append(Field(name, "struct", 0, struct=inner, count=draw(st.sampled_from([1, 1, 2, 3]))))
    subs = []
    if depth < 2:
        for j in range(draw(st.integers(0, 2))):
            sub = draw(vmsds(depth + 1, f"{prefix}/s{j}"))
            subs.append(Subsection(Vmsd(f"{prefix}/s{j}", sub.version_id, 0, sub.fields, sub.subsections)))
    if subs and depth > 0:
        # An element with no bytes before its subsections would make QEMU's wire format itself
        # ambiguous (the next element's subsection reads as this one's): QEMU never does that.
        fields.insert(0, Field("pad", "uint8", 1))
    return Vmsd(prefix, draw(st.integers(0, 5)), 0, tuple(_unique(fields)), tuple(subs))


@st.composite
def trees(draw: Any, vmsd: Vmsd) -> dict[str, Any]:
    """A tree that fits ``vmsd``; counts and sizes agree with their fields."""
    out: dict[str, Any] = {}
    for f in vmsd.fields:
        if f.count_field is not None:
            n = out[f.count_field]
            out[f.name] = [draw(_value(f)) for _ in range(n)]
        elif f.size_field is not None:
            out[f.name] = draw(st.binary(min_size=out[f.size_field], max_size=out[f.size_field]))
        elif f.name.endswith("_n"):
            out[f.name] = draw(st.integers(0, 4))
        elif f.name.endswith("_len"):
            out[f.name] = draw(st.integers(0, 24))
        elif f.is_array:
            out[f.name] = [draw(_value(f)) for _ in range(f.count)]
        else:
            out[f.name] = draw(_value(f))
    for sub in vmsd.subsections:
        if draw(st.booleans()):
            out[sub.vmsd.name] = draw(trees(sub.vmsd))
    return out


def _value(f: Field):
    if f.struct is not None:
        return trees(f.struct)
    if f.type in INT_TYPES:
        size, signed = INT_TYPES[f.type]
        bits = 8 * size
        return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else st.integers(0, (1 << bits) - 1)
    if f.type == "bool":
        return st.booleans()
    if f.type == "float64":
        return st.floats(allow_nan=False)
    return st.binary(min_size=f.size, max_size=f.size)


@st.composite
def schema_and_tree(draw: Any) -> tuple[Vmsd, dict[str, Any]]:
    vmsd = draw(vmsds())
    return vmsd, draw(trees(vmsd))
