"""Recipes for the golden migration streams that real QEMU 7.2 and 10.0 produce.

A :class:`Recipe` says how one stream is made: machine type, extra devices,
guest state (never started, or running the counting boot sector),
capabilities, parameters, and which producer drives QEMU.  This module
promises:

* :data:`RECIPES` (name -> recipe) covers the stream flavours of the
  specification's section 13, a range of machine types and a range of
  devices; :func:`names` lists them.
* :func:`generate` writes one stream with a real QEMU into a directory and
  :func:`generate_with_provenance` also returns how it was made (QEMU
  version, command lines, QMP commands, what QEMU reported), with the paths
  of this machine replaced by ``$CORPUS``/``$WORKDIR``.
* :class:`Corpus`, a mapping name -> path, generates streams lazily into one
  directory, caches them, keeps ``provenance.json`` beside them, and (with
  ``reuse=True``) reuses streams a previous run made with the same QEMU and
  the same recipe.
* A recipe that needs something this QEMU build or host lacks (a device,
  a machine type, userfaultfd) raises :class:`RecipeUnavailable`.
* A recipe with ``qemu_version="10.0"`` runs QEMU 10.0 (the chroot of
  :func:`vmferry.live.qemu.process.qemu10_root`), likewise ``"5.2"`` and
  ``"11.1"`` (:func:`vmferry.live.qemu.process.release_root`);
  ``names(qemu="10.0")`` lists those, ``names()`` the system QEMU's (7.2)
  as before.

Used by the tests (``tests/qemu_corpus.py``), the demo and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from vmferry.live.qemu.guest import counting_boot_sector
from vmferry.live.qemu.process import QemuError, QemuVM, escape_option, expose, qemu_command, qemu_version

__all__ = [
    "Corpus",
    "RECIPES",
    "Recipe",
    "RecipeUnavailable",
    "check_available",
    "generate",
    "generate_with_provenance",
    "names",
]

Kind = Literal[
    "paused", "running", "xbzrle", "postcopy", "background-snapshot", "xen-devices", "random-ram",
    "file", "multifd",
]

#: A fixed UUID so that the validate-uuid stream is reproducible.
FIXED_UUID = "5c1c3a2e-7d6b-4b8e-9a41-1f2e3d4c5b6a"
PC = "pc-i440fx-7.2"
Q35 = "pc-q35-7.2"
PC10 = "pc-i440fx-10.0"
Q35_10 = "pc-q35-10.0"


class RecipeUnavailable(QemuError):
    """This QEMU build or host cannot make the stream (device, machine or feature missing)."""


@dataclass(frozen=True)
class Recipe:
    """How to make one golden stream; see the module docstring."""

    name: str
    summary: str
    machine: str = PC
    args: tuple[str, ...] = ()
    memory: str = "64M"
    kind: Kind = "paused"
    caps: Mapping[str, bool] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    #: device types that must appear in ``-device help``
    devices: tuple[str, ...] = ()
    #: keyword arguments of :func:`vmferry.live.qemu.guest.counting_boot_sector` (running kinds)
    guest: Mapping[str, int] = field(default_factory=dict)
    has_configuration: bool = True
    has_footers: bool = True
    has_vmdesc: bool = True
    #: big or slow (e.g. 1 GiB); left out of ``names()`` unless asked for
    heavy: bool = False
    #: the QEMU that makes the stream: None for the system's (7.2), "5.2"/"10.0"/"11.1" for a chroot one
    qemu_version: str | None = None

    @property
    def machine_type(self) -> str:
        return self.machine.split(",", 1)[0]

    def fingerprint(self) -> str:
        """Changes whenever the recipe or the guest code changes."""
        data = dataclasses.asdict(self)
        if self.kind in ("running", "xbzrle", "background-snapshot"):
            data["guest_code"] = counting_boot_sector(**self.guest).hex()
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _recipes() -> list[Recipe]:
    r: list[Recipe] = [
        # --- the flavours of the specification's section 13
        Recipe("pc-7.2-paused", "baseline pc (i440FX), 64 MiB, never started (-S)"),
        Recipe("q35-7.2-paused", "baseline q35, 64 MiB, never started (-S)", machine=Q35),
        Recipe("pc-7.2-uuid-ignore-shared",
               "validate-uuid + x-ignore-shared with -uuid: configuration subsections "
               "(uuid, capabilities) and a GPA per block in MEM_SIZE; plain private RAM, so pages are still sent",
               args=("-uuid", FIXED_UUID), caps={"validate-uuid": True, "x-ignore-shared": True}),
        Recipe("pc-7.2-ignore-shared-backend",
               "x-ignore-shared with guest RAM in a shared memory-backend-memfd: the RAM block "
               "'mem' is listed in MEM_SIZE but its pages are not sent",
               machine=f"{PC},memory-backend=mem",
               args=("-object", "memory-backend-memfd,id=mem,size=64M,share=on"),
               caps={"x-ignore-shared": True}),
        Recipe("pc-7.2-postcopy-ram",
               "postcopy-ram enabled (never switched to postcopy): OPEN_RETURN_PATH, PING and "
               "POSTCOPY_ADVISE commands; recorded with tee between two QEMUs so the return path works",
               kind="postcopy", caps={"postcopy-ram": True}),
        Recipe("pc-7.2-compress", "compress capability: COMPRESS_PAGE (0x100) records for non-zero pages",
               caps={"compress": True}),
        Recipe("pc-7.2-xbzrle-running",
               "running counting guest dirtying 128 pages per count, xbzrle, max-bandwidth 1 MiB/s and "
               "downtime-limit 1 ms until XBZRLE pages were sent: many PART sections, XBZRLE (0x40) records",
               kind="xbzrle", caps={"xbzrle": True},
               params={"max-bandwidth": 1 << 20, "downtime-limit": 1}, guest={"dirty_pages": 128}),
        Recipe("pc-7.2-e1000-slirp", "e1000 on -netdev user: old-style slirp section",
               args=("-netdev", "user,id=net0", "-device", "e1000,netdev=net0"), devices=("e1000",)),
        Recipe("pc-2.3-nocfg", "pc-i440fx-2.3: no configuration section, no section footers",
               machine="pc-i440fx-2.3", has_configuration=False, has_footers=False),
        Recipe("pc-2.2-novmdesc", "pc-i440fx-2.2: no configuration, no footers, no vmdesc (suppress-vmdesc)",
               machine="pc-i440fx-2.2", has_configuration=False, has_footers=False, has_vmdesc=False),
        Recipe("pc-7.2-background-snapshot",
               "background-snapshot of the running counting guest: RAM START+PARTs without END, "
               "then the device state captured at the start",
               kind="background-snapshot", caps={"background-snapshot": True}),
        Recipe("pc-7.2-xen-devices",
               "xen-save-devices-state {live: false}: header, FULL device sections with footers, EOF; "
               "no configuration, no RAM, no vmdesc",
               kind="xen-devices", has_configuration=False, has_vmdesc=False),
        # --- machine types
        Recipe("isapc-paused", "isapc (ISA-only PC), never started", machine="isapc"),
    ]
    for v in ("2.4", "2.12", "3.1", "4.2", "5.2", "6.2"):
        r.append(Recipe(f"pc-{v}-paused", f"machine pc-i440fx-{v}, never started", machine=f"pc-i440fx-{v}"))
    for v in ("2.4", "2.12", "4.2", "6.2"):
        r.append(Recipe(f"q35-{v}-paused", f"machine pc-q35-{v}, never started", machine=f"pc-q35-{v}"))

    # --- devices (pc-i440fx-7.2 unless q35 is needed), never started
    def dev(name: str, summary: str, args: tuple[str, ...], devices: tuple[str, ...],
            machine: str = PC) -> Recipe:
        return Recipe(name, summary, machine=machine, args=args, devices=devices)

    r += [
        dev("pc-7.2-virtio-net", "virtio-net-pci (no netdev)", ("-device", "virtio-net-pci"), ("virtio-net-pci",)),
        dev("pc-7.2-rtl8139", "rtl8139 (no netdev)", ("-device", "rtl8139"), ("rtl8139",)),
        dev("pc-7.2-ne2k_pci", "ne2k_pci (no netdev)", ("-device", "ne2k_pci"), ("ne2k_pci",)),
        dev("q35-7.2-e1000e", "e1000e on q35 (no netdev)", ("-device", "e1000e"), ("e1000e",), machine=Q35),
        dev("pc-7.2-uhci-tablet", "piix3-usb-uhci with a usb-tablet",
            ("-device", "piix3-usb-uhci,id=usb", "-device", "usb-tablet,bus=usb.0"),
            ("piix3-usb-uhci", "usb-tablet")),
        dev("pc-7.2-ehci-kbd", "usb-ehci with a usb-kbd",
            ("-device", "usb-ehci,id=usb", "-device", "usb-kbd,bus=usb.0"), ("usb-ehci", "usb-kbd")),
        dev("pc-7.2-xhci-tablet", "qemu-xhci with a usb-tablet",
            ("-device", "qemu-xhci,id=usb", "-device", "usb-tablet,bus=usb.0"), ("qemu-xhci", "usb-tablet")),
        dev("pc-7.2-ac97", "AC97 on -audiodev none",
            ("-audiodev", "none,id=snd0", "-device", "AC97,audiodev=snd0"), ("AC97",)),
        dev("pc-7.2-hda-duplex", "intel-hda + hda-duplex on -audiodev none",
            ("-audiodev", "none,id=snd0", "-device", "intel-hda", "-device", "hda-duplex,audiodev=snd0"),
            ("intel-hda", "hda-duplex")),
        dev("pc-7.2-vga-std", "-vga std", ("-vga", "std"), ("VGA",)),
        dev("pc-7.2-vga-cirrus", "-vga cirrus", ("-vga", "cirrus"), ("cirrus-vga",)),
        dev("pc-7.2-device-VGA", "-device VGA", ("-device", "VGA"), ("VGA",)),
        dev("pc-7.2-qxl-vga", "-device qxl-vga", ("-device", "qxl-vga"), ("qxl-vga",)),
        dev("pc-7.2-virtio-vga", "-device virtio-vga", ("-device", "virtio-vga"), ("virtio-vga",)),
    ]
    # --- running guests
    r += [
        Recipe("pc-7.2-running", "counting guest on floppy + COM1, running, saved while it counts",
               kind="running"),
        Recipe("q35-7.2-running", "counting guest on q35, running, saved while it counts",
               machine=Q35, kind="running"),
        Recipe("pc-7.2-smp2", "two vCPUs (-smp 2), counting guest running, saved while it counts",
               args=("-smp", "2"), kind="running"),
    ]
    r += _qemu10_recipes()
    r += _release_recipes("5.2") + _release_recipes("11.1")
    # --- benchmarks
    r.append(Recipe(
        "pc-7.2-1g-random",
        "1 GiB guest RAM pre-filled with random bytes (memory-backend-file, share=off), never "
        "started, max-bandwidth lifted: ~1 GiB of PAGE records",
        machine=f"{PC},memory-backend=mem", memory="1G", kind="random-ram",
        params={"max-bandwidth": 1 << 40}, heavy=True))
    return r


def _qemu10_recipes() -> list[Recipe]:
    """Streams made by QEMU 10.0 (spec section 11): its own machine types and 7.2's."""
    def r10(name: str, summary: str, **kw: Any) -> Recipe:
        kw.setdefault("machine", PC10)
        return Recipe(name, summary, qemu_version="10.0", **kw)

    e1000 = ("-netdev", "user,id=net0", "-device", "e1000,netdev=net0")
    return [
        r10("pc-10.0-paused", "QEMU 10.0, pc-i440fx-10.0, 64 MiB, never started: SWITCHOVER_START before ram END"),
        r10("q35-10.0-paused", "QEMU 10.0, pc-q35-10.0, never started", machine=Q35_10),
        r10("pc-10.0-running", "QEMU 10.0, pc-i440fx-10.0, counting guest saved while it counts", kind="running"),
        r10("q35-10.0-running", "QEMU 10.0, pc-q35-10.0, counting guest saved while it counts",
            machine=Q35_10, kind="running"),
        r10("pc-10.0-e1000-slirp", "QEMU 10.0, pc-i440fx-10.0, e1000 on -netdev user: slirp section first (id 1)",
            args=e1000, devices=("e1000",)),
        r10("pc-10.0-virtio-net", "QEMU 10.0, pc-i440fx-10.0, virtio-net-pci (no netdev)",
            args=("-device", "virtio-net-pci"), devices=("virtio-net-pci",)),
        r10("q35-10.0-virtio-net", "QEMU 10.0, pc-q35-10.0, virtio-net-pci (no netdev)", machine=Q35_10,
            args=("-device", "virtio-net-pci"), devices=("virtio-net-pci",)),
        r10("pc-7.2-on-10.0-paused", "QEMU 10.0 running machine type pc-i440fx-7.2, never started: "
            "no SWITCHOVER_START (hw_compat_9_2)", machine=PC),
        r10("pc-7.2-on-10.0-running", "QEMU 10.0 running machine type pc-i440fx-7.2, counting guest",
            machine=PC, kind="running"),
        r10("pc-10.0-no-switchover", "QEMU 10.0, pc-i440fx-10.0 with -global migration.send-switchover-start=off",
            args=("-global", "migration.send-switchover-start=off")),
        r10("pc-7.2-on-10.0-switchover-on", "QEMU 10.0 running pc-i440fx-7.2 with "
            "-global migration.send-switchover-start=on: SWITCHOVER_START on an old machine type",
            machine=PC, args=("-global", "migration.send-switchover-start=on")),
        r10("pc-10.0-uuid-ignore-shared", "QEMU 10.0, validate-uuid + x-ignore-shared with -uuid",
            args=("-uuid", FIXED_UUID), caps={"validate-uuid": True, "x-ignore-shared": True}),
        r10("pc-10.0-return-path", "QEMU 10.0, return-path: OPEN_RETURN_PATH + PING(1); recorded with tee "
            "between two QEMU 10.0 so the return path works", kind="postcopy", caps={"return-path": True}),
        r10("pc-10.0-postcopy-ram", "QEMU 10.0, postcopy-ram enabled (never switched): OPEN_RETURN_PATH, PING, "
            "POSTCOPY_ADVISE; recorded with tee between two QEMU 10.0", kind="postcopy", caps={"postcopy-ram": True}),
        r10("pc-10.0-background-snapshot", "QEMU 10.0, background-snapshot of the running counting guest: "
            "no ram END, no SWITCHOVER_START", kind="background-snapshot", caps={"background-snapshot": True}),
        r10("pc-10.0-mapped-ram", "QEMU 10.0, mapped-ram to a file: URI: RAM at fixed file offsets "
            "(a sparse 70 MiB file), never started", kind="file", caps={"mapped-ram": True}),
        r10("pc-10.0-multifd-main", "QEMU 10.0, multifd (2 channels) over unix sockets between two QEMU 10.0, "
            "running counting guest: the main channel only (MULTIFD_FLUSH records, no page records)",
            kind="multifd", caps={"multifd": True}, params={"multifd-channels": 2}),
        r10("pc-7.2-on-10.0-multifd-main", "QEMU 10.0 running pc-i440fx-7.2, multifd as pc-10.0-multifd-main: "
            "no MULTIFD_FLUSH (hw_compat_8_0), ZERO records in the main channel (hw_compat_8_2)",
            machine=PC, kind="multifd", caps={"multifd": True}, params={"multifd-channels": 2}),
        r10("pc-10.0-xbzrle-running", "QEMU 10.0, running counting guest dirtying 128 pages per count, xbzrle, "
            "max-bandwidth 1 MiB/s and downtime-limit 1 ms until XBZRLE pages were sent",
            kind="xbzrle", caps={"xbzrle": True},
            params={"max-bandwidth": 1 << 20, "downtime-limit": 1}, guest={"dirty_pages": 128}),
    ]


