"""Size and speed of ferry's compression beside xz, zstd and QEMU 10.0's own multifd zstd (issue 15).

For each input (a QEMU stream file), measured in this one run on the same bytes:

* sizes: QEMU's stream; ``xz -9e`` and ``zstd -19`` of it; ``vmferry convert
  --to ferry --compress zstd`` (GROUP frames, docs/format.md §2.4) and the
  older per-frame compression (``--per-frame``); and the bytes QEMU 10.0
  sends for the same guest with ``multifd-compression=zstd`` (the stream is
  loaded into a QEMU 10.0 and migrated, paused, to a second one over unix
  sockets through a relay that counts every channel);
* speed: ferry encode + decode (QEMU stream -> ferry+zstd -> QEMU stream,
  library calls) against ``lzma`` with xz's ``-9e`` preset (liblzma, as the
  ``xz`` command uses) compress + decompress, in this process, repeats
  interleaved, medians.  The ratio is taken on CPU time (both sides are
  single-threaded; this machine is shared, and CPU time moves less than wall
  time); wall time is shown beside it, and so are the commands
  (``vmferry convert`` both ways against ``xz -9e`` and ``xz -d``), whose
  times include starting Python;
* peak RSS of both ``vmferry convert`` commands.

Targets: ferry+zstd at most the size of ``xz -9e``; encode + decode at least
10x xz's speed; peak RSS under 100 MB.  The round trip must give QEMU's
stream back byte for byte.

Inputs: ``--stream FILE`` (repeatable) with ``--qemu-args`` for the devices
QEMU needs to load it (``-m`` and the machine type come from the stream), or
by default the idle ``pc-i440fx-7.2`` guest (corpus ``pc-7.2-paused``, 64 MiB,
never started), a booted guest with 512 MiB (the corpus' counting guest,
``pc-7.2-running`` with ``-m 512M``, saved while it counts) and, when
scripts/ensure-linux-guest.sh has built it, the Linux test guest (Debian's
cloud kernel and a busybox initramfs) booted with 512 MiB and saved while
it counts.

    .venv/bin/python benchmarks/compress.py [--stream FILE [--qemu-args ARGS]] [--repeat N] [--no-qemu10]
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import lzma
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the corpus recipes
from _bench import REPO, run_once, verdict, vmferry  # noqa: E402

from vmferry.encode import ferry, legacy  # noqa: E402
from vmferry.events import Configuration, RamMemSize  # noqa: E402

XZ_PRESET = 9 | lzma.PRESET_EXTREME


@dataclasses.dataclass
class Guest:
    label: str
    stream: Path
    qemu_args: list[str]  # what QEMU needs besides -machine and -m to load the stream
    boot_sector: bool = False  # the counting boot sector on a floppy
    serial: bool = False  # COM1
    expose: Path | None = None  # a directory the QEMU 10.0 chroot must see (the Linux guest's kernel)


LINUX_GUEST = Path(os.environ.get("VMFERRY_LINUX_GUEST") or "/var/cache/vmferry/linux-guest")
LINUX_APPEND = "console=ttyS0 quiet loglevel=0"  # as tests/linux_guest.py


def linux_guest(workdir: Path) -> Guest | None:
    """Debian's cloud kernel with a busybox initramfs counting on ttyS0 (scripts/ensure-linux-guest.sh), booted
    with 512 MiB under QEMU 7.2 and saved while it counts; None when the guest is not built."""
    from vmferry.live.qemu.process import QemuVM

    if not (LINUX_GUEST / "vmlinuz").is_file():
        print(f"no Linux guest at {LINUX_GUEST} (scripts/ensure-linux-guest.sh): left out", file=sys.stderr)
        return None
    args = ["-kernel", str(LINUX_GUEST / "vmlinuz"), "-initrd", str(LINUX_GUEST / "initrd.img"),
            "-append", LINUX_APPEND]
    path = workdir / "guests" / "linux-512m-running.mig"
    if not path.exists():
        print("booting the Linux guest with 512 MiB under QEMU 7.2 and saving it while it counts ...",
              file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        with QemuVM("pc-i440fx-7.2", args, memory="512M", paused=False, serial=True,
                    workdir=Path(tempfile.mkdtemp(prefix="vf-linux-")), name="linux-guest") as vm:
            vm.wait_for_count(20, timeout=180)
            vm.save(path, timeout=300)
    return Guest("Linux guest (Debian cloud kernel, busybox), 512 MiB, booted", path, args, serial=True,
                 expose=LINUX_GUEST)


def default_guests(workdir: Path) -> list[Guest]:
    from qemu_recipes import RECIPES, Corpus, generate

    corpus = Corpus(workdir / "corpus", reuse=True)
    idle = Guest("idle pc-i440fx-7.2, 64 MiB", corpus.get("pc-7.2-paused"), [])
    booted = workdir / "guests" / "pc-7.2-512m-running.mig"
    if not booted.exists():
        recipe = dataclasses.replace(RECIPES["pc-7.2-running"], name="pc-7.2-512m-running", memory="512M",
                                     summary="counting guest, 512 MiB, saved while it counts")
        print("saving a booted 512 MiB counting guest with QEMU ...", file=sys.stderr)
        booted.parent.mkdir(parents=True, exist_ok=True)
        generate(recipe, booted.parent)
    guests = [idle, Guest("booted counting guest, 512 MiB", booted, [], boot_sector=True, serial=True)]
    linux = linux_guest(workdir)
    return guests + ([linux] if linux is not None else [])


# ---------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------


def ferry_bytes(data: bytes, **options: object) -> bytes:
    return b"".join(bytes(c) for c in ferry.encode(legacy.decode([data]), compress="zstd", **options))


def legacy_bytes(fry: bytes) -> bytes:
    return b"".join(bytes(c) for c in legacy.encode(ferry.decode([fry], ferry.DecodeOptions(legacy_records=True))))


def tool_size(argv: list[str], data: bytes) -> int:
    return len(subprocess.run(argv, input=data, capture_output=True, check=True).stdout)


# ---------------------------------------------------------------------------
# QEMU 10.0, multifd with zstd
# ---------------------------------------------------------------------------


class CountingRelay:
    """Accept on ``listen``; connect each connection to ``target``; copy both ways, counting what the source sends.

    QEMU's multifd opens the main channel and one connection per multifd channel; all are counted.
    """

    def __init__(self, listen: Path, target: Path) -> None:
        self.target = target
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(16)
        self.server.settimeout(0.1)
        self.sent: list[int] = []  # bytes source -> destination, per connection
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except socket.timeout:
                continue
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(str(self.target))
            with self.lock:
                index = len(self.sent)
                self.sent.append(0)
            for a, b, count in ((conn, peer, True), (peer, conn, False)):
                t = threading.Thread(target=self._copy, args=(a, b, index if count else None), daemon=True)
                t.start()
                self.threads.append(t)

    def _copy(self, src: socket.socket, dst: socket.socket, index: int | None) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                if index is not None:
                    with self.lock:
                        self.sent[index] += len(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def finish(self, timeout: float = 30.0) -> list[int]:
        deadline = time.monotonic() + timeout
        for t in list(self.threads):
            t.join(max(0.0, deadline - time.monotonic()))
        self.stop.set()
        self.acceptor.join()
        self.server.close()
        return list(self.sent)


def stream_facts(data: bytes) -> tuple[str, str]:
    """The machine type and the ``-m`` size of the guest that wrote ``data``."""
    machine, ram = "pc", None
    for ev in legacy.decode([data]):
        if isinstance(ev, Configuration):
            machine = ev.machine
        elif isinstance(ev, RamMemSize):
            main = max(ev.blocks, key=lambda b: b.length)
            ram = f"{main.length >> 20}M"
            break
    if ram is None:
        raise SystemExit("the stream has no MEM_SIZE record: cannot size a guest for it")
    return machine, ram


def qemu10_multifd_zstd(guest: Guest, data: bytes) -> tuple[int, list[int], str]:
    """Bytes QEMU 10.0 sends, all channels together, migrating the stream's guest with multifd zstd."""
    from vmferry.live.qemu.process import QemuVM, qemu_version

    machine, ram = stream_facts(data)
    tmp = Path(tempfile.mkdtemp(prefix="vf-mfd-"))
    try:
        common = dict(args=guest.qemu_args, memory=ram, incoming=True, serial=guest.serial,
                      boot_sector=guest.boot_sector, qemu_version="10.0")
        if guest.expose is not None:
            from vmferry.live.qemu.process import expose

            expose(guest.expose, "10.0")
        with QemuVM(machine, workdir=tmp / "src", name="qemu10-source", **common) as src, \
                QemuVM(machine, workdir=tmp / "dst", name="qemu10-destination", **common) as dst:
            src.load(guest.stream)  # the very same RAM and devices; -S keeps it paused, so nothing changes
            for vm in (src, dst):
                vm.set_caps({"multifd": True})
                vm.set_params({"multifd-channels": 2, "multifd-compression": "zstd"})
            src.expose(tmp)
            dst.cmd("migrate-incoming", uri=f"unix:{tmp / 'dst.sock'}")
            deadline = time.monotonic() + 30
            while not (tmp / "dst.sock").exists():
                if time.monotonic() > deadline:
                    raise SystemExit("QEMU 10.0 did not listen for the migration")
                time.sleep(0.02)
            relay = CountingRelay(tmp / "relay.sock", tmp / "dst.sock")
            src.migrate(f"unix:{tmp / 'relay.sock'}")
            src.wait_migration(300)
            deadline = time.monotonic() + 60
            while dst.status() == "inmigrate":
                if time.monotonic() > deadline:
                    raise SystemExit("the QEMU 10.0 destination did not finish loading")
                time.sleep(0.05)
            state = dst.status()
            sent = relay.finish()
        return sum(sent), sent, f"{qemu_version(release='10.0')}, destination {state}"
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


