"""The catalogue of four QEMU releases without QEMU: its shape, the planner across releases, the vmdesc styles,
machine-type inference, and the 5.2/11.1 transforms on small inputs (tests/test_releases_real.py has the real ones).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from vmferry.cli import main
from vmferry.compat import Machine, Registry, Release, qemu_registry, source_release
from vmferry.compat.machines import PC5, PC11, Q35_5, Q35_11, qemu5, qemu11
from vmferry.compat.machines.vmdesc import restyle_fields, restyle_text, style_of, writer_qemu
from vmferry.encode.legacy import vmdesc_text
from vmferry.errors import CompatError
from vmferry.events import Configuration, DeviceSection, Vmdesc
from vmferry.serialize.describe import describe_section
from vmferry.serialize.schema import Field, Subsection, Vmsd

REG = qemu_registry()
NEWEST = ["pc-i440fx-5.2@5.2", "pc-i440fx-7.2", "pc-i440fx-10.0", "pc-i440fx-11.1",
          "pc-q35-5.2@5.2", "pc-q35-7.2", "pc-q35-10.0", "pc-q35-11.1"]


# ------------------------------------------------------------ the catalogue


def test_the_new_releases_and_their_steps() -> None:
    assert [r.name for r in PC11] == ["pc-i440fx-10.0@11.1", "pc-i440fx-10.1", "pc-i440fx-10.2", "pc-i440fx-11.0",
                                      "pc-i440fx-11.1"]
    assert {r.qemu for r in PC11 + Q35_11} == {"11.1"} and {r.qemu for r in PC5 + Q35_5} == {"5.2"}
    assert (REG.release("pc-q35-5.2@5.2").machine, REG.release("pc-i440fx-10.0@11.1").machine) == \
        ("pc-q35-5.2", "pc-i440fx-10.0")
    steps = [("pc-i440fx-5.2@5.2", "pc-i440fx-5.2"), ("pc-q35-5.2@5.2", "pc-q35-5.2"),
             ("pc-i440fx-10.0@11.1", "pc-i440fx-10.0"), ("pc-q35-10.0@11.1", "pc-q35-10.0")]
    for line in (PC11, Q35_11):
        steps += list(zip([r.name for r in line], [r.name for r in line[1:]]))
    for a, b in steps:
        for s, t in ((a, b), (b, a)):
            ts = REG.transforms(s, t)
            assert ts and all(x.mirrors for x in ts), (s, t)
    # each QEMU-version step says what QEMU change it mirrors; the 11.1 machine steps the compat tables
    assert any("hw_compat_10_1" in t.mirrors for t in REG.transforms("pc-i440fx-10.1", "pc-i440fx-10.2"))
    assert any("pc_compat_10_1" in t.mirrors and t.section == "mch"
               for t in REG.transforms("pc-q35-10.2", "pc-q35-10.1"))


@pytest.mark.parametrize("chipset", ["pc-i440fx", "pc-q35"])
def test_any_release_to_any_of_one_chipset_has_exactly_one_path(chipset: str) -> None:
    names = [n for n in REG.releases if n.startswith(chipset + "-")]
    assert len(names) == (24 if chipset == "pc-i440fx" else 24) + 8 + 5 + 1
    for a in names:
        for b in names:
            plan = REG.plan(a, b)
            assert plan.path[0] == a and plan.path[-1] == b and len(set(plan.path)) == len(plan.path)
    path = REG.plan(f"{chipset}-5.2@5.2", f"{chipset}-11.1").path
    assert path[:2] == [f"{chipset}-5.2@5.2", f"{chipset}-5.2"]
    assert f"{chipset}-7.2@10.0" in path and f"{chipset}-10.0@11.1" in path
    with pytest.raises(CompatError, match="missing step"):
        REG.plan(f"{chipset}-5.2@5.2", ("pc-q35" if chipset == "pc-i440fx" else "pc-i440fx") + "-11.1")


def test_a_machine_type_names_its_home_release_and_a_qemu_version_picks_another() -> None:
    assert REG.resolve("pc-i440fx-5.2") == "pc-i440fx-5.2"  # QEMU 7.2's, as before QEMU 5.2 was catalogued
    assert REG.release(REG.resolve("pc-i440fx-5.2")).qemu == "7.2"
    assert REG.resolve("pc-i440fx-5.2", "5.2") == "pc-i440fx-5.2@5.2"
    assert REG.resolve("pc-q35-10.0") == "pc-q35-10.0" and REG.resolve("pc-q35-10.0", "11.1") == "pc-q35-10.0@11.1"
    assert REG.resolve("pc-q35-11.0") == "pc-q35-11.0" and REG.release("pc-q35-11.0").qemu == "11.1"


def test_the_removed_machine_type_rescue() -> None:
    """QEMU 11.1 has no pc-i440fx-2.12: the error says what it has; the plan to its newest goes through 10.0."""
    with pytest.raises(CompatError) as e:
        REG.resolve("pc-i440fx-2.12", "11.1")
    assert "QEMU 11.1 has here: pc-i440fx-10.0 .. pc-i440fx-11.1" in str(e.value)
    assert "--machine pc-i440fx-11.1 --qemu-version 11.1" in str(e.value) and "\n" not in str(e.value)
    plan = REG.plan("pc-i440fx-2.12", "pc-i440fx-11.1")
    assert plan.path[plan.path.index("pc-i440fx-7.2") + 1] == "pc-i440fx-7.2@10.0"
    assert plan.path[plan.path.index("pc-i440fx-10.0") + 1] == "pc-i440fx-10.0@11.1"
    assert not plan.lossless  # QEMU 10.0 drops e1000e's pending flags (qemu10.py)
    assert REG.plan("pc-i440fx-11.1", "pc-i440fx-2.12").path[-1] == "pc-i440fx-2.12"


def test_plan_list_shows_every_release(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--list"]) == 0
    out = capsys.readouterr().out
    assert "pc-i440fx@11.1: 10.0, 10.1, 10.2, 11.0, 11.1" in out and "pc-q35@5.2: 5.2" in out
    assert main(["plan", "pc-q35-5.2", "pc-q35-11.1", "--from-qemu-version", "5.2", "--qemu-version", "11.1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pc-q35-5.2@5.2 -> pc-q35-11.1:") and "hw/input/pckbd.c" in out


# ------------------------------------------------------------ vmdesc styles


def _entry(name: str, index: int | None = None, size: int = 4) -> dict[str, Any]:
    e: dict[str, Any] = {"name": name}
    if index is not None:
        e["index"] = index
    e.update({"type": "uint32", "size": size})
    return e


STYLES = {
    "every": [_entry("a"), _entry("x", 0), _entry("x", 1), _entry("x", 2), _entry("y", 0), _entry("y", 1), _entry("b")],
    "all-but-last": [_entry("a"), _entry("x", 0), _entry("x", 1), _entry("x"), _entry("y", 0), _entry("y"),
                     _entry("b")],
    "none": [_entry("a"), _entry("x"), _entry("x"), _entry("x"), _entry("y"), _entry("y"), _entry("b")],
}


@pytest.mark.parametrize("src", list(STYLES))
@pytest.mark.parametrize("dst", list(STYLES))
def test_array_indexes_go_from_any_style_to_any(src: str, dst: str) -> None:
    assert restyle_fields(STYLES[src], dst) == STYLES[dst]
    nested = [{"name": "s", "type": "struct", "struct": {"vmsd_name": "t", "version": 1, "fields": STYLES[src],
                                                          "subsections": [{"vmsd_name": "t/u", "version": 1,
                                                                           "fields": STYLES[src]}]}, "size": 28}]
    out = restyle_fields(nested, dst)
    assert out[0]["struct"]["fields"] == STYLES[dst] and out[0]["struct"]["subsections"][0]["fields"] == STYLES[dst]


def test_two_arrays_of_one_name_side_by_side_stay_two() -> None:
    every = [_entry("x", 0), _entry("x", 1), _entry("x", 0), _entry("x", 1)]
    ten = [_entry("x", 0), _entry("x"), _entry("x", 0), _entry("x")]
    assert restyle_fields(every, "all-but-last") == ten and restyle_fields(ten, "every") == every
    compressed = [{"name": "x", "array_len": 4, "type": "uint8", "size": 1}, _entry("x", 0), _entry("x", 1)]
    assert restyle_fields(compressed, "none") == [compressed[0], _entry("x"), _entry("x")]
    with pytest.raises(CompatError, match="index 3 after 1 elements"):
        restyle_fields([_entry("x", 0), _entry("x", 3)], "none")


def test_the_describer_and_the_restyle_agree() -> None:
    """A schema with an array of unequal elements, described by each QEMU's rule, restyled into each other."""
    extra = Subsection(Vmsd("port/extra", 1, 0, (Field("e", "uint8", 1),)))
    inner = Vmsd("port", 1, 0, (Field("n", "uint32", 4),), (extra,))
    vmsd = Vmsd("dev", 1, 0, (Field("ports", "struct", 4, count=3, array=True, struct=inner), Field("z", "uint8", 1)))
    state = {"ports": [{"n": 1}, {"n": 2, "port/extra": {"e": 1}}, {"n": 3}], "z": 0}
    descs = {q: describe_section(vmsd, state, "dev", 0, 1, array_index=style_of(q)) for q in ("7.2", "10.0", "11.1")}
    assert [f.get("index") for f in descs["7.2"]["fields"]] == [0, 1, 2, None]
    assert [f.get("index") for f in descs["10.0"]["fields"]] == [0, 1, None, None]
    for a in descs.values():
        for q, b in descs.items():
            assert restyle_fields(a["fields"], style_of(q)) == b["fields"]