# ---- QEMU 5.2 and 11.1 (issue 13) -------------------------------------------


def _release_recipes(release: str) -> list[Recipe]:
    """Streams made by QEMU ``release`` ("5.2" or "11.1") under its newest machine types.

    Names: ``pc-11.1-paused`` is pc-i440fx-11.1 made by QEMU 11.1; a machine
    type made by another release says so, ``pc-5.2-on-11.1-paused``.  QEMU
    5.2's own are all ``...-on-5.2-...``: ``pc-5.2-paused`` is QEMU 7.2's
    stream of pc-i440fx-5.2.
    """
    pc, q35 = f"pc-i440fx-{release}", f"pc-q35-{release}"
    own = f"{release}-on-{release}" if release == "5.2" else release

    def rr(name: str, summary: str, **kw: Any) -> Recipe:
        kw.setdefault("machine", pc)
        return Recipe(name, f"QEMU {release}, {kw['machine']}, {summary}", qemu_version=release, **kw)

    e1000 = ("-netdev", "user,id=net0", "-device", "e1000,netdev=net0")
    out = [
        rr(f"pc-{own}-paused", "64 MiB, never started"),
        rr(f"q35-{own}-paused", "64 MiB, never started", machine=q35),
        rr(f"pc-{own}-running", "counting guest saved while it counts", kind="running"),
        rr(f"q35-{own}-running", "counting guest saved while it counts", machine=q35, kind="running"),
        rr(f"pc-{own}-e1000-slirp", "e1000 on -netdev user, never started", args=e1000, devices=("e1000",)),
        rr(f"q35-{own}-e1000e", "e1000e (no netdev), never started", machine=q35,
           args=("-device", "e1000e"), devices=("e1000e",)),
        rr(f"pc-{own}-virtio-net", "virtio-net-pci (no netdev), never started",
           args=("-device", "virtio-net-pci"), devices=("virtio-net-pci",)),
        rr(f"q35-{own}-virtio-net", "virtio-net-pci (no netdev), never started", machine=q35,
           args=("-device", "virtio-net-pci"), devices=("virtio-net-pci",)),
    ]
    if release == "11.1":  # older machine types that QEMU 11.1 still runs, for transforms
        for old in ("5.2", "7.2", "10.0"):
            out += [
                rr(f"pc-{old}-on-11.1-paused", "never started", machine=f"pc-i440fx-{old}"),
                rr(f"q35-{old}-on-11.1-paused", "never started", machine=f"pc-q35-{old}"),
            ]
    return out


