"""The real-QEMU harness: the counting guest, save/load through QemuVM, the golden corpus.

Everything here runs the installed qemu-system-x86_64 (no mocks); only the
tests of the pure guest helpers at the top do without it.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from qemu_recipes import RECIPES, generate_with_provenance, names

from vmferry.live.qemu.guest import counting_boot_sector, parse_counts
from vmferry.live.qemu.process import QemuError, QemuVM

MAGIC = b"QEVM\x00\x00\x00\x03"


# ----------------------------------------------------------------- helpers


def find_vmdesc(path: Path, window: int = 16 << 20) -> tuple[int, Any] | None:
    """(offset, parsed JSON) of the trailing vmdesc record, per spec section 4.7, or None.

    Scans backwards for p with byte[p] == 0x06, be32(p+1) == size - p - 5 and
    byte[p+5] == '{', preceded by the EOF byte 0x00.
    """
    size = path.stat().st_size
    start = max(0, size - window)
    with open(path, "rb") as f:
        f.seek(start)
        tail = f.read()
    p = len(tail) - 6
    while p >= 1:
        p = tail.rfind(b"\x06", 0, p + 1)
        if p < 1:
            return None
        if (p + 6 <= len(tail) and struct.unpack_from(">I", tail, p + 1)[0] == size - (start + p) - 5
                and tail[p + 5:p + 6] == b"{" and tail[p - 1] == 0x00):
            return start + p, json.loads(tail[p + 5:])
        p -= 1
    return None


def read_head(path: Path, n: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def config_end(head: bytes) -> int:
    """Offset just after the configuration section's machine name (head[8] must be 0x07)."""
    assert head[8] == 0x07, f"no configuration section: type byte {head[8]:#x}"
    (length,) = struct.unpack_from(">I", head, 9)
    return 13 + length


# ------------------------------------------------------ guest (pure, no QEMU)


def test_boot_sector_shape() -> None:
    sector = counting_boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert counting_boot_sector() == sector  # deterministic
    assert counting_boot_sector(dirty_pages=0) != sector
    with pytest.raises(ValueError):
        counting_boot_sector(dirty_pages=129)
    with pytest.raises(ValueError):
        counting_boot_sector(ticks=0)


def test_parse_counts() -> None:
    assert parse_counts("1\r\n2\r\n3\r\n4") == [1, 2, 3]  # "4" is not finished yet
    assert parse_counts("") == []
    assert parse_counts("Booting...\r\n7\r\n8\r\n") == [7, 8]
    assert parse_counts("1\r\n2\r") == [1]


# ------------------------------------------------------------ (a) counting


@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["pc", "q35", "isapc"])
def test_guest_counts_on_serial(tmp_path: Path, machine: str) -> None:
    with QemuVM(machine, paused=False, boot_sector=True, workdir=tmp_path) as vm:
        vm.wait_for_count(1, timeout=60)
        t0 = time.monotonic()
        first = vm.counts()[-1]
        last = vm.wait_for_count(first + 10, timeout=30)
        rate = (last - first) / (time.monotonic() - t0)
        counts = vm.counts()
        assert vm.status() == "running"
    assert counts == list(range(1, len(counts) + 1))
    assert 3 <= rate <= 60, f"{rate:.1f} numbers per second"


@pytest.mark.qemu
def test_paused_guest_does_not_count(tmp_path: Path) -> None:
    with QemuVM("pc", paused=True, boot_sector=True, workdir=tmp_path) as vm:
        time.sleep(0.5)
        assert vm.status() == "prelaunch"
        assert vm.counts() == []
        vm.cont()
        vm.wait_for_count(3, timeout=60)
        vm.stop()
        stopped_at = vm.counts()[-1]
        time.sleep(0.3)
        assert vm.counts()[-1] <= stopped_at + 1  # at most the number being printed


