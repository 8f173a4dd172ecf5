"""``vmferry migrate --via-proxy``: the management tool sets up the proxies (real QEMU 7.2 and 10.0).

* QEMU alone refuses pc-i440fx-2.12 -> pc-i440fx-7.2; the same pair through
  the proxies (ferry on the wire, machine type read from the destination)
  migrates, and the guest counts on;
* the QEMU capabilities a proxy cannot carry are switched off on both sides;
* across QEMU versions the release is (machine type, QEMU version) of each side;
* argument mistakes are one line and a non-zero exit.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import pytest
from live_helpers import short_dir
from test_live_qemu import Managed

from vmferry import cli
from vmferry.cli.summary import StreamSummary
from vmferry.live.migrate import MigrationError, machine_type, migrate
from vmferry.live.qemu.guest import parse_counts
from vmferry.live.qemu.process import QemuVM
from vmferry.live.qmp.client import QMPConnection


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    yield short_dir(tmp_path)


def _counted_on(src: QemuVM, dst: QemuVM) -> None:
    before = parse_counts(src.serial_text())[-1]
    dst.wait_for_count(before + 5, timeout=60)
    dst_text = dst.serial_text()
    assert not dst_text.startswith("1\r\n"), "the guest restarted"
    combined = parse_counts(src.serial_text() + dst_text)
    assert combined == list(range(1, len(combined) + 1)), combined[-30:]


@pytest.mark.qemu
def test_qemu_refuses_the_pair_and_the_proxy_carries_it(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e1000 = ("-device", "e1000")
    s = Managed(where, "src", "pc-i440fx-2.12", e1000)
    refused = Managed(where, "refused", "pc-i440fx-7.2", e1000, incoming=True)
    with s as src:
        src.wait_for_count(5, timeout=60)
        with refused:
            with pytest.raises(MigrationError, match="destination"):
                migrate(s.address, refused.address, timeout=60)
        assert "Machine type received is 'pc-i440fx-2.12'" in refused.vm.stderr_log.read_text()
        assert src.status() == "running"
        n = src.counts()[-1]
        src.wait_for_count(n + 2, timeout=30)

        d = Managed(where, "dst", "pc-i440fx-7.2", e1000, incoming=True)
        with d as dst:
            conn = QMPConnection(d.address, name="destination").connect()
            try:
                assert machine_type(conn) == "pc-i440fx-7.2"
            finally:
                conn.close()
            code = cli.main(["migrate", "--source", s.address, "--dest", d.address, "--via-proxy", "--wire", "ferry",
                             "--max-bandwidth", str(1 << 30), "--json"])
            out = capsys.readouterr()
            assert code == 0, out.err
            result = json.loads(out.out)
            route = result["route"]
            assert route["wire"] == "ferry"
            assert (route["from_machine"], route["machine"]) == ("pc-i440fx-2.12", "pc-i440fx-7.2")
            assert "codec-ferry" in route["link_names"] and "frame-crc32c" in route["link_names"]
            near_src, near_dst = route["proxies"]
            assert near_src["input_format"] == "legacy" and near_dst["input_format"] == "ferry"
            assert near_src["done"] and near_dst["done"] and near_dst["bytes_out"] > 100_000
            assert result["mask"] == 0  # both ends are QEMU: today's protocol
            _counted_on(src, dst)


@pytest.mark.qemu
def test_capabilities_a_proxy_cannot_carry_are_switched_off(where: Path) -> None:
    s, d = Managed(where, "src", "pc-i440fx-7.2"), Managed(where, "dst", "pc-i440fx-7.2", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(3, timeout=60)
        for vm in (src, dst):
            vm.set_caps({"block": True, "return-path": True, "events": True})
        summary = StreamSummary()
        r = migrate(s.address, d.address, via_proxy=True, observe=summary.add, timeout=120)
        assert r.qemu_caps == ["events", "return-path"]  # both carried; block migration is not
        for vm in (src, dst):
            states = {c["capability"]: c["state"] for c in vm.query("query-migrate-capabilities")}
            assert states["block"] is False and states["return-path"] is True and states["events"] is True
        assert r.route is not None and r.route["machine"] is None  # same machine type: nothing to convert
        assert summary.machine == "pc-i440fx-7.2" and summary.has_eof and summary.total_pages > 0
        assert "open-return-path" in summary.commands
        _counted_on(src, dst)


@pytest.mark.qemu
def test_multifd_and_postcopy_through_the_proxies(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e1000 = ("-device", "e1000")
    twin = Managed(where, "twin", "pc-i440fx-2.12", e1000)
    with twin as vm:  # the source's schemas, for the postcopy package
        vm.wait_for_count(3, timeout=60)
        vm.save(where / "twin.mig")
    s, d = Managed(where, "src", "pc-i440fx-2.12", e1000), Managed(where, "dst", "pc-i440fx-7.2", e1000,
                                                                    incoming=True)
    with s as src, d as dst:
        src.wait_for_count(5, timeout=60)
        code = cli.main(["migrate", "--source", s.address, "--dest", d.address, "--via-proxy", "--to", "ferry",
                         "--multifd-channels", "4", "--multifd-compression", "zstd", "--json", "-q"])
        out = capsys.readouterr()
        assert code == 0, out.err
        result = json.loads(out.out)
        assert "multifd" in result["qemu_capabilities"]
        for p in result["route"]["proxies"]:
            kinds = [c["kind"] for c in p["channels"]]
            assert kinds.count("multifd") == 4 and kinds[0].startswith("main"), kinds
        _counted_on(src, dst)
    s, d = Managed(where, "src2", "pc-i440fx-2.12", e1000), Managed(where, "dst2", "pc-i440fx-7.2", e1000,
                                                                     incoming=True)
    with s as src, d as dst:
        src.wait_for_count(5, timeout=60)
        code = cli.main(["migrate", "--source", s.address, "--dest", d.address, "--via-proxy", "--postcopy",
                         "--schema", str(where / "twin.mig"), "--max-bandwidth", "262144", "--downtime-limit", "1",
                         "--json", "-q"])  # precopy alone would not converge
        out = capsys.readouterr()
        assert code == 0, out.err
        result = json.loads(out.out)
        assert "postcopy-ram" in result["qemu_capabilities"]
        (proxy,) = result["route"]["proxies"]
        assert proxy["channels"][0]["return_path"].get("PONG") == 4  # pings 2 to 4 come with the switch
        _counted_on(src, dst)


@pytest.mark.qemu
@pytest.mark.parametrize(("args", "says"), [
    (["--qemu-caps", "switchover-ack"], "switchover-ack: the source (QEMU 7.2) has no such migration capability"),
    (["--qemu-caps", "block"], "block: the proxy cannot carry it"),
    (["--postcopy"], "give --schema"),
])
def test_refused_before_anything_moves(where: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                      says: str) -> None:
    s, d = Managed(where, "src", "pc-i440fx-2.12"), Managed(where, "dst", "pc-i440fx-7.2", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(2, timeout=60)
        assert cli.main(["migrate", "--source", s.address, "--dest", d.address, "--via-proxy", *args]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert src.query_migrate().get("status") in (None, "none")
        assert src.status() == "running" and dst.status() == "inmigrate"


@pytest.mark.qemu
def test_a_destination_lost_behind_the_proxies_leaves_the_source_running(where: Path) -> None:
    s = Managed(where, "src", "pc-i440fx-2.12")
    d = Managed(where, "dst", "pc-i440fx-7.2", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(3, timeout=60)
        killer = threading.Timer(1.5, dst.kill)
        killer.start()
        with pytest.raises(MigrationError) as err:
            migrate(s.address, d.address, via_proxy=True, wire="ferry",
                    params={"max-bandwidth": 65536}, timeout=60)  # ~0.8 MB to send: ~12 s
        killer.join()
        assert "\n" not in str(err.value)
        assert src.query_migrate()["status"] in ("failed", "cancelled")
        assert src.status() == "running"
        now = src.counts()[-1]
        src.wait_for_count(now + 3, timeout=30)


@pytest.mark.qemu
def test_an_unknown_target_machine_fails_before_anything_moves(where: Path) -> None:
    s, d = Managed(where, "src", "pc-i440fx-7.2"), Managed(where, "dst", "pc-i440fx-7.2", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(2, timeout=60)
        with pytest.raises(MigrationError, match="pc-nonesuch-1.0"):
            migrate(s.address, d.address, via_proxy=True, machine="pc-nonesuch-1.0")
        assert src.query_migrate().get("status") in (None, "none")
        assert src.status() == "running" and dst.status() == "inmigrate"


def test_proxy_options_need_via_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrate", "--source", "unix:nowhere-a", "--dest", "unix:nowhere-b", "--wire", "ferry"]) != 0
    err = capsys.readouterr().err
    assert "--via-proxy" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli.main(["migrate", "--source", "unix:nowhere-a", "--dest", "unix:nowhere-b", "--via-proxy",
                     "--uri", "unix:x"]) != 0
    err = capsys.readouterr().err
    assert "exclude" in err and len(err.strip().splitlines()) == 1


@pytest.mark.qemu
def test_the_demo_shows_the_whole_mission(capsys: pytest.CaptureFixture[str]) -> None:
    from vmferry.cli import demo

    assert demo.main([]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo rich's wrapping
    assert "the destination refuses: Machine type received is 'pc-i440fx-2.12'" in out
    assert "proxy <-> proxy │ agreed" in out and "codec-ferry" in out
    assert "migrated via proxy (ferry on the wire" in out and "pc-i440fx-2.12 -> pc-i440fx-7.2" in out
    assert "machine type: pc-i440fx-2.12" in out and "0000:00:02.0/e1000" in out
    assert "demo OK" in out


@pytest.mark.qemu
@pytest.mark.qemu10
def test_across_qemu_versions_the_release_is_read_from_both_sides(where: Path) -> None:
    """QEMU 10.0 running pc-i440fx-7.2 -> QEMU 7.2's pc-i440fx-7.2: same machine type, other QEMU."""
    s = Managed(where, "src", "pc-i440fx-7.2", qemu_version="10.0")
    d = Managed(where, "dst", "pc-i440fx-7.2", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(5, timeout=60)
        r = migrate(s.address, d.address, via_proxy=True, wire="ferry", timeout=120)
        assert r.route is not None
        assert (r.route["from_machine"], r.route["machine"]) == ("pc-i440fx-7.2@10.0", "pc-i440fx-7.2")
        assert "10.0" in r.source["version"] and "7.2" in r.destination["version"]
        _counted_on(src, dst)


def test_the_progress_bar_names_each_kind_of_channel() -> None:
    from vmferry.cli.common import channel_summary

    mib = 1 << 20
    channels = [{"kind": "main", "bytes_in": 12 * mib}] + [{"kind": "multifd", "bytes_in": 30 * mib}] * 4
    assert channel_summary(channels) == "main 12M, multifd 4x30M"
    assert channel_summary([{"kind": "main (resumed)", "bytes_in": 3 * mib}, {"kind": "preempt", "bytes_in": 0}]) \
        == "main 3M, preempt 0M"
    assert channel_summary([]) == ""


@pytest.mark.qemu
def test_a_balloon_crosses_5_1_only_as_the_source_ran_it(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hw_compat_5_0's page-poison sizes the balloon's BAR, which the guest's driver holds: a destination with the
    new default is refused before anything moves; one started with the source's value takes the guest."""
    balloon = ("-device", "virtio-balloon-pci")
    s = Managed(where, "src", "pc-i440fx-2.12", balloon)
    refused = Managed(where, "refused", "pc-i440fx-7.2", balloon, incoming=True)
    with s as src:
        src.wait_for_count(3, timeout=60)
        with refused as r:
            assert cli.main(["migrate", "--source", s.address, "--dest", refused.address, "--via-proxy"]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1, err
            assert "runs with page-poison=on" in err and "-global virtio-balloon-device.page-poison=off" in err
            assert src.query_migrate().get("status") in (None, "none")
            assert src.status() == "running" and r.status() == "inmigrate"
        kept = balloon + ("-global", "virtio-balloon-device.page-poison=off")
        d = Managed(where, "dst", "pc-i440fx-7.2", kept, incoming=True)
        with d as dst:
            assert cli.main(["migrate", "--source", s.address, "--dest", d.address, "--via-proxy",
                             "--max-bandwidth", str(1 << 30)]) == 0, capsys.readouterr().err
            _counted_on(src, dst)
