"""The vmferry endpoint machine: dirty tracking, sections, and stream-level loads (files, no sockets)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import wait_for

from vmferry import encode
from vmferry.events import DeviceSection, RamPages, RamZeros
from vmferry.live.endpoint.endpoint import Endpoint
from vmferry.live.endpoint.machine import (
    DEVICES,
    PAGE_SIZE,
    CounterState,
    GlobalState,
    Machine,
    device_section,
    dirty_runs,
    page_events,
    parse_size,
)
from vmferry.live.qmp.protocol import CommandFailed
from vmferry.serialize.devices import RTCState, load
from vmferry.serialize.visitor import TreeReader

RAM = 4 << 20


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("1G") == 1 << 30 and parse_size("16") == 16 << 20
    assert parse_size("64MiB") == 64 << 20
    for bad in ("", "x", "0", "-1M", "1001K"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_dirty_runs() -> None:
    bm = bytearray(1000)
    bm[3:5] = b"\x01\x01"
    bm[10:700] = b"\x01" * 690
    bm[999] = 1
    assert list(dirty_runs(bm, 256)) == [(3, 5), (10, 266), (266, 522), (522, 700), (999, 1000)]
    assert list(dirty_runs(bytearray(10))) == []


def test_page_events_collapse_zero_pages() -> None:
    data = bytearray(PAGE_SIZE * 5)
    data[PAGE_SIZE * 2 + 7] = 1
    data[PAGE_SIZE * 3] = 2
    evs = page_events(bytes(data), 10, True)
    assert [(type(e).__name__, e.offset // PAGE_SIZE, e.count, e.named) for e in evs] == [
        ("RamZeros", 10, 2, True), ("RamPages", 12, 2, False), ("RamZeros", 14, 1, False)]
    assert isinstance(evs[1], RamPages) and bytes(evs[1].data or b"") == bytes(data[PAGE_SIZE * 2:PAGE_SIZE * 4])
    only = page_events(bytes(PAGE_SIZE * 3), 0, False)
    assert len(only) == 1 and isinstance(only[0], RamZeros) and only[0].count == 3


def test_workload_advances_the_counter_and_dirties_pages() -> None:
    m = Machine(RAM, rate=200, dirty_per_tick=8)
    m.sync_dirty()
    for _ in range(3):
        m.tick()
    assert m.counter.count == 0  # not running: ticks do nothing
    m._running = True
    for _ in range(5):
        m.tick()
    m._running = False
    assert m.counter.count == 5 == m.mirrored_count()
    dirty = m.sync_dirty()
    assert 2 <= dirty.count(1) <= 41 and dirty[0] == 1
    assert not any(m.sync_dirty())
    m.shutdown()


@pytest.mark.parametrize("version", [2, 3])
def test_device_section_round_trips_through_the_codecs(version: int) -> None:
    rtc = RTCState(irq_reinject_on_ack_count=3)
    sec = device_section(5, "mc146818rtc", 0, rtc, version)
    assert sec.version_id == version and sec.desc["version"] == version
    assert ("base_rtc" in sec.state) == (version >= 3)
    for fmt in ("legacy", "ferry"):
        from vmferry.encode.configuration import configuration_state
        from vmferry.encode.legacy import vmdesc_text
        from vmferry.events import Configuration, Eof, Header, Vmdesc

        evs = [Header(), Configuration(configuration_state("m")), sec, Eof(),
               Vmdesc(vmdesc_text({"page_size": PAGE_SIZE, "devices": [sec.desc]}))]
        data = b"".join(bytes(c) for c in encode.codec(fmt).encode(evs))
        back = [e for e in encode.codec(fmt).decode([data]) if isinstance(e, DeviceSection)][0]
        got = load(RTCState, TreeReader(back.state), back.version_id)
        assert got.irq_reinject_on_ack_count == 3
        if version == 3:
            assert got == rtc


def test_globalstate_and_counter_models() -> None:
    sec = device_section(1, "globalstate", 0, GlobalState("paused"), 1)
    assert sec.state["size"] == 7 and sec.state["runstate"][:7] == b"paused\0"
    assert load(GlobalState, TreeReader(sec.state), 1).runstate == "paused"
    c = device_section(2, CounterState.VMSD_NAME, 0, CounterState(count=1 << 40, rate_hz=7), 1)
    assert load(CounterState, TreeReader(c.state), 1) == CounterState(count=1 << 40, rate_hz=7)


def test_machine_refuses_odd_configurations() -> None:
    with pytest.raises(ValueError):
        Machine(1000)
    with pytest.raises(ValueError, match="no device"):
        Machine(RAM, device_versions={"nosuch": 1})
    with pytest.raises(ValueError, match="outside"):
        Machine(RAM, device_versions={"i8254": 1})
    with pytest.raises(ValueError, match="fill"):
        Machine(RAM, fill="pattern")


# ---------------------------------------------------------------- file streams


def _wait_status(ep: Endpoint, *states: str, timeout: float = 30.0) -> dict[str, Any]:
    wait_for(lambda: ep.info.status in states, timeout, f"migration status in {states}")
    return ep.cmd_query_migrate({})


@pytest.fixture
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A running source migrated to files, once as ferry and once as QEMU's stream."""
    d = tmp_path_factory.mktemp("streams")
    m = Machine(RAM, rate=200, dirty_per_tick=4, fill="random")
    src = Endpoint(m)
    time.sleep(0.1)
    out: dict[str, Any] = {}
    for fmt, mask in (("ferry", None), ("legacy", 0)):
        if mask is not None:
            src.handle("set-migration-capabilities", {"mask": mask})
        path = d / f"{fmt}.stream"
        src.handle("migrate", {"uri": f"file:{path}"})
        info = _wait_status(src, "completed", "failed")
        assert info["status"] == "completed", info
        assert info["x-vmferry"]["codec"] == fmt and not info["x-vmferry"]["return-path"]
        assert src.runstate == "postmigrate"
        out[fmt] = (path, m.counter.count, bytes(m.ram))
        src.handle("cont", {})
        time.sleep(0.05)
    src.shutdown()
    return out