# ---------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------


def interleaved(data: bytes, repeat: int) -> dict[str, tuple[float, float]]:
    """Median (CPU s, wall s) of each way, run in turn ``repeat`` times after one warm-up round.

    ``ferry``: QEMU's stream decoded, encoded as ferry+zstd, decoded and encoded as QEMU's stream again (what
    compressing a stream file and getting it back costs); ``ferry codec``: only ferry's own encoder and decoder,
    from the stream's events to bytes and back to events (the events made once, beforehand).
    """
    events = list(legacy.decode([data]))
    ways = {
        "ferry": lambda: legacy_bytes(ferry_bytes(data, groups=True)),
        "ferry codec": lambda: list(ferry.decode([b"".join(bytes(c) for c in ferry.encode(
            events, compress="zstd", groups=True))])),
        "xz": lambda: lzma.decompress(lzma.compress(data, preset=XZ_PRESET)),
    }
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    for i in range(repeat + 1):
        for name, fn in ways.items():
            c, w = time.process_time(), time.perf_counter()
            out = fn()
            c, w = time.process_time() - c, time.perf_counter() - w
            if name != "ferry codec" and out != data:
                raise SystemExit(f"{name}: the round trip changed the stream")
            if i:
                got[name].append((c, w))
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in got.items()}