def test_restyle_text_writes_each_qemus_spacing() -> None:
    obj = {"page_size": 4096, "devices": [{"name": "d", "instance_id": 0, "vmsd_name": "d", "version": 1,
                                           "fields": STYLES["none"]}]}
    five = restyle_text(Vmdesc(json.dumps(obj).encode()), "5.2")
    assert five.text.startswith(b'{ "page_size" : 4096, "devices" : [ { "name" : "d"')
    assert json.loads(five.text)["devices"][0]["fields"] == STYLES["every"]
    assert five.text == vmdesc_text(json.loads(five.text), qjson=True)
    assert restyle_text(five, "11.1").text == json.dumps(obj).encode()


@pytest.mark.parametrize(("style", "spacing", "config", "expected"), [
    ("every", "qjson", False, ["5.2"]),
    ("every", "json", False, ["7.2"]),
    ("all-but-last", "json", True, ["10.0", "11.1"]),
    ("every", "json", True, ["10.0", "11.1"]),  # a 10.0 stream without any element-by-element array
    ("none", "json", True, ["11.1", "10.0"]),
])
def test_the_vmdesc_tells_which_qemu_wrote_it(style: str, spacing: str, config: bool, expected: list[str]) -> None:
    fields = STYLES[style] if style != "every" or not config else [_entry("a")]
    obj: dict[str, Any] = {"page_size": 4096, "devices": [{"name": "d", "instance_id": 0, "vmsd_name": "d",
                                                           "version": 1, "fields": fields}]}
    if config:
        obj = {"configuration": {"vmsd_name": "configuration", "version": 1, "fields": []}, **obj}
    # neighbouring devices of one name (dma, dma) are not an array
    obj["devices"] += [{"name": "dma", "instance_id": i, "vmsd_name": "dma", "version": 1, "fields": []}
                       for i in (0, 1)]
    assert writer_qemu(vmdesc_text(obj, qjson=spacing == "qjson")) == expected
    assert writer_qemu(b"not json") == [] and writer_qemu(b'{"devices": 3}') == []