# ---------------------------------------------------- (b) save, load, go on


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("machine", "multipass"),
    [("pc", False), ("q35", False), ("isapc", False), ("pc", True)],
    ids=["pc", "q35", "isapc", "pc-multipass"],
)
def test_running_guest_continues_after_save_and_load(tmp_path: Path, machine: str, multipass: bool) -> None:
    """Save while the guest counts, load into a fresh QEMU: the count goes on.

    ``multipass`` throttles the migration (1 MiB/s, 1 ms downtime limit until
    the fourth dirty-bitmap sync) so that pages are sent again and again
    while the guest writes them: this catches lost dirty-page tracking (the
    guest's TLB flush works around a QEMU 7.2 TCG bug; without it the count
    goes backwards here).
    """
    stream = tmp_path / "running.mig"
    with QemuVM(machine, paused=False, boot_sector=True, workdir=tmp_path / "src", name="source") as src:
        src.wait_for_count(5, timeout=60)
        params: dict[str, int] = {}
        relaxed: list[int] = []

        def relax(info: dict[str, Any]) -> None:
            if multipass and not relaxed and info.get("ram", {}).get("dirty-sync-count", 0) >= 4:
                src.set_params({"downtime-limit": 300})
                relaxed.append(1)

        if multipass:
            params = {"max-bandwidth": 1 << 20, "downtime-limit": 1}
        info = src.save(stream, params=params, timeout=120, on_poll=relax)
        assert info["status"] == "completed"
        assert src.status() == "postmigrate"
        src_text = src.serial_text()
    if multipass:
        assert info["ram"]["dirty-sync-count"] >= 4  # really several passes while running
    before = parse_counts(src_text)
    assert before[-1] >= 5
    with QemuVM(machine, incoming=True, paused=False, boot_sector=True, workdir=tmp_path / "dst",
                name="destination") as dst:
        assert dst.load(stream) == "running"
        dst.wait_for_count(before[-1] + 5, timeout=60)
        dst_text = dst.serial_text()
    # The destination's log goes on where the source's stopped (possibly mid-number).
    combined = parse_counts(src_text + dst_text)
    assert combined == list(range(1, len(combined) + 1)), combined[-40:]
    assert combined[-1] > before[-1] + 4
    assert not dst_text.startswith("1\r\n"), "the counter restarted"


@pytest.mark.qemu
def test_load_of_a_bad_stream_reports_qemu_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mig"
    bad.write_bytes(MAGIC + b"\x07\x00\x00\x00\x05nopeX")
    with QemuVM("pc", incoming=True, workdir=tmp_path / "dst") as dst:
        with pytest.raises(QemuError) as err:
            dst.load(bad)
    assert "exited with status 1" in str(err.value)
    assert "qemu-system-x86_64:" in err.value.stderr_tail  # QEMU's own words are in the error


@pytest.mark.qemu
def test_qmp_error_carries_qemu_desc(tmp_path: Path) -> None:
    with QemuVM("pc", workdir=tmp_path, serial=False) as vm:
        with pytest.raises(QemuError) as err:
            vm.set_caps({"no-such-capability": True})
        assert err.value.desc and "no-such-capability" in err.value.desc


@pytest.mark.qemu
def test_save_to_awkward_path(tmp_path: Path) -> None:
    target = tmp_path / "dir with space" / "it's; $(odd) name.mig"
    target.parent.mkdir()
    with QemuVM("pc", workdir=tmp_path / "vm", serial=False) as vm:
        vm.save(target)
    assert read_head(target, 8) == MAGIC
    assert find_vmdesc(target) is not None


# ----------------------------------------------------------- (c) the corpus


@pytest.mark.qemu
@pytest.mark.parametrize("name", names())
def test_corpus_stream(qemu_corpus: Any, name: str) -> None:
    recipe = RECIPES[name]
    path = qemu_corpus[name]
    prov = qemu_corpus.provenance(name)
    size = path.stat().st_size
    head = read_head(path)
    assert size > 0 and head[:8] == MAGIC
    assert prov["size"] == size and prov["vms"] and prov["vms"][0]["argv"][0] == "qemu-system-x86_64"
    text = json.dumps(prov)  # no path of this machine in the provenance
    assert str(qemu_corpus.directory) not in text and tempfile.gettempdir() + "/" not in text

    if recipe.has_configuration:
        end = config_end(head)
        (length,) = struct.unpack_from(">I", head, 9)
        assert head[13:13 + length].decode() == recipe.machine_type
    else:
        assert head[8] != 0x07

    found = find_vmdesc(path)
    if recipe.has_vmdesc:
        assert found is not None, "no vmdesc at the end"
        offset, desc = found
        assert desc["page_size"] == 4096 and desc["devices"]
        if recipe.has_footers:
            with open(path, "rb") as f:
                f.seek(offset - 6)
                assert f.read(1) == b"\x7e"  # the last FULL section's footer, then EOF
    else:
        assert found is None
        with open(path, "rb") as f:
            f.seek(-1, 2)
            assert f.read() == b"\x00"  # ends with QEMU_VM_EOF

    facts = prov["facts"]
    if name == "pc-7.2-uuid-ignore-shared":
        assert head[config_end(head)] == 0x05  # configuration subsections follow the name
    elif name == "pc-7.2-postcopy-ram":
        assert head[config_end(head)] == 0x08  # QEMU_VM_COMMAND right after the configuration
        assert facts["destination_migrate_status"] == "completed"
    elif name == "pc-7.2-xen-devices":
        assert head[8] == 0x04  # straight to a FULL section
    elif name in ("pc-2.3-nocfg", "pc-2.2-novmdesc"):
        assert head[8] == 0x01  # SECTION_START of ram, no configuration
    elif name == "pc-7.2-xbzrle-running":
        assert facts["xbzrle"]["pages"] > 0
        assert facts["dirty-sync-count"] >= 3
        assert size > 1_000_000  # several passes over 64 MiB at 1 MiB/s
    elif name == "pc-7.2-compress":
        assert facts["compression"]["pages"] > 0
    elif name == "pc-7.2-ignore-shared-backend":
        baseline = qemu_corpus["pc-7.2-paused"].stat().st_size
        assert size < baseline - 100_000  # the 64 MiB of shared guest RAM were not sent
    elif recipe.kind == "running":
        assert facts["count_at_save"] >= 5


