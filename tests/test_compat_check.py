"""The static diff on small hand-made descriptions: every kind of difference, and what covers it."""

from __future__ import annotations

from typing import Any

import pytest

from vmferry.compat import Change, Registry
from vmferry.compat.check import diff, from_dump_vmstate, from_vmdesc
from vmferry.errors import SchemaError


def dev(name: str, version: int, fields: list[dict[str, Any]], subs: list[dict[str, Any]] | None = None,
        idstr: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": idstr or name, "instance_id": 0, "vmsd_name": name, "version": version,
                         "fields": fields}
    if subs:
        d["subsections"] = subs
    return d


def f(name: str, t: str = "uint32", size: int = 4, **kw: Any) -> dict[str, Any]:
    return {"name": name, **kw, "type": t, "size": size}


A = {"page_size": 4096, "devices": [
    dev("timer", 2, [f("a"), f("b", "uint8", 1)]),
    dev("gone", 1, [f("x")]),
    dev("kbd", 3, [{"name": "kbd", "type": "struct", "struct": {"vmsd_name": "kbd", "version": 1,
                                                                "fields": [f("s", "uint8", 1)]}, "size": 1}]),
    dev("arr", 1, [f("v", "uint16", 2, array_len=4), f("e", "struct", 8, index=0, struct={
        "vmsd_name": "e", "version": 1, "fields": [f("u"), f("w")]}), f("e", "struct", 8, index=1, struct={
            "vmsd_name": "e", "version": 1, "fields": [f("u"), f("w")]})]),
]}
B = {"page_size": 4096, "devices": [
    dev("timer", 3, [f("a", "uint64", 8), f("c", "bool", 1)], [{"vmsd_name": "timer/new", "version": 1,
                                                                "fields": [f("n")]}]),
    dev("kbd", 3, [{"name": "kbd", "type": "struct", "struct": {
        "vmsd_name": "kbd", "version": 2, "fields": [f("s", "uint8", 1)],
        "subsections": [{"vmsd_name": "kbd/ext", "version": 0, "fields": [f("o")]}]}, "size": 9}]),
    dev("arr", 1, [f("v", "uint16", 2, array_len=8), f("e", "struct", 8, index=0, struct={
        "vmsd_name": "e", "version": 1, "fields": [f("u"), f("w")]})]),
    dev("PCIHost", 1, [f("config_reg")]),
]}


def test_every_kind_is_found() -> None:
    r = diff(from_vmdesc(A, "a"), from_vmdesc(B, "b"))
    got = {(d.kind, d.section, d.item) for d in r.differences}
    assert got == {
        ("section-removed", "gone", ""), ("section-added", "PCIHost", ""),
        ("version", "timer", ""), ("field-resized", "timer", "a"), ("field-removed", "timer", "b"),
        ("field-added", "timer", "c"), ("subsection-added", "timer", "timer/new"),
        ("subsection-added", "kbd", "kbd/kbd/ext"),  # the nested struct's own version is never on the wire
        ("field-resized", "arr", "v"), ("field-resized", "arr", "e"),
    }
    assert r.plan is None and not r.plan_error  # no registry asked
    assert all(not d.covered for d in r.differences)


def test_coverage_comes_from_the_transforms_on_the_path() -> None:
    reg = Registry()
    reg.line("m", ["m-1", "m-2", "m-3"])
    reg.machine("m-1", "m-2", None, lossless=True, mirrors="", name="pcihost",
                changes=[Change("section-added", "PCIHost")])
    reg.machine("m-2", "m-3", None, lossless=True, mirrors="", name="kbd-ext",
                changes=[Change("subsection-added", "kbd", "kbd/kbd/ext")])
    r = diff(from_vmdesc(A, "a"), from_vmdesc(B, "b"), reg, source="m-1", target="m-3")
    covered = {(d.kind, d.section): d.covered_by for d in r.differences if d.covered}
    assert covered == {("section-added", "PCIHost"): ["pcihost"], ("subsection-added", "kbd"): ["kbd-ext"]}
    assert r.plan == ["m-1", "m-2", "m-3"] and len(r.uncovered) == len(r.differences) - 2
    r2 = diff(from_vmdesc(A, "a"), from_vmdesc(B, "b"), reg)
    assert r2.plan_error and "unknown" in r2.plan_error
    r3 = diff(from_vmdesc(A, "a"), from_vmdesc(B, "b"), reg, source="m-1", target="x-1")
    assert r3.plan_error and "unknown release 'x-1'" in r3.plan_error


