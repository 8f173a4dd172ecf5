"""A private libvirtd (with its virtlogd) for the tests, and a counting guest defined in it.

:class:`LibvirtDaemon` runs Debian's ``virtlogd`` and ``libvirtd`` (libvirt
9.0 on bookworm) as root, inside a mount namespace of their own
(``unshare --mount``), where ``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt`` and ``/var/cache/libvirt`` are
bind mounts of directories under the daemon's ``root``.  So the daemons
read the ``qemu.conf`` written here and nothing of the host's libvirt
set-up is read or changed, apart from those five directories created empty
as mount points where they are missing.  The client socket lies outside
the namespace (``unix_sock_dir``), and clients reach it with
:attr:`LibvirtDaemon.uri` (``qemu:///system?socket=...``); every path a
test hands to libvirt (images, logs, save files) lies under ``root``,
which is the same directory inside the namespace and out.

``qemu.conf`` runs QEMU as root, without mount namespaces, cgroups or a
security driver, and leaves file ownership alone, which is what a
container without systemd, cgroup delegation or AppArmor allows; no
``libvirt-qemu`` user is needed then.  ``save_image_format`` is the
compression of ``virsh save``/``managedsave`` images; :meth:`restart`
changes it.

:class:`Domain` defines a guest that boots vmferry's counting boot sector
from a disk (IDE on i440fx, SATA on q35) with COM1 written to a log file,
and reads its counts.  Not from a floppy: under KVM here, SeaBIOS waits
for the floppy controller's IRQ 6 in ``sti; nop; pause; cli`` windows, and
the in-kernel PIC of this host's KVM (kvm-pvm) leaves it pending in IRR,
so most boots hang at "Booting from Floppy..."; SeaBIOS polls the ATA and
AHCI controllers instead (docs/libvirt.md).

:meth:`LibvirtDaemon.release_emulator` writes an ``<emulator>`` for another
QEMU release (11.1 in its Debian chroot): a script that libvirt execs, which
execs QEMU in the chroot with libvirt's directories visible inside.

The daemons are stopped by pid (SIGTERM, then SIGKILL) when the context
ends; libvirtd leaves its QEMUs running when it stops, so
:meth:`LibvirtDaemon.stop` destroys every running domain first.  The
module-scoped fixture :func:`libvirtd` gives a test module one daemon.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator
from xml.sax.saxutils import escape

import pytest

from vmferry.live.qemu.guest import parse_counts
from vmferry.live.qemu.process import release_root, write_boot_image

#: The directories libvirtd and virtlogd use as root, each replaced by one under the daemon's root.
PRIVATE_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
#: The compressions ``save_image_format`` names in libvirt 9.0 (src/qemu/qemu_saveimage.c), and the program each runs.
#: The user libvirtd (Debian's build) runs QEMU as by default, and the id Debian gives it.
QEMU_USER = "libvirt-qemu"
QEMU_UID = 64055
SAVE_FORMATS = {"raw": None, "gzip": "gzip", "bzip2": "bzip2", "xz": "xz", "lzop": "lzop"}


class LibvirtError(RuntimeError):
    """A daemon did not start, or a virsh command failed."""


def libvirt_missing() -> str | None:
    """Why the daemon cannot run here (None when it can)."""
    for prog in ("libvirtd", "virtlogd", "virsh", "unshare", "nsenter", "qemu-system-x86_64"):
        if shutil.which(prog) is None and not Path("/usr/sbin", prog).exists():
            return f"{prog} not found (scripts/ensure-libvirt.sh installs libvirt)"
    if os.geteuid() != 0:
        return "libvirtd runs QEMU as root here: the tests need root"
    return None


def kvm_missing() -> str | None:
    """Why a domain of type ``kvm`` cannot run here (None when /dev/kvm opens for reading and writing)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def _which(prog: str) -> str:
    found = shutil.which(prog) or (f"/usr/sbin/{prog}" if Path("/usr/sbin", prog).exists() else None)
    if found is None:
        raise LibvirtError(f"{prog} not found")
    return found


