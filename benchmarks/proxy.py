"""Live migration through ``vmferry proxy``, beside direct QEMU -> QEMU, on a 1 GiB random-RAM guest.

Measured in this one run, each the median of ``--repeat`` migrations of a
QEMU 7.2 guest with 1 GiB of RAM pre-filled with random bytes (through a
memory-backend-file), ``max-bandwidth`` lifted, all over sockets on this
machine.  With ``--guest stopped`` (the default) the source never runs, so
the figures are those of the migration path alone; with ``--guest running``
it runs the counting boot sector, whose busy-wait keeps one host CPU busy
(TCG) while the stream is sent.  The paths:

* the anchor: QEMU -> QEMU directly over a unix socket, and (a second
  column) over tcp on loopback, as a migration between hosts would go;
* QEMU -> proxy -> QEMU (one ``vmferry proxy`` process: QEMU's format in and
  out, device sections decoded and re-encoded);
* QEMU -> proxy -> ferry over tcp -> proxy -> QEMU (two proxy processes);
* for reference, the same places taken by byte pumps (benchmarks/_pump.py),
  which move the bytes without looking at them: one pump copying
  (recv/send), one splicing (zero copy), and two pumps of each kind with
  tcp between them.  They show what any process in the path costs on this
  machine before any decoding, so the proxy's own share is the gap between
  its row and the pump's.

A figure is MB (10^6 bytes) of QEMU's stream per second of wall time from
``migrate`` until the source reports ``completed``, after which the
destination must run (or, for a stopped guest, hold the migrated state
paused).  Each proxy or pump is its own process, so its peak RSS is the
kernel's (``wait4``).  Targets: one proxy >= 70% of direct, two proxies with
ferry >= 50%, proxy peak RSS < 200 MB.

    .venv/bin/python benchmarks/proxy.py [--workdir DIR] [--repeat N] [--ram 1G] [--guest stopped|running]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, random_ram, verdict, vmferry  # noqa: E402

from vmferry.live.endpoint.machine import parse_size  # noqa: E402
from vmferry.live.qemu.process import QemuVM, escape_option  # noqa: E402


@dataclass
class Figure:
    seconds: float
    transferred: int
    stage_rss_mb: float  # the largest of the run's proxies or pumps
    stage_cpu_s: float  # user + system time of all of them, start-up included

    @property
    def mb_per_s(self) -> float:
        return self.transferred / self.seconds / 1e6


#: Each route's stages from the source on: ``legacy``/``ferry`` is a ``vmferry proxy`` writing that wire,
#: ``copy``/``splice`` a byte pump (benchmarks/_pump.py).  The source reaches the first stage over a unix
#: socket, stages reach each other over tcp (as between hosts), the last reaches the destination over unix.
ROUTES: dict[str, list[str]] = {
    "direct": [],
    "direct-tcp": [],
    "copy-pump": ["copy"],
    "splice-pump": ["splice"],
    "proxy": ["legacy"],
    "copy-pumps": ["copy", "copy"],
    "splice-pumps": ["splice", "splice"],
    "ferry": ["ferry", "legacy"],
}
PUMPS = ("copy", "splice")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_stage(kind: str, listen: str, forward: str) -> subprocess.Popen[bytes]:
    """A ``vmferry proxy`` process (``kind`` is its wire, ``legacy`` or ``ferry``) or a byte pump (``copy`` or
    ``splice``), returned once it listens (its first line on stderr says so)."""
    if kind in PUMPS:
        argv = [sys.executable, str(Path(__file__).with_name("_pump.py")), kind, "--listen", listen,
                "--forward", forward]
    else:
        argv = vmferry("proxy", "--listen", listen, "--forward", forward, "--to", kind, "--timeout", "120")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode(errors="replace")
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"{kind} did not start: {line.strip()}{proc.stderr.read().decode(errors='replace')}")
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """A finished proxy's peak RSS (MB) and CPU time (s)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"vmferry proxy failed ({proc.returncode}): {err.strip()[-500:]}")
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def run(sockdir: Path, backing: Path, ram_bytes: int, hops: str, running: bool) -> Figure:
    """One migration along the route ``ROUTES[hops]``."""
    for stale in sockdir.iterdir():
        stale.unlink(missing_ok=True)
    # prealloc: both guests' RAM is faulted in before the clock starts, so page faults do not add noise
    src_mem = (f"memory-backend-file,id=mem,size={ram_bytes},mem-path={escape_option(backing.absolute())},"
               "share=off,prealloc=on")
    dst_mem = f"memory-backend-ram,id=mem,size={ram_bytes},prealloc=on"
    m = f"{ram_bytes >> 20}M"
    dst_uri = f"tcp:127.0.0.1:{_free_port()}" if hops == "direct-tcp" else f"unix:{sockdir / 'dst.sock'}"
    with QemuVM("pc,memory-backend=mem", ["-object", src_mem], memory=m, paused=not running, boot_sector=True,
                name="src") as src, \
            QemuVM("pc,memory-backend=mem", ["-object", dst_mem], memory=m, paused=not running, boot_sector=True,
                   incoming=True, name="dst") as dst:
        dst.cmd("migrate-incoming", uri=dst_uri)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            forward = dst_uri  # started from the destination back, so each stage's forward URI listens
            for i, kind in reversed(list(enumerate(ROUTES[hops]))):
                listen = f"unix:{sockdir / 'proxy.sock'}" if i == 0 else f"tcp:127.0.0.1:{_free_port()}"
                procs.append(_start_stage(kind, listen, forward))
                forward = listen
            src_uri = forward
            if running:
                src.wait_for_count(2, timeout=60)
            src.set_params({"max-bandwidth": 1 << 40})
            t0 = time.monotonic()
            src.cmd("migrate", uri=src_uri)
            while (info := src.query_migrate())["status"] not in ("completed", "failed", "cancelled"):
                time.sleep(0.005)
            elapsed = time.monotonic() - t0
            if info["status"] != "completed":
                raise SystemExit(f"{hops}: migration {info['status']}: {info.get('error-desc')}")
            reaped = [_reap(p) for p in procs]
            rss, cpu = max((r for r, _ in reaped), default=0.0), sum(c for _, c in reaped)
            deadline = time.monotonic() + 60
            want = ("running",) if running else ("paused", "prelaunch")  # a never-started source: prelaunch
            while (state := dst.status()) not in want:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{hops}: the destination is {state}, not {' or '.join(want)}")
                time.sleep(0.02)
            return Figure(elapsed, int(info["ram"]["transferred"]), rss, cpu)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--guest", choices=("stopped", "running"), default="stopped",
                    help="the source guest never started (default) or running its counting loop")
    args = ap.parse_args()
    ram_bytes = parse_size(args.ram)
    runs: dict[str, list[Figure]] = {hops: [] for hops in ROUTES}
    with random_ram(args.workdir / "proxy-qemu-ram.bin", ram_bytes) as (backing, sockdir):
        for i in range(args.repeat):
            for hops in runs:
                f = run(sockdir, backing, ram_bytes, hops, args.guest == "running")
                runs[hops].append(f)
                print(f"  run {i + 1} {hops:<12} {f.transferred / 1e6:8.1f} MB {f.seconds:6.3f} s "
                      f"{f.mb_per_s:7.0f} MB/s  stage peak RSS {f.stage_rss_mb:6.1f} MB  "
                      f"stages' CPU {f.stage_cpu_s:5.2f} s", file=sys.stderr)

    def rate(hops: str) -> float:
        return statistics.median(f.mb_per_s for f in runs[hops])

    anchor, tcp_anchor = rate("direct"), rate("direct-tcp")
    rss = max(f.stage_rss_mb for hops in ("proxy", "ferry") for f in runs[hops])
    rows = [("QEMU -> QEMU over unix (anchor)", "direct", None),
            ("QEMU -> QEMU over tcp", "direct-tcp", None),
            ("QEMU -> copy pump -> QEMU (no decoding)", "copy-pump", None),
            ("QEMU -> splice pump -> QEMU (no decoding)", "splice-pump", None),
            ("QEMU -> proxy -> QEMU", "proxy", 0.70),
            ("QEMU -> pump -> tcp -> pump -> QEMU (copy)", "copy-pumps", None),
            ("QEMU -> pump -> tcp -> pump -> QEMU (splice)", "splice-pumps", None),
            ("QEMU -> proxy -> ferry -> proxy -> QEMU", "ferry", 0.50)]
    print(f"\n{'migration of a ' + args.guest + ' ' + args.ram + ' random-RAM guest':<44} {'MB/s':>7} "
          f"{'vs unix':>8} {'vs tcp':>7}")
    for title, hops, target in rows:
        r = rate(hops)
        mark = f"  target >= {target:.0%} of unix: {verdict(r / anchor >= target)}" if target else ""
        print(f"{title:<44} {r:7.0f} {r / anchor:8.0%} {r / tcp_anchor:7.0%}{mark}")
    print(f"{'proxy peak RSS (max over its runs)':<44} {rss:6.1f} MB  target < 200 MB: {verdict(rss < 200)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