def dump(machine: str, **classes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"vmschkmachine": {"Name": machine}}
    for name, desc in classes.items():
        out[name] = {"Name": name, "version_id": desc["version_id"], "minimum_version_id": desc["minimum_version_id"],
                     "Description": desc}
    return out


def d(name: str, v: int, m: int, fields: list[dict[str, Any]], subs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"name": name, "version_id": v, "minimum_version_id": m, "Fields": fields, "Subsections": subs or []}


def fd(name: str, size: int = 4, since: int = 0, exists: bool = False) -> dict[str, Any]:
    return {"field": name, "version_id": since, "field_exists": exists, "size": size}


def test_dump_vmstate_checks_version_ranges_and_field_tests() -> None:
    a = from_dump_vmstate(dump("pc-x", hpet=d("hpet", 2, 1, [fd("config", 8), fd("n", 1, 2)]),
                               rtc=d("mc146818rtc", 3, 1, [fd("cmos", 128)]),
                               kbd=d("pckbd", 3, 3, [fd("unused"), fd("unused"), fd("s", 1)])), "a")
    b = from_dump_vmstate(dump("pc-y", hpet=d("hpet", 3, 3, [fd("config", 8), fd("n", 1, 3)]),
                               rtc=d("mc146818rtc", 4, 1, [fd("cmos", 128, exists=True)]),
                               kbd=d("pckbd", 3, 3, [fd("unused"), fd("unused", 2), fd("s", 1)])), "b")
    assert a.machine == "pc-x" and sorted(a.sections) == ["hpet", "mc146818rtc", "pckbd"]
    got = {(x.kind, x.section, x.item, x.detail) for x in diff(a, b).differences}
    assert got == {
        ("version", "hpet", "", "version 2, the other side loads 3..3"),
        ("field-changed", "hpet", "n", "since version 2 -> 3"),
        ("field-changed", "mc146818rtc", "cmos", "gained a field test"),
        ("field-resized", "pckbd", "unused[1]", "4 bytes -> 2 bytes"),
    }  # rtc 3 -> 4 is within 1..4: loadable, not reported


def test_stream_facts_are_compared() -> None:
    from vmferry.events import RamBlock

    a = from_vmdesc({"devices": []}, "a", "stream", None)
    b = from_vmdesc({"devices": []}, "b", "stream", "pc-i440fx-2.4")
    a.configuration, a.footers = False, False
    b.configuration, b.footers = True, True
    a.ram = [RamBlock("pc.ram", 4096), RamBlock("vga.vram", 8192), RamBlock("old", 1)]
    b.ram = [RamBlock("pc.ram", 8192), RamBlock("0000:00:02.0/vga.vram", 8192), RamBlock("new", 1)]
    got = {(x.kind, x.item) for x in diff(a, b).differences}
    assert got == {("configuration-added", ""), ("footers-added", ""), ("ram-block-renamed", "vga.vram"),
                   ("ram-block-removed", "old"), ("ram-block-added", "new"), ("ram-block-resized", "pc.ram")}


@pytest.mark.parametrize("bad", [{"devices": [{"name": 1}]}, {"devices": [{"name": "x", "instance_id": 0,
                                                                          "vmsd_name": "x", "version": 1,
                                                                          "fields": [{"name": "a"}]}]}, [], {}])
def test_malformed_descriptions_are_schema_errors(bad: Any) -> None:
    with pytest.raises(SchemaError):
        from_vmdesc(bad, "bad")