class LibvirtDaemon:
    """virtlogd + libvirtd in a private mount namespace; a context manager."""

    def __init__(self, root: Path | None = None, *, save_image_format: str = "raw",
                 start_timeout: float = 60.0) -> None:
        self._own_root = root is None
        # short: the socket path must fit in sun_path (108 bytes)
        self.root = Path(tempfile.mkdtemp(prefix="vf-lv-")) if root is None else Path(root)
        self.save_image_format = save_image_format
        self.start_timeout = start_timeout
        self.sock_dir = self.root / "sock"
        self.uri = f"qemu:///system?socket={self.sock_dir / 'libvirt-sock'}"
        self.logd: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ files

    def private(self, path: str) -> Path:
        """The directory under ``root`` that stands for ``path`` (one of :data:`PRIVATE_DIRS`) in the namespace."""
        return self.root / path.strip("/").replace("/", "_")

    def managed_save_path(self, name: str) -> Path:
        """Where ``virsh managedsave NAME`` writes its image, as seen from outside the namespace."""
        return self.private("/var/lib/libvirt") / "qemu" / "save" / f"{name}.save"

    def _write_config(self) -> None:
        for d in PRIVATE_DIRS:
            self.private(d).mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        etc = self.private("/etc/libvirt")
        log = self.private("/var/log/libvirt")
        (etc / "libvirtd.conf").write_text(textwrap.dedent(f"""\
            unix_sock_dir = "{self.sock_dir}"
            unix_sock_group = "root"
            unix_sock_rw_perms = "0700"
            auth_unix_ro = "none"
            auth_unix_rw = "none"
            log_outputs = "3:file:{log}/libvirtd.log"
            """))
        (etc / "virtlogd.conf").write_text(f'log_outputs = "3:file:{log}/virtlogd.log"\n')
        fmt = self.save_image_format
        (etc / "qemu.conf").write_text(textwrap.dedent(f"""\
            user = "root"
            group = "root"
            dynamic_ownership = 0
            remember_owner = 0
            security_driver = "none"
            namespaces = []
            cgroup_controllers = []
            save_image_format = "{fmt}"
            """))

    def _accounts(self) -> list[tuple[Path, str]]:
        """Copies of /etc/passwd and /etc/group that add the ``libvirt-qemu`` user and its groups.

        libvirtd looks the user up before it reads qemu.conf's ``user`` (its
        compiled-in default, Debian's ``libvirt-qemu``), and fails to start
        without it; libvirt-daemon-system's postinst would create it.  The
        copies are bind-mounted in the daemons' namespace only.
        """
        out: list[tuple[Path, str]] = []
        for name, line in (("passwd", f"{QEMU_USER}:x:{QEMU_UID}:{QEMU_UID}:libvirt qemu:/nonexistent:/usr/sbin/nologin"),
                           ("group", f"{QEMU_USER}:x:{QEMU_UID}:")):
            text = Path("/etc", name).read_text()
            if not any(row.split(":", 1)[0] == QEMU_USER for row in text.splitlines()):
                text = text.rstrip("\n") + "\n" + line + "\n"
            copy = self.root / f"etc_{name}"
            copy.write_text(text)
            out.append((copy, f"/etc/{name}"))
        return out

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LibvirtDaemon:
        if self.daemon is not None:
            raise LibvirtError("libvirtd already started")
        self._write_config()
        for d in PRIVATE_DIRS:
            Path(d).mkdir(parents=True, exist_ok=True)  # a mount point; left empty on the host
        binds = [(self.private(d), d) for d in PRIVATE_DIRS] + self._accounts()
        mounts = " && ".join(f"mount --bind {src} {dst}" for src, dst in binds)
        etc = self.private("/etc/libvirt")
        run = self.private("/run/libvirt")
        log = open(self.root / "daemons.log", "ab")  # noqa: SIM115 - kept by the children
        try:
            self.logd = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f"{mounts} && exec {_which('virtlogd')} -f {etc}/virtlogd.conf -p {run}/virtlogd.pid"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait(lambda: (run / "virtlogd-sock").exists(), "virtlogd", self.logd)
            self.daemon = subprocess.Popen(
                ["nsenter", f"--mount=/proc/{self.logd.pid}/ns/mnt", _which("libvirtd"),
                 "-f", f"{etc}/libvirtd.conf", "-p", f"{run}/libvirtd.pid"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait(self._answers, "libvirtd", self.daemon)
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()
        return self

    def _answers(self) -> bool:
        return subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True,
                              timeout=30).returncode == 0

    def _wait(self, ready: Any, what: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LibvirtError(f"{what} exited with {proc.returncode}: {self.log_tail()}")
            if ready():
                return
            time.sleep(0.1)
        raise LibvirtError(f"{what} did not come up in {self.start_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        text = ""
        for p in (self.root / "daemons.log", self.private("/var/log/libvirt") / "libvirtd.log"):
            if p.exists():
                text += p.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, destroy: bool = True) -> None:
        """Destroy the running domains (unless not ``destroy``), then stop libvirtd and virtlogd by pid."""
        if destroy and self.daemon is not None and self.daemon.poll() is None:
            try:
                for name in self.virsh("list", "--name").split():
                    self.virsh("destroy", name, check=False)
            except (LibvirtError, subprocess.TimeoutExpired):
                pass
        for proc in (self.daemon, self.logd):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.daemon = self.logd = None

    def restart(self, save_image_format: str | None = None) -> None:
        """Stop and start again with another ``save_image_format``; running domains run on (libvirtd reconnects)."""
        self.stop(destroy=False)
        if save_image_format is not None:
            self.save_image_format = save_image_format
        self.start()

    def __enter__(self) -> LibvirtDaemon:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def release_emulator(self, release: str) -> Path:
        """An executable for a domain's ``<emulator>`` that runs QEMU ``release`` (e.g. ``"11.1"``) in its chroot.

        libvirt execs it like a QEMU binary, to probe its capabilities over QMP
        and to run domains.  It goes into a mount namespace of its own (made
        from the daemons' one, so libvirt's private directories are the ones
        bound here), bind-mounts ``/proc``, ``/dev``, libvirt's directories
        (:data:`PRIVATE_DIRS`: monitor sockets, pid files, the master key) and
        the daemon's root (disks, serial logs, save images) at the same paths
        inside the chroot (:func:`vmferry.live.qemu.process.release_root`),
        and execs ``chroot ROOT qemu-system-x86_64`` with libvirt's arguments.
        Every step is an ``exec``: the process libvirt started becomes QEMU,
        keeps the file descriptors libvirt passes, and the mounts end with it.
        libvirt caches the capabilities per emulator path (under the private
        ``/var/cache/libvirt``) until the file changes, so the script is written
        once and the first domain of a daemon pays the probe (about 4 s here).
        """
        root = release_root(release)
        dirs = " ".join(shlex.quote(d) for d in ("/proc", "/dev", *PRIVATE_DIRS, str(self.root)))
        inner = ('set -e; r=$1; shift; for d in ' + dirs + '; do mkdir -p "$r$d"; mount --rbind "$d" "$r$d"; done; '
                 'exec chroot "$r" qemu-system-x86_64 "$@"')
        script = (f"#!/bin/sh\n# QEMU {release} in {root}, for libvirt\n"
                  f"exec {_which('unshare')} --mount --propagation private sh -c {shlex.quote(inner)} "
                  f"sh {shlex.quote(str(root))} \"$@\"\n")
        path = self.root / f"qemu-{release}"
        if not path.exists() or path.read_text() != script:  # a new ctime would make libvirt probe it again
            path.write_text(script)
            path.chmod(0o755)
        return path

    # ------------------------------------------------------------------ virsh

    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """Run ``virsh -c URI ARGS``; its stdout (LibvirtError with stderr when it fails and ``check``)."""
        r = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout


#: Devices a domain may have besides its disk and serial port (the XML libvirt is given; it adds the rest, e.g. a
#: pcie-root-port for each PCI device on q35).  Without ``usb`` and ``balloon`` the domain has neither.
DEVICES = {
    "usb": "<controller type='usb' model='piix3-uhci'/><input type='tablet' bus='usb'/>",
    "vga": "<video><model type='vga'/></video><graphics type='vnc' port='-1' listen='127.0.0.1'/>",
    "cirrus": "<video><model type='cirrus'/></video><graphics type='vnc' port='-1' listen='127.0.0.1'/>",
    "e1000": "<interface type='user'><model type='e1000'/></interface>",
    "virtio-net": "<interface type='user'><model type='virtio'/></interface>",
    "virtio-serial": "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
    "balloon": "<memballoon model='virtio'/>",
    "rng": "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
}


class Domain:
    """A counting guest defined in a :class:`LibvirtDaemon`: the boot sector on a disk, COM1 to a log file.

    ``devices`` names more devices (:data:`DEVICES`).  ``acpi`` gives the
    domain ``<features><acpi/></features>``; without it libvirt 9.0 runs QEMU
    with ``-no-acpi``, an option QEMU 11.1 no longer has.
    """

    def __init__(self, daemon: LibvirtDaemon, name: str, machine: str, *, kind: str = "qemu",
                 memory_mib: int = 64, devices: tuple[str, ...] = (), acpi: bool = False) -> None:
        self.daemon = daemon
        self.name = name
        self.machine = machine
        self.kind = kind
        self.memory_mib = memory_mib
        self.devices = devices
        self.acpi = acpi
        self.dir = daemon.root / "domains" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.boot_image = self.dir / "boot.img"
        self.serial_log = self.dir / "serial.log"

    def xml(self) -> str:
        # a disk, not a floppy: see the module's docstring
        bus, dev = ("sata", "sda") if "q35" in self.machine else ("ide", "hda")
        disk = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file='{escape(str(self.boot_image))}'/><target dev='{dev}' bus='{bus}'/></disk>")
        boot = "hd"
        extra = "".join(DEVICES[d] for d in self.devices)
        if "usb" not in self.devices:
            extra += "<controller type='usb' model='none'/>"
        if "balloon" not in self.devices:
            extra += "<memballoon model='none'/>"
        return textwrap.dedent(f"""\
            <domain type='{self.kind}'>
              <name>{escape(self.name)}</name>
              <memory unit='MiB'>{self.memory_mib}</memory>
              <vcpu>1</vcpu>
              <os>
                <type arch='x86_64' machine='{escape(self.machine)}'>hvm</type>
                <boot dev='{boot}'/>
              </os>
              {"<features><acpi/></features>" if self.acpi else ""}
              <on_poweroff>destroy</on_poweroff>
              <on_reboot>restart</on_reboot>
              <on_crash>destroy</on_crash>
              <devices>
                <emulator>{_which('qemu-system-x86_64')}</emulator>
                {disk}
                <serial type='file'>
                  <source path='{escape(str(self.serial_log))}' append='on'/>
                  <target port='0'/>
                </serial>
                {extra}
              </devices>
            </domain>
            """)

    def define(self) -> Domain:
        write_boot_image(self.boot_image)
        self.serial_log.write_bytes(b"")
        path = self.dir / "domain.xml"
        path.write_text(self.xml())
        self.daemon.virsh("define", str(path))
        return self

    def start(self) -> None:
        self.daemon.virsh("start", self.name)

    def state(self) -> str:
        return self.daemon.virsh("domstate", self.name).strip()

    def counts(self) -> list[int]:
        return parse_counts(self.serial_log.read_text(errors="replace"))

    def wait_for_count(self, n: int, timeout: float = 60.0) -> int:
        """Wait until the guest has printed at least ``n`` numbers in all; its last count."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.counts()
            if c and len(c) >= n:
                return c[-1]
            time.sleep(0.1)
        raise LibvirtError(f"{self.name}: the guest printed {self.counts()[-5:]} in {timeout:.0f} s, wanted {n} counts")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[LibvirtDaemon]:
    """A private libvirtd for a test module (skipped where libvirt is missing, failed so in CI)."""
    missing = libvirt_missing()
    if missing is not None:
        if _in_ci():
            pytest.fail(f"CI is set and {missing}", pytrace=False)
        pytest.skip(missing + " (CI unset, so skipping)")
    with LibvirtDaemon() as daemon:
        yield daemon
