"""Run a real ``qemu-system-x86_64`` and drive it over QMP, synchronously.

This is an orchestration-layer module: it starts processes, owns files and
sockets and sleeps.  It promises:

* :class:`QemuVM` starts one QEMU (TCG unless given another ``accel``,
  ``-nodefaults -display none``, QMP on a unix socket in its work
  directory), optionally with the counting
  boot sector of :mod:`vmferry.live.qemu.guest` on a floppy and COM1 logged to a file,
  and offers a small blocking API: QMP commands, migration to and from
  files, the guest's serial counter, and a clean or forced shutdown.
* Every failure surfaces as :class:`QemuError`, whose message includes what
  QEMU said: the QMP ``error-desc``/``desc`` and the tail of QEMU's stderr.
* QMP goes through the ``qemu.qmp`` library (``QMPClient``); its asyncio loop
  runs in a private thread, so the blocking API also works from threads and
  from inside other event loops.

The QEMU binary is ``$VMFERRY_QEMU`` or ``qemu-system-x86_64`` on ``PATH``
(the system's QEMU, 7.2 on Debian bookworm).  ``qemu_version="5.2"``,
``"10.0"`` or ``"11.1"`` runs that QEMU release instead, as ``chroot ROOT
qemu-system-x86_64`` in the Debian chroot (bullseye, trixie, forky) that
``scripts/ensure-qemu-release.sh RELEASE`` builds (:data:`RELEASE_CHROOTS`,
:func:`release_root`).  The host directories QEMU must see (``/proc``, ``/dev``, the temporary directory
and every work directory or stream file the harness hands to QEMU) are
bind-mounted at the same path inside the chroot at first use, so every path
means the same inside and outside.  ``chroot`` execs QEMU: the process id is
QEMU's own, and the parent-death signal reaches QEMU.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .guest import counting_boot_sector, parse_counts

__all__ = [
    "QemuError",
    "QemuVM",
    "escape_option",
    "exec_load_uri",
    "exec_save_uri",
    "find_qemu",
    "RELEASES",
    "RELEASE_CHROOTS",
    "ReleaseChroot",
    "qemu10_root",
    "release_root",
    "qemu_binary",
    "qemu_command",
    "qemu_version",
    "write_boot_image",
]

_T = TypeVar("_T")

#: Size the boot image is padded to: a 1.44 MB floppy, so SeaBIOS and QEMU's
#: floppy controller see a standard geometry.
FLOPPY_SIZE = 1_474_560
#: ``sun_path`` holds 108 bytes on Linux; leave room for the terminating NUL.
_MAX_UNIX_PATH = 100


class QemuError(Exception):
    """QEMU refused, failed or died; the message says what QEMU reported.

    ``stderr_tail`` holds the last lines QEMU wrote to stderr (may be empty),
    ``desc`` QEMU's own error text when there is one (QMP ``desc`` or
    ``query-migrate``'s ``error-desc``).
    """

    def __init__(self, message: str, *, stderr_tail: str = "", desc: str | None = None) -> None:
        self.message = message
        self.stderr_tail = stderr_tail
        self.desc = desc
        text = message
        if stderr_tail.strip():
            text += "\n--- QEMU stderr (tail) ---\n" + stderr_tail.rstrip()
        super().__init__(text)


def qemu_binary() -> str:
    """The QEMU binary to run: ``$VMFERRY_QEMU`` or ``qemu-system-x86_64``."""
    return os.environ.get("VMFERRY_QEMU") or "qemu-system-x86_64"


def qemu_version(binary: str | None = None, *, release: str | None = None) -> str:
    """The first line of ``qemu-system-x86_64 --version`` (of QEMU ``release``, see :func:`qemu_command`)."""
    command = qemu_command(release, binary)
    out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise QemuError(f"{shlex.join(command)} --version failed with status {out.returncode}",
                        stderr_tail=out.stderr)
    return out.stdout.splitlines()[0].strip() if out.stdout else ""


# ---- QEMU releases in Debian chroots (issue 13) ----------------------------


@dataclass(frozen=True)
class ReleaseChroot:
    """Where QEMU ``release`` lives: a Debian ``suite`` chroot at ``$env`` or ``default_root``."""

    release: str
    suite: str
    default_root: str
    env: str

    @property
    def install(self) -> str:
        return f"run scripts/ensure-qemu-release.sh {self.release} (or `make qemu-releases`) as root"


#: The QEMU releases besides the system's that :func:`qemu_command` runs, each in
#: the chroot ``scripts/ensure-qemu-release.sh RELEASE`` builds (same suites, roots
#: and variables as that script).
RELEASE_CHROOTS: dict[str, ReleaseChroot] = {c.release: c for c in (
    ReleaseChroot("5.2", "bullseye", "/var/cache/vmferry/qemu-5.2-bullseye", "VMFERRY_QEMU5_2_ROOT"),
    ReleaseChroot("10.0", "trixie", "/var/cache/vmferry/qemu-10.0-trixie", "VMFERRY_QEMU10_ROOT"),
    ReleaseChroot("11.1", "forky", "/var/cache/vmferry/qemu-11.1-forky", "VMFERRY_QEMU11_1_ROOT"),
)}
RELEASES = tuple(RELEASE_CHROOTS)
#: Where the Debian trixie chroot of QEMU 10.0 is cached (``$VMFERRY_QEMU10_ROOT`` overrides).
QEMU10_DEFAULT_ROOT = RELEASE_CHROOTS["10.0"].default_root
#: QEMU's path inside the chroot.
_CHROOT_QEMU = "/usr/bin/qemu-system-x86_64"
#: Host directories every chroot QEMU needs, bind-mounted at the same path.
_CHROOT_BINDS = ("/proc", "/dev")


def _release(release: str) -> ReleaseChroot:
    try:
        return RELEASE_CHROOTS[release]
    except KeyError:
        raise QemuError(f"unknown QEMU release {release!r}: None (the system's QEMU) "
                        f"or one of {', '.join(RELEASES)}") from None


def release_root(release: str) -> Path:
    """The Debian chroot holding QEMU ``release``; QemuError (saying how to build it) if missing."""
    chroot = _release(release)
    root = Path(os.environ.get(chroot.env) or chroot.default_root)
    if not (root / _CHROOT_QEMU.lstrip("/")).is_file():
        raise QemuError(f"QEMU {release} not found: no chroot with {_CHROOT_QEMU} at {root}; {chroot.install}")
    return root


def qemu10_root() -> Path:
    """The Debian trixie chroot holding QEMU 10.0 (:func:`release_root` of ``"10.0"``)."""
    return release_root("10.0")


# ---- end of the QEMU release table ------------------------------------------


def qemu_command(release: str | None = None, binary: str | None = None) -> list[str]:
    """The command that runs QEMU ``release`` (None: the system's, see :func:`find_qemu`).

    For a release of :data:`RELEASES` (``"5.2"``, ``"10.0"``, ``"11.1"``):
    ``[chroot, ROOT, "qemu-system-x86_64"]``, after making sure ``/proc``,
    ``/dev`` and the temporary directory are visible inside (see :func:`expose`).
    """
    if release is None:
        return [find_qemu(binary)]
    _release(release)
    if binary is not None:
        raise QemuError(f"give either a QEMU binary ({binary!r}) or a QEMU release ({release!r}), not both")
    root = release_root(release)
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    for path in (*_CHROOT_BINDS, tempfile.gettempdir()):
        expose(path, release)
    return [chroot, str(root), "qemu-system-x86_64"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def expose(path: str | os.PathLike[str], release: str | None = None) -> None:
    """Make the host directory ``path`` (or a file's directory) visible at the same path to QEMU ``release``.

    Nothing to do for the system's QEMU.  For a chroot QEMU: if no directory
    already bind-mounted covers ``path``, bind-mount the directory itself
    (idempotent: a directory and its chroot twin with the same device and
    inode are already bound; a lock file serialises concurrent callers).
    Needs root; raises QemuError otherwise.
    """
    if release is None:
        return
    root = release_root(release)
    host = Path(path).absolute()
    if not host.is_dir():
        host = host.parent
    if _visible(root, host):
        return
    if host == Path("/"):
        raise QemuError(f"refusing to bind-mount / into {root}")
    with open(root / ".vmferry-mount.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _visible(root, host):
            return
        inside = root / str(host).lstrip("/")
        inside.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "--bind", str(host), str(inside)],
                             capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0:
            raise QemuError(f"cannot show {host} to QEMU {release} in {root}: mount --bind failed "
                            f"with status {out.returncode} (needs root)", stderr_tail=out.stderr)


def _visible(root: Path, host: Path) -> bool:
    """Whether ``host`` or one of its parents is the same directory inside ``root``."""
    for d in (host, *host.parents):
        if d == Path("/"):
            return False
        if _same_file(d, root / str(d).lstrip("/")):
            return True
    return False


def find_qemu(binary: str | None = None) -> str:
    """The full path of ``binary`` (default: :func:`qemu_binary`); QemuError if absent."""
    name = binary or qemu_binary()
    found = shutil.which(name)
    if found is None:
        raise QemuError(
            f"QEMU binary {name!r} not found (set VMFERRY_QEMU or install Debian's qemu-system-x86)"
        )
    return found


def write_boot_image(path: Path, sector: bytes | None = None) -> Path:
    """Write the counting boot sector (or ``sector``) as a sparse 1.44 MB floppy image."""
    data = counting_boot_sector() if sector is None else sector
    if len(data) != 512 or data[510:] != b"\x55\xaa":
        raise ValueError("a boot sector is 512 bytes ending with 55 AA")
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(FLOPPY_SIZE)
    return path


def exec_save_uri(path: Path) -> str:
    """An ``exec:`` URI that writes the outgoing stream to ``path``.

    It is ``cat > PATH`` made safe against two races in QEMU 7.2:
    ``query-migrate`` says ``completed`` before QEMU has closed the pipe, and
    when it closes it, QEMU at once SIGTERMs (10 ms later SIGKILLs) the
    process it spawned if that has not exited yet; with a shell that execs
    the last command, that is ``cat`` itself, with up to a pipe-full of the
    stream not yet on disk.  So the data is copied by a detached ``cat``
    that writes ``PATH.part`` and renames it to ``PATH`` once it has seen
    EOF: ``PATH`` appears only when it is complete, which is what
    :meth:`QemuVM.save` waits for.
    """
    final = Path(path).absolute()
    part = final.with_name(final.name + ".part")
    q_part, q_final = shlex.quote(str(part)), shlex.quote(str(final))
    return f"exec:exec 3<&0; (cat <&3 >{q_part} && mv -f {q_part} {q_final}) &"


def exec_load_uri(path: Path) -> str:
    """An ``exec:`` URI that feeds the file ``path`` to an incoming migration."""
    return "exec:cat " + shlex.quote(str(Path(path).absolute()))


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # not glibc/Linux: no parent-death signal
        return None


#: Loaded before any fork: the child only calls into it (no dlopen after fork).
_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGKILL QEMU when the thread that started it exits."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def escape_option(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a comma is doubled)."""
    return str(value).replace(",", ",,")


class _LoopThread:
    """A private asyncio event loop running in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class QemuVM:
    """One real QEMU process with QMP, used as a context manager.

    ``machine`` goes to ``-machine`` (it may carry options, e.g.
    ``"pc,suppress-vmdesc=on"``) and ``args`` are appended to the command
    line.  ``memory`` is ``-m`` (None: leave it out), ``incoming`` adds
    ``-incoming defer``, ``paused`` adds ``-S``, ``boot_sector`` attaches the
    counting guest (True) or the given 512-byte sector as a raw floppy (as
    an IDE disk with ``boot_disk``: SeaBIOS polls a disk, while it waits for
    the floppy's interrupt, which the in-kernel PIC of a nested KVM can
    lose), ``serial`` connects COM1 to ``serial.log``.  QMP listens on
    ``qmp.sock``; QEMU's stdout and stderr go to ``qemu.log``; all of them in
    ``workdir`` (a fresh temporary directory, deleted on exit, when None).

    With ``die_with_parent`` (the default) the kernel kills QEMU when the
    thread that started it exits (Linux ``PR_SET_PDEATHSIG``), so a test run
    that is killed never leaves a QEMU behind; start long-lived QEMUs from a
    long-lived thread, or pass False.

    ``qemu_version`` picks the QEMU: None for the system's (``binary`` or
    ``$VMFERRY_QEMU``), or a release of :data:`RELEASES` (``"5.2"``,
    ``"10.0"``, ``"11.1"``) for a chroot one (see :func:`qemu_command`); it
    and ``binary`` exclude each other.  The stream files of :meth:`save` and
    :meth:`load` are made visible to a chroot QEMU automatically; call
    :meth:`expose` for any other host path handed to QEMU (e.g. in a raw
    ``migrate`` URI) outside the temporary directory.

    ``accel`` goes to ``-accel`` (default ``"tcg"``; ``"kvm"`` needs
    ``/dev/kvm``).
    """

    def __init__(
        self,
        machine: str = "pc",
        args: Sequence[str] = (),
        *,
        memory: str | None = "64M",
        incoming: bool = False,
        paused: bool = True,
        boot_sector: bool | bytes = False,
        boot_disk: bool = False,
        serial: bool = True,
        workdir: Path | None = None,
        binary: str | None = None,
        accel: str = "tcg",
        name: str = "vm",
        qmp_timeout: float = 30.0,
        start_timeout: float = 30.0,
        die_with_parent: bool = True,
        qemu_version: str | None = None,
    ) -> None:
        self.machine = machine
        self.extra_args = list(args)
        self.memory = memory
        self.incoming = incoming
        self.paused = paused
        self.boot_sector = boot_sector
        self.boot_disk = boot_disk
        self.serial = serial
        self.accel = accel
        self.name = name
        self.qmp_timeout = qmp_timeout
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        #: the QEMU release (None: the system's QEMU)
        self.qemu_version = qemu_version
        #: the command that runs QEMU (``[binary]``, or ``[chroot, ROOT, qemu-system-x86_64]``)
        self.command = qemu_command(qemu_version, binary)
        #: the QEMU binary (for a chroot QEMU: its path inside the chroot)
        self.binary = self.command[0] if qemu_version is None else _CHROOT_QEMU
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="vmferry-qemu-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.workdir / "serial.log"
        self.stderr_log = self.workdir / "qemu.log"
        self.boot_image = self.workdir / "boot.img"
        self._sock_dir: Path | None = None
        sock = self.workdir / "qmp.sock"
        if len(str(sock.absolute())) > _MAX_UNIX_PATH:
            self._sock_dir = Path(tempfile.mkdtemp(prefix="vmferry-qmp-"))
            sock = self._sock_dir / "qmp.sock"
        self.qmp_socket = sock.absolute()
        #: QMP commands sent with :meth:`cmd` (polling queries excluded), for provenance.
        self.transcript: list[dict[str, Any]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: _LoopThread | None = None
        self._client: Any = None

    # ------------------------------------------------------------------ setup

    @property
    def argv(self) -> list[str]:
        """The full QEMU command line."""
        argv = [
            *self.command,
            "-machine", self.machine,
            "-accel", self.accel,
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
        ]
        if self.memory is not None:
            argv += ["-m", self.memory]
        argv += [
            "-chardev", f"socket,id=qmp,path={escape_option(self.qmp_socket)},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        if self.serial:
            argv += ["-chardev", f"file,id=serial0,path={escape_option(self.serial_log.absolute())}",
                     "-serial", "chardev:serial0"]
        if self.boot_sector is not False:
            where = "ide" if self.boot_disk else "floppy"
            argv += ["-drive", f"file={escape_option(self.boot_image.absolute())},format=raw,if={where}"]
        if self.paused:
            argv.append("-S")
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv + self.extra_args

    def expose(self, path: str | os.PathLike[str]) -> None:
        """Make the host directory ``path`` (or a file's directory) visible to this QEMU (see :func:`expose`)."""
        expose(path, self.qemu_version)

    def start(self) -> QemuVM:
        """Start QEMU and connect to its QMP monitor."""
        if self._proc is not None:
            raise QemuError(f"{self.name}: already started")
        self.expose(self.workdir)
        self.expose(self.qmp_socket.parent)
        if self.boot_sector is not False:
            sector = None if self.boot_sector is True else bytes(self.boot_sector)
            write_boot_image(self.boot_image, sector)
        for stale in (self.qmp_socket, self.serial_log):
            stale.unlink(missing_ok=True)
        if self.serial:
            self.serial_log.touch()
        with open(self.stderr_log, "wb") as log:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        try:
            self._connect()
        except BaseException:
            self.kill()
            raise
        return self

    def _connect(self) -> None:
        from qemu.qmp import QMPClient  # the `qmp` extra

        deadline = time.monotonic() + self.start_timeout
        while not self.qmp_socket.exists():
            self._check_alive("while starting")
            if time.monotonic() > deadline:
                raise self._error(f"{self.name}: QMP socket did not appear within {self.start_timeout} s")
            time.sleep(0.01)
        self._loop = _LoopThread(f"qmp-{self.name}")
        last: BaseException | None = None
        while time.monotonic() < deadline:
            client = QMPClient(self.name)
            try:
                self._loop.run(client.connect(str(self.qmp_socket)), self.qmp_timeout)
                self._client = client
                return
            except Exception as exc:  # the socket may exist before QEMU listens on it
                last = exc
                self._check_alive("while connecting to QMP")
                time.sleep(0.05)
        raise self._error(f"{self.name}: could not connect to QMP: {last}")

    def __enter__(self) -> QemuVM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.quit()
        else:
            self.kill()

    # ---------------------------------------------------------------- process

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs (or before start)."""
        return None if self._proc is None else self._proc.poll()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines QEMU wrote to stdout/stderr."""
        try:
            text = self.stderr_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _error(self, message: str, desc: str | None = None) -> QemuError:
        return QemuError(message, stderr_tail=self.stderr_tail(), desc=desc)

    def _check_alive(self, doing: str) -> None:
        rc = self.returncode
        if self._proc is not None and rc is not None:
            raise self._error(f"{self.name}: QEMU exited with status {rc} {doing}")

    def quit(self, timeout: float = 10.0) -> int | None:
        """Ask QEMU to quit (QMP ``quit``), kill it if it does not; return its status."""
        if self._proc is None:
            self._cleanup()
            return None
        if self._proc.poll() is None and self._client is not None:
            try:
                self._execute("quit", {}, timeout=timeout)
            except QemuError:
                pass  # it may close the connection before answering
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout)
        self._cleanup()
        return self._proc.returncode

    def kill(self) -> int | None:
        """Kill QEMU at once (SIGKILL) and release everything."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(10)
        self._cleanup()
        return None if self._proc is None else self._proc.returncode

    def _cleanup(self) -> None:
        if self._client is not None and self._loop is not None:
            try:
                self._loop.run(self._client.disconnect(), 5)
            except Exception:  # the peer is gone; disconnect() re-raises why
                pass
        self._client = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self._own_workdir and (self._proc is None or self._proc.poll() is not None):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -------------------------------------------------------------------- QMP

    def _execute(self, name: str, args: Mapping[str, Any], timeout: float | None = None) -> Any:
        from qemu.qmp import ExecuteError

        if self._client is None or self._loop is None:
            raise self._error(f"{self.name}: QMP is not connected (QEMU not started or already stopped)")
        try:
            return self._loop.run(self._client.execute(name, dict(args) or None),
                                  self.qmp_timeout if timeout is None else timeout)
        except ExecuteError as exc:
            raise self._error(f"{self.name}: QMP {name} failed: {exc}", desc=str(exc)) from exc
        except TimeoutError as exc:
            raise self._error(f"{self.name}: QMP {name} got no answer within {timeout or self.qmp_timeout} s") from exc
        except Exception as exc:
            time.sleep(0.05)  # let the process status catch up with the dropped connection
            rc = self.returncode
            state = f"QEMU exited with status {rc}" if rc is not None else f"{type(exc).__name__}: {exc}"
            raise self._error(f"{self.name}: QMP {name} failed: {state}") from exc

    def cmd(self, name: str, args: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        """Run the QMP command ``name`` and return its ``return`` value.

        Arguments come from ``args`` (use it for names with dashes, e.g.
        ``{"max-bandwidth": 1}``) and from ``kwargs``.
        """
        merged = {**(args or {}), **kwargs}
        self.transcript.append({"execute": name, **({"arguments": merged} if merged else {})})
        return self._execute(name, merged)

    def query(self, name: str, args: Mapping[str, Any] | None = None) -> Any:
        """Like :meth:`cmd` but not recorded in :attr:`transcript` (for polling)."""
        return self._execute(name, args or {})

    def hmp(self, text: str) -> str:
        """Run a human monitor command and return its output."""
        out = self.cmd("human-monitor-command", {"command-line": text})
        return str(out)

    def status(self) -> str:
        """The run state (``query-status``): ``running``, ``paused``, ``inmigrate``, ..."""
        return str(self.query("query-status")["status"])

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.query("query-migrate"))

    def set_caps(self, caps: Mapping[str, bool]) -> None:
        """``migrate-set-capabilities`` for each ``name: state``."""
        if caps:
            self.cmd("migrate-set-capabilities", {
                "capabilities": [{"capability": k, "state": bool(v)} for k, v in caps.items()]
            })

    def set_params(self, params: Mapping[str, Any]) -> None:
        """``migrate-set-parameters`` with ``params`` (dashed QMP names)."""
        if params:
            self.cmd("migrate-set-parameters", dict(params))

    def cont(self) -> None:
        self.cmd("cont")

    def stop(self) -> None:
        self.cmd("stop")

    # -------------------------------------------------------------- migration

    def migrate(self, uri: str) -> None:
        """Start an outgoing migration to ``uri`` and return at once."""
        self.cmd("migrate", uri=uri)

    def wait_migration(
        self,
        timeout: float = 120.0,
        poll: float = 0.02,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``; return its last answer.

        ``on_poll`` sees every intermediate answer (e.g. to stop the guest
        after a while).  Raises :class:`QemuError` with QEMU's ``error-desc``
        when the migration fails or is cancelled, or on timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                desc = info.get("error-desc")
                raise self._error(f"{self.name}: migration {status}: {desc or 'no error-desc'}", desc=desc)
            if time.monotonic() > deadline:
                raise self._error(f"{self.name}: migration not completed within {timeout} s "
                                  f"(status {status!r})")
            if on_poll is not None:
                on_poll(info)
            time.sleep(poll)

    def save(
        self,
        path: Path,
        caps: Mapping[str, bool] | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Migrate to the file ``path`` (see :func:`exec_save_uri`) and wait.

        Sets ``caps`` and ``params`` first.  Returns the final
        ``query-migrate`` answer once the migration has completed *and* the
        file is completely written.  A failed save leaves no file behind.
        """
        final = Path(path).absolute()
        part = final.with_name(final.name + ".part")
        final.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        self.expose(final.parent)
        self.set_caps(caps or {})
        self.set_params(params or {})
        deadline = time.monotonic() + timeout
        try:
            self.migrate(exec_save_uri(final))
            info = self.wait_migration(timeout, on_poll=on_poll)
            while not final.exists():
                if time.monotonic() > deadline:
                    raise self._error(f"{self.name}: migration completed but {final.name} was not "
                                      f"finished within {timeout} s")
                time.sleep(0.01)
        except BaseException:
            self._remove_soon(final, part)
            raise
        return info

    @staticmethod
    def _remove_soon(*paths: Path) -> None:
        # the detached cat may still be renaming .part: give it a moment
        time.sleep(0.2)
        for p in paths:
            p.unlink(missing_ok=True)

    def load(
        self,
        path: Path,
        caps: Mapping[str, bool] | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
    ) -> str:
        """Load the stream in ``path`` into this ``incoming=True`` QEMU.

        Sets ``caps``/``params`` on this destination, runs
        ``migrate-incoming`` and waits until the run state leaves
        ``inmigrate``; returns the new state (``paused`` or ``running``).
        QEMU 7.2 exits with status 1 when it rejects a stream: that raises
        :class:`QemuError` with the tail of its stderr.
        """
        if not self.incoming:
            raise QemuError(f"{self.name}: load() needs a QemuVM started with incoming=True")
        src = Path(path)
        if not src.is_file():
            raise QemuError(f"{self.name}: no stream file {src}")
        self.expose(src.absolute().parent)
        self.set_caps(caps or {})
        self.set_params(params or {})
        self.cmd("migrate-incoming", uri=exec_load_uri(src))
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.status()
            except QemuError:
                rc = self._wait_exit(2.0)
                if rc is not None:
                    raise self._error(f"{self.name}: QEMU rejected {src.name}: it exited with status {rc}") from None
                raise
            if state != "inmigrate":
                break
            if time.monotonic() > deadline:
                raise self._error(f"{self.name}: loading {src.name} did not finish within {timeout} s")
            time.sleep(0.02)
        info = self.query_migrate()
        if info.get("status") == "failed":
            desc = info.get("error-desc")
            raise self._error(f"{self.name}: incoming migration failed: {desc}", desc=desc)
        return state

    def _wait_exit(self, timeout: float) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # ------------------------------------------------------------------ guest

    def serial_text(self) -> str:
        """Everything the guest wrote to COM1 so far."""
        if not self.serial:
            raise QemuError(f"{self.name}: started with serial=False")
        try:
            return self.serial_log.read_bytes().decode("ascii", errors="replace")
        except FileNotFoundError:
            return ""

    def counts(self) -> list[int]:
        """The numbers the counting guest has printed so far."""
        return parse_counts(self.serial_text())

    def wait_for_count(self, n: int, timeout: float = 30.0) -> int:
        """Wait until the guest has printed a number >= ``n``; return the latest number."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if counts and counts[-1] >= n:
                return counts[-1]
            self._check_alive(f"while waiting for count {n}")
            if time.monotonic() > deadline:
                last = counts[-1] if counts else None
                raise self._error(f"{self.name}: guest count did not reach {n} within {timeout} s "
                                  f"(last count: {last})")
            time.sleep(0.05)
