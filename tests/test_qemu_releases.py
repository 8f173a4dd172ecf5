"""QEMU 5.2 and 11.1 in their chroots, run by the harness exactly like 10.0.

Each release: its version line, the counting guest under TCG and under KVM
(``-accel kvm``, when this host has ``/dev/kvm``), and a stream saved and
loaded back by the same QEMU with the guest counting on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from vmferry.live.qemu.process import RELEASE_CHROOTS, QemuError, QemuVM, qemu_version, release_root

MAGIC = b"QEVM\x00\x00\x00\x03"
#: -machine options per accelerator.  Under KVM on this (nested, shared 2-vCPU) host, with the
#: default in-kernel irqchip, SeaBIOS now and then halts for good before the boot sector
#: (HLT with IRQ0 unmasked, no timer interrupt ever delivered), mostly while the host is busy;
#: kernel-irqchip=split keeps the PIC and PIT in QEMU.
MACHINE_OPTIONS = {"tcg": "", "kvm": ",kernel-irqchip=split"}
BOOT_TIMEOUT = 60

#: release -> (pytest marker, major QEMU version, newest i440FX and q35 machine types)
RELEASES = {
    "5.2": (pytest.mark.qemu5, 5, "pc-i440fx-5.2", "pc-q35-5.2"),
    "11.1": (pytest.mark.qemu11, 11, "pc-i440fx-11.1", "pc-q35-11.1"),
}


def _params(*accels: str) -> list[object]:
    out: list[object] = []
    for release, (mark, _, pc, q35) in RELEASES.items():
        for machine in (pc, q35):
            for accel in accels:
                marks = [mark]
                if accel == "kvm":
                    marks.append(pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                                    reason="no usable /dev/kvm"))
                out.append(pytest.param(release, machine, accel, marks=marks,
                                        id=f"{release}-{machine}-{accel}"))
    return out


@pytest.mark.parametrize("release", [pytest.param(r, marks=m[0]) for r, m in RELEASES.items()])
def test_release_version(release: str) -> None:
    line = qemu_version(release=release)
    assert line.startswith(f"QEMU emulator version {release}"), line
    assert str(release_root(release)) in (os.environ.get(RELEASE_CHROOTS[release].env) or
                                          RELEASE_CHROOTS[release].default_root)


@pytest.mark.parametrize(("release", "machine", "accel"), _params("tcg", "kvm"))
def test_guest_counts(tmp_path: Path, release: str, machine: str, accel: str) -> None:
    major = RELEASES[release][1]
    with QemuVM(machine + MACHINE_OPTIONS[accel], paused=False, boot_sector=True, workdir=tmp_path,
                qemu_version=release, accel=accel) as vm:
        assert vm.argv[0].endswith("chroot") and vm.argv[2] == "qemu-system-x86_64"
        assert vm.argv[vm.argv.index("-accel") + 1] == accel
        vm.wait_for_count(3, timeout=BOOT_TIMEOUT)
        assert Path(f"/proc/{vm.pid}/exe").resolve().name == "qemu-system-x86_64"
        assert vm.query("query-version")["qemu"]["major"] == major
        assert vm.query("query-kvm")["enabled"] is (accel == "kvm")
    assert vm.counts()[:3] == [1, 2, 3]


def _stuck_guest_report(vm: QemuVM) -> str:
    """What a guest that stopped counting was doing: run state, instruction pointer, interrupt controllers."""
    regs = vm.hmp("info registers").splitlines()
    where = " ".join(line.split()[0] for line in regs if line.startswith(("EIP=", "RIP=")))
    pics = [line for line in vm.hmp("info pic").splitlines() if line.startswith("pic")]  # the two i8259s
    return f"status {vm.status()}, {where or 'no EIP'}; " + " | ".join(pics)


def _save_then_load(tmp_path: Path, release: str, machine: str, accel: str) -> str | None:
    """Save a counting guest, load it into a fresh QEMU of the same release; None when the loaded guest counts
    on from where it was saved, else what the stuck guest was doing."""
    stream = tmp_path / "running.mig"
    with QemuVM(machine + MACHINE_OPTIONS[accel], paused=False, boot_sector=True, workdir=tmp_path / "src",
                qemu_version=release, accel=accel) as src:
        src.wait_for_count(3, timeout=BOOT_TIMEOUT)
        src.save(stream)
        before = src.counts()[-1]
    with open(stream, "rb") as f:
        head = f.read(64)
    assert head[:8] == MAGIC and head[13:13 + len(machine)] == machine.encode()
    with QemuVM(machine + MACHINE_OPTIONS[accel], incoming=True, paused=False, boot_sector=True,
                workdir=tmp_path / "dst", qemu_version=release, accel=accel) as dst:
        assert dst.load(stream) == "running"
        try:
            dst.wait_for_count(before + 3, timeout=BOOT_TIMEOUT)
        except QemuError as e:
            if accel != "kvm" or not dst.is_running():
                raise
            return f"{e.args[0].splitlines()[0]}; {_stuck_guest_report(dst)}"
        # the guest goes on from where it was saved, it did not boot again
        assert not dst.serial_text().startswith("1\r\n")
    return None


@pytest.mark.parametrize(("release", "machine", "accel"), _params("tcg", "kvm"))
def test_loads_what_it_saved(tmp_path: Path, release: str, machine: str, accel: str) -> None:
    stuck = _save_then_load(tmp_path / "first", release, machine, accel)
    if stuck is None:
        return
    # Under the nested KVM of these hosts a loaded guest has, once in a CI run (11.1, q35, split irqchip),
    # printed nothing for a minute: the timer tick it busy-waits on never came.  That is the host's interrupt
    # delivery, not the stream (TCG and every other run load it), so a second save and load decides, and
    # the first one's state is reported.
    warnings.warn(f"{release} {machine} under KVM: the loaded guest stopped counting ({stuck}); tried again",
                  stacklevel=1)
    again = _save_then_load(tmp_path / "second", release, machine, accel)
    assert again is None, f"the loaded guest stopped counting twice: {stuck} / {again}"


def test_missing_release_chroot_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for release, chroot in RELEASE_CHROOTS.items():
        monkeypatch.setenv(chroot.env, str(tmp_path / "nowhere"))
        with pytest.raises(QemuError, match=rf"QEMU {release} not found.*ensure-qemu-release.sh {release}"):
            QemuVM("pc", qemu_version=release)
