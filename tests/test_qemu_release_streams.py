"""Streams written by real QEMU 5.2 and 11.1: decoding, byte-exact round trips, vmdesc shape.

The corpus recipes ``names(qemu="5.2")`` and ``names(qemu="11.1")`` make
pc-i440fx and pc-q35 streams (paused, running the counting guest, e1000 +
slirp, e1000e on q35, virtio-net-pci; for 11.1 also the 5.2, 7.2 and 10.0
machine types it still runs).  Every one must decode into device trees,
come back byte for byte through legacy, JSON and ferry, and have each of
its vmdesc entries, and the whole vmdesc, rebuilt byte for byte by the
Describer in that QEMU's style of array indexes (5.2: on every element,
11.1: on none).  docs/qemu-releases.md records what these streams showed.
The last tests load such streams into other QEMU releases, as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qemu_recipes import RECIPES, names

from vmferry.cli import main
from vmferry.cli.summary import StreamSummary
from vmferry.encode import legacy
from vmferry.events import CMD_SWITCHOVER_START, Command, Configuration, DeviceSection, Event, OpaqueSection, Vmdesc
from vmferry.live.qemu.process import QemuError, QemuVM
from vmferry.serialize.describe import describe_section
from vmferry.serialize.visitor import ARRAY_INDEX_BY_QEMU

#: release -> its marker
MARKS = {"5.2": pytest.mark.qemu5, "11.1": pytest.mark.qemu11}


def _params(release: str) -> list[Any]:
    return [pytest.param(n, marks=[pytest.mark.qemu, MARKS[release]]) for n in names(qemu=release)]


ALL = _params("5.2") + _params("11.1")


def _events(path: Path) -> list[Event]:
    return list(legacy.decode([path.read_bytes()]))


def _convert(src: Path, dst: Path, to: str) -> None:
    assert main(["convert", "-q", str(src), str(dst), "--to", to]) == 0


def _has_key(obj: Any, key: str) -> bool:
    if isinstance(obj, dict):
        return key in obj or any(_has_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_key(v, key) for v in obj)
    return False


def test_the_recipes_cover_both_chipsets_and_the_nics() -> None:
    for release in ("5.2", "11.1"):
        recs = [RECIPES[n] for n in names(qemu=release)]
        assert {f"pc-i440fx-{release}", f"pc-q35-{release}"} <= {r.machine_type for r in recs}
        assert {"paused", "running"} <= {r.kind for r in recs}
        devices = {d for r in recs for d in r.devices}
        assert {"e1000", "e1000e", "virtio-net-pci"} <= devices
    # QEMU 7.2's own pc-i440fx-5.2 stream keeps its name; 5.2's are "...-on-5.2-..."
    assert RECIPES["pc-5.2-paused"].qemu_version is None
    assert all("-on-5.2-" in n for n in names(qemu="5.2"))


@pytest.mark.parametrize("name", ALL)
def test_decodes_into_device_trees_and_round_trips(name: str, qemu_corpus: Any, tmp_path: Path) -> None:
    src = qemu_corpus[name]
    release = RECIPES[name].qemu_version
    assert qemu_corpus.provenance(name)["qemu"].startswith(f"QEMU emulator version {release}")
    events = _events(src)
    devices = [e for e in events if isinstance(e, DeviceSection)]
    opaque = [e.idstr for e in events if isinstance(e, OpaqueSection)]
    assert len(devices) >= 29 and opaque == []
    original = src.read_bytes()
    _convert(src, tmp_path / "same.mig", "legacy")
    assert (tmp_path / "same.mig").read_bytes() == original
    for to in ("json", "ferry"):
        _convert(src, tmp_path / f"state.{to}", to)
        _convert(tmp_path / f"state.{to}", tmp_path / f"back-{to}.mig", "legacy")
        assert (tmp_path / f"back-{to}.mig").read_bytes() == original, to


@pytest.mark.parametrize("name", ALL)
def test_the_describer_rebuilds_the_vmdesc_byte_for_byte(name: str, qemu_corpus: Any) -> None:
    release = RECIPES[name].qemu_version
    assert release is not None
    style = ARRAY_INDEX_BY_QEMU[release]
    events = _events(qemu_corpus[name])
    devices = [e for e in events if isinstance(e, DeviceSection)]
    for sec in devices:
        desc = describe_section(sec.schema, sec.state, sec.idstr, sec.instance_id, sec.version_id,
                                array_index=style)
        assert json.dumps(desc) == json.dumps(sec.desc), sec.idstr
    (vmdesc,) = [e for e in events if isinstance(e, Vmdesc)]
    obj = json.loads(vmdesc.text)
    by_key = {(d.idstr, d.instance_id): d for d in devices}
    rebuilt = []
    for d in obj["devices"]:
        sec = by_key[(d["name"], d["instance_id"])]
        rebuilt.append(describe_section(sec.schema, sec.state, sec.idstr, sec.instance_id, sec.version_id,
                                        array_index=style))
    # 5.2 still writes the vmdesc with QJSON's spacing, 11.1 with the JSON writer of 6.0 and later
    assert legacy.vmdesc_text({**obj, "devices": rebuilt}, qjson=release == "5.2") == vmdesc.text
    # 5.2 marks every array element with "index"; 11.1 none (10.0 all but the last)
    assert _has_key(obj, "index") is (release == "5.2")
    # and 5.2's vmdesc has no configuration object, 11.1's starts with one
    assert ("configuration" in obj) is (release == "11.1")
    if release == "11.1":
        assert next(iter(obj)) == "configuration"


@pytest.mark.qemu
@pytest.mark.qemu11
def test_qemu_11_1_arrays_are_arrays(qemu_corpus: Any) -> None:
    """Without any "index", ide's two bmdma and two buses still decode as arrays of two."""
    events = _events(qemu_corpus["pc-11.1-paused"])
    ide = next(e for e in events if isinstance(e, DeviceSection) and e.idstr.endswith("/ide"))
    assert len(ide.state["bmdma"]) == 2 and len(ide.state["bus"]) == 2
    (vmdesc,) = [e for e in events if isinstance(e, Vmdesc)]
    desc = next(d for d in json.loads(vmdesc.text)["devices"] if d["name"].endswith("/ide"))
    assert [f["name"] for f in desc["fields"]][:3] == ["parent_obj", "bmdma", "bmdma"]