# ---- end of QEMU 5.2 and 11.1 ----------------------------------------------


RECIPES: dict[str, Recipe] = {rec.name: rec for rec in _recipes()}


def names(*, include_heavy: bool = False, qemu: str | None = None) -> list[str]:
    """Recipe names made by QEMU ``qemu`` (None: the system's), in a stable order.

    Heavy ones only when asked for.
    """
    return [n for n, rec in RECIPES.items()
            if rec.qemu_version == qemu and (include_heavy or not rec.heavy)]


# ------------------------------------------------------------- availability


@lru_cache(maxsize=8)
def _help_names(command: tuple[str, ...], option: str) -> frozenset[str]:
    out = subprocess.run([*command, option, "help"], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise QemuError(f"{shlex.join(command)} {option} help failed with status {out.returncode}",
                        stderr_tail=out.stderr)
    if option == "-device":
        return frozenset(re.findall(r'^name "([^"]+)"', out.stdout, re.M))
    return frozenset(line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip())


def check_available(recipe: Recipe, binary: str | None = None) -> None:
    """Raise :class:`RecipeUnavailable` if this QEMU lacks the recipe's machine or devices."""
    command = tuple(qemu_command(recipe.qemu_version, binary))
    if recipe.machine_type not in _help_names(command, "-machine"):
        raise RecipeUnavailable(f"{recipe.name}: machine type {recipe.machine_type!r} is not in this QEMU build")
    missing = [d for d in recipe.devices if d not in _help_names(command, "-device")]
    if missing:
        raise RecipeUnavailable(f"{recipe.name}: device(s) {', '.join(missing)} not in this QEMU build")


# ---------------------------------------------------------------- producers


class _Run:
    """What a producer did, for the provenance record."""

    def __init__(self, recipe: Recipe, out: Path, work: Path, binary: str | None) -> None:
        self.recipe = recipe
        self.out = out
        self.work = work
        self.binary = binary
        self.vms: list[tuple[str, QemuVM]] = []
        self.steps: list[str] = []
        self.facts: dict[str, Any] = {}

    def vm(self, role: str, **kw: Any) -> QemuVM:
        rec = self.recipe
        kw.setdefault("machine", rec.machine)
        kw.setdefault("args", rec.args)
        kw.setdefault("memory", rec.memory)
        kw.setdefault("serial", False)
        vm = QemuVM(workdir=self.work / role, binary=self.binary, name=f"{rec.name}/{role}",
                    qemu_version=rec.qemu_version, **kw)
        self.vms.append((role, vm))
        return vm

    def step(self, text: str) -> None:
        self.steps.append(text)


def _migration_facts(info: Mapping[str, Any]) -> dict[str, Any]:
    ram = info.get("ram", {})
    facts = {k: ram[k] for k in ("transferred", "normal", "duplicate", "dirty-sync-count") if k in ram}
    if "xbzrle-cache" in info:
        facts["xbzrle"] = {k: info["xbzrle-cache"].get(k) for k in ("pages", "bytes", "cache-miss")}
    if "compression" in info:
        facts["compression"] = {k: info["compression"].get(k) for k in ("pages", "compressed-size")}
    return facts


def _produce_paused(run: _Run) -> None:
    rec = run.recipe
    with run.vm("source") as vm:
        info = vm.save(run.out, caps=rec.caps, params=rec.params)
        run.step("migrate (exec: cat into the file) with the VM never started; poll query-migrate until completed")
        run.facts.update(_migration_facts(info))


def _start_counting(run: _Run, role: str = "source", count: int = 5) -> QemuVM:
    vm = run.vm(role, paused=False, serial=True, boot_sector=counting_boot_sector(**run.recipe.guest))
    vm.start()
    vm.wait_for_count(count, timeout=60)
    run.step(f"counting guest booted from floppy, waited until COM1 showed {count}")
    return vm


def _produce_running(run: _Run) -> None:
    rec = run.recipe
    vm = _start_counting(run)
    try:
        info = vm.save(run.out, caps=rec.caps, params=rec.params)
        run.step("migrate while the guest runs; poll query-migrate until completed")
        run.facts.update(_migration_facts(info))
        counts = vm.counts()
        run.facts["count_at_save"] = counts[-1] if counts else None
        vm.quit()
    except BaseException:
        vm.kill()
        raise


def _produce_xbzrle(run: _Run) -> None:
    rec = run.recipe
    vm = _start_counting(run, count=3)
    started = time.monotonic()
    relaxed = False

    def on_poll(info: dict[str, Any]) -> None:
        nonlocal relaxed
        pages = info.get("xbzrle-cache", {}).get("pages", 0)
        if not relaxed and (pages >= 300 or time.monotonic() - started > 20):
            vm.set_params({"downtime-limit": 300, "max-bandwidth": 1 << 30})
            run.step(f"after {pages} XBZRLE pages: downtime-limit 300 ms, max-bandwidth 1 GiB/s to converge")
            relaxed = True

    try:
        run.step(f"caps {dict(rec.caps)}, params {dict(rec.params)}; migrate while the guest runs")
        info = vm.save(run.out, caps=rec.caps, params=rec.params, timeout=90, on_poll=on_poll)
        run.facts.update(_migration_facts(info))
        if not info.get("xbzrle-cache", {}).get("pages"):
            raise QemuError(f"{rec.name}: QEMU sent no XBZRLE pages: {info}")
        vm.quit()
    except BaseException:
        vm.kill()
        raise


def _produce_background_snapshot(run: _Run) -> None:
    rec = run.recipe
    vm = _start_counting(run, count=3)
    try:
        try:
            vm.set_caps(rec.caps)
        except QemuError as exc:
            raise RecipeUnavailable(f"{rec.name}: {exc.desc or exc}") from exc
        info = vm.save(run.out)
        run.step("migrate with background-snapshot while the guest runs (it must have run: "
                 "7.2 aborts on a never-started guest)")
        run.facts.update(_migration_facts(info))
        vm.quit()
    except BaseException:
        vm.kill()
        raise


def _produce_xen_devices(run: _Run) -> None:
    with run.vm("source") as vm:
        vm.cmd("xen-save-devices-state", filename=str(run.out.absolute()), live=False)
        run.step("xen-save-devices-state writes the file itself (device state only)")


def _produce_postcopy(run: _Run) -> None:
    """A postcopy-ram source needs a live return path (it waits for the destination's SHUT
    before it completes), so the stream runs through ``tee`` into a real destination."""
    rec = run.recipe
    data, back = run.work / "data.fifo", run.work / "return-path.fifo"
    run.work.mkdir(parents=True, exist_ok=True)
    for fifo in (data, back):
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
    part = run.out.with_name(run.out.name + ".part")
    src = run.vm("source")
    dst = run.vm("destination", incoming=True)
    try:
        _postcopy_through_fifos(run, src, dst, data, back, part)
    finally:
        for fifo in (data, back):  # release any helper still blocked opening a FIFO
            try:
                os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
            except OSError:
                pass
            fifo.unlink(missing_ok=True)


def _postcopy_through_fifos(run: _Run, src: QemuVM, dst: QemuVM, data: Path, back: Path, part: Path) -> None:
    rec = run.recipe
    q = shlex.quote
    with src, dst:
        dst.set_caps(rec.caps)
        src.set_caps(rec.caps)
        dst.cmd("migrate-incoming", uri=f"exec:exec 3<&0; (cat <&3 >{q(str(back))}) & cat {q(str(data))}")
        run.out.unlink(missing_ok=True)
        src.migrate(f"exec:exec 3<&0; cat {q(str(back))} & "
                    f"(tee {q(str(part))} <&3 >{q(str(data))} && mv -f {q(str(part))} {q(str(run.out))}) &")
        try:
            info = src.wait_migration(60)
        except QemuError as exc:
            tail = dst.stderr_tail()
            if "serfault" in tail or "userfault" in tail.lower():
                raise RecipeUnavailable(f"{rec.name}: destination lacks userfaultfd: {tail}") from exc
            raise QemuError(f"{exc}\n--- destination stderr ---\n{tail}") from exc
        run.facts.update(_migration_facts(info))
        deadline = time.monotonic() + 30
        while not run.out.exists() or dst.status() == "inmigrate":
            if time.monotonic() > deadline:
                raise QemuError(f"{rec.name}: stream or destination did not finish", stderr_tail=dst.stderr_tail())
            time.sleep(0.02)
        run.facts["destination_status"] = dst.status()
        run.facts["destination_migrate_status"] = dst.query_migrate().get("status")
        run.step("destination: -incoming defer, postcopy-ram, migrate-incoming from a FIFO; "
                 "return path through a second FIFO")
        run.step("source: postcopy-ram, migrate to exec: tee FILE into the data FIFO, reading the "
                 "return path FIFO; poll query-migrate until completed (never switched to postcopy)")


def _fill_random(path: Path, size: int, chunk: int = 4 << 20) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def _produce_random_ram(run: _Run) -> None:
    rec = run.recipe
    run.work.mkdir(parents=True, exist_ok=True)
    backing = run.work / "ram.bin"
    size = 1 << 30
    _fill_random(backing, size)
    run.step("guest RAM backing file pre-filled with os.urandom in 4 MiB chunks")
    try:
        backend = f"memory-backend-file,id=mem,size={size},mem-path={escape_option(backing.absolute())},share=off"
        args = ("-object", backend, *rec.args)
        with run.vm("source", args=args) as vm:
            info = vm.save(run.out, caps=rec.caps, params=rec.params, timeout=600)
            run.step("migrate with max-bandwidth lifted, VM never started")
            run.facts.update(_migration_facts(info))
    finally:
        backing.unlink(missing_ok=True)


def _produce_file(run: _Run) -> None:
    """``migrate`` to a ``file:`` URI (QEMU >= 8.2), which mapped-ram needs (a seekable channel)."""
    rec = run.recipe
    with run.vm("source") as vm:
        vm.set_caps(rec.caps)
        vm.set_params(rec.params)
        run.out.unlink(missing_ok=True)
        vm.migrate("file:" + str(run.out))
        info = vm.wait_migration(120)
        run.step("migrate to file:FILE with the VM never started; poll query-migrate until completed")
        run.facts.update(_migration_facts(info))


def _produce_multifd(run: _Run) -> None:
    """Migrate a running guest with multifd between two QEMUs through a unix-socket relay that
    keeps the main channel (the connection that starts with ``QEVM``); the multifd channels
    (64-byte hello with magic 0x11223344) are relayed and counted, not kept."""
    rec = run.recipe
    run.work.mkdir(parents=True, exist_ok=True)
    dst_sock, relay_sock = run.work / "dst.sock", run.work / "relay.sock"
    src = _start_counting(run)
    try:
        with run.vm("destination", incoming=True, paused=False, serial=True,
                    boot_sector=counting_boot_sector(**rec.guest)) as dst:
            for vm in (src, dst):
                vm.set_caps(rec.caps)
                vm.set_params(rec.params)
            dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
            with _Relay(relay_sock, dst_sock, run.out) as relay:
                src.migrate(f"unix:{relay_sock}")
                info = src.wait_migration(60)
                deadline = time.monotonic() + 30
                while dst.status() == "inmigrate" or not relay.finished():
                    if time.monotonic() > deadline:
                        raise QemuError(f"{rec.name}: destination or relay did not finish",
                                        stderr_tail=dst.stderr_tail())
                    time.sleep(0.02)
            run.facts.update(_migration_facts(info))
            run.facts["destination_status"] = dst.status()
            run.facts["channels"] = relay.kinds
            counts = src.counts()
            run.facts["count_at_save"] = counts[-1] if counts else None
        run.step("destination: multifd, migrate-incoming unix:dst.sock; source: multifd, migrate to "
                 "unix:relay.sock; the relay copies every connection to dst.sock and writes the main one")
        src.quit()
    except BaseException:
        src.kill()
        raise


class _Relay:
    """Accept connections on ``listen``, connect each to ``target``, copy both ways, keep the main one."""

    def __init__(self, listen: Path, target: Path, out: Path) -> None:
        self.target, self.out = target, out
        listen.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(16)
        self.server.settimeout(0.1)
        self.kinds: list[str] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, name="relay-accept", daemon=True)

    def __enter__(self) -> _Relay:
        self.acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        self.acceptor.join(5)
        self.server.close()
        for t in self.threads:
            t.join(5)

    def finished(self) -> bool:
        return self.out.exists() and not any(t.is_alive() for t in self.threads)

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(str(self.target))
            t = threading.Thread(target=self._pump, args=(conn, peer), daemon=True)
            back = threading.Thread(target=self._copy, args=(peer, conn, None), daemon=True)
            self.threads += [t, back]
            t.start()
            back.start()

    def _pump(self, conn: socket.socket, peer: socket.socket) -> None:
        head = b""
        while len(head) < 4:
            chunk = conn.recv(4 - len(head))
            if not chunk:
                break
            head += chunk
        main = head == b"QEVM"
        self.kinds.append("main" if main else head.hex())
        part = self.out.with_name(self.out.name + ".part")
        with open(part, "wb") if main else open(os.devnull, "wb") as sink:
            sink.write(head)
            peer.sendall(head)
            self._copy(conn, peer, sink)
        if main:
            part.replace(self.out)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket, sink: Any) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if sink is not None:
                    sink.write(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


_PRODUCERS: dict[str, Callable[[_Run], None]] = {
    "paused": _produce_paused,
    "running": _produce_running,
    "xbzrle": _produce_xbzrle,
    "postcopy": _produce_postcopy,
    "background-snapshot": _produce_background_snapshot,
    "xen-devices": _produce_xen_devices,
    "random-ram": _produce_random_ram,
    "file": _produce_file,
    "multifd": _produce_multifd,
}


# ----------------------------------------------------------------- generate


def _scrub(value: Any, replacements: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for old, new in replacements:
            value = value.replace(old, new)
        return value
    if isinstance(value, Mapping):
        return {k: _scrub(v, replacements) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, replacements) for v in value]
    return value


def generate_with_provenance(
    recipe: str | Recipe,
    dest_dir: Path,
    *,
    binary: str | None = None,
    keep_workdir: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Make the stream ``dest_dir/<name>.mig`` with real QEMU; return it and its provenance."""
    rec = RECIPES[recipe] if isinstance(recipe, str) else recipe
    command = qemu_command(rec.qemu_version, binary)
    exe = command[0] if rec.qemu_version is None else None
    check_available(rec, exe)
    dest = Path(dest_dir).absolute()
    dest.mkdir(parents=True, exist_ok=True)
    expose(dest, rec.qemu_version)  # the stream, the work directories and FIFOs live here
    out = dest / f"{rec.name}.mig"
    work = dest / ".work" / rec.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = _Run(rec, out, work, exe)
    started = time.monotonic()
    try:
        _PRODUCERS[rec.kind](run)
    finally:
        for _, vm in run.vms:
            if vm.is_running():
                vm.kill()
    seconds = round(time.monotonic() - started, 3)
    if not out.is_file() or out.stat().st_size == 0:
        raise QemuError(f"{rec.name}: QEMU produced no stream")
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    replacements = [(str(work), "$WORKDIR"), (str(dest), "$CORPUS"), (command[0], Path(command[0]).name)]
    provenance = {
        "name": rec.name,
        "file": out.name,
        "summary": rec.summary,
        "qemu": qemu_version(exe, release=rec.qemu_version),
        "recipe": _scrub(dataclasses.asdict(rec), []),
        "fingerprint": rec.fingerprint(),
        "vms": [
            {"role": role, "argv": _scrub(vm.argv, replacements),
             "command_line": _scrub(shlex.join(vm.argv), replacements),
             "qmp": _scrub(vm.transcript, replacements)}
            for role, vm in run.vms
        ],
        "steps": run.steps,
        "facts": run.facts,
        "size": out.stat().st_size,
        "sha256": digest.hexdigest(),
        "seconds": seconds,
    }
    if not keep_workdir:
        shutil.rmtree(work, ignore_errors=True)
        try:
            (dest / ".work").rmdir()
        except OSError:
            pass
    return out, provenance


def generate(recipe: str | Recipe, dest_dir: Path, *, binary: str | None = None) -> Path:
    """Make the stream ``dest_dir/<name>.mig`` with real QEMU and return its path."""
    return generate_with_provenance(recipe, dest_dir, binary=binary)[0]


class Corpus(Mapping[str, Path]):
    """Golden streams in ``directory``, generated on first use and cached.

    A read-only mapping name -> stream path: ``corpus[name]`` (or
    ``corpus.get(name)``) generates the stream the first time and returns
    its path; iterating lists :func:`names` (without heavy recipes; those
    can still be looked up by name).  ``provenance(name)`` says how a stream
    was made, and ``provenance.json`` in the directory always holds every
    stream generated so far.  With ``reuse=True`` a stream already in the
    directory is reused when its provenance names the same QEMU version and
    recipe fingerprint.
    """

    PROVENANCE_FILE = "provenance.json"

    def __init__(self, directory: Path, *, binary: str | None = None, reuse: bool = False) -> None:
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self._lock = threading.RLock()
        self._paths: dict[str, Path] = {}
        self._provenance: dict[str, dict[str, Any]] = {}
        #: name -> why this QEMU build or host cannot make the stream
        self.unavailable: dict[str, str] = {}
        self._qemu: str | None = None
        self._qemu_of: dict[str, str] = {}
        if reuse:
            self._load_previous()

    @property
    def qemu(self) -> str:
        """``qemu-system-x86_64 --version`` of the QEMU that makes the streams."""
        if self._qemu is None:
            self._qemu = qemu_version(self.binary)
        return self._qemu

    def qemu_of(self, recipe: Recipe) -> str:
        """``--version`` of the QEMU that makes ``recipe`` (the system's, or a release's)."""
        if recipe.qemu_version is None:
            return self.qemu
        if recipe.qemu_version not in self._qemu_of:
            self._qemu_of[recipe.qemu_version] = qemu_version(release=recipe.qemu_version)
        return self._qemu_of[recipe.qemu_version]

    def _load_previous(self) -> None:
        try:
            previous = json.loads((self.directory / self.PROVENANCE_FILE).read_text())
        except (OSError, ValueError):
            return
        for name, prov in previous.get("streams", {}).items():
            rec = RECIPES.get(name)
            path = self.directory / str(prov.get("file", ""))
            if (rec is not None and prov.get("fingerprint") == rec.fingerprint()
                    and prov.get("qemu") == self._version_if_present(rec) and path.is_file()
                    and path.stat().st_size == prov.get("size")):
                self._paths[name] = path
                self._provenance[name] = prov

    def _version_if_present(self, recipe: Recipe) -> str | None:
        try:
            return self.qemu_of(recipe)
        except QemuError:  # that QEMU is not installed: nothing made by it is reused
            return None

    # Mapping
    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(names())

    def __contains__(self, name: object) -> bool:
        return name in RECIPES

    def __getitem__(self, name: str) -> Path:
        """The stream ``name``, generated now if this corpus does not have it yet.

        Raises KeyError for an unknown name and :class:`RecipeUnavailable`
        when this QEMU cannot make it.
        """
        rec = self.recipe(name)
        with self._lock:
            if name in self._paths:
                return self._paths[name]
            if name in self.unavailable:
                raise RecipeUnavailable(self.unavailable[name])
            try:
                binary = self.binary if rec.qemu_version is None else None  # binary: the system's QEMU
                path, prov = generate_with_provenance(rec, self.directory, binary=binary)
            except RecipeUnavailable as exc:
                self.unavailable[name] = str(exc)
                self._write_provenance()
                raise
            self._paths[name] = path
            self._provenance[name] = prov
            self._write_provenance()
            return path

    def names(self, *, include_heavy: bool = False) -> list[str]:
        return names(include_heavy=include_heavy)

    def recipe(self, name: str) -> Recipe:
        try:
            return RECIPES[name]
        except KeyError:
            raise KeyError(f"no corpus recipe {name!r}; known: {', '.join(RECIPES)}") from None

    def provenance(self, name: str) -> dict[str, Any]:
        """How stream ``name`` was made (generating it if needed)."""
        self[name]
        return self._provenance[name]

    def generated(self) -> dict[str, Path]:
        """Name -> path of the streams generated (or reused) so far."""
        with self._lock:
            return dict(self._paths)

    def generate_all(self, selection: Iterable[str] | None = None) -> dict[str, Path]:
        """Generate every (or every selected) stream; unavailable ones are skipped and recorded."""
        for name in self.names() if selection is None else selection:
            try:
                self[name]
            except RecipeUnavailable:
                pass
        return self.generated()

    def _write_provenance(self) -> None:
        doc = {
            "qemu": self.qemu,
            "streams": {n: self._provenance[n] for n in RECIPES if n in self._provenance},
            "unavailable": dict(self.unavailable),
        }
        tmp = self.directory / (self.PROVENANCE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.directory / self.PROVENANCE_FILE)