def commands(guest: Guest, workdir: Path, repeat: int) -> dict[str, tuple[float, float]]:
    """Median wall time and peak RSS of the commands, in turn."""
    fry, back, xz, unxz = (workdir / n for n in ("c.fry", "c.mig", "c.mig.xz", "c.unxz"))
    src = str(guest.stream)
    ways = {
        "vmferry convert --to ferry --compress zstd": vmferry("convert", "-q", src, str(fry), "--to", "ferry",
                                                              "--compress", "zstd"),
        "vmferry convert --to legacy": vmferry("convert", "-q", str(fry), str(back), "--to", "legacy"),
        "xz -9e": ["bash", "-c", f"xz -9e -c {shlex.quote(src)} > {shlex.quote(str(xz))}"],
        "xz -d": ["bash", "-c", f"xz -d -c {shlex.quote(str(xz))} > {shlex.quote(str(unxz))}"],
    }
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    for i in range(repeat + 1):
        for name, argv in ways.items():
            t, rss = run_once(argv)
            if i:
                got[name].append((t, rss))
    if not (filecmp.cmp(src, back, shallow=False) and filecmp.cmp(src, unxz, shallow=False)):
        raise SystemExit("a command's round trip changed the stream")
    for p in (fry, back, xz, unxz):
        p.unlink(missing_ok=True)
    return {k: (statistics.median(t for t, _ in v), max(r for _, r in v)) for k, v in got.items()}


# ---------------------------------------------------------------------------


