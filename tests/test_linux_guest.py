"""A real Linux guest (Debian's kernel, a busybox shell counting on ttyS0) moves between QEMU releases.

The counting boot sector proves that the CPU and RAM arrive; a booted Linux
kernel also needs its timers, interrupt controllers, clocks and the serial
port's state to be right after the move, or its shell stops printing.  Each
test saves the running guest with one QEMU, converts the stream with
``vmferry transform`` and loads it into the other QEMU, which must go on
counting from where the source stopped, with no gap and no restart: 7.2 <->
10.0, and QEMU 11.1 <-> 5.2 on pc and q35 (the whole catalogue, both ways).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from linux_guest import LinuxGuest, linux_guest  # noqa: F401  (the fixture)

from vmferry.cli import main
from vmferry.live.qemu.guest import parse_counts
from vmferry.live.qemu.process import QemuVM

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MEMORY = "256M"
#: the marker of each release's chroot (7.2 is the system's QEMU)
MARKS = {"5.2": pytest.mark.qemu5, "10.0": pytest.mark.qemu10, "11.1": pytest.mark.qemu11}


def _move(a: str, qa: str, b: str, qb: str) -> object:
    return pytest.param(a, qa, b, qb, marks=[MARKS[q] for q in (qa, qb) if q in MARKS], id=f"{a}@{qa}->{b}@{qb}")


MOVES = [
    _move("pc-i440fx-7.2", "7.2", "pc-i440fx-10.0", "10.0"),
    _move("pc-q35-10.0", "10.0", "pc-q35-7.2", "7.2"),
    # QEMU 11.1 <-> 5.2 (issue 13): the whole catalogue, both ways, both chipsets
    _move("pc-i440fx-11.1", "11.1", "pc-i440fx-5.2", "5.2"),
    _move("pc-i440fx-5.2", "5.2", "pc-i440fx-11.1", "11.1"),
    _move("pc-q35-11.1", "11.1", "pc-q35-5.2", "5.2"),
    _move("pc-q35-5.2", "5.2", "pc-q35-11.1", "11.1"),
]


def _vm(guest: LinuxGuest, machine: str, qemu: str, workdir: Path, **kw: object) -> QemuVM:
    vm = QemuVM(machine, guest.args, memory=MEMORY, qemu_version=None if qemu == "7.2" else qemu,
                workdir=workdir, **kw)  # type: ignore[arg-type]
    vm.expose(guest.root)
    return vm


@pytest.mark.parametrize(("a", "qa", "b", "qb"), MOVES)
def test_a_linux_guest_keeps_counting_on_the_other_qemu(linux_guest: LinuxGuest, tmp_path: Path,  # noqa: F811
                                                        a: str, qa: str, b: str, qb: str) -> None:
    src_stream, out = tmp_path / "src.mig", tmp_path / "out.mig"
    with _vm(linux_guest, a, qa, tmp_path / "src", paused=False, name="source") as src:
        src.wait_for_count(20, timeout=120)
        src.save(src_stream)
        src_text = src.serial_text()
    before = parse_counts(src_text)
    assert main(["transform", str(src_stream), str(out), "--machine", b, "--qemu-version", qb, "-q"]) == 0
    with _vm(linux_guest, b, qb, tmp_path / "dst", incoming=True, paused=False, name="destination") as dst:
        assert dst.load(out) == "running"
        dst.wait_for_count(before[-1] + 20, timeout=60)
        dst_text = dst.serial_text()
    assert not dst_text.startswith("1\n"), "the guest restarted"
    combined = parse_counts(src_text + dst_text)
    assert combined == list(range(1, len(combined) + 1)), combined[-40:]
    assert combined[-1] >= before[-1] + 20
    print(f"\nLinux guest {a}@{qa} -> {b}@{qb}: stopped at {before[-1]}, went on to {combined[-1]}")
