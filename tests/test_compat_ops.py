"""The reusable compat operations: each one on its own, their errors, and their inverses (Hypothesis)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from strategies import schema_and_tree, trees, vmsds
from vmferry.compat import ops
from vmferry.compat.ops import Machine, Node, Part
from vmferry.errors import CompatError
from vmferry.events import DeviceSection
from vmferry.serialize.describe import describe_section
from vmferry.serialize.drive import visit_vmsd
from vmferry.serialize.qemu_vmdesc import vmsd_from_desc
from vmferry.serialize.schema import Field, Subsection, Vmsd
from vmferry.serialize.visitor import LegacyReader, LegacyWriter

INNER = Vmsd("inner", 1, 0, (Field("x", "uint8", 1),), (Subsection(Vmsd("inner/sub", 1, 0, (Field("y", "uint16", 2),))),))
DEV = Vmsd("dev", 2, 1, (
    Field("a", "uint32", 4),
    Field("n", "uint8", 1),
    Field("arr", "uint16", 2, count_field="n"),
    Field("s", "struct", 0, struct=INNER),
    Field("b", "bool", 1),
))
TREE: dict[str, Any] = {"a": 7, "n": 2, "arr": [1, 2], "s": {"x": 3, "inner/sub": {"y": 9}}, "b": True}


def wire(n: Node) -> bytes:
    out = bytearray()
    visit_vmsd(LegacyWriter(out), n.vmsd, n.tree)
    return bytes(out)


def reread(n: Node, data: bytes) -> dict[str, Any]:
    return visit_vmsd(LegacyReader(data), n.vmsd, None)


def test_add_field_with_default_and_computed_value() -> None:
    n = Node(DEV, TREE)
    m = ops.add_field(n, Field("c", "uint8", 1), 5, after="a")
    assert [f.name for f in m.vmsd.fields] == ["a", "c", "n", "arr", "s", "b"]
    assert list(m.tree) == ["a", "c", "n", "arr", "s", "b"]
    assert m.tree["c"] == 5 and n.tree is TREE and "c" not in TREE  # nothing changed in place
    assert reread(m, wire(m)) == m.tree
    k = ops.add_field(n, Field("sum", "uint32", 4), lambda t: t["a"] + sum(t["arr"]))
    assert k.tree["sum"] == 10 and k.vmsd.fields[-1].name == "sum"


def test_add_field_inside_a_struct() -> None:
    m = ops.add_field(Node(DEV, TREE), Field("z", "int8", 1), -1, path=("s",), before="x")
    assert m.tree["s"] == {"z": -1, "x": 3, "inner/sub": {"y": 9}}
    assert [f.name for f in m.vmsd.field("s").struct.fields] == ["z", "x"]
    assert reread(m, wire(m)) == m.tree


def test_drop_and_rename_field() -> None:
    n = Node(DEV, TREE)
    m = ops.drop_field(n, "b")
    assert "b" not in m.tree and len(wire(m)) == len(wire(n)) - 1
    with pytest.raises(CompatError, match="holds the length of 'arr'"):
        ops.drop_field(n, "n")
    r = ops.rename_field(n, "n", "count")
    assert r.vmsd.field("arr").count_field == "count" and r.tree["count"] == 2
    assert wire(r) == wire(n)  # a rename changes no byte
    with pytest.raises(CompatError, match="no field 'nope'"):
        ops.rename_field(n, "nope", "x")
    with pytest.raises(CompatError, match="already exists"):
        ops.rename_field(n, "a", "b")


def test_subsections_add_drop_and_set_version() -> None:
    n = Node(DEV, TREE)
    sub = Vmsd("dev/extra", 1, 0, (Field("e", "uint64", 8),))
    m = ops.add_subsection(n, sub, {"e": 1})
    assert m.tree["dev/extra"] == {"e": 1}
    assert wire(m).endswith(b"\x05\x09dev/extra\x00\x00\x00\x01" + (1).to_bytes(8, "big"))
    assert ops.drop_subsection(m, "dev/extra").tree == n.tree
    assert ops.drop_subsection(n, "dev/extra") is n  # absent: nothing to do
    with pytest.raises(CompatError):
        ops.drop_subsection(n, "dev/extra", missing_ok=False)
    with pytest.raises(CompatError, match="already exists"):
        ops.add_subsection(m, sub, {"e": 2})
    nested = ops.drop_subsection(n, "inner/sub", path=("s",))
    assert nested.tree["s"] == {"x": 3}
    v = ops.set_vmsd_version(n, 3, path=("s", "inner/sub"))
    assert b"\x05\x09inner/sub\x00\x00\x00\x03" in wire(v)


def test_bad_paths_are_named() -> None:
    n = Node(DEV, TREE)
    with pytest.raises(CompatError, match="no field 'q'"):
        ops.add_field(n, Field("z", "uint8", 1), 0, path=("q",))
    with pytest.raises(CompatError, match="not a single nested struct"):
        ops.add_field(n, Field("z", "uint8", 1), 0, path=("arr",))
    with pytest.raises(CompatError, match="no subsection 'dev/none'"):
        ops.drop_field(n, "z", path=("dev/none",))


def test_split_and_merge() -> None:
    n = Node(DEV, TREE)
    parts = [Part("dev-core", 3, ("a", "n", "arr")), Part("dev-rest", 3, ("s", "b"))]
    core, rest = ops.split(n, parts)
    assert core.vmsd.name == "dev-core" and core.tree == {"a": 7, "n": 2, "arr": [1, 2]}
    assert rest.tree == {"s": TREE["s"], "b": True}
    back = ops.merge([core, rest], "dev", 2)
    assert back.tree == n.tree and wire(back) == wire(n)
    swapped = ops.merge([rest, core], "dev", 2, order=[f.name for f in DEV.fields])
    assert wire(swapped) == wire(n)
    with pytest.raises(CompatError, match="same part"):
        ops.split(n, [Part("x", 3, ("a", "n", "s", "b")), Part("y", 3, ("arr",))])
    with pytest.raises(CompatError, match="places no part for 'b'"):
        ops.split(n, [Part("x", 3, ("a", "n", "arr", "s"))])
    with pytest.raises(CompatError, match="two parts"):
        ops.split(n, [Part("x", 3, ("a", "n", "arr", "s", "b")), Part("y", 3, ("b",))])
    with pytest.raises(CompatError, match="comes from two sections"):
        ops.merge([core, core], "dev", 2)


def _section(idstr: str, vmsd: Vmsd, tree: dict[str, Any], sid: int, version: int | None = None) -> DeviceSection:
    v = vmsd.version_id if version is None else version
    return DeviceSection(sid, idstr, 0, v, tree, vmsd, describe_section(vmsd, tree, idstr, 0, v))


def test_machine_operations() -> None:
    a = _section("a", DEV, TREE, 3)
    g = _section("globalstate", Vmsd("globalstate", 1, 0, (Field("size", "uint32", 4),)), {"size": 1}, 9)
    m = Machine("r1", (a, g))
    spk = ops.new_section("spk", 0, Node(Vmsd("spk", 1, 0, (Field("on", "uint8", 1),)), {"on": 0}))
    m2 = ops.add_section(m, spk)
    assert [s.idstr for s in m2.sections] == ["a", "spk", "globalstate"]  # globalstate stays last
    assert m2.get("spk").section_id == 10 and m.get("spk") is None
    with pytest.raises(CompatError, match="already exists"):
        ops.add_section(m2, spk)
    assert [s.idstr for s in ops.add_section(m, spk, before="dev").sections] == ["spk", "a", "globalstate"]
    assert [s.idstr for s in ops.drop_sections(m2, "spk").sections] == ["a", "globalstate"]
    renamed = ops.rename_section(m, "dev", idstr=lambda s: "0000:00:01.0/" + s, new_vmsd_name="newdev")
    sec = renamed.get("0000:00:01.0/a")
    assert sec is not None and sec.schema.name == "newdev"
    split = ops.split_section(m, "a", 0, [Part("dev-core", 3, ("a", "n", "arr"), idstr="a"),
                                          Part("dev-rest", 3, ("s", "b"), idstr="a-rest")])
    assert [(s.idstr, s.section_id) for s in split.sections] == [("a", 3), ("a-rest", 10), ("globalstate", 9)]
    merged = ops.merge_sections(split, [("a", 0), ("a-rest", 0)], "a", 0, "dev", 2)
    back = merged.get("a")
    assert back.state == TREE and back.schema.fields == DEV.fields and back.section_id == 3


def test_on_section_and_set_version() -> None:
    a = _section("a", DEV, TREE, 3)
    b = ops.on_section(a, ops.add_field, Field("c", "uint8", 1), 1)
    assert b.state["c"] == 1 and b.desc == {} and a.state is TREE
    c = ops.set_version(a, 5)
    assert c.version_id == 5 and c.schema.version_id == 5
    with pytest.raises(CompatError):
        ops.set_version(a, -1)


# ------------------------------------------------------------- inverses


@settings(max_examples=150, deadline=None)
@given(schema_and_tree(), st.data())
def test_add_then_drop_field_is_identity(pair: tuple[Vmsd, dict[str, Any]], data: st.DataObject) -> None:
    vmsd, tree = pair
    n = Node(vmsd, tree)
    names = [f.name for f in vmsd.fields]
    after = data.draw(st.sampled_from(names)) if names else None
    f = Field("added_field", "uint32", 4)
    m = ops.add_field(n, f, data.draw(st.integers(0, 2**32 - 1)), after=after)
    assert reread(m, wire(m)) == m.tree
    back = ops.drop_field(m, "added_field")
    assert back.tree == tree and back.vmsd == vmsd and wire(back) == wire(n)


@settings(max_examples=150, deadline=None)
@given(schema_and_tree(), st.data())
def test_rename_round_trip(pair: tuple[Vmsd, dict[str, Any]], data: st.DataObject) -> None:
    vmsd, tree = pair
    assume(vmsd.fields)
    n = Node(vmsd, tree)
    old = data.draw(st.sampled_from([f.name for f in vmsd.fields]))
    m = ops.rename_field(n, old, "renamed_field")
    assert wire(m) == wire(n)
    back = ops.rename_field(m, "renamed_field", old)
    assert back.tree == tree and back.vmsd == vmsd


@settings(max_examples=100, deadline=None)
@given(schema_and_tree(), vmsds(depth=1, prefix="dev/added"), st.data())
def test_add_then_drop_subsection_is_identity(pair: tuple[Vmsd, dict[str, Any]], sub: Vmsd,
                                              data: st.DataObject) -> None:
    vmsd, tree = pair
    sub = Vmsd("dev/added", sub.version_id, 0, sub.fields, sub.subsections)
    n = Node(vmsd, tree)
    m = ops.add_subsection(n, sub, data.draw(trees(sub)))
    assert reread(m, wire(m)) == m.tree
    back = ops.drop_subsection(m, "dev/added")
    assert back.tree == tree and back.vmsd == vmsd and wire(back) == wire(n)


@settings(max_examples=150, deadline=None)
@given(schema_and_tree(), st.data())
def test_split_then_merge_is_identity(pair: tuple[Vmsd, dict[str, Any]], data: st.DataObject) -> None:
    vmsd, tree = pair
    n = Node(vmsd, tree)
    # Keep every field with the fields it depends on, as the split requires.
    groups: list[list[str]] = []
    for f in vmsd.fields:
        if f.count_field or f.size_field:
            groups[-1].append(f.name)
        else:
            groups.append([f.name])
    subs = [s.vmsd.name for s in vmsd.subsections]
    k = data.draw(st.integers(0, len(groups)))
    first = [x for g in groups[:k] for x in g]
    second = [x for g in groups[k:] for x in g]
    parts = [Part("dev-a", vmsd.version_id + 1, tuple(first), tuple(subs)),
             Part("dev-b", vmsd.version_id + 1, tuple(second))]
    a, b = ops.split(n, parts)
    for part in (a, b):  # each piece stands on its own on the wire
        assert reread(part, wire(part)) == part.tree
    back = ops.merge([a, b], vmsd.name, vmsd.version_id, order=[f.name for f in vmsd.fields] + subs)
    assert back.tree == tree and wire(back) == wire(n)
    assert vmsd_from_desc(describe_section(back.vmsd, back.tree, "x", 0), "$", 0).fields == \
        vmsd_from_desc(describe_section(vmsd, tree, "x", 0), "$", 0).fields