def measure(guest: Guest, workdir: Path, repeat: int, qemu10: bool) -> list[tuple[str, str, str, bool]]:
    data = guest.stream.read_bytes()
    print(f"\n== {guest.label}: {guest.stream} ({len(data):,} bytes)", file=sys.stderr)
    grouped = ferry_bytes(data, groups=True)
    if legacy_bytes(grouped) != data:
        raise SystemExit("ferry+zstd did not give the stream back byte for byte")
    sizes = {
        "legacy": len(data),
        "xz -9e": tool_size(["xz", "-9e", "-c"], data),
        "zstd -19": tool_size(["zstd", "-19", "-q", "-c"], data),
        "ferry+zstd": len(grouped),
        "ferry+zstd --per-frame": len(ferry_bytes(data)),
    }
    multifd_note = ""
    if qemu10:
        total, channels, how = qemu10_multifd_zstd(guest, data)
        sizes["QEMU 10.0 multifd zstd"] = total
        multifd_note = f" (channels {', '.join(f'{c:,}' for c in channels)}; QEMU {how})"
    for k, v in sizes.items():
        print(f"  {k:<26} {v:>12,} B  {len(data) / v:6.2f}x smaller than QEMU's stream", file=sys.stderr)
    speed = interleaved(data, repeat)
    cmd = commands(guest, workdir, repeat)
    for k, (t, rss) in cmd.items():
        print(f"  {k:<44} {t:7.3f} s  peak RSS {rss:6.1f} MB", file=sys.stderr)
    (fc, fw), (xc, xw) = speed["ferry"], speed["xz"]
    ratio_cpu, ratio_wall = xc / fc, xw / fw
    rss = max(cmd["vmferry convert --to ferry --compress zstd"][1], cmd["vmferry convert --to legacy"][1])
    cmd_ferry = cmd["vmferry convert --to ferry --compress zstd"][0] + cmd["vmferry convert --to legacy"][0]
    cmd_xz = cmd["xz -9e"][0] + cmd["xz -d"][0]
    g, x = sizes["ferry+zstd"], sizes["xz -9e"]
    rows = [
        (f"[{guest.label}] ferry+zstd vs xz -9e", f"{g:,} vs {x:,} B ({g / x:.3f}; zstd -19 {sizes['zstd -19']:,}, "
         f"per-frame {sizes['ferry+zstd --per-frame']:,})", "<= 1.0", g <= x),
        ("  encode + decode vs xz -9e + -d", f"{ratio_cpu:.1f}x faster (CPU {fc * 1e3:.0f} vs {xc * 1e3:.0f} ms; "
         f"wall {fw * 1e3:.0f} vs {xw * 1e3:.0f} ms, {ratio_wall:.1f}x)", ">= 10x", ratio_cpu >= 10),
        ("  ferry's codec alone (events <-> bytes)", f"{xc / speed['ferry codec'][0]:.1f}x faster (CPU "
         f"{speed['ferry codec'][0] * 1e3:.0f} ms)", "(info)", True),
        ("  the same as commands", f"{cmd_xz / cmd_ferry:.1f}x (vmferry convert x2 {cmd_ferry:.2f} s, "
         f"xz -9e + xz -d {cmd_xz:.2f} s)", "(info)", True),
        ("  peak RSS, vmferry convert both ways", f"{rss:.0f} MB", "< 100 MB", rss < 100),
    ]
    if qemu10:
        q = sizes["QEMU 10.0 multifd zstd"]
        rows.append(("  QEMU 10.0 multifd zstd, same guest", f"{q:,} B ({q / g:.2f}x ferry+zstd){multifd_note}",
                     "(info)", True))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--stream", type=Path, action="append", help="a QEMU stream to measure (repeatable)")
    ap.add_argument("--qemu-args", default="", help="QEMU options the --stream guests need besides -machine "
                                                    "and -m (devices), for the QEMU 10.0 comparison")
    ap.add_argument("--boot-sector", action="store_true", help="the --stream guests ran vmferry's counting "
                                                               "boot sector (floppy and COM1)")
    ap.add_argument("--serial", action="store_true", help="the --stream guests have COM1")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-qemu10", action="store_true", help="skip QEMU 10.0's multifd zstd comparison")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stream:
        guests = [Guest(p.name, p, shlex.split(args.qemu_args), args.boot_sector, args.boot_sector or args.serial)
                  for p in args.stream]
    else:
        guests = default_guests(args.workdir)
    rows = []
    for g in guests:
        rows += measure(g, args.workdir, args.repeat, not args.no_qemu10)
    print(f"\n{'figure':<46} {'measured':<78} {'target':<9} result")
    for name, value, target, ok in rows:
        print(f"{name:<46} {value:<78} {target:<9} {verdict(ok)}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