# ------------------------------------------------------------ which machine type, which QEMU


def test_a_stream_without_configuration_is_the_one_release_that_sends_none() -> None:
    assert source_release(None, None, REG) == "pc-i440fx-2.3"
    assert source_release(None, None, REG, ["7.2"]) == "pc-i440fx-2.3"
    with pytest.raises(CompatError) as e:
        source_release(None, None, REG, ["5.2"])  # QEMU 5.2 running pc-i440fx-2.3: not catalogued
    assert "no machine type of QEMU 5.2 in the catalogue sends none" in str(e.value)
    assert "pc-i440fx-2.3 (QEMU 7.2)" in str(e.value) and "--from-machine" in str(e.value)
    reg = Registry()
    reg.line("a", [Release("old-a", "a", configuration=False, qemu="1.0")])
    reg.line("b", [Release("old-b", "b", configuration=False, qemu="1.0")])
    with pytest.raises(CompatError) as e:
        source_release(None, None, reg)
    assert "it could be any of: old-a (QEMU 1.0), old-b (QEMU 1.0)" in str(e.value)
    assert "--from-machine" in str(e.value)


def test_the_first_qemu_the_vmdesc_allows_that_has_the_machine_type_is_taken() -> None:
    def config(name: str) -> Configuration:
        return Configuration({"len": len(name), "name": name.encode()})

    assert source_release(config("pc-i440fx-10.0"), None, REG, ["11.1"]) == "pc-i440fx-10.0@11.1"
    assert source_release(config("pc-i440fx-7.2"), None, REG, ["11.1", "10.0"]) == "pc-i440fx-7.2@10.0"
    assert source_release(config("pc-q35-5.2"), None, REG, ["5.2"]) == "pc-q35-5.2@5.2"
    assert source_release(config("pc-q35-5.2"), None, REG, ["7.2"]) == "pc-q35-5.2"
    with pytest.raises(CompatError) as e:  # QEMU 11.1 running pc-i440fx-5.2: not catalogued
        source_release(config("pc-i440fx-5.2"), None, REG, ["11.1", "10.0"])
    assert "written by QEMU 11.1 or 10.0 as far as its vmdesc shows, but the catalogue has pc-i440fx-5.2 for " \
        "QEMU 5.2, 7.2 only" in str(e.value) and "--from-qemu-version" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------ transforms on small inputs


