"""``vmferry transform``, ``diff`` and ``plan`` on small streams made here (no QEMU needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmferry.cli import main
from vmferry.compat import qemu_registry, transform_events
from vmferry.encode import legacy
from vmferry.encode.configuration import configuration_state
from vmferry.events import (
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Header,
    IterBegin,
    IterEnd,
    RamBlock,
    RamEos,
    RamMemSize,
    RamPages,
    RamZeros,
    Vmdesc,
)
from vmferry.serialize.describe import describe_section
from vmferry.serialize.schema import Field, Vmsd

PCIHOST = Vmsd("PCIHost", 1, 0, (Field("config_reg", "uint32", 4),))
PCSPK = Vmsd("pcspk", 1, 0, (Field("data_on", "uint8", 1), Field("dummy_refresh_clock", "uint8", 1)))
I8254 = Vmsd("i8254", 3, 0, (Field("x", "uint8", 1),))
PCIBUS = Vmsd("PCIBUS", 1, 0, (Field("nirq", "int32 equal", 4),))
GLOBAL = Vmsd("globalstate", 1, 0, (Field("size", "uint32", 4), Field("runstate", "buffer", 100)))


def dev(sid: int, idstr: str, vmsd: Vmsd, tree: dict[str, Any], footer: bool = True) -> DeviceSection:
    return DeviceSection(sid, idstr, 0, vmsd.version_id, tree, vmsd, describe_section(vmsd, tree, idstr, 0), footer)


def small_stream(machine: str | None = "pc-i440fx-7.2", runstate: bytes = b"running",
                 vram: str = "0000:00:02.0/vga.vram") -> list[Event]:
    footer = machine is not None
    secs = [dev(1, "i8254", I8254, {"x": 1}, footer), dev(2, "pcspk", PCSPK, {"data_on": 1, "dummy_refresh_clock": 16},
                                                          footer),
            dev(3, "PCIHost", PCIHOST, {"config_reg": 0x8000005C}, footer),
            dev(4, "PCIBUS", PCIBUS, {"nirq": 4}, footer)]
    if runstate:
        secs.append(dev(5, "globalstate", GLOBAL, {"size": len(runstate) + 1, "runstate": runstate.ljust(100, b"\0")},
                        footer))
    page = bytes(range(256)) * 16
    events: list[Event] = [Header()]
    if machine:
        events.append(Configuration(configuration_state(machine)))
    events += [IterBegin(1, 9, "ram", 0, 4),
               RamMemSize(0x3000, [RamBlock("pc.ram", 0x1000), RamBlock(vram, 0x1000),
                                   RamBlock("0000:00:02.0/vga.rom", 0x1000)]),
               RamPages("pc.ram", 0, 1, True, data=page), RamPages(vram, 0, 1, True, data=page),
               RamZeros("0000:00:02.0/vga.rom", 0, 1, True), RamEos(), IterEnd(9, footer), *secs, Eof(),
               Vmdesc(json.dumps({"page_size": 4096, "devices": [s.desc for s in secs]}).encode())]
    return events


def write(path: Path, events: list[Event]) -> Path:
    path.write_bytes(b"".join(bytes(c) for c in legacy.encode(events)))
    return path


def read(path: Path) -> list[Event]:
    return list(legacy.decode([path.read_bytes()]))


def devices(events: list[Event]) -> dict[str, DeviceSection]:
    return {e.idstr: e for e in events if isinstance(e, DeviceSection)}


def test_transform_down_and_up_through_the_cli(tmp_path: Path) -> None:
    src = write(tmp_path / "in.mig", small_stream())
    assert main(["transform", str(src), str(tmp_path / "old.mig"), "--machine", "pc-i440fx-2.3", "-q"]) == 0
    old = read(tmp_path / "old.mig")
    assert not any(isinstance(e, Configuration) for e in old)
    assert set(devices(old)) == {"i8254", "PCIBUS"}  # no PCIHost (5.0), no pcspk (2.7), no globalstate "running"
    assert all(not e.footer for e in old if isinstance(e, (DeviceSection, IterEnd)))
    assert [b.name for e in old if isinstance(e, RamMemSize) for b in e.blocks][1] == "vga.vram"
    assert {e.block for e in old if isinstance(e, RamPages)} == {"pc.ram", "vga.vram"}
    vmdesc = json.loads([e for e in old if isinstance(e, Vmdesc)][0].text)
    assert [d["name"] for d in vmdesc["devices"]] == ["i8254", "PCIBUS"]

    # no configuration: pc-i440fx-2.3 is the one machine type of the catalogue that sends none
    assert main(["transform", str(tmp_path / "old.mig"), str(tmp_path / "inferred.mig"), "--machine",
                 "pc-i440fx-7.2", "-q"]) == 0
    assert main(["transform", str(tmp_path / "old.mig"), str(tmp_path / "new.mig"), "--machine", "pc-i440fx-7.2",
                 "--from-machine", "pc-i440fx-2.3", "-q"]) == 0
    assert (tmp_path / "inferred.mig").read_bytes() == (tmp_path / "new.mig").read_bytes()
    new = read(tmp_path / "new.mig")
    assert [e.machine for e in new if isinstance(e, Configuration)] == ["pc-i440fx-7.2"]
    got = devices(new)
    assert got["PCIHost"].state == {"config_reg": 0}  # what the older destination had: its reset value
    assert got["pcspk"].state == {"data_on": 0, "dummy_refresh_clock": 0}
    assert bytes(got["globalstate"].state["runstate"]).rstrip(b"\0") == b"running"
    assert list(got) == ["i8254", "pcspk", "PCIHost", "PCIBUS", "globalstate"]  # where QEMU puts them
    ids = [e.section_id for e in got.values()] + [e.section_id for e in new if isinstance(e, IterBegin)]
    assert len(set(ids)) == 6  # new sections take ids nobody uses, the ram section's (9) included
    pages = [bytes(e.page(0)) for e in new if isinstance(e, RamPages)]
    assert pages == [bytes(range(256)) * 16] * 2 and any(e.block == "0000:00:02.0/vga.vram"
                                                         for e in new if isinstance(e, RamPages))


def test_same_machine_is_byte_for_byte(tmp_path: Path) -> None:
    src = write(tmp_path / "in.mig", small_stream())
    assert main(["transform", str(src), str(tmp_path / "out.mig"), "--machine", "pc-i440fx-7.2", "-q"]) == 0
    assert (tmp_path / "out.mig").read_bytes() == src.read_bytes()


def test_a_neighbouring_step_keeps_untouched_sections_exact(tmp_path: Path) -> None:
    events = small_stream()
    out = list(transform_events(iter(events), qemu_registry(), "pc-i440fx-7.1"))
    assert [e.machine for e in out if isinstance(e, Configuration)] == ["pc-i440fx-7.1"]
    assert devices(out)["PCIHost"] is devices(events)["PCIHost"]  # nothing to do: the very same section


def test_transform_to_json_and_back(tmp_path: Path) -> None:
    src = write(tmp_path / "in.mig", small_stream())
    assert main(["transform", str(src), str(tmp_path / "old.json"), "--machine", "pc-i440fx-4.2", "--to", "json",
                 "-q"]) == 0
    assert main(["transform", str(tmp_path / "old.json"), str(tmp_path / "back.mig"), "--machine", "pc-i440fx-4.2",
                 "--to", "legacy", "-q"]) == 0
    assert main(["transform", str(src), str(tmp_path / "direct.mig"), "--machine", "pc-i440fx-4.2", "-q"]) == 0
    assert (tmp_path / "back.mig").read_bytes() == (tmp_path / "direct.mig").read_bytes()


@pytest.mark.parametrize(("argv", "message"), [
    (["--machine", "pc-i440fx-9.9"], "unknown release 'pc-i440fx-9.9'"),
    (["--machine", "pc-q35-7.2"], "missing step: pc-i440fx-7.2 -> pc-q35-7.2"),
    (["--machine", "pc-i440fx-7.2", "--from-machine", "pc-i440fx-2.12"],
     "the stream says it is pc-i440fx-7.2, but pc-i440fx-2.12 was given"),
])
def test_transform_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    src = write(tmp_path / "in.mig", small_stream())
    assert main(["transform", str(src), str(tmp_path / "out.mig"), "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out.mig").exists()


def test_a_running_globalstate_in_a_2_3_stream_is_suspicious(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "in.mig", small_stream(None, b"running", "vga.vram"))
    assert main(["transform", str(src), str(tmp_path / "o.mig"), "--machine", "pc-i440fx-2.4", "--from-machine",
                 "pc-i440fx-2.3", "-q"]) == 2
    assert "is the source machine type right" in capsys.readouterr().err


def test_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "pc-i440fx-5.0", "pc-i440fx-5.2"]) == 0
    out = capsys.readouterr().out
    assert "PCIHost" in out and "hw_compat_5_0" in out and "no-change" in out
    assert main(["plan", "pc-q35-4.1", "pc-q35-3.1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["to"] for s in plan["steps"]] == ["pc-q35-4.0.1", "pc-q35-4.0", "pc-q35-3.1"] and not plan["lossless"]
    assert main(["plan", "--list"]) == 0
    assert "4.0.1" in capsys.readouterr().out
    assert main(["plan", "pc-i440fx-2.3"]) == 2


def test_diff_of_vmdesc_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def vmdesc(events: list[Event]) -> Path:
        text = [e for e in events if isinstance(e, Vmdesc)][0].text
        p = tmp_path / f"v{len(list(tmp_path.iterdir()))}.json"
        p.write_bytes(text)
        return p

    new = small_stream()
    old = list(transform_events(iter(small_stream()), qemu_registry(), "pc-i440fx-4.2"))
    a, b = vmdesc(old), vmdesc(new)
    assert main(["diff", str(a), str(b), "--json"]) == 3  # machine types unknown: nothing can be covered
    report = json.loads(capsys.readouterr().out)
    assert report["plan_error"] and {(d["kind"], d["section"]) for d in report["differences"]} == \
        {("section-added", "PCIHost")}
    assert main(["diff", str(a), str(b), "--from-machine", "pc-i440fx-4.2", "--to-machine", "pc-i440fx-7.2"]) == 0
    out = capsys.readouterr().out
    assert "PCIHost" in out and "0 not covered" in out
    sa, sb = write(tmp_path / "a.mig", old), write(tmp_path / "b.mig", new)
    assert main(["diff", str(sa), str(sb), "--json"]) == 0
    kinds = {d["kind"] for d in json.loads(capsys.readouterr().out)["differences"]}
    assert kinds == {"section-added", "machine"}
    assert main(["diff", str(tmp_path / "nope.json"), str(b)]) == 2


def test_a_vmdesc_is_written_when_the_source_had_none() -> None:
    events = [e for e in small_stream(None, b"", "vga.vram") if not isinstance(e, Vmdesc)]
    out = list(transform_events(iter(events), qemu_registry(), "pc-i440fx-2.4", "pc-i440fx-2.3"))
    assert isinstance(out[-1], Vmdesc) and isinstance(out[-2], Eof)
    described = json.loads(out[-1].text)
    assert described["page_size"] == 4096
    assert [d["name"] for d in described["devices"]] == [e.idstr for e in out if isinstance(e, DeviceSection)]
    assert "globalstate" in [d["name"] for d in described["devices"]]


def test_diff_reads_streams_of_any_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "in.mig", small_stream())
    assert main(["convert", str(src), str(tmp_path / "in.json"), "--to", "json", "-q"]) == 0
    assert main(["diff", str(src), str(tmp_path / "in.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["differences"] == [] and report["b"]["kind"] == "stream" and report["plan"] == ["pc-i440fx-7.2"]


def test_pcihost_comes_back_once_whatever_the_buses(tmp_path: Path) -> None:
    """A root port or bridge has a bus of its own: QEMU sends a PCIBUS section per bus (instance 1, 2, ...), and
    the host bridge's one PCIHost goes before the first of them."""
    events = small_stream()
    at = next(i for i, e in enumerate(events) if isinstance(e, DeviceSection) and e.idstr == "PCIBUS") + 1
    bus1 = DeviceSection(6, "PCIBUS", 1, 1, {"nirq": 0}, PCIBUS, describe_section(PCIBUS, {"nirq": 0}, "PCIBUS", 1),
                         True)
    events.insert(at, bus1)
    src = write(tmp_path / "in.mig", events)
    assert main(["transform", str(src), str(tmp_path / "old.mig"), "--machine", "pc-i440fx-2.3", "-q"]) == 0
    assert main(["transform", str(tmp_path / "old.mig"), str(tmp_path / "new.mig"), "--machine", "pc-i440fx-7.2",
                 "-q"]) == 0
    sections = [(e.idstr, e.instance_id) for e in read(tmp_path / "new.mig") if isinstance(e, DeviceSection)]
    assert sections == [("i8254", 0), ("pcspk", 0), ("PCIHost", 0), ("PCIBUS", 0), ("PCIBUS", 1), ("globalstate", 0)]
