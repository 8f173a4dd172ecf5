"""The management tool against real QEMU 7.2 processes (marked ``qemu``)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from live_helpers import short_dir

from vmferry import cli
from vmferry.live.migrate import MigrationError, migrate, qemu_qmp_args
from vmferry.live.qemu.guest import parse_counts
from vmferry.live.qemu.process import QemuVM

pytestmark = pytest.mark.qemu


class Managed:
    """A QemuVM plus a second QMP monitor for the management tool (QEMU serves one client per monitor)."""

    def __init__(self, directory: Path, name: str, machine: str = "pc", args: Sequence[str] = (), **kw: Any) -> None:
        self.sock = directory / f"{name}-mgmt.sock"
        self.vm = QemuVM(machine, [*qemu_qmp_args(str(self.sock)), *args], workdir=directory / name, name=name,
                         boot_sector=True, paused=False, **kw)
        self.address = f"unix:{self.sock}"

    def __enter__(self) -> QemuVM:
        self.vm.start()
        return self.vm

    def __exit__(self, *exc: Any) -> None:
        self.vm.kill()


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    yield short_dir(tmp_path)


def _qemu_caps(vm: QemuVM) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in vm.query("query-migrate-capabilities")}


def test_qemu_to_qemu_one_sided_capabilities_are_not_used(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s, d = Managed(where, "src"), Managed(where, "dst", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(5, timeout=60)
        src.set_caps({"xbzrle": True})  # on at the source only
        dst.set_caps({"events": True})  # on at the destination only
        assert cli.main(["caps", s.address, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["kind"] == "qemu" and doc["mask"] == 0 and doc["names"] == []
        assert len(doc["qemu-capabilities"]) == 21 and doc["qemu-capabilities"]["xbzrle"] is True
        assert cli.main(["migrate", "--source", s.address, "--dest", d.address, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["mask"] == 0 and result["qemu_capabilities"] == [] and result["codec"] == "legacy"
        assert _qemu_caps(src)["xbzrle"] is False and _qemu_caps(dst)["events"] is False
        final = src.query_migrate()
        assert final["status"] == "completed" and "xbzrle-cache" not in final
        assert src.status() == "postmigrate" and dst.status() == "running"
        before = parse_counts(src.serial_text())[-1]
        dst.wait_for_count(before + 5, timeout=60)
        combined = parse_counts(src.serial_text() + dst.serial_text())
        assert combined == list(range(1, len(combined) + 1)), combined[-20:]  # no restart, no gap


def test_qemu_capability_on_both_sides_is_used(where: Path) -> None:
    s, d = Managed(where, "src"), Managed(where, "dst", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(3, timeout=60)
        r = migrate(s.address, d.address, set_caps=["xbzrle"])
        assert r.qemu_caps == ["xbzrle"]
        assert _qemu_caps(src)["xbzrle"] is True and _qemu_caps(dst)["xbzrle"] is True
        assert "xbzrle-cache" in src.query_migrate()
        before = parse_counts(src.serial_text())[-1]
        dst.wait_for_count(before + 3, timeout=60)


def test_killed_qemu_destination_leaves_the_source_running(where: Path) -> None:
    s, d = Managed(where, "src"), Managed(where, "dst", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(3, timeout=60)
        killer = threading.Timer(1.0, dst.kill)
        killer.start()
        with pytest.raises(MigrationError) as err:
            migrate(s.address, d.address, params={"max-bandwidth": 65536})  # ~0.7 MB to send: ~10 s
        killer.join()
        assert "\n" not in str(err.value) and ("destination" in str(err.value) or "failed" in str(err.value))
        assert src.query_migrate()["status"] in ("failed", "cancelled")
        assert src.status() == "running"
        now = src.counts()[-1]
        src.wait_for_count(now + 3, timeout=30)


def test_refused_stream_resumes_the_qemu_source(where: Path) -> None:
    """A q35 destination rejects a pc stream after the source sent everything: the tool resumes the source."""
    s, d = Managed(where, "src"), Managed(where, "dst", machine="q35", incoming=True)
    with s as src, d as dst:
        src.wait_for_count(3, timeout=60)
        with pytest.raises(MigrationError, match="destination"):
            migrate(s.address, d.address)
        deadline = time.monotonic() + 10
        while src.status() != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert src.status() == "running"
        now = src.counts()[-1]
        src.wait_for_count(now + 3, timeout=30)
        assert dst.returncode == 1  # QEMU exits with status 1 on a stream it rejects