def _sec(idstr: str, sid: int, vmsd: str | None = None, fields: tuple[Field, ...] = (),
         state: dict[str, Any] | None = None, instance: int = 0) -> DeviceSection:
    return DeviceSection(sid, idstr, instance, 1, dict(state or {}), Vmsd(vmsd or idstr, 1, 0, fields), {})


def _layout(m: Machine) -> list[tuple[str, int, int]]:
    return [(s.idstr, s.instance_id, s.section_id) for s in m.sections]


def test_dma_moves_with_its_registration_order() -> None:
    """QEMU 5.2 sends dma after the PC speaker, 7.2 before the southbridge; ids follow (two CPUs, a serial port)."""
    five = [("timer", 0), ("cpu", 5), ("apic", 7), ("cpu", 8), ("apic", 10), ("fw_cfg", 11), ("PIIX3", 15),
            ("i8259", 16), ("i8259", 17), ("ioapic", 18), ("hpet", 19), ("mc146818rtc", 20), ("i8254", 21),
            ("pcspk", 22), ("dma", 23), ("dma", 24), ("serial", 25), ("globalstate", 44)]
    seen: dict[str, int] = {}
    sections = []
    for name, sid in five:
        sections.append(_sec(name, sid, instance=seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    m = Machine("pc-i440fx-5.2@5.2", tuple(sections))
    up = qemu5.dma_first(m)
    assert _layout(up)[6:17] == [("dma", 0, 15), ("dma", 1, 16), ("PIIX3", 0, 17), ("i8259", 0, 18), ("i8259", 1, 19),
                                 ("ioapic", 0, 20), ("hpet", 0, 21), ("mc146818rtc", 0, 22), ("i8254", 0, 23),
                                 ("pcspk", 0, 24), ("serial", 0, 25)]
    assert qemu5.dma_first(up) is up  # already in 7.2's order
    assert _layout(qemu5.dma_after_speaker(up)) == _layout(m)
    assert qemu5.dma_after_speaker(m) is m


def test_apic_first_and_back_in_id_order() -> None:
    ten = [("timer", 0), ("cpu_common", 3), ("cpu", 4), ("kvm-tpr-opt", 5), ("apic", 6), ("cpu_common", 7),
           ("cpu", 8), ("apic", 9), ("I440FX", 10), ("acpi_build", 42), ("globalstate", 43)]
    m = Machine("pc-i440fx-10.0", tuple(_sec(n, sid, instance=1 if sid in (7, 8, 9) else 0) for n, sid in ten))
    up = qemu11.apic_first(m)
    assert [s.section_id for s in up.sections] == [6, 9, 0, 3, 4, 5, 7, 8, 10, 42, 43]
    assert qemu11.apic_first(up) is up
    assert _layout(qemu11.apic_in_id_order(up)) == _layout(m)


def _mch(ext: int, esmramc: int) -> DeviceSection:
    cfg = bytearray(256)
    cfg[0x50:0x52] = ext.to_bytes(2, "little")
    cfg[0x9E] = esmramc
    pci = Vmsd("PCIDevice", 2, 0, (Field("version_id", "int32 equal", 4), Field("config[0]", "buffer", 256)))
    return _sec("0000:00:00.0/mch", 8, "mch", (Field("parent_obj", "struct", 260, struct=pci),),
                {"parent_obj": {"version_id": 2, "config[0]": bytes(cfg)}})


def test_the_mch_extended_tseg_register_follows_the_machine_type() -> None:
    m = Machine("pc-q35-10.1", ())
    up, down = qemu11._ext_tseg(16, 64), qemu11._ext_tseg(64, 16)
    got = up(_mch(16, 0x38), m)
    assert got.state["parent_obj"]["config[0]"][0x50] == 64 and not got.desc
    assert down(got, m).state == _mch(16, 0x38).state
    odd = _mch(0xFFFF, 0x38)
    assert up(odd, m) is odd  # not the value the machine type answers: left alone
    with pytest.raises(CompatError, match="extended TSEG of 16 MiB"):
        up(_mch(16, 0x38 | 0x06 | 0x01), m)


def test_state_the_older_qemu_cannot_load_is_refused() -> None:
    m = Machine("x", ())
    cpu = _sec("cpu", 4, "cpu", state={"cpu/cet": {}, "cpu/pkru": {}})
    with pytest.raises(CompatError, match="cpu/cet: state QEMU 10.0 cannot load"):
        qemu11.cpu_down(cpu, m)
    with pytest.raises(CompatError, match="cpu/pdptrs: state QEMU 5.2 cannot load"):
        qemu5.cpu_down(_sec("cpu", 4, "cpu", state={"cpu/pdptrs": {}}), m)
    assert qemu5.cpu_down(cpu, m) is cpu
    blob = b"\x00" * 40 + b"\x05\x16virtio/128bit_features\x00\x00\x00\x01" + b"\x00" * 16
    with pytest.raises(CompatError, match="features above bit 63"):
        qemu11.features_128_down(_sec("0000:00:04.0/virtio-net", 40, "virtio-net", state={"virtio": blob}), m)
    plain = _sec("0000:00:04.0/virtio-net", 40, "virtio-net", state={"virtio": b"\x00" * 64})
    assert qemu11.features_128_down(plain, m) is plain


def test_the_5_2_names_travel_both_ways() -> None:
    common = Vmsd("PS2 Common State", 3, 0, (Field("write_cmd", "int32", 4),))
    kbd = _sec("ps2kbd", 23, "ps2kbd", (Field("common", "struct", 4, struct=common),), {"common": {"write_cmd": -1}})
    up = [t for t in REG.transforms("pc-i440fx-5.2@5.2", "pc-i440fx-5.2") if t.section == "ps2kbd"][0]
    down = [t for t in REG.transforms("pc-i440fx-5.2", "pc-i440fx-5.2@5.2") if t.section == "ps2kbd"][0]
    m = Machine("pc-i440fx-5.2@5.2", ())
    assert up.section_fn is not None and down.section_fn is not None
    new = up.section_fn(kbd, m)
    assert list(new.state) == ["parent_obj"] and new.schema.fields[0].name == "parent_obj"
    back = down.section_fn(new, m)
    assert back.state == kbd.state and back.schema == kbd.schema
    assert up.section_fn(new, m) is new  # already 7.2's
    inner = Vmsd("pckbd", 3, 0, (Field("status", "uint8", 1), Field("pending", "uint8", 1)))
    pckbd = _sec("pckbd", 25, "pckbd", (Field("kbd", "struct", 2, struct=inner),),
                 {"kbd": {"status": 0x1c, "pending": 1}})
    t = [t for t in REG.transforms("pc-i440fx-5.2@5.2", "pc-i440fx-5.2") if t.section == "pckbd"][0]
    assert t.section_fn is not None
    assert t.section_fn(pckbd, m).state == {"kbd": {"status": 0x1c, "pending_tmp": 1}}
    assert pckbd.state == {"kbd": {"status": 0x1c, "pending": 1}}  # the input is left as it was


def test_diff_infers_the_machine_type_of_a_stream_without_configuration(tmp_path: Any,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from test_compat_cli import read, small_stream, write

    new = write(tmp_path / "new.mig", small_stream())
    assert main(["transform", str(new), str(tmp_path / "old.mig"), "--machine", "pc-i440fx-2.3", "-q"]) == 0
    assert not any(isinstance(e, Configuration) for e in read(tmp_path / "old.mig"))
    assert main(["diff", str(tmp_path / "old.mig"), str(new), "--schemas-only", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"][0] == "pc-i440fx-2.3" and report["plan"][-1] == "pc-i440fx-7.2"
    assert report["plan_error"] is None and report["uncovered"] == 0
