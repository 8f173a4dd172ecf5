"""Live migration through ``vmferry proxy``, beside direct QEMU -> QEMU, on a 1 GiB random-RAM guest.

Measured in this one run, each the median of ``--repeat`` migrations (the
routes interleaved, one migration of each per round) of a QEMU guest (7.2,
or ``--qemu 10.0``) with 1 GiB of RAM pre-filled with random bytes
(through a memory-backend-file), both guests' RAM preallocated,
``max-bandwidth`` lifted, all over sockets on this machine.  Each proxy or
pump is its own process, so its peak RSS and CPU time are the kernel's
(``wait4``); a stage's CPU is given per GiB of QEMU's stream, gross and net
of its start-up (the same process started and stopped while idle).  Both
QEMUs' CPU time while migrating (from /proc) is given per GiB too, and the
CPU time of all of them per second of migration: how many of this
machine's 2 CPUs the migration kept busy (other users' work not counted;
the load average is printed after each round), and the machine's steal
time while migrating (its CPUs waiting for a host that served other
guests): a slow round with much steal is the host's, not the route's.

Three modes:

**precopy** (the default).  With ``--guest stopped`` the source never runs,
so the figures are those of the migration path alone; with ``--guest
running`` it runs the counting boot sector, whose busy-wait keeps one host
CPU busy (TCG).  The routes:

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
  its row and the pump's.  One more, the tee pump, splices as the proxy does
  and also reads every byte as the proxy must (a copy through ``tee``),
  parsing nothing: the gap between it and the splice pump is what reading
  the stream costs before any interpreter work.

Targets (issue 15): one proxy >= 90% of the splice pump, two proxies with
ferry >= 80% of two splice pumps joined by tcp, each proxy's CPU per GiB
shown beside the pumps', proxy peak RSS < 100 MB.  The columns against
direct QEMU stay (the earlier targets were 70% and 50% of it; two pumps
joined by tcp stay under 50% themselves on a 2-vCPU machine).

**--multifd N**.  The same guest migrated with the ``multifd`` capability
and N channels (the main channel plus N connections, all to one address):
direct; through one splice pump that carries every channel as the proxy
does (each accepted connection pumped to a fresh destination connection,
in accept order); through one proxy; and, between two hosts, through two
splice pumps and through two proxies with ferry (whose multifd channels are
parallel tcp connections, relayed byte for byte by both proxies).  The
two-hop routes and direct are run with 1 channel and without multifd too
(one connection carrying the same bytes), to show whether parallel
connections pay on that route.  Targets: one proxy >= 90% of the splice
pump, proxy peak RSS < 100 MB.

**--postcopy**.  A busy running guest (benchmarks/_guest.py: it reads
random pages all over its RAM, ``--touch`` pages at ``--hz`` per second) is
migrated with ``postcopy-ram`` (and ``postcopy-preempt`` with
``--preempt``): precopy until ``--switch-after`` MiB of the stream have
gone, then ``migrate-start-postcopy`` (``downtime-limit`` 10 ms, so that
QEMU does not finish in precopy instead); the destination runs the guest
and asks for every page it reads before the background stream
(``max-postcopy-bandwidth`` = ``--postcopy-bandwidth``, default 0:
unlimited) brings it.  Routes: direct, one splice pump (which relays the
return path back as it pumps), one tee pump (the proxy's reads, nothing
decoded), one proxy, and one splice pump with the kernel's default socket
buffer and pipe size (a diagnostic: how much of a
requested page's wait is the queue in front of it).  Figures: total time
from ``migrate`` to ``completed`` (and from the switch), and the page-fault
latency at the destination: the destination QEMU traces (``-trace``, log
backend, ``-msg timestamp=on``) each fault its fault thread requests
(``postcopy_ram_fault_thread_request``) and the moment that page is placed
(``postcopy_page_req_del``), so every requested page's wait is measured
where the guest waits for it; median and p99 over all the requests of all
the rounds.  QEMU's own ``postcopy-blocktime`` (ms summed over the vCPU's
waits, the destination's ``query-migrate``; 7.2 and 10.0 give totals only,
no ``postcopy-latency``) divided by the source's ``postcopy-requests`` is
printed beside it as a check.  (A low ``--postcopy-bandwidth`` measures
QEMU 7.2's rate limiter instead: a request that comes while it sleeps waits
for the rest of its 100 ms window, on every route alike.)  Targets: proxy
total time no more than 1/0.9 of the splice pump's, median and p99 latency
within 1.5x of direct, proxy peak RSS < 100 MB.

A throughput figure is MB (10^6 bytes) of QEMU's stream (``ram.transferred``
of the source, multifd channels included) per second of wall time from
``migrate`` until the source reports ``completed``, after which the
destination must run (or, for a stopped guest, hold the migrated state
paused).

    .venv/bin/python benchmarks/proxy.py [--workdir DIR] [--repeat N] [--ram 1G] [--qemu 10.0] [--only ROUTES]
        [--guest stopped|running] [--multifd N | --postcopy [--preempt] [--postcopy-bandwidth MBPS]
        [--switch-after MIB] [--hz N] [--touch N]]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, random_ram, verdict, vmferry  # noqa: E402
from _guest import page_reader_boot_sector  # noqa: E402

from vmferry.live.endpoint.machine import parse_size  # noqa: E402
from vmferry.live.qemu.process import QemuVM, escape_option, expose  # noqa: E402

GIB = 1 << 30
PUMPS = ("copy", "splice", "tee", "splice-small")
#: The small-buffer pump's options: the kernel's default send buffer (net.core.wmem_default on this machine) and
#: pipe size, as QEMU's own sockets have, where vmferry's transport widens a unix socket's to 4 MiB.
SMALL_BUFFERS = ["--sndbuf", "212992", "--pipe", "65536"]
PROXIES = ("legacy", "ferry")


@dataclass
class Stage:
    """One proxy or pump process of a route, as the kernel accounted it."""

    kind: str  # legacy/ferry (a vmferry proxy writing that wire) or copy/splice/splice-small (a pump)
    rss_mb: float
    cpu_s: float


@dataclass
class Figure:
    seconds: float
    transferred: int
    stages: list[Stage]  # from the source on
    qemu_cpu_s: tuple[float, float] = (0.0, 0.0)  # the source's and the destination's CPU time while migrating
    latencies_ms: list[float] = field(default_factory=list)  # postcopy: each requested page's wait
    postcopy_s: float = 0.0  # postcopy: from migrate-start-postcopy to completed
    requests: int = 0  # postcopy: the source's postcopy-requests
    blocktime_ms: int = 0  # postcopy: the destination's postcopy-blocktime
    steal_s: float = 0.0  # CPU time the host gave to others while this machine's CPUs wanted it, while migrating

    @property
    def mb_per_s(self) -> float:
        return self.transferred / self.seconds / 1e6

    def busy(self, startup: dict[str, float]) -> float:
        """CPU seconds of both QEMUs and of every stage (without its ``startup``) per second of the migration:
        how many of the machine's CPUs the migration kept busy (this one has 2)."""
        return (sum(self.qemu_cpu_s) + sum(s.cpu_s - startup[s.kind] for s in self.stages)) / self.seconds

    @property
    def proxy_rss_mb(self) -> float:
        return max((s.rss_mb for s in self.stages if s.kind in PROXIES), default=0.0)


