"""Live-migration speed: a 1 GiB vmferry endpoint to another endpoint over a unix socket, beside QEMU->QEMU.

Measured in this one run, each the median of ``--repeat`` migrations:

* endpoint -> endpoint, negotiated (ferry framing with CRC32C, return path);
* endpoint -> endpoint, mask 0 (QEMU's own stream, no return path);
* the anchor: direct QEMU 7.2 -> QEMU 7.2 migration of a running 1 GiB guest
  over a unix socket, ``max-bandwidth`` lifted, driven by the same tool.

Every guest's RAM is random (incompressible, no zero pages): the endpoint
with ``--fill random``, QEMU through a memory-backend-file pre-filled with
os.urandom.  Both sources keep running while they migrate (the endpoint's
workload, QEMU's counting boot sector).  A figure is MB (10^6 bytes) of
stream per second of wall time from the ``migrate`` command until the source
reports ``completed``.

    .venv/bin/python benchmarks/live.py [--workdir DIR] [--repeat N] [--ram 1G]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, random_ram, vmferry  # noqa: E402

from vmferry.live.endpoint.machine import parse_size  # noqa: E402
from vmferry.live.migrate import Result, migrate, qemu_qmp_args  # noqa: E402
from vmferry.live.qemu.process import QemuVM, escape_option  # noqa: E402


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"endpoint exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit("endpoint did not come up")
        time.sleep(0.05)


def endpoint_run(sockdir: Path, ram: str, set_caps: list[str] | None) -> Result:
    src_sock, dst_sock = sockdir / "src.qmp", sockdir / "dst.qmp"
    for stale in (src_sock, dst_sock):
        stale.unlink(missing_ok=True)
    src = subprocess.Popen(vmferry("serve", "-q", "--qmp", f"unix:{src_sock}", "--ram", ram, "--fill", "random"))
    dst = subprocess.Popen(vmferry("serve", "-q", "--qmp", f"unix:{dst_sock}", "--ram", ram, "--incoming"))
    try:
        _wait_socket(src_sock, src)
        _wait_socket(dst_sock, dst)
        time.sleep(0.5)  # let the workload run a little
        return migrate(f"unix:{src_sock}", f"unix:{dst_sock}", uri=f"unix:{sockdir / 'stream.sock'}",
                       set_caps=set_caps, poll=0.005)
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def qemu_run(sockdir: Path, backing: Path, ram_bytes: int) -> Result:
    src_sock, dst_sock = sockdir / "qsrc.qmp", sockdir / "qdst.qmp"
    src_mem = (f"memory-backend-file,id=mem,size={ram_bytes},mem-path={escape_option(backing.absolute())},"
               "share=off")
    dst_mem = f"memory-backend-ram,id=mem,size={ram_bytes}"
    m = f"{ram_bytes >> 20}M"
    with QemuVM("pc,memory-backend=mem", ["-object", src_mem, *qemu_qmp_args(str(src_sock))], memory=m,
                paused=False, boot_sector=True, name="qemu-src") as src, \
            QemuVM("pc,memory-backend=mem", ["-object", dst_mem, *qemu_qmp_args(str(dst_sock))], memory=m,
                   paused=False, boot_sector=True, incoming=True, name="qemu-dst") as dst:
        src.wait_for_count(2, timeout=60)
        src.set_params({"max-bandwidth": 1 << 40})
        r = migrate(f"unix:{src_sock}", f"unix:{dst_sock}", uri=f"unix:{sockdir / 'qstream.sock'}", poll=0.005)
        assert dst.status() == "running"
        return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ram", default="1G")
    args = ap.parse_args()
    ram_bytes = parse_size(args.ram)
    runs: dict[str, list[Result]] = {"qemu": [], "ferry": [], "legacy": []}
    with random_ram(args.workdir / "live-qemu-ram.bin", ram_bytes) as (backing, sockdir):
        for i in range(args.repeat):
            for label, fn in (("qemu", lambda: qemu_run(sockdir, backing, ram_bytes)),
                              ("ferry", lambda: endpoint_run(sockdir, args.ram, None)),
                              ("legacy", lambda: endpoint_run(sockdir, args.ram, []))):
                r = fn()
                runs[label].append(r)
                print(f"  run {i + 1} {label:<7} {r.transferred / 1e6:8.1f} MB {r.seconds:6.3f} s "
                      f"{r.mb_per_s:7.0f} MB/s  downtime {r.downtime_ms} ms  codec {r.codec or '?'}",
                      file=sys.stderr)

    def med(label: str) -> tuple[float, float, float]:
        rs = runs[label]
        return (statistics.median(r.mb_per_s for r in rs), statistics.median(r.seconds for r in rs),
                statistics.median(r.transferred for r in rs) / 1e6)

    anchor = med("qemu")[0]
    rows = [("QEMU 7.2 -> QEMU 7.2 (anchor)", "qemu"),
            ("endpoint -> endpoint, negotiated (ferry)", "ferry"),
            ("endpoint -> endpoint, mask 0 (legacy)", "legacy")]
    print(f"\n{'migration of a running ' + args.ram + ' guest over unix:':<46} {'MB':>8} {'s':>7} {'MB/s':>7} "
          f"{'vs QEMU':>8}")
    for title, label in rows:
        rate, secs, mb = med(label)
        print(f"{title:<46} {mb:8.1f} {secs:7.3f} {rate:7.0f} {rate / anchor:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
