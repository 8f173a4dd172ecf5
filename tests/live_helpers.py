"""Helpers for the live-migration tests: vmferry endpoints in threads or processes, QEMU with a spare monitor."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vmferry.live.endpoint.serve import ServeOptions, serve
from vmferry.live.qemu.process import QemuVM
from vmferry.live.qmp import QMPConnection


def short_dir(tmp_path: Path) -> Path:
    """A directory whose socket paths fit in sun_path (pytest's tmp_path can be long)."""
    import tempfile

    if len(str(tmp_path)) < 60:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="vf-"))


class EndpointThread:
    """``vmferry serve`` in a thread of this process; quit on exit."""

    def __init__(self, directory: Path, name: str, **opts: Any) -> None:
        self.sock = directory / f"{name}.qmp"
        self.address = f"unix:{self.sock}"
        self.opts = ServeOptions(qmp=self.address, quiet=True, **opts)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"endpoint-{name}", daemon=True)

    def _run(self) -> None:
        try:
            serve(self.opts, ready=lambda _: self._ready.set())
        except BaseException as e:  # noqa: BLE001
            self._error = e
            self._ready.set()

    def __enter__(self) -> EndpointThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"endpoint did not start: {self._error}")
        return self

    def qmp(self) -> QMPConnection:
        return QMPConnection(self.address, name=self.sock.stem).connect()

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        with self.qmp() as c:
            return c.cmd(name, args)

    def machine(self) -> dict[str, Any]:
        return dict(self.cmd("x-vmferry-query-machine"))

    def quit(self) -> None:
        if self._thread.is_alive():
            try:
                self.cmd("quit")
            except Exception:  # noqa: BLE001
                pass
            self._thread.join(10)

    def __exit__(self, *exc: Any) -> None:
        self.quit()


class EndpointProcess:
    """``vmferry serve`` as a child process (for killing it)."""

    def __init__(self, directory: Path, name: str, *args: str) -> None:
        self.sock = directory / f"{name}.qmp"
        self.address = f"unix:{self.sock}"
        self.argv = [sys.executable, "-m", "vmferry.cli", "serve", "--qmp", self.address, "-q", *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EndpointProcess:
        env = dict(os.environ)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"endpoint exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("endpoint did not start")
            time.sleep(0.05)
        return self

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        with QMPConnection(self.address) as c:
            return c.cmd(name, args)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.cmd("quit")
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def release_vm(machine: str, qemu: str, args: tuple[str, ...], **kw: Any) -> QemuVM:
    """The counting guest under ``machine`` in QEMU release ``qemu`` (7.2: the host's; others: their chroot)."""
    return QemuVM(machine, args, boot_sector=True, qemu_version=None if qemu == "7.2" else qemu, **kw)


class SavedStreams:
    """Streams saved on demand by any QEMU release, cached for the test session (thread-safe)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.lock = threading.Lock()
        self.done: dict[tuple[str, str, tuple[str, ...], bool], tuple[Path, str]] = {}

    def get(self, machine: str, qemu: str, args: tuple[str, ...], running: bool) -> tuple[Path, str]:
        """The stream of ``machine`` in ``qemu`` with ``args`` (paused, or saved while it counts) and what the
        guest had printed on its serial port."""
        key = (machine, qemu, args, running)
        with self.lock:
            if key in self.done:
                return self.done[key]
            name = f"{machine}@{qemu}-{len(self.done)}"
            path = self.dir / f"{name}.mig"
            with release_vm(machine, qemu, args, paused=not running, name=name, workdir=self.dir / name) as vm:
                if running:
                    vm.wait_for_count(5, timeout=60)
                vm.save(path)
                text = vm.serial_text()
            self.done[key] = (path, text)
            return path, text
