"""QEMU 10.0 <-> 7.2 transforms without QEMU: releases, plans, the stream transforms, globalstate.

The same transforms against real QEMU 10.0 and 7.2 are in test_compat_qemu10_real.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmferry.cli.compat import source_qemu
from vmferry.cli import main
from vmferry.compat import Machine, apply, qemu_registry, transform_events
from vmferry.compat.machines.qemu10 import (
    add_switchover_start,
    configuration_desc,
    drop_switchover_start,
    globalstate_down,
    globalstate_up,
    restyle_vmdesc,
)
from vmferry.compat.machines.vmdesc import restyle_fields, style_of
from vmferry.compat.registry import Registry
from vmferry.encode import legacy
from vmferry.errors import CompatError
from vmferry.events import (
    CMD_SWITCHOVER_START,
    SECTION_END,
    SECTION_PART,
    SECTION_START,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Header,
    IterBegin,
    IterEnd,
    RamEos,
    Vmdesc,
)
from vmferry.serialize.describe import describe_section
from vmferry.serialize.schema import Field, Vmsd

REG = qemu_registry()


# ------------------------------------------------------------- releases


def test_a_release_is_a_machine_type_of_one_qemu_version() -> None:
    assert REG.resolve("pc-i440fx-10.0") == "pc-i440fx-10.0"  # only QEMU 10.0 has it
    assert REG.resolve("pc-i440fx-7.2") == "pc-i440fx-7.2"  # its home: QEMU 7.2
    assert REG.resolve("pc-i440fx-7.2", "7.2") == "pc-i440fx-7.2"
    assert REG.resolve("pc-i440fx-7.2", "10.0") == "pc-i440fx-7.2@10.0"
    assert REG.resolve("pc-q35-7.2@10.0") == "pc-q35-7.2@10.0"
    assert REG.release("pc-i440fx-10.0@10.0").name == "pc-i440fx-10.0"
    assert REG.release("pc-i440fx-5.2@7.2").name == "pc-i440fx-5.2"
    rel = REG.release("pc-q35-7.2@10.0")
    assert (rel.machine, rel.qemu) == ("pc-q35-7.2", "10.0")
    assert REG.release("pc-i440fx-6.0").qemu == "7.2"


@pytest.mark.parametrize(("machine", "qemu", "message"), [
    ("pc-i440fx-10.0", "7.2", "no release of pc-i440fx-10.0 for QEMU 7.2 (it has QEMU 10.0, 11.1)"),
    ("pc-i440fx-5.2", "10.0", "QEMU 10.0 has here: pc-i440fx-7.2 .. pc-i440fx-10.0; pc-q35-7.2 .. pc-q35-10.0"),
    ("pc-i440fx-9.2", "7.2", "no release of pc-i440fx-9.2 for QEMU 7.2 (it has QEMU 10.0)"),
    ("pc-i440fx-12.0", None, "unknown release 'pc-i440fx-12.0'"),
    ("pc-i440fx-7.2@10.0", "7.2", "pc-i440fx-7.2@10.0 names QEMU 10.0, but QEMU 7.2 was given"),
])
def test_releases_that_do_not_exist_are_refused_in_one_line(machine: str, qemu: str | None, message: str) -> None:
    with pytest.raises(CompatError) as e:
        REG.resolve(machine, qemu)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_path_down_goes_through_the_7_2_machine_type_of_each_qemu() -> None:
    plan = REG.plan("pc-i440fx-10.0", "pc-i440fx-5.2")
    on10 = ["pc-i440fx-10.0", "pc-i440fx-9.2", "pc-i440fx-9.1", "pc-i440fx-9.0", "pc-i440fx-8.2", "pc-i440fx-8.1",
            "pc-i440fx-8.0", "pc-i440fx-7.2@10.0"]
    assert plan.path[:10] == on10 + ["pc-i440fx-7.2", "pc-i440fx-7.1"]
    assert plan.path[-1] == "pc-i440fx-5.2" and not plan.lossless
    up = REG.plan("pc-q35-7.2", "pc-q35-10.0")
    assert up.path == ["pc-q35-7.2"] + [n.replace("i440fx", "q35") for n in reversed(on10)]
    assert [t.name for t in up.transforms if not t.lossless] == ["e1000e pending flags"]
    assert [t.name for t in up.steps[-1].transforms] == ["switchover-start", "vmdesc (QEMU 10.0)"]
    assert REG.resolve("pc-i440fx-9.2") == "pc-i440fx-9.2" and REG.release("pc-i440fx-9.2").qemu == "10.0"
    with pytest.raises(CompatError, match="missing step: pc-i440fx-10.0 -> pc-q35-10.0"):
        REG.plan("pc-i440fx-10.0", "pc-q35-10.0")


# ------------------------------------------------------- SWITCHOVER_START


def _precopy(switchover: bool) -> list[Event]:
    evs: list[Event] = [Header(), Configuration({"len": 14, "name": b"pc-i440fx-10.0"}),
                        IterBegin(SECTION_START, 1, "ram", 0, 4), RamEos(), IterEnd(1),
                        IterBegin(SECTION_PART, 1), RamEos(), IterEnd(1)]
    if switchover:
        evs.append(Command(CMD_SWITCHOVER_START))
    evs += [IterBegin(SECTION_END, 1), RamEos(), IterEnd(1), Eof()]
    return evs


def test_switchover_start_is_dropped_and_put_back_where_qemu_10_writes_it() -> None:
    new, old = _precopy(True), _precopy(False)
    assert list(drop_switchover_start(iter(new))) == old
    assert list(add_switchover_start(iter(old))) == new
    assert list(add_switchover_start(iter(new))) == new  # never twice


def test_switchover_start_in_postcopy_comes_before_the_discards() -> None:
    evs: list[Event] = [Header(), IterBegin(SECTION_START, 1, "ram", 0, 4), RamEos(), IterEnd(1),
                        Command(6, b"\0"), Command(2, b"\0\0\0\2")]
    out = list(add_switchover_start(iter(evs)))
    assert [type(e).__name__ for e in out[4:6]] == ["Command", "Command"]
    assert isinstance(out[4], Command) and out[4].cmd == CMD_SWITCHOVER_START and out[5] == evs[4]


def test_a_stream_without_a_switchover_gets_none() -> None:
    # background snapshot: no END section; device state only: no iterative section at all
    evs: list[Event] = [Header(), IterBegin(SECTION_START, 1, "ram", 0, 4), RamEos(), IterEnd(1), Eof()]
    assert list(add_switchover_start(iter(evs))) == evs


# ----------------------------------------------------------------- vmdesc


def _elements(n: int, last_index: bool) -> list[dict[str, object]]:
    out: list[dict[str, object]] = [{"name": "bmdma", "index": i, "type": "struct", "size": 8} for i in range(n)]
    if not last_index:
        del out[-1]["index"]
    return out


def test_array_indexes_as_each_qemu_writes_them() -> None:
    old = [{"name": "a", "type": "uint8", "size": 1}, *_elements(3, True), {"name": "b", "type": "uint8", "size": 1}]
    new = [{"name": "a", "type": "uint8", "size": 1}, *_elements(3, False), {"name": "b", "type": "uint8", "size": 1}]
    seven, ten = style_of("7.2"), style_of("10.0")
    assert restyle_fields(old, ten) == new
    assert restyle_fields(new, seven) == old
    assert restyle_fields(old, seven) == old and restyle_fields(new, ten) == new
    assert list(restyle_fields(new, seven)[3]) == ["name", "index", "type", "size"]  # QEMU's key order
    nested = [{"name": "s", "type": "struct", "size": 16, "struct": {"vmsd_name": "x", "version": 1,
                                                                      "fields": _elements(2, True)}}]
    assert restyle_fields(nested, ten)[0]["struct"]["fields"] == _elements(2, False)


def test_the_configuration_object_comes_and_goes_with_qemu_10() -> None:
    config = Configuration({"len": 14, "name": b"pc-i440fx-10.0",
                            "configuration/capabilities": {"caps_count": 2,
                                                           "capabilities": [b"x-ignore-shared", b"mapped-ram"]},
                            "configuration/uuid": {"uuid.data": list(range(16))}})
    desc = configuration_desc(config)
    assert desc["fields"][1] == {"name": "name", "type": "buffer", "size": 14}
    caps, uuid = desc["subsections"]
    assert caps["fields"][1] == {"name": "capabilities", "array_len": 2, "type": "capability", "size": 16}
    assert uuid["fields"] == [{"name": "uuid.data", "array_len": 16, "type": "uint8", "size": 1}]
    text = json.dumps({"page_size": 4096, "devices": []}).encode()
    up = restyle_vmdesc(Vmdesc(text), "10.0", config)
    assert list(json.loads(up.text)) == ["configuration", "page_size", "devices"]
    assert restyle_vmdesc(up, "7.2", config).text == text


# ------------------------------------------------------------ globalstate

GLOBALSTATE_72 = Vmsd("globalstate", 1, 0, (Field("size", "uint32", 4), Field("runstate", "buffer", 100)))


def _globalstate(state: bytes) -> DeviceSection:
    tree = {"size": len(state) + 1, "runstate": state.ljust(100, b"\0")}
    return DeviceSection(30, "globalstate", 0, 1, tree, GLOBALSTATE_72,
                         describe_section(GLOBALSTATE_72, tree, "globalstate", 0), size=104)


def test_globalstate_gets_qemu_10s_four_fields_and_loses_them_again() -> None:
    m = Machine("pc-i440fx-7.2", ())
    for state, suspended in ((b"running", 0), (b"suspended", 1), (b"prelaunch", 0)):
        sec = _globalstate(state)
        up = globalstate_up(sec, m)
        assert [f.name for f in up.schema.fields] == ["size", "runstate", "has_vm_was_suspended",
                                                      "vm_was_suspended", "unused"]
        assert up.state["runstate"] == state.ljust(32, b"\0") and up.state["has_vm_was_suspended"] == 1
        assert up.state["vm_was_suspended"] == suspended and up.state["unused"] == bytes(66)
        assert sum(f.size for f in up.schema.fields) == sum(f.size for f in sec.schema.fields)  # same bytes
        down = globalstate_down(up, m)
        assert down.state == sec.state and down.schema.fields == sec.schema.fields


def test_a_run_state_longer_than_qemu_10_holds_is_refused() -> None:
    with pytest.raises(CompatError, match="longer than QEMU 10.0's 32 bytes"):
        globalstate_up(_globalstate(b"x" * 40), Machine("pc-i440fx-7.2", ()))


# ----------------------------------------------------------- whole streams


def test_a_stream_goes_to_qemu_10_and_back_unchanged() -> None:
    sec = _globalstate(b"running")
    vmdesc = Vmdesc(json.dumps({"page_size": 4096, "devices": [sec.desc]}).encode())
    old: list[Event] = [*_precopy(False)[:-1], sec, Eof(), vmdesc]
    old[1] = Configuration({"len": 13, "name": b"pc-i440fx-7.2"})
    new = list(transform_events(iter(old), REG, "pc-i440fx-10.0"))
    cmds = [e for e in new if isinstance(e, Command)]
    assert [c.cmd for c in cmds] == [CMD_SWITCHOVER_START]
    cfg = next(e for e in new if isinstance(e, Configuration))
    assert cfg.state == {"len": 14, "name": b"pc-i440fx-10.0"}
    obj = json.loads(next(e for e in new if isinstance(e, Vmdesc)).text)
    assert obj["configuration"]["fields"][1]["size"] == 14
    assert [f["name"] for f in obj["devices"][0]["fields"]][2:4] == ["has_vm_was_suspended", "vm_was_suspended"]
    back = list(transform_events(iter(new), REG, "pc-i440fx-7.2"))
    assert back == old


def test_the_source_qemu_can_be_named() -> None:
    evs = [*_precopy(False), Vmdesc(json.dumps({"page_size": 4096, "devices": []}).encode())]
    evs[1] = Configuration({"len": 13, "name": b"pc-i440fx-7.2"})
    # the same machine type on QEMU 10.0: only the description of its state changes
    assert list(transform_events(iter(evs), REG, "pc-i440fx-7.2", source_qemu="10.0")) == evs
    with pytest.raises(CompatError, match="the stream says it is pc-i440fx-7.2, but pc-i440fx-10.0 was given"):
        list(transform_events(iter(evs), REG, "pc-i440fx-7.2", "pc-i440fx-10.0"))


def test_the_planner_keeps_stream_transforms_out_of_apply() -> None:
    reg = Registry()
    reg.line("x", ["x-1", "x-2"])
    seen: list[str] = []

    def fn(events):  # type: ignore[no-untyped-def]
        seen.append("ran")
        yield from events

    reg.stream("x-1", "x-2", fn, lossless=True, mirrors="test", name="s")
    plan = reg.plan("x-1", "x-2")
    assert apply(plan, Machine("x-1", ())).release == "x-2" and not seen
    assert plan.transforms[0].kind == "stream" and len(plan.stream_fns()) == 1


# -------------------------------------------------------------- the CLI


def _file(path: Path, events: list[Event]) -> Path:
    path.write_bytes(b"".join(bytes(c) for c in legacy.encode(events)))
    return path


def _stream(machine: bytes, qemu10: bool) -> list[Event]:
    sec = _globalstate(b"running")
    if qemu10:
        sec = globalstate_up(sec, Machine("pc-i440fx-7.2", ()))
        sec.desc = describe_section(sec.schema, sec.state, sec.idstr, 0)
    config = Configuration({"len": len(machine), "name": machine})
    obj: dict[str, object] = {"page_size": 4096, "devices": [sec.desc]}
    if qemu10:
        obj = {"configuration": configuration_desc(config), **obj}
    evs = _precopy(machine.endswith(b"10.0"))
    evs[1] = config
    return [*evs[:-1], sec, Eof(), Vmdesc(json.dumps(obj).encode())]


def test_the_source_qemu_is_read_from_the_vmdesc(tmp_path: Path) -> None:
    on10 = _file(tmp_path / "on10.mig", _stream(b"pc-i440fx-7.2", True))
    on72 = _file(tmp_path / "on72.mig", _stream(b"pc-i440fx-7.2", False))
    assert (source_qemu(str(on10)), source_qemu(str(on72))) == (["10.0", "11.1"], ["7.2"])
    assert source_qemu(str(_file(tmp_path / "junk", []))) is None
    out = tmp_path / "out.mig"
    # the same machine type, from QEMU 10.0 to QEMU 7.2: globalstate and the vmdesc as 7.2 writes them
    assert main(["transform", str(on10), str(out), "--machine", "pc-i440fx-7.2", "-q"]) == 0
    assert out.read_bytes() == on72.read_bytes()
    assert main(["transform", str(on72), str(out), "--machine", "pc-i440fx-7.2", "--qemu-version", "10.0", "-q"]) == 0
    assert out.read_bytes() == on10.read_bytes()
    # told otherwise, the stream is taken as QEMU 7.2's: nothing to do
    assert main(["transform", str(on10), str(out), "--machine", "pc-i440fx-7.2", "--from-qemu-version", "7.2",
                 "-q"]) == 0
    assert out.read_bytes() == on10.read_bytes()


def test_transform_between_the_qemus_on_the_command_line(tmp_path: Path) -> None:
    new = _file(tmp_path / "new.mig", _stream(b"pc-i440fx-10.0", True))
    old = _file(tmp_path / "old.mig", _stream(b"pc-i440fx-7.2", False))
    out = tmp_path / "out.mig"
    assert main(["transform", str(new), str(out), "--machine", "pc-i440fx-7.2", "--qemu-version", "7.2", "-q"]) == 0
    assert out.read_bytes() == old.read_bytes()
    assert main(["transform", str(old), str(out), "--machine", "pc-i440fx-10.0", "-q"]) == 0
    assert out.read_bytes() == new.read_bytes()


def test_a_machine_type_the_qemu_does_not_have_fails_in_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = _file(tmp_path / "new.mig", _stream(b"pc-i440fx-10.0", True))
    out = tmp_path / "out.mig"
    assert main(["transform", str(src), str(out), "--machine", "pc-i440fx-10.0", "--qemu-version", "7.2", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no release of pc-i440fx-10.0 for QEMU 7.2" in err and not out.exists()


def test_plan_shows_the_stream_transforms(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "pc-i440fx-10.0", "pc-i440fx-5.2"]) == 0
    text = capsys.readouterr().out
    assert "pc-i440fx-10.0 -> pc-i440fx-5.2: 14 steps, lossy" in text
    assert "switchover-start [stream] lossless: hw_compat_9_2" in text
    assert main(["plan", "pc-q35-7.2", "pc-q35-7.2", "--from-qemu-version", "10.0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["source"] == "pc-q35-7.2@10.0" and [t["kind"] for t in plan["steps"][0]["transforms"]][-1] == "stream"
    assert main(["plan", "--list"]) == 0
    assert "pc-i440fx@10.0: 7.2, 8.0, 8.1, 8.2, 9.0, 9.1, 9.2, 10.0" in capsys.readouterr().out


# ----------------------------------------------------------------- e1000e


def _e1000e(cfg: bytes, qemu10: bool) -> DeviceSection:
    pci = Vmsd("PCIDevice", 2, 0, (Field("version_id", "int32", 4), Field("config[1]", "buffer", len(cfg))))
    if qemu10:
        fields = (Field("parent_obj[0]", "struct", 4 + len(cfg), struct=pci), Field("unused[0]", "unused_buffer", 1),
                  Field("unused[1]", "unused_buffer", 5))
        tree = {"parent_obj[0]": {"version_id": 2, "config[1]": cfg}, "unused[0]": b"\0", "unused[1]": bytes(5)}
    else:
        fields = (Field("parent_obj[0]", "struct", 4 + len(cfg), struct=pci),
                  Field("core.itr_intr_pending", "bool", 1),
                  Field("core.eitr_intr_pending", "bool", 1, count=5, array=True))
        tree = {"parent_obj[0]": {"version_id": 2, "config[1]": cfg}, "core.itr_intr_pending": True,
                "core.eitr_intr_pending": [False, True, False, False, False]}
    vmsd = Vmsd("e1000e", 2, 2, fields)
    return DeviceSection(9, "0000:00:01.0/e1000e", 0, 2, tree, vmsd, {})


def _pcie_config() -> bytes:
    cfg = bytearray(4096)
    cfg[0x34] = 0xC8
    cfg[0xC8:0xCA] = b"\x01\xe0"  # power management -> 0xe0
    cfg[0xE0:0xE2] = b"\x10\x00"  # PCI Express, last
    cfg[0xE4] = 0x20  # Extended Tag Field Supported
    cfg[0x100:0x104] = (0x0001 | (1 << 16) | (0x140 << 20)).to_bytes(4, "little")  # AER -> 0x140
    cfg[0x108:0x10C] = (0x00400000 | 0x02000000).to_bytes(4, "little")  # uncorrectable error mask
    return bytes(cfg)


def test_pci_express_devices_lose_the_bits_qemu_7_2_compares() -> None:
    sec = _e1000e(_pcie_config(), True)
    sec.state["core.timadj"] = 5
    sec.schema = Vmsd("e1000e", 2, 2, (*sec.schema.fields, Field("core.timadj", "int64", 8)))
    m = Machine("pc-q35-10.0", (sec, _globalstate(b"running")))
    down = apply(REG.plan("pc-q35-10.0", "pc-q35-7.2@10.0"), m)
    assert apply(REG.plan("pc-q35-10.0", "pc-q35-9.1"), m).sections[0].state["core.timadj"] == 5
    e = down.sections[0]
    assert isinstance(e, DeviceSection)
    cfg = e.state["parent_obj[0]"]["config[1]"]
    assert cfg[0xE4] == 0 and cfg[0x108:0x10C] == bytes(4) and "core.timadj" not in e.state
    assert cfg[:0xE4] == _pcie_config()[:0xE4] and down.sections[1] == m.sections[1]
    up = apply(REG.plan("pc-q35-7.2@10.0", "pc-q35-10.0"), down).sections[0]
    assert isinstance(up, DeviceSection)
    assert up.state["core.timadj"] == 0 and up.state["parent_obj[0]"]["config[1]"][0xE4] == 0x20
    assert up.state["parent_obj[0]"]["config[1]"][0x108:0x10C] == bytes(4)  # as the guest saw it
    # a conventional PCI device (256-byte config space) is left alone
    plain = _e1000e(_pcie_config()[:256], True)
    assert apply(REG.plan("pc-q35-10.0", "pc-q35-7.2@10.0"), Machine("pc-q35-10.0", (plain,))).sections[0] == plain


def test_e1000e_pending_flags_that_qemu_10_no_longer_migrates() -> None:
    from vmferry.compat.machines.qemu10 import e1000e_pending_down, e1000e_pending_up

    m = Machine("pc-q35-7.2", ())
    old = e1000e_pending_down(_e1000e(_pcie_config(), True), m)
    assert old.state["core.itr_intr_pending"] is False and old.state["core.eitr_intr_pending"] == [False] * 5
    assert [f.name for f in old.schema.fields] == [f.name for f in _e1000e(b"", False).schema.fields]
    new = e1000e_pending_up(_e1000e(_pcie_config(), False), m)
    assert new.state == _e1000e(_pcie_config(), True).state
    assert new.schema.fields == _e1000e(_pcie_config(), True).schema.fields
def test_a_zero_page_with_another_fill_byte_is_refused_for_qemu_10() -> None:
    from vmferry.events import RamZeros

    evs = _precopy(False)
    evs[1] = Configuration({"len": 13, "name": b"pc-i440fx-7.2"})
    evs.insert(3, RamZeros("pc.ram", 0x2000, 2, True, fill=b"\x00\x55"))
    assert len(list(transform_events(iter(evs), REG, "pc-i440fx-7.2", source_qemu="10.0"))) == len(evs) + 1
    with pytest.raises(CompatError, match="'pc.ram': a ZERO record with fill byte 0x55 at 0x2000"):
        list(transform_events(iter(evs), REG, "pc-i440fx-10.0"))


def test_a_capability_qemu_7_2_does_not_know_is_refused() -> None:
    evs = _precopy(True)
    caps = {"caps_count": 2, "capabilities": [b"x-ignore-shared", b"mapped-ram"]}
    evs[1] = Configuration({"len": 14, "name": b"pc-i440fx-10.0", "configuration/capabilities": caps})
    with pytest.raises(CompatError, match="capability mapped-ram: QEMU 7.2 does not know it"):
        list(transform_events(iter(evs), REG, "pc-i440fx-7.2"))
    caps["capabilities"], caps["caps_count"] = [b"x-ignore-shared"], 1
    out = list(transform_events(iter(evs), REG, "pc-i440fx-7.2"))
    assert next(e for e in out if isinstance(e, Configuration)).capabilities == ["x-ignore-shared"]