@pytest.mark.parametrize("fmt", ["ferry", "legacy"])
def test_file_stream_loads_and_the_counter_goes_on(saved: dict[str, Any], fmt: str) -> None:
    path, count, ram = saved[fmt]
    dst = Endpoint(Machine(RAM), incoming=True)
    try:
        assert dst.runstate == "inmigrate"
        with pytest.raises(CommandFailed, match="waiting for an incoming"):
            dst.handle("migrate", {"uri": "file:/dev/null"})
        dst.handle("migrate-incoming", {"uri": f"file:{path}"})
        assert _wait_status(dst, "completed", "failed")["status"] == "completed"
        assert dst.machine.counter.count == count and bytes(dst.machine.ram) == ram or \
            dst.machine.counter.count > count  # it may have ticked already
        wait_for(lambda: dst.machine.counter.count >= count + 3, 10, "the destination to count")
        assert dst.runstate == "running" and dst.machine.mirrored_count() >= count + 3
    finally:
        dst.shutdown()


def _refused(path: Path) -> Endpoint:
    dst = Endpoint(Machine(RAM), incoming=True)
    dst.handle("migrate-incoming", {"uri": f"file:{path}"})
    info = _wait_status(dst, "completed", "failed")
    assert info["status"] == "failed", f"{path.name} was accepted"
    assert info["error-desc"]
    assert dst.runstate == "inmigrate" and dst.machine.counter.count == 0
    with pytest.raises(CommandFailed, match="incoming migration failed"):
        dst.handle("cont", {})
    with pytest.raises(CommandFailed, match="failed earlier"):
        dst.handle("migrate-incoming", {"uri": f"file:{path}"})
    time.sleep(0.05)
    assert dst.machine.counter.count == 0  # it never started
    dst.shutdown()
    return dst


@pytest.mark.parametrize("fmt", ["ferry", "legacy"])
@pytest.mark.parametrize("cut", [0, 7, 100, 0.5, -300, -2])
def test_truncated_stream_is_refused(saved: dict[str, Any], tmp_path: Path, fmt: str, cut: float) -> None:
    path = saved[fmt][0]
    data = path.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut if cut >= 0 else len(data) + cut
    if fmt == "legacy" and cut == -2:
        n = data.rindex(b"\x00\x06")  # the vmdesc cut off a stream that also loses its EOF
    bad = tmp_path / "cut.stream"
    bad.write_bytes(data[:n])
    _refused(bad)


@pytest.mark.parametrize("where", [0.3, 0.9, -40, 20])
def test_corrupted_ferry_stream_is_refused(saved: dict[str, Any], tmp_path: Path, where: float) -> None:
    data = bytearray(saved["ferry"][0].read_bytes())
    at = int(len(data) * where) if isinstance(where, float) else where if where >= 0 else len(data) + where
    data[at] ^= 0x10
    bad = tmp_path / "flipped.stream"
    bad.write_bytes(bytes(data))
    dst = _refused(bad)
    assert "CRC" in (dst.info.error or "") or "crc" in (dst.info.error or "").lower() or dst.info.error