@pytest.mark.qemu
@pytest.mark.slow
def test_random_ram_recipe_yields_a_gibibyte_of_pages(tmp_path: Path) -> None:
    path, prov = generate_with_provenance("pc-7.2-1g-random", tmp_path)
    try:
        size = path.stat().st_size
        assert read_head(path, 8) == MAGIC
        assert prov["facts"]["normal"] >= (1 << 30) // 4096
        assert 1.07e9 < size < 1.09e9  # 262 144 PAGE records of 4 KiB plus headers
        assert find_vmdesc(path) is not None
    finally:
        path.unlink(missing_ok=True)


# ------------------------------------------------- (d) QEMU 10.0 in its chroot


@pytest.mark.qemu10
@pytest.mark.parametrize("machine", ["pc-i440fx-10.0", "pc-q35-10.0"])
def test_guest_counts_under_qemu10(tmp_path: Path, machine: str) -> None:
    with QemuVM(machine, paused=False, boot_sector=True, workdir=tmp_path, qemu_version="10.0") as vm:
        assert vm.argv[0].endswith("chroot") and vm.argv[2] == "qemu-system-x86_64"
        vm.wait_for_count(3, timeout=60)
        # chroot execs QEMU: the pid we hold (and signal) is QEMU's own
        assert Path(f"/proc/{vm.pid}/exe").resolve().name == "qemu-system-x86_64"
        assert str(Path(f"/proc/{vm.pid}/root").resolve()) != "/"
        assert vm.query("query-version")["qemu"]["major"] == 10
    assert vm.counts()[:3] == [1, 2, 3]


@pytest.mark.qemu10
def test_qemu10_version_and_stream_path(tmp_path: Path) -> None:
    from vmferry.live.qemu.process import qemu_version

    assert qemu_version(release="10.0").startswith("QEMU emulator version 10.0")
    stream = tmp_path / "out" / "paused.mig"
    stream.parent.mkdir()
    with QemuVM("pc-i440fx-10.0", workdir=tmp_path / "vm", serial=False, qemu_version="10.0") as vm:
        vm.save(stream)
    head = read_head(stream)
    assert head[:8] == MAGIC and head[13:13 + 14] == b"pc-i440fx-10.0"


@pytest.mark.qemu10
def test_qemu10_dies_with_the_thread_that_started_it(tmp_path: Path) -> None:
    import os
    import threading

    started: list[QemuVM] = []
    t = threading.Thread(target=lambda: started.append(
        QemuVM("pc-i440fx-10.0", workdir=tmp_path, serial=False, qemu_version="10.0").start()))
    t.start()
    t.join()
    vm = started[0]
    try:
        assert vm._proc is not None
        assert vm._proc.wait(30) == -9  # SIGKILL from PR_SET_PDEATHSIG, through chroot's exec
        assert not os.path.exists(f"/proc/{vm.pid}/exe")
    finally:
        vm.kill()


@pytest.mark.qemu10
def test_qemu10_loads_what_it_saved_and_the_guest_counts_on(tmp_path: Path) -> None:
    stream = tmp_path / "running.mig"
    with QemuVM("pc-q35-10.0", paused=False, boot_sector=True, workdir=tmp_path / "src",
                qemu_version="10.0") as src:
        src.wait_for_count(3, timeout=60)
        src.save(stream)
        before = src.counts()[-1]
    with QemuVM("pc-q35-10.0", incoming=True, paused=False, boot_sector=True, workdir=tmp_path / "dst",
                qemu_version="10.0") as dst:
        assert dst.load(stream) == "running"
        dst.wait_for_count(before + 3, timeout=60)
        assert not dst.serial_text().startswith("1\r\n")


def test_unknown_qemu_release_is_refused() -> None:
    with pytest.raises(QemuError, match="unknown QEMU release"):
        QemuVM("pc", qemu_version="9.9")
