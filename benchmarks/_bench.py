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
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


@dataclass
class Run:
    label: str
    seconds: float
    peak_rss_mb: float

    def rate(self, nbytes: int) -> float:
        return nbytes / self.seconds / 1e6


def run_once(argv: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Wall time and peak RSS (MB) of one run of ``argv``; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {shlex.join(argv)}\n{err[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


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


def vmferry(*args: str) -> list[str]:
    exe = VENV_BIN / "vmferry"
    return [str(exe) if exe.exists() else "vmferry", *args]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
