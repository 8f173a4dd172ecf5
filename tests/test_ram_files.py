"""``vmferry ram extract`` / ``ram inject``: guest RAM as raw files per block and back, checked with real QEMU:
the counting guest's counter is edited in the raw file, injected, and a fresh QEMU counts on from it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from live_helpers import short_dir

from vmferry.cli.ram import block_file_names
from vmferry.live.migrate import qemu_qmp_args
from vmferry.live.qemu.guest import COUNTER_ADDRESS, parse_counts
from vmferry.live.qemu.process import QemuVM

CLI = [sys.executable, "-m", "vmferry.cli"]


def vmferry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=300)


class Managed:
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


@pytest.mark.qemu
def test_edit_the_counter_in_raw_ram_and_qemu_counts_on_from_it(where: Path) -> None:
    guest = where / "guest.mig"
    s = Managed(where, "src")
    with s as src:
        src.wait_for_count(4, timeout=60)
        assert vmferry("migrate", "--source", s.address, "--to-file", str(guest), "-q").returncode == 0
        saved = src.counts()[-1]

    ram = where / "ram"
    out = vmferry("ram", "extract", str(guest), str(ram), "--json")
    assert out.returncode == 0, out.stderr.decode()
    rows = {r["block"]: r for r in json.loads(out.stdout)["blocks"]}
    manifest = json.loads((ram / "blocks.json").read_text())
    assert {r["block"] for r in manifest["blocks"]} == set(rows) and "pc.ram" in rows
    pc_ram = ram / rows["pc.ram"]["file"]
    assert pc_ram.stat().st_size == rows["pc.ram"]["length"] == 64 << 20
    assert pc_ram.stat().st_blocks * 512 < 16 << 20  # zero pages stay holes
    with open(pc_ram, "r+b") as f:
        f.seek(COUNTER_ADDRESS)
        counter = struct.unpack("<I", f.read(4))[0]
        assert counter in (saved, saved + 1)  # the guest had printed it, or was about to
        f.seek(COUNTER_ADDRESS)
        f.write(struct.pack("<I", 5000))

    edited = where / "edited.mig"
    out = vmferry("ram", "inject", str(guest), str(ram), str(edited))
    assert out.returncode == 0, out.stderr.decode()
    d = Managed(where, "dst", incoming=True)
    with d as dst:
        out = vmferry("migrate", "--from-file", str(edited), "--dest", d.address)
        assert out.returncode == 0, out.stderr.decode()
        dst.wait_for_count(5003, timeout=60)
        counts = parse_counts(dst.serial_text())
        assert counts[:3] in ([5001, 5002, 5003], [5000, 5001, 5002]), counts[:10]


def test_inject_then_extract_gives_the_same_files(qemu_corpus, tmp_path: Path) -> None:
    src = qemu_corpus["pc-7.2-running"]
    a = tmp_path / "a"
    assert vmferry("ram", "extract", "-q", str(src), str(a)).returncode == 0
    for fmt in ("legacy", "ferry"):
        out = tmp_path / f"out.{fmt}"
        done = vmferry("ram", "inject", str(src), str(a), str(out), "--to", fmt, "--json")
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)["bytes"] == out.stat().st_size
        back = tmp_path / f"back-{fmt}"
        assert vmferry("ram", "extract", "-q", str(out), str(back)).returncode == 0
        for f in a.iterdir():
            if f.name != "blocks.json":
                assert (back / f.name).read_bytes() == f.read_bytes(), (fmt, f.name)
    # device state travels unchanged: everything but the RAM sections inspects the same
    def devices(path: Path) -> Any:
        got = vmferry("inspect", "--json", str(path))
        return json.loads(got.stdout)["devices"]

    assert devices(tmp_path / "out.legacy") == devices(src)
    assert vmferry("ram", "extract", "-q", str(src), str(a)).returncode == 2  # exists already


def test_block_file_names_are_plain_and_distinct() -> None:
    names = block_file_names(["pc.ram", "/rom@etc/acpi/tables", "0000:00:02.0/vga.vram", "a/b", "a_b", "..", ""])
    assert names["pc.ram"] == "pc.ram.ram"
    assert all("/" not in n and not n.startswith(".") for n in names.values())
    assert len(set(names.values())) == len(names)


def test_a_manifest_that_points_outside_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ram"
    d.mkdir()
    (d / "blocks.json").write_text(json.dumps({"format": "vmferry-ram", "version": 1,
                                               "blocks": [{"block": "pc.ram", "file": "../../etc/passwd"}]}))
    stream = tmp_path / "s.mig"
    stream.write_bytes(b"QEVM\x00\x00\x00\x03\x00")
    out = vmferry("ram", "inject", str(stream), str(d), str(tmp_path / "o.mig"))
    err = out.stderr.decode()
    assert out.returncode == 2 and "outside the directory" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.mig").exists() and not list(tmp_path.glob("*partial*"))
    assert not os.path.exists(tmp_path / "o.mig")
