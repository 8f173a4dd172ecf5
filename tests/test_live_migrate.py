"""Live migration between vmferry endpoints through the management tool (QMP, sockets, return path)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from live_helpers import EndpointProcess, EndpointThread, short_dir, wait_for

from vmferry import caps, cli
from vmferry.caps import Cap
from vmferry.live.migrate import MigrationError, migrate
from vmferry.live.qmp import QMPConnection

RAM = 16 << 20


def _check_counter_goes_on(src: Any, dst: Any, min_gain: int = 3) -> None:
    s = src.machine()
    d0 = dst.machine()
    assert s["runstate"] == "postmigrate" and d0["runstate"] == "running"
    assert d0["count"] >= s["count"]
    d1 = wait_for(lambda: (m := dst.machine())["count"] >= s["count"] + min_gain and m, 10, "counting on")
    assert d1["mirrored-count"] in (d1["count"], d1["count"] + 1) or d1["mirrored-count"] >= s["count"]
    time.sleep(0.1)
    assert src.machine()["count"] == s["count"]  # the source stays stopped


def test_both_capable_negotiate_ferry_with_a_return_path(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM, fill="random", dirty_per_tick=64) as src, \
            EndpointThread(d, "dst", ram_size=RAM, incoming=True) as dst:
        wait_for(lambda: src.machine()["count"] > 5, 10, "the source to count")
        seen: list[dict[str, Any]] = []
        r = migrate(src.address, dst.address, progress=seen.append)
        assert r.mask > 0 and r.mask == int(caps.intersect(r.source["mask"], r.destination["mask"]))
        assert r.codec == "ferry"
        info = src.cmd("query-migrate")
        assert info["status"] == "completed" and info["x-vmferry"]["return-path"] is True
        assert info["ram"]["transferred"] >= RAM and info["ram"]["dirty-sync-count"] >= 1
        assert info["downtime"] < 5000
        assert dst.cmd("query-migrate")["x-vmferry"]["codec"] == "ferry"
        assert seen and seen[-1]["status"] == "completed"
        _check_counter_goes_on(src, dst)
        assert "ferry stream" in r.line()


@pytest.mark.parametrize("how", ["caps-none", "no-commands", "set-caps-none"])
def test_one_side_at_mask_0_falls_back_to_qemus_stream(tmp_path: Path, how: str) -> None:
    d = short_dir(tmp_path)
    dst_opts: dict[str, Any] = {"caps-none": {"supported": 0}, "no-commands": {"capability_commands": False},
                                "set-caps-none": {}}[how]
    with EndpointThread(d, "src", ram_size=RAM, fill="random") as src, \
            EndpointThread(d, "dst", ram_size=RAM, incoming=True, **dst_opts) as dst:
        wait_for(lambda: src.machine()["count"] > 3, 10, "the source to count")
        r = migrate(src.address, dst.address, set_caps=[] if how == "set-caps-none" else None)
        assert r.mask == 0 and r.codec == "legacy"
        assert src.cmd("query-migration-capabilities")["mask"] == 0  # the intersection was set on the source too
        info = src.cmd("query-migrate")
        assert info["x-vmferry"]["return-path"] is False and info["x-vmferry"]["codec"] == "legacy"
        _check_counter_goes_on(src, dst)


def test_set_caps_limits_the_mask(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM) as src, EndpointThread(d, "dst", ram_size=RAM, incoming=True) as dst:
        r = migrate(src.address, dst.address, set_caps=["ferry-framing", "codec-ferry", "frame-crc32c"])
        assert Cap(r.mask) == Cap.FERRY_FRAMING | Cap.CODEC_FERRY | Cap.FRAME_CRC32C
        assert r.codec == "ferry" and src.cmd("query-migrate")["x-vmferry"]["return-path"] is False
        _check_counter_goes_on(src, dst, 1)


def test_the_source_saves_devices_at_the_destinations_versions(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM) as src, \
            EndpointThread(d, "dst", ram_size=RAM, incoming=True, device_versions={"mc146818rtc": 2}) as dst:
        migrate(src.address, dst.address)
        plan = src.cmd("query-migrate")["x-vmferry"]["devices"]
        assert plan["mc146818rtc"] == {"newest": 3, "send": 2, "how": "vmstate"}
        assert plan["i8254"]["how"] == "as-is"
        _check_counter_goes_on(src, dst, 1)


def test_an_incompatible_destination_is_refused_and_the_source_runs_on(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM) as src, \
            EndpointThread(d, "dst", ram_size=RAM * 2, incoming=True) as dst:
        with pytest.raises(MigrationError, match="RAM differs"):
            migrate(src.address, dst.address)
        assert src.cmd("query-status")["status"] == "running"
        assert dst.cmd("query-status")["status"] == "inmigrate"
        before = src.machine()["count"]
        wait_for(lambda: src.machine()["count"] > before, 5, "the source to go on")


def test_without_return_path_a_refused_stream_resumes_the_source(tmp_path: Path) -> None:
    """mask 0: the source sends everything and stops; the destination refuses; the tool resumes the source."""
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM) as src, \
            EndpointThread(d, "dst", ram_size=RAM * 2, incoming=True, supported=0) as dst:
        with pytest.raises(MigrationError, match="RAM blocks"):
            migrate(src.address, dst.address)
        assert src.cmd("query-status")["status"] == "running"
        assert dst.cmd("query-status")["status"] == "inmigrate"
        with QMPConnection(dst.address) as c:
            assert c.cmd("query-migrate")["status"] == "failed"


def test_killed_destination_leaves_the_source_running(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM, fill="random") as src, \
            EndpointProcess(d, "dst", "--incoming", "--ram", "16M") as dst:
        wait_for(lambda: src.machine()["count"] > 3, 10, "the source to count")
        killer = threading.Timer(1.0, dst.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(MigrationError) as err:
            migrate(src.address, dst.address, params={"max-bandwidth": 4 << 20})  # ~4 s for 16 MiB
        killer.join()
        assert time.monotonic() - t0 < 4, "the failure was not noticed at once"
        assert "destination" in str(err.value)
        assert "\n" not in str(err.value)
        info = src.cmd("query-migrate")
        assert info["status"] == "failed" and "lost the destination" in info["error-desc"]
        m0 = src.machine()
        assert m0["runstate"] == "running" and m0["mirrored-count"] >= m0["count"] - 1
        wait_for(lambda: src.machine()["count"] > m0["count"] + 3, 10, "the source to keep counting")


def test_cancel_keeps_the_source_and_the_destination_refuses(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM, fill="random") as src, \
            EndpointThread(d, "dst", ram_size=RAM, incoming=True) as dst:
        src.cmd("migrate-set-parameters", {"max-bandwidth": 2 << 20})
        dst.cmd("migrate-incoming", {"uri": f"unix:{d / 'm.sock'}"})
        src.cmd("migrate", {"uri": f"unix:{d / 'm.sock'}"})
        wait_for(lambda: src.cmd("query-migrate")["ram"]["transferred"] > 1 << 20, 10, "data to flow")
        src.cmd("migrate_cancel")
        wait_for(lambda: src.cmd("query-migrate")["status"] == "cancelled", 10, "the cancel")
        assert src.cmd("query-status")["status"] == "running"
        wait_for(lambda: dst.cmd("query-migrate")["status"] == "failed", 10, "the destination to give up")
        assert "aborted" in dst.cmd("query-migrate")["error-desc"]
        assert dst.cmd("query-status")["status"] == "inmigrate"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates")
def test_migration_over_tls(tmp_path: Path) -> None:
    from vmferry.live.qmp.server import unused_tcp_port
    from vmferry.live.transport import TlsOptions

    d = short_dir(tmp_path)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    tls_src = TlsOptions(ca=str(cert))
    tls_dst = TlsOptions(cert=str(cert), key=str(key))
    with EndpointThread(d, "src", ram_size=RAM, tls=tls_src) as src, \
            EndpointThread(d, "dst", ram_size=RAM, incoming=True, tls=tls_dst) as dst:
        r = migrate(src.address, dst.address, uri=f"tls:127.0.0.1:{unused_tcp_port()}")
        assert r.codec == "ferry" and src.cmd("query-migrate")["x-vmferry"]["return-path"] is True
        _check_counter_goes_on(src, dst, 1)


def test_cli_caps_and_migrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM) as src, EndpointThread(d, "dst", ram_size=RAM, incoming=True) as dst:
        assert cli.main(["caps", src.address, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["kind"] == "vmferry" and doc["mask"] > 0 and "return-path" in doc["names"]
        assert cli.main(["caps", dst.address]) == 0
        assert "mask: 0x" in capsys.readouterr().out
        assert cli.main(["migrate", "--source", src.address, "--dest", dst.address, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["codec"] == "ferry"
        # the same again: now the source has migrated away and the destination runs
        assert cli.main(["migrate", "--source", src.address, "--dest", dst.address]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vmferry: error:") and "not waiting for a migration" in err and "\n" not in err
        assert cli.main(["migrate", "--source", src.address, "--dest", dst.address, "--set-caps", "warp"]) == 2
        assert cli.main(["caps", f"unix:{d / 'nobody.sock'}"]) == 2
        assert "cannot connect" in capsys.readouterr().err


@pytest.mark.parametrize("mask", [None, 0])
def test_ram_and_devices_arrive_intact_over_a_socket(tmp_path: Path, mask: int | None) -> None:
    """A destination that does not autostart ends paused: its RAM equals the stopped source's, bit for bit."""
    d = short_dir(tmp_path)
    with EndpointThread(d, "src", ram_size=RAM, fill="random", dirty_per_tick=64) as src, \
            EndpointThread(d, "dst", ram_size=RAM, incoming=True, paused=True) as dst:
        wait_for(lambda: src.machine()["count"] > 5, 10, "the source to count")
        if mask is not None:
            for side in (src, dst):
                side.cmd("set-migration-capabilities", {"mask": mask})
        uri = f"unix:{d / 'm.sock'}"
        dst.cmd("migrate-incoming", {"uri": uri})
        src.cmd("migrate", {"uri": uri})
        wait_for(lambda: dst.cmd("query-migrate").get("status") in ("completed", "failed"), 20, "the load")
        assert dst.cmd("query-migrate")["status"] == "completed"
        assert dst.cmd("query-status")["status"] == "paused"
        wait_for(lambda: src.cmd("query-migrate")["status"] == "completed", 10, "the source")
        a, b = src.cmd("x-vmferry-ram-digest"), dst.cmd("x-vmferry-ram-digest")
        assert a == b and a["count"] > 5
        assert dst.cmd("query-migrate")["x-vmferry"]["codec"] == ("legacy" if mask == 0 else "ferry")
        dst.cmd("cont")
        wait_for(lambda: dst.machine()["count"] > a["count"] + 2, 10, "the destination to count on")