@pytest.mark.qemu
@pytest.mark.qemu11
@pytest.mark.parametrize("name", ["pc-11.1-paused", "pc-7.2-on-11.1-paused", "pc-5.2-on-11.1-paused",
                                  "q35-11.1-paused", "q35-5.2-on-11.1-paused"])
def test_qemu_11_1_sends_apic_first_and_cpu_hotplug_state(name: str, qemu_corpus: Any) -> None:
    events = _events(qemu_corpus[name])
    devices = [e for e in events if isinstance(e, DeviceSection)]
    assert devices[0].idstr == "apic"
    pm = next(e for e in devices if e.idstr.endswith(("/piix4_pm", "/ICH9LPC")))
    cpuhp = pm.state.get("piix4_pm/cpuhp") or pm.state["pm"].get("ich9_pm/cpuhp")
    assert cpuhp == {"cpuhp_state": {"selector": 0, "command": 0, "devs": {
        "is_inserting": False, "is_removing": False, "ost_event": 0, "ost_status": 0}}}
    switchover = [e for e in events if isinstance(e, Command) and e.cmd == CMD_SWITCHOVER_START]
    assert len(switchover) == (1 if RECIPES[name].machine_type.endswith("-11.1") else 0)


@pytest.mark.qemu
@pytest.mark.qemu5
def test_qemu_5_2_names_fields_as_5_2_did(qemu_corpus: Any) -> None:
    """Same bytes as QEMU 7.2's pc-i440fx-5.2, other names: ps2 ``common``, pckbd ``pending``."""
    own = {(e.idstr, e.instance_id): e for e in _events(qemu_corpus["pc-5.2-on-5.2-paused"])
           if isinstance(e, DeviceSection)}
    by72 = {(e.idstr, e.instance_id): e for e in _events(qemu_corpus["pc-5.2-paused"])
            if isinstance(e, DeviceSection)}
    assert own.keys() == by72.keys()
    assert {k: e.size for k, e in own.items()} == {k: e.size for k, e in by72.items()}
    assert "common" in own[("ps2kbd", 0)].state and "parent_obj" in by72[("ps2kbd", 0)].state
    assert "pending" in own[("pckbd", 0)].state["kbd"] and "pending_tmp" in by72[("pckbd", 0)].state["kbd"]
    config = next(e for e in _events(qemu_corpus["pc-5.2-on-5.2-paused"]) if isinstance(e, Configuration))
    assert bytes(config.state["name"]) == b"pc-i440fx-5.2"


@pytest.mark.parametrize("name", ALL)
def test_the_writer_guess_names_the_release(name: str, qemu_corpus: Any) -> None:
    summary = StreamSummary()
    for ev in _events(qemu_corpus[name]):
        summary.add(ev)
    guess = summary.writer
    assert guess.consistent
    if RECIPES[name].qemu_version == "5.2":  # QJSON spacing and a 5.2 machine type
        assert (guess.low, guess.high) == ((5, 2), (5, 2))
    else:  # index-less vmdesc arrays: newer than 10.0, whatever the machine type
        assert guess.low is not None and guess.low >= (10, 1) and guess.high is None


# ------------------------------------------------------ loading across releases


def _load(stream: Path, machine: str, release: str | None, tmp_path: Path) -> str:
    with QemuVM(machine, incoming=True, workdir=tmp_path, qemu_version=release, serial=False) as vm:
        return vm.load(stream, timeout=60)


@pytest.mark.qemu
@pytest.mark.qemu11
@pytest.mark.parametrize(("name", "machine"), [("pc-7.2-on-11.1-paused", "pc-i440fx-7.2"),
                                               ("pc-5.2-on-11.1-paused", "pc-i440fx-5.2")])
def test_qemu_7_2_loads_an_11_1_stream_of_its_machine_type_as_is(name: str, machine: str, qemu_corpus: Any,
                                                                 tmp_path: Path) -> None:
    assert _load(qemu_corpus[name], machine, None, tmp_path) == "prelaunch"


@pytest.mark.qemu
@pytest.mark.qemu11
def test_qemu_7_2_refuses_the_11_1_machine_type(qemu_corpus: Any, tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="Machine type received is 'pc-i440fx-11.1' and local is 'pc-i440fx-7.2'"):
        _load(qemu_corpus["pc-11.1-paused"], "pc-i440fx-7.2", None, tmp_path)


@pytest.mark.qemu
@pytest.mark.qemu5
@pytest.mark.qemu11
def test_qemu_5_2_and_11_1_load_each_others_pc_5_2_streams(qemu_corpus: Any, tmp_path: Path) -> None:
    assert _load(qemu_corpus["pc-5.2-on-5.2-paused"], "pc-i440fx-5.2", "11.1", tmp_path / "a") == "prelaunch"
    assert _load(qemu_corpus["pc-5.2-on-11.1-paused"], "pc-i440fx-5.2", "5.2", tmp_path / "b") == "prelaunch"