def test_corrupted_legacy_structure_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    data = bytearray(saved["legacy"][0].read_bytes())
    eof = data.rindex(b"\x00\x06")
    data[eof] = 0x09  # the EOF record becomes an unknown record type
    bad = tmp_path / "bad-type.stream"
    bad.write_bytes(bytes(data))
    _refused(bad)


def test_a_stream_for_another_machine_is_refused(saved: dict[str, Any]) -> None:
    dst = Endpoint(Machine(RAM * 2), incoming=True)
    dst.handle("migrate-incoming", {"uri": f"file:{saved['ferry'][0]}"})
    info = _wait_status(dst, "completed", "failed")
    assert info["status"] == "failed" and "RAM blocks" in info["error-desc"]
    dst.shutdown()


def test_ferry_switched_off_at_the_destination(saved: dict[str, Any]) -> None:
    dst = Endpoint(Machine(RAM), incoming=True, supported=0)
    dst.handle("migrate-incoming", {"uri": f"file:{saved['ferry'][0]}"})
    info = _wait_status(dst, "completed", "failed")
    assert info["status"] == "failed" and "switched off here" in info["error-desc"]
    dst.shutdown()


def test_endpoint_commands() -> None:
    ep = Endpoint(Machine(RAM), paused=True)
    try:
        assert ep.handle("query-status", {}) == {"status": "paused", "running": False, "singlestep": False}
        full = ep.handle("query-migration-capabilities", {})
        assert full["mask"] == full["supported"] > 0
        assert ep.handle("set-migration-capabilities", {"names": ["zstd", "return-path"]})["names"] == [
            "zstd", "return-path"]
        assert ep.handle("set-migration-capabilities", {"mask": (1 << 63) | 1})["mask"] == 1  # masked by support
        listed = {c["capability"]: c["state"] for c in ep.handle("query-migrate-capabilities", {})}
        assert listed["x-vmferry-ferry-framing"] is True and listed["return-path"] is False
        ep.handle("migrate-set-capabilities", {"capabilities": [{"capability": "return-path", "state": True}]})
        assert ep.mask == 1 | (1 << 32)
        for bad in ({"capabilities": [{"capability": "xbzrle", "state": True}]}, {"capabilities": 3}):
            with pytest.raises(CommandFailed):
                ep.handle("migrate-set-capabilities", bad)
        with pytest.raises(CommandFailed, match="mask"):
            ep.handle("set-migration-capabilities", {"mask": -1})
        with pytest.raises(CommandFailed, match="not supported"):
            ep.handle("migrate-set-parameters", {"tls-creds": "x"})
        ep.handle("migrate-set-parameters", {"max-bandwidth": 5, "downtime-limit": 10})
        assert ep.handle("query-migrate-parameters", {})["max-bandwidth"] == 5
        assert ep.handle("query-migrate", {}) == {}
        with pytest.raises(CommandFailed, match="incoming"):
            ep.handle("migrate-incoming", {"uri": "tcp::0"})
        with pytest.raises(CommandFailed, match="unknown scheme"):
            ep.handle("migrate", {"uri": "rdma:x:1"})
        ep.handle("cont", {})
        wait_for(lambda: ep.machine.counter.count > 2, 10, "ticks")
        ep.handle("stop", {})
        stopped = ep.machine.counter.count
        time.sleep(0.05)
        assert ep.machine.counter.count == stopped
        names = {c["name"] for c in ep.handle("query-commands", {})}
        assert {"migrate", "migrate-incoming", "migrate_cancel", "query-migrate", "query-status", "stop", "cont",
                "quit", "query-migration-capabilities", "set-migration-capabilities", "query-migrate-capabilities",
                "migrate-set-capabilities"} <= names
    finally:
        ep.shutdown()
    old = Endpoint(Machine(RAM), capability_commands=False)
    with pytest.raises(CommandFailed) as err:
        old.handle("query-migration-capabilities", {})
    assert err.value.error_class == "CommandNotFound"
    old.shutdown()


def test_device_list_is_complete() -> None:
    names = [cls.VMSD_NAME for _, _, cls in DEVICES]
    assert names == ["mc146818rtc", "i8254", "ps2kbd", "pckbd", "serial", "vmferry-counter", "globalstate"]
