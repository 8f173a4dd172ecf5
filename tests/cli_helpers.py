"""Helpers for the tests that run the ``vmferry`` command as a user would: a subprocess, its one-line errors,
its partial outputs, a signal sent while it writes, and ``vmferry proxy`` in a thread."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CLI = [sys.executable, "-m", "vmferry.cli"]


def one_line_error(out: subprocess.CompletedProcess, code: int = 2) -> str:
    """The error of a command that failed with ``code``, checked to be one line and no traceback."""
    err = out.stderr.decode()
    assert out.returncode == code, (out.returncode, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def partials(folder: Path) -> list[Path]:
    """The partial outputs (``OUT.vmferry-partial-*``) in ``folder``."""
    return list(folder.glob("*vmferry-partial*"))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_while_writing(args: list[str], data: bytes, folder: Path, sig: int) -> tuple[int, str]:
    """Run ``vmferry ARGS`` reading half of ``data`` from stdin, wait until its partial output appears in
    ``folder``, send ``sig``; its exit status and stderr.

    SIGINT arrives as a terminal gives it: a shell that runs the tests in the background has it ignored, and an
    ignored SIGINT is inherited (and rightly left alone by vmferry).
    """
    proc = subprocess.Popen([*CLI, *args], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(data[:len(data) // 2])  # half the input, then the writer stalls
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while not partials(folder):
        assert time.monotonic() < deadline and proc.poll() is None, "no partial output appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    proc.stdin.close()
    return rc, err


def proxy_in_thread(args: list[str], listening: Path, timeout: float = 30) -> tuple[threading.Thread, list[int]]:
    """``vmferry proxy ARGS`` run by ``vmferry.cli.main`` in a thread (so that its stderr is captured), returned
    once it listens on the unix socket ``listening``, with the list its exit code goes to."""
    from vmferry.cli import main

    result: list[int] = []
    command = threading.Thread(target=lambda: result.append(main(["proxy", *args])))
    command.start()
    deadline = time.monotonic() + timeout
    while not listening.exists():
        assert command.is_alive(), f"vmferry proxy exited with {result}"
        assert time.monotonic() < deadline, "vmferry proxy did not listen"
        time.sleep(0.01)
    return command, result
