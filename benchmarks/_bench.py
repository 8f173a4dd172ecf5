"""Shared helpers for the benchmarks: run a command, time it, read its peak RSS.

Each figure is the median of several runs on a warm page cache, and every
target is a ratio against an anchor measured in the same run, because these
machines are noisy.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


@dataclass
class Run:
    label: str
    seconds: float
    peak_rss_mb: float

    def rate(self, nbytes: int) -> float:
        return nbytes / self.seconds / 1e6


TIME = "/usr/bin/time"  # GNU time (Debian's "time" package), for a peak RSS that is the command's own


@dataclass
class Sample:
    """One run of a command: wall time, CPU time (user + system, its children included) and peak RSS (MB)."""

    wall: float
    cpu: float
    rss_mb: float


def run_once(argv: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Wall time and peak RSS (MB) of one run of ``argv``; raises if it fails (see :func:`run_sample`)."""
    s = run_sample(argv, stdout)
    return s.wall, s.rss_mb


def run_sample(argv: list[str], stdout=subprocess.DEVNULL) -> Sample:
    """Wall time, CPU time and peak RSS of one run of ``argv``; raises if it fails.

    The kernel's peak RSS of a process forked from this one starts from this process' own peak (``exec``
    keeps the larger of the two), which would charge a benchmark's memory to the command it measures.  So the
    command runs under GNU time, a small process that forks it afresh, and the figure is the one time reports;
    without GNU time it is wait4's (then at least this process' peak).
    """
    report = None
    if os.access(TIME, os.X_OK):
        fd, report = tempfile.mkstemp(prefix="vf-rss-")
        os.close(fd)
        argv = [TIME, "-q", "-f", "%M", "-o", report, *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {shlex.join(argv)}\n{err[-2000:]}")
    peak_kb = float(usage.ru_maxrss)
    if report is not None:
        with open(report) as f:
            peak_kb = float(f.read().split()[-1])
        os.unlink(report)
    return Sample(elapsed, usage.ru_utime + usage.ru_stime, peak_kb / 1024)


def interleaved(commands: dict[str, list[str]], repeat: int, before=None) -> dict[str, list[Sample]]:
    """Run every command in turn, ``repeat`` rounds after one warm-up round; the samples of each, in order.

    ``before(name)``, when given, runs before each command (e.g. to sync the disk or remove an output).
    """
    out: dict[str, list[Sample]] = {k: [] for k in commands}
    for i in range(repeat + 1):
        for name, argv in commands.items():
            if before is not None:
                before(name)
            s = run_sample(argv)
            if i:
                out[name].append(s)
    return out


def median(samples: list[Sample]) -> Sample:
    """Median wall and CPU time, largest peak RSS."""
    return Sample(statistics.median(s.wall for s in samples), statistics.median(s.cpu for s in samples),
                  max(s.rss_mb for s in samples))


def measure(label: str, argv: list[str], repeat: int) -> Run:
    run_once(argv)  # warm-up: page cache, imports
    times, rss = [], []
    for _ in range(repeat):
        t, r = run_once(argv)
        times.append(t)
        rss.append(r)
    result = Run(label, statistics.median(times), max(rss))
    print(f"  {label:<40} {result.seconds:8.3f} s  peak RSS {result.peak_rss_mb:7.1f} MB", file=sys.stderr)
    return result


_compiled = False


def vmferry(*args: str) -> list[str]:
    """The command line of ``vmferry ARGS``, with vmferry's bytecode compiled first, as ``pip install`` leaves a
    package: a shell with PYTHONDONTWRITEBYTECODE=1 would otherwise charge every run the compilation of every
    module it imports (about 0.1 s, more than a whole ``inspect`` of a 1 GiB file)."""
    global _compiled
    if not _compiled:
        import compileall

        compileall.compile_dir(REPO / "src" / "vmferry", quiet=1)
        _compiled = True
    exe = VENV_BIN / "vmferry"
    return [str(exe) if exe.exists() else "vmferry", *args]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@contextmanager
def random_ram(path: Path, size: int) -> Iterator[tuple[Path, Path]]:
    """``path`` filled with ``size`` random bytes (a QEMU guest's RAM backing) and a short directory for unix
    sockets; both are removed afterwards."""
    print(f"filling {size >> 20} MiB of random guest RAM ...", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(4 << 20, left)
            f.write(os.urandom(n))
            left -= n
    sockdir = Path(tempfile.mkdtemp(prefix="vf-bench-"))
    try:
        yield path, sockdir
    finally:
        path.unlink(missing_ok=True)
        for p in sockdir.iterdir():
            p.unlink(missing_ok=True)
        sockdir.rmdir()