@dataclass(frozen=True)
class Route:
    """A way from the source QEMU to the destination: ``stages`` from the source on (none: direct), over tcp
    between direct QEMUs with ``tcp``; ``multifd`` channels (0: the capability off)."""

    name: str
    title: str
    stages: tuple[str, ...] = ()
    tcp: bool = False
    multifd: int = 0

    @property
    def key(self) -> str:
        return f"{self.name}/{self.multifd}"


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(vm: QemuVM) -> float:
    """A running QEMU's CPU time so far (user + system, all threads), from /proc."""
    assert vm.pid is not None
    with open(f"/proc/{vm.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of stat)


def _steal_s() -> float:
    """The CPU time this virtual machine's CPUs have waited for the host so far (all CPUs; /proc/stat's steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / _TICK if len(fields) > 8 else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stage_argv(kind: str, listen: str, forward: str) -> list[str]:
    if kind in PUMPS:
        mode, extra = ("splice", SMALL_BUFFERS) if kind == "splice-small" else (kind, [])
        return [sys.executable, str(Path(__file__).with_name("_pump.py")), mode, "--listen", listen,
                "--forward", forward, *extra]
    return vmferry("proxy", "--listen", listen, "--forward", forward, "--to", kind, "--timeout", "120")


def _start_stage(kind: str, listen: str, forward: str) -> subprocess.Popen[bytes]:
    """A ``vmferry proxy`` process (``kind`` is its wire, ``legacy`` or ``ferry``) or a byte pump (``copy`` or
    ``splice``), returned once it listens (its first line on stderr says so)."""
    proc = subprocess.Popen(_stage_argv(kind, listen, forward), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode(errors="replace")
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"{kind} did not start: {line.strip()}{proc.stderr.read().decode(errors='replace')}")
    return proc


def _reap(kind: str, proc: subprocess.Popen[bytes]) -> Stage:
    """A finished stage's peak RSS and CPU time."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"{kind} failed ({proc.returncode}): {err.strip()[-500:]}")
    return Stage(kind, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


def startup_cpu(kind: str, sockdir: Path, repeat: int = 3) -> float:
    """CPU seconds a stage spends starting (imports, listening) and stopping with nothing to carry."""
    cpus = []
    for _ in range(repeat):
        proc = _start_stage(kind, f"unix:{sockdir / 'idle.sock'}", f"unix:{sockdir / 'nowhere.sock'}")
        proc.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(proc.pid, 0)
        cpus.append(usage.ru_utime + usage.ru_stime)
    return statistics.median(cpus)


@dataclass
class Bench:
    """What every migration of the run shares."""

    sockdir: Path
    backing: Path
    ram_bytes: int
    qemu: str | None  # a chroot QEMU release, None for the system's (7.2)
    running: bool = False  # precopy/multifd: the source runs the counting guest
    postcopy_bandwidth: int = 0  # bytes/s, 0: unlimited
    preempt: bool = False  # postcopy-preempt: requested pages on a channel of their own
    switch_after: int = 0  # bytes of stream sent in precopy before migrate-start-postcopy
    hz: int = 1000
    touch: int = 4

    def vm(self, name: str, memory: str, incoming: bool, paused: bool, sector: bool | bytes,
           args: list[str]) -> QemuVM:
        return QemuVM("pc,memory-backend=mem", ["-object", memory, *args], memory=f"{self.ram_bytes >> 20}M",
                      paused=paused, boot_sector=sector, incoming=incoming, name=name, qemu_version=self.qemu)

    def source_memory(self) -> str:
        # prealloc: both guests' RAM is faulted in before the clock starts, so page faults do not add noise
        return (f"memory-backend-file,id=mem,size={self.ram_bytes},"
                f"mem-path={escape_option(self.backing.absolute())},share=off,prealloc=on")

    def destination_memory(self) -> str:
        return f"memory-backend-ram,id=mem,size={self.ram_bytes},prealloc=on"


def _route_stages(route: Route, sockdir: Path, dst_uri: str) -> tuple[list[tuple[str, subprocess.Popen[bytes]]], str]:
    """Start the route's stages from the destination back (each one's forward URI must listen already); the
    source reaches the first over a unix socket, stages reach each other over tcp (as between hosts).
    Returns the stages from the source on, and the URI the source migrates to."""
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    forward = dst_uri
    try:
        for i, kind in reversed(list(enumerate(route.stages))):
            listen = f"unix:{sockdir / 'proxy.sock'}" if i == 0 else f"tcp:127.0.0.1:{_free_port()}"
            procs.insert(0, (kind, _start_stage(kind, listen, forward)))
            forward = listen
    except BaseException:
        _kill(procs)
        raise
    return procs, forward


def _kill(procs: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _, p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _clean(sockdir: Path) -> None:
    for stale in sockdir.iterdir():
        stale.unlink(missing_ok=True)


def _wait_status(vm: QemuVM, want: tuple[str, ...], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (state := vm.status()) not in want:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: the destination is {state}, not {' or '.join(want)}")
        time.sleep(0.02)


def _final(src: QemuVM, route: Route, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (info := src.query_migrate())["status"] not in ("completed", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{route.title}: migration still {info['status']} after {timeout:.0f} s")
        time.sleep(0.005)
    if info["status"] != "completed":
        raise SystemExit(f"{route.title}: migration {info['status']}: {info.get('error-desc')}")
    return info


# --------------------------------------------------------------------------- precopy and multifd


def run_precopy(b: Bench, route: Route) -> Figure:
    """One precopy migration along ``route`` (multifd when ``route.multifd``)."""
    _clean(b.sockdir)
    dst_uri = f"tcp:127.0.0.1:{_free_port()}" if route.tcp else f"unix:{b.sockdir / 'dst.sock'}"
    caps = {"multifd": True} if route.multifd else {}
    params = {"multifd-channels": route.multifd} if route.multifd else {}
    with b.vm("src", b.source_memory(), False, not b.running, True, []) as src, \
            b.vm("dst", b.destination_memory(), True, not b.running, True, []) as dst:
        for vm in (src, dst):
            vm.set_caps(caps)
            vm.set_params(params)
        dst.cmd("migrate-incoming", uri=dst_uri)
        procs, src_uri = _route_stages(route, b.sockdir, dst_uri)
        try:
            if b.running:
                src.wait_for_count(2, timeout=60)
            src.set_params({"max-bandwidth": 1 << 40})
            cpu0, steal0 = (_cpu_s(src), _cpu_s(dst)), _steal_s()
            t0 = time.monotonic()
            src.cmd("migrate", uri=src_uri)
            info = _final(src, route)
            elapsed = time.monotonic() - t0
            qemu_cpu, steal = (_cpu_s(src) - cpu0[0], _cpu_s(dst) - cpu0[1]), _steal_s() - steal0
            stages = [_reap(kind, p) for kind, p in procs]
            # a never-started source leaves the destination in prelaunch
            _wait_status(dst, ("running",) if b.running else ("paused", "prelaunch"), route.title)
            return Figure(elapsed, int(info["ram"]["transferred"]), stages, qemu_cpu, steal_s=steal)
        finally:
            _kill(procs)


# --------------------------------------------------------------------------- postcopy

#: Destination trace events: the fault thread's request for a page, and that requested page placed.
TRACE_EVENTS = ("postcopy_ram_fault_thread_request", "postcopy_page_req_del")
_TRACE_LINE = re.compile(r"\d+@(\d+)\.(\d+):(\w+) (.*)")
_REQUEST = re.compile(r"HVA=0x([0-9a-f]+)")
_RESOLVED = re.compile(r"page req 0x([0-9a-f]+)")


def fault_latencies(log: Path, page_size: int = 4096) -> list[float]:
    """Each requested page's wait (ms) in a destination's trace log: from its fault thread's request (the first
    for that page) to the page placed.  A request for a page placed meanwhile (never resolved) is left out."""
    asked: dict[int, float] = {}
    waits: list[float] = []
    with open(log, errors="replace") as f:
        for line in f:
            m = _TRACE_LINE.match(line)
            if m is None:
                continue
            t = int(m[1]) + int(m[2]) / 1e6
            if m[3] == "postcopy_ram_fault_thread_request" and (r := _REQUEST.search(m[4])):
                asked.setdefault(int(r[1], 16) & ~(page_size - 1), t)
            elif m[3] == "postcopy_page_req_del" and (r := _RESOLVED.search(m[4])):
                if (start := asked.pop(int(r[1], 16), None)) is not None:
                    waits.append((t - start) * 1e3)
    return waits


def run_postcopy(b: Bench, route: Route) -> Figure:
    """One postcopy migration of the busy guest along ``route``."""
    _clean(b.sockdir)
    trace_log = b.sockdir / "dst-trace.log"
    dst_uri = f"unix:{b.sockdir / 'dst.sock'}"
    sector = page_reader_boot_sector(b.ram_bytes, hz=b.hz, pages_per_tick=b.touch)
    trace = [a for e in TRACE_EVENTS for a in ("-trace", e)] + ["-D", str(trace_log), "-msg", "timestamp=on"]
    with b.vm("src", b.source_memory(), False, False, sector, []) as src, \
            b.vm("dst", b.destination_memory(), True, False, sector, trace) as dst:
        caps = {"postcopy-ram": True, "postcopy-preempt": b.preempt}
        dst.set_caps({**caps, "postcopy-blocktime": True})
        src.set_caps(caps)
        dst.cmd("migrate-incoming", uri=dst_uri)
        procs, src_uri = _route_stages(route, b.sockdir, dst_uri)
        try:
            _wait_touching(src)
            # A small downtime-limit keeps QEMU from finishing in precopy: it stops and copies once what is left
            # fits in downtime-limit at the measured bandwidth (300 ms at GB/s would be most of the guest).
            src.set_params({"max-bandwidth": 1 << 40, "max-postcopy-bandwidth": b.postcopy_bandwidth,
                            "downtime-limit": 10})
            cpu0, steal0 = (_cpu_s(src), _cpu_s(dst)), _steal_s()
            t0 = time.monotonic()
            src.cmd("migrate", uri=src_uri)
            while (info := src.query_migrate())["status"] in ("setup", "active") and \
                    info.get("ram", {}).get("transferred", 0) < b.switch_after:
                time.sleep(0.002)
            if info["status"] != "active":
                raise SystemExit(f"{route.title}: migration {info['status']} before the switch to postcopy "
                                 f"(--switch-after {b.switch_after >> 20} MiB is too late?)")
            src.cmd("migrate-start-postcopy")
            switched = time.monotonic()
            info = _final(src, route)
            elapsed = time.monotonic() - t0
            in_postcopy = time.monotonic() - switched
            qemu_cpu, steal = (_cpu_s(src) - cpu0[0], _cpu_s(dst) - cpu0[1]), _steal_s() - steal0
            stages = [_reap(kind, p) for kind, p in procs]
            _wait_status(dst, ("running",), route.title)
            blocktime = int(dst.query_migrate().get("postcopy-blocktime", 0))
        finally:
            _kill(procs)
    # read once QEMU has exited: its log is then complete
    return Figure(elapsed, int(info["ram"]["transferred"]), stages, qemu_cpu, fault_latencies(trace_log),
                  in_postcopy, int(info["ram"].get("postcopy-requests", 0)), blocktime, steal)


def _wait_touching(vm: QemuVM, pages: int = 1000, timeout: float = 60.0) -> None:
    """Until the busy guest has booted and read ``pages`` pages (its counter at 0x600)."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r":\s*0x([0-9a-f]+)", vm.hmp("xp /1wx 0x600"))
        if m and int(m[1], 16) >= pages:
            return
        if time.monotonic() > deadline:
            raise SystemExit("the busy guest did not start reading pages")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the modes

PRECOPY = [
    Route("direct", "QEMU -> QEMU over unix (anchor)"),
    Route("direct-tcp", "QEMU -> QEMU over tcp", tcp=True),
    Route("copy-pump", "QEMU -> copy pump -> QEMU (no decoding)", ("copy",)),
    Route("splice-pump", "QEMU -> splice pump -> QEMU (no decoding)", ("splice",)),
    Route("tee-pump", "QEMU -> tee pump -> QEMU (reads, no decoding)", ("tee",)),
    Route("proxy", "QEMU -> proxy -> QEMU", ("legacy",)),
    Route("copy-pumps", "QEMU -> pump -> tcp -> pump -> QEMU (copy)", ("copy", "copy")),
    Route("splice-pumps", "QEMU -> pump -> tcp -> pump -> QEMU (splice)", ("splice", "splice")),
    Route("tee-pumps", "QEMU -> pump -> tcp -> pump -> QEMU (tee)", ("tee", "tee")),
    Route("ferry", "QEMU -> proxy -> ferry -> proxy -> QEMU", ("ferry", "legacy")),
]


def multifd_routes(n: int) -> list[Route]:
    one_hop = [Route("direct", "QEMU -> QEMU over unix", multifd=n),
               Route("splice-pump", "QEMU -> splice pump -> QEMU", ("splice",), multifd=n),
               Route("proxy", "QEMU -> proxy -> QEMU", ("legacy",), multifd=n)]
    two_hops = []
    for m in sorted({n, 1, 0}, reverse=True):
        if m != n:
            two_hops.append(Route("direct", "QEMU -> QEMU over unix", multifd=m))
        two_hops += [Route("splice-pumps", "QEMU -> pump -> tcp -> pump -> QEMU (splice)", ("splice", "splice"),
                           multifd=m),
                     Route("ferry", "QEMU -> proxy -> ferry -> proxy -> QEMU", ("ferry", "legacy"), multifd=m)]
    return one_hop + two_hops


POSTCOPY = [
    Route("direct", "QEMU -> QEMU over unix (anchor)"),
    Route("splice-pump", "QEMU -> splice pump -> QEMU", ("splice",)),
    Route("tee-pump", "QEMU -> tee pump -> QEMU", ("tee",)),
    Route("proxy", "QEMU -> proxy -> QEMU", ("legacy",)),
    Route("small-pump", "QEMU -> splice pump, small buffers -> QEMU", ("splice-small",)),
]


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _p99(xs: list[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def _stage_cells(runs: list[Figure], startup: dict[str, float]) -> str:
    """Medians of the run's CPU: both QEMUs' per GiB, how many of the machine's CPUs all of it kept busy, then
    each stage's per GiB (and without its start-up) and its peak RSS."""
    def per_gib(f: Figure, seconds: float) -> float:
        return seconds / (f.transferred / GIB)

    cells = [f"QEMU {_med([per_gib(f, f.qemu_cpu_s[0]) for f in runs]):.2f}+"
             f"{_med([per_gib(f, f.qemu_cpu_s[1]) for f in runs]):.2f} s/GiB, {_med([f.busy(startup) for f in runs]):.2f} CPUs"]
    for i, st in enumerate(runs[0].stages):
        gross = _med([per_gib(f, f.stages[i].cpu_s) for f in runs])
        net = _med([per_gib(f, f.stages[i].cpu_s - startup[st.kind]) for f in runs])
        rss = max(f.stages[i].rss_mb for f in runs)
        name = {"legacy": "proxy", "ferry": "proxy(ferry)"}.get(st.kind, st.kind)
        cells.append(f"{name} {gross:.2f} ({net:.2f}) s/GiB {rss:.0f} MB")
    return "; ".join(cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--qemu", metavar="RELEASE", help="a chroot QEMU release (e.g. 10.0) instead of the system's")
    ap.add_argument("--guest", choices=("stopped", "running"), default="stopped",
                    help="precopy and multifd: the source guest never started (default) or running its counting loop")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--multifd", type=int, metavar="N", help="migrate with multifd and N channels")
    mode.add_argument("--postcopy", action="store_true", help="a busy guest migrated in postcopy")
    ap.add_argument("--preempt", action="store_true", help="postcopy: with postcopy-preempt")
    ap.add_argument("--postcopy-bandwidth", type=float, default=0, metavar="MBPS",
                    help="postcopy: max-postcopy-bandwidth in MB/s (default 0: unlimited)")
    ap.add_argument("--switch-after", type=int, default=256, metavar="MIB",
                    help="postcopy: MiB of stream sent in precopy before migrate-start-postcopy (default 256)")
    ap.add_argument("--hz", type=int, default=1000, help="postcopy: the busy guest's reading rounds per second")
    ap.add_argument("--touch", type=int, default=4, help="postcopy: pages the busy guest reads per round")
    ap.add_argument("--only", metavar="ROUTE,...", help="run only these routes (names or keys, e.g. direct/4,proxy), "
                    "for an experiment; the anchors the report needs must be among them")
    args = ap.parse_args()
    ram_bytes = parse_size(args.ram)
    if args.multifd is not None and args.multifd < 1:
        ap.error("--multifd needs at least 1 channel")
    if args.postcopy:
        routes, run = POSTCOPY, run_postcopy
    elif args.multifd:
        routes, run = multifd_routes(args.multifd), run_precopy
    else:
        routes, run = PRECOPY, run_precopy
    if args.only:
        wanted = set(args.only.split(","))
        routes = [r for r in routes if r.name in wanted or r.key in wanted]
    runs: dict[str, list[Figure]] = {r.key: [] for r in routes}
    loads = [_load()]
    with random_ram(args.workdir / "proxy-qemu-ram.bin", ram_bytes) as (backing, sockdir):
        if args.qemu:
            for d in (backing.parent, sockdir):
                expose(d, args.qemu)
        bench = Bench(sockdir, backing, ram_bytes, args.qemu, running=args.guest == "running",
                      postcopy_bandwidth=int(args.postcopy_bandwidth * 1e6), preempt=args.preempt,
                      switch_after=args.switch_after << 20,
                      hz=args.hz, touch=args.touch)
        kinds = sorted({k for r in routes for k in r.stages})
        startup = {k: startup_cpu(k, sockdir) for k in kinds}
        for i in range(args.repeat):
            for route in routes:
                f = run(bench, route)
                runs[route.key].append(f)
                extra = ""
                if args.postcopy:
                    extra = (f"  {len(f.latencies_ms)} faults: median {_med(f.latencies_ms):6.3f} ms "
                             f"p99 {_p99(f.latencies_ms):6.3f} ms; blocktime {f.blocktime_ms} ms / "
                             f"{f.requests} requests")
                cpu = " ".join(f"{s.kind} {s.cpu_s:5.2f} s {s.rss_mb:5.1f} MB" for s in f.stages)
                print(f"  run {i + 1} {route.key:<16} {f.transferred / 1e6:8.1f} MB {f.seconds:6.3f} s "
                      f"{f.mb_per_s:7.0f} MB/s  QEMU CPU {f.qemu_cpu_s[0]:4.2f} + {f.qemu_cpu_s[1]:4.2f} s, "
                      f"{f.busy(startup):4.2f} CPUs busy, steal {f.steal_s:4.2f} s  {cpu}{extra}", file=sys.stderr)
            loads.append(_load())

    qemu = f"QEMU {args.qemu or '7.2'}"
    print(f"\nload average (1, 5, 15 min) at the start and after each round: {' | '.join(loads)}")
    print("stage start-up CPU (idle start and stop, subtracted in parentheses): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()))
    steals = sorted(f.steal_s / f.seconds for fs in runs.values() for f in fs)
    print(f"steal (CPU time the host gave to other guests while these CPUs wanted it) per second of migration: "
          f"median {_med(steals):.2f}, max {steals[-1]:.2f} CPUs; rounds with much of it are the host's, not the "
          "route's")
    if args.postcopy:
        return report_postcopy(args, routes, runs, startup, qemu)
    if args.multifd:
        return report_multifd(args, routes, runs, startup, qemu)
    return report_precopy(args, routes, runs, startup, qemu)


def _rate(runs: dict[str, list[Figure]], key: str) -> float:
    return _med([f.mb_per_s for f in runs[key]])


#: Precopy routes against the splice pumps in the same place: ``route: (the pumps' key, target or None, what,
#: the pumps)``.  The proxies have issue 15's targets; the tee pumps (the proxy's reads, nothing decoded) show
#: what reading the stream costs before any decoding.
VS_PUMPS = {"proxy": ("splice-pump/0", 0.9, "one proxy", "one splice pump"),
            "ferry": ("splice-pumps/0", 0.8, "two proxies with ferry over tcp", "two splice pumps joined by tcp"),
            "tee-pump": ("splice-pump/0", None, "one tee pump", "one splice pump"),
            "tee-pumps": ("splice-pumps/0", None, "two tee pumps joined by tcp", "two splice pumps")}


def report_precopy(args: argparse.Namespace, routes: list[Route], runs: dict[str, list[Figure]],
                   startup: dict[str, float], qemu: str) -> int:
    anchor, tcp_anchor = _rate(runs, "direct/0"), _rate(runs, "direct-tcp/0")
    print(f"\n{qemu}: migration of a {args.guest} {args.ram} random-RAM guest, medians of {args.repeat}")
    print(f"{'route':<46} {'MB/s':>7} {'vs unix':>8} {'vs tcp':>7} {'vs pump(s)':>11}  "
          "CPU: src+dst QEMU, CPUs busy; stages per GiB (net), peak RSS")
    for r in routes:
        rate = _rate(runs, r.key)
        pump = VS_PUMPS.get(r.name)
        vs_pump = f"{rate / _rate(runs, pump[0]):11.0%}" if pump else " " * 11
        print(f"{r.title:<46} {rate:7.0f} {rate / anchor:8.0%} {rate / tcp_anchor:7.0%} {vs_pump}  "
              f"{_stage_cells(runs[r.key], startup)}")
    print()
    for name, (key, target, what, anchor_name) in VS_PUMPS.items():
        if f"{name}/0" not in runs or key not in runs:  # left out with --only
            continue
        ratio = _rate(runs, f"{name}/0") / _rate(runs, key)
        if target is None:
            print(f"{what} (the proxy's splice, tee and read of every byte, nothing decoded): {ratio:.0%} of "
                  f"{anchor_name}: what reading the stream costs before any decoding")
        else:
            print(f"{what}: {ratio:.0%} of {anchor_name}  target >= {target:.0%}: {verdict(ratio >= target)}")
    rss = max(f.proxy_rss_mb for k in ("proxy/0", "ferry/0") if k in runs for f in runs[k])
    print(f"proxy peak RSS (max over its runs): {rss:.1f} MB  target < 100 MB: {verdict(rss < 100)}")
    return 0


def report_multifd(args: argparse.Namespace, routes: list[Route], runs: dict[str, list[Figure]],
                   startup: dict[str, float], qemu: str) -> int:
    n = args.multifd
    pump, proxy = _rate(runs, f"splice-pump/{n}"), _rate(runs, f"proxy/{n}")
    print(f"\n{qemu}: migration of a {args.guest} {args.ram} random-RAM guest, medians of {args.repeat}")
    print(f"{'route':<46} {'channels':>9} {'MB/s':>7} {'vs direct':>10} {'vs pump(s)':>11}  "
          "CPU: src+dst QEMU, CPUs busy; stages per GiB (net), peak RSS")
    for r in routes:
        rate = _rate(runs, r.key)
        direct = _rate(runs, f"direct/{r.multifd}") if f"direct/{r.multifd}" in runs else math.nan
        pumps = {"proxy": f"splice-pump/{r.multifd}", "ferry": f"splice-pumps/{r.multifd}"}.get(r.name)
        vs_pump = f"{rate / _rate(runs, pumps):11.0%}" if pumps in runs else " " * 11
        channels = f"{r.multifd} multifd" if r.multifd else "1 (plain)"
        print(f"{r.title:<46} {channels:>9} {rate:7.0f} {rate / direct:10.0%} {vs_pump}  "
              f"{_stage_cells(runs[r.key], startup)}")
    rss = max(f.proxy_rss_mb for r in routes for f in runs[r.key])
    print(f"\none proxy, {n} multifd channels: {proxy / pump:.0%} of one splice pump carrying the same channels"
          f"  target >= 90%: {verdict(proxy / pump >= 0.9)}")
    print(f"proxy peak RSS (max over every proxy of every run): {rss:.1f} MB  target < 100 MB: {verdict(rss < 100)}")
    return 0


def report_postcopy(args: argparse.Namespace, routes: list[Route], runs: dict[str, list[Figure]],
                    startup: dict[str, float], qemu: str) -> int:
    bw = f"max-postcopy-bandwidth {args.postcopy_bandwidth:g} MB/s" if args.postcopy_bandwidth else \
        "postcopy bandwidth unlimited"
    print(f"\n{qemu}: postcopy{' with preempt' if args.preempt else ''} of a running {args.ram} random-RAM guest "
          f"reading {args.touch} random pages {args.hz} times a second; switched after {args.switch_after} MiB, "
          f"{bw}; medians of {args.repeat} (latencies: over every requested page of every run)")
    print(f"{'route':<42} {'total s':>7} {'postcopy s':>10} {'faults':>7} {'median ms':>9} {'p99 ms':>8} "
          f"{'vs direct':>11} {'QEMU bt/req':>11}  CPU: src+dst QEMU, CPUs busy; stages per GiB (net), peak RSS")
    figures: dict[str, tuple[float, float, float]] = {}
    for r in routes:
        fs = runs[r.key]
        lat = [x for f in fs for x in f.latencies_ms]
        total = _med([f.seconds for f in fs])
        figures[r.name] = (total, _med(lat), _p99(lat))
        d_med, d_p99 = figures["direct"][1:]
        per_req = _med([f.blocktime_ms / f.requests for f in fs if f.requests])
        print(f"{r.title:<42} {total:7.3f} {_med([f.postcopy_s for f in fs]):10.3f} {len(lat):7d} {_med(lat):9.3f} "
              f"{_p99(lat):8.3f} {_med(lat) / d_med:5.2f} {_p99(lat) / d_p99:5.2f} {per_req:11.3f}  "
              f"{_stage_cells(fs, startup)}")
    p_total, x_total = figures["splice-pump"][0], figures["proxy"][0]
    (_, d_med, d_p99), (_, x_med, x_p99) = figures["direct"], figures["proxy"]
    rss = max(f.proxy_rss_mb for f in runs["proxy/0"])
    print("(vs direct: the median's and the p99's ratio to direct's; QEMU bt/req: the destination's "
          "postcopy-blocktime / the source's postcopy-requests, ms, median of the runs)")
    print(f"\nproxy vs splice pump, total time: {p_total / x_total:.0%} of the pump's speed (time "
          f"{x_total / p_total:.2f}x)  target >= 90%: {verdict(p_total / x_total >= 0.9)}")
    print(f"page-fault latency through the proxy: median {x_med / d_med:.2f}x, p99 {x_p99 / d_p99:.2f}x direct's  "
          f"target <= 1.5x: {verdict(x_med / d_med <= 1.5 and x_p99 / d_p99 <= 1.5)}")
    if "tee-pump" in figures:
        print(f"tee pump vs splice pump, total time: {p_total / figures['tee-pump'][0]:.0%} of the pump's speed "
              "(the proxy's reads, nothing decoded)")
    print(f"proxy peak RSS (max over its runs): {rss:.1f} MB  target < 100 MB: {verdict(rss < 100)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
