"""``vmferry migrate --to-file`` / ``--from-file`` against real QEMU 7.2: save a counting guest to a file, load
it into a fresh QEMU, and it counts on (as ``virsh save`` / ``virsh restore`` and QEMU's ``file:`` URI)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from live_helpers import short_dir

from vmferry.live.migrate import qemu_qmp_args
from vmferry.live.qemu.guest import parse_counts
from vmferry.live.qemu.process import QemuVM

pytestmark = pytest.mark.qemu

CLI = [sys.executable, "-m", "vmferry.cli"]


class Managed:
    """A QemuVM running the counting guest, plus a spare QMP monitor for vmferry."""

    def __init__(self, directory: Path, name: str, args: Sequence[str] = (), **kw: Any) -> None:
        self.sock = directory / f"{name}-mgmt.sock"
        self.vm = QemuVM("pc", [*qemu_qmp_args(str(self.sock)), *args], workdir=directory / name, name=name,
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


def vmferry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=300)


def test_save_a_counting_guest_and_restore_it_into_a_fresh_qemu(where: Path) -> None:
    guest = where / "guest.mig"
    s = Managed(where, "src")
    with s as src:
        src.wait_for_count(5, timeout=60)
        out = vmferry("migrate", "--source", s.address, "--to-file", str(guest), "--json")
        assert out.returncode == 0, out.stderr.decode()
        result = json.loads(out.stdout)
        assert result["source"]["status"] == "postmigrate" and src.status() == "postmigrate"
        assert result["transferred"] == guest.stat().st_size > 64 << 10  # 64 MiB of mostly zero pages
        saved = src.counts()[-1]
    assert guest.read_bytes()[:4] == b"QEVM"
    assert stat.S_IMODE(guest.stat().st_mode) == 0o600  # guest RAM: private
    assert vmferry("inspect", str(guest)).returncode == 0

    d = Managed(where, "dst", incoming=True)
    with d as dst:
        out = vmferry("migrate", "--from-file", str(guest), "--dest", d.address)
        assert out.returncode == 0, out.stderr.decode()
        assert dst.status() == "running"
        dst.wait_for_count(saved + 5, timeout=60)
        counts = parse_counts(dst.serial_text())
        # the guest goes on from the count it was saved at: nothing restarted, nothing lost
        assert counts[0] == saved + 1 and counts == list(range(saved + 1, saved + 1 + len(counts))), counts[:20]


def test_restore_from_another_format_and_refuse_a_damaged_file(where: Path) -> None:
    guest = where / "guest.mig"
    s = Managed(where, "src")
    with s as src:
        src.wait_for_count(3, timeout=60)
        assert vmferry("migrate", "--source", s.address, "--to-file", str(guest), "-q").returncode == 0
        saved = src.counts()[-1]
    ferry = where / "guest.ferry"
    assert vmferry("convert", "-q", str(guest), str(ferry), "--to", "ferry").returncode == 0
    d = Managed(where, "dst", incoming=True)
    with d as dst:
        out = vmferry("migrate", "--from-file", str(ferry), "--dest", d.address, "--json")
        assert out.returncode == 0, out.stderr.decode()
        assert json.loads(out.stdout)["destination"]["status"] == "running"
        dst.wait_for_count(saved + 3, timeout=60)

    cut = where / "cut.mig"
    data = guest.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    e = Managed(where, "dst2", incoming=True)
    with e:
        out = vmferry("migrate", "--from-file", str(cut), "--dest", e.address)
        err = out.stderr.decode()
        assert out.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("args,says", [
    (["--to-file", "x.mig"], "--source"),
    (["--from-file", "x.mig"], "--dest"),
    (["--source", "unix:a", "--dest", "unix:b", "--to-file", "x.mig"], "without --dest"),
    (["--source", "unix:a", "--to-file", "x.mig", "--via-proxy"], "not to a file"),
])
def test_file_options_are_checked(args: list[str], says: str, tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "migrate", *args], capture_output=True, timeout=60, cwd=tmp_path)
    err = out.stderr.decode()
    assert out.returncode == 2 and err.count("\n") == 1 and says in err, err
    assert not list(tmp_path.iterdir())
