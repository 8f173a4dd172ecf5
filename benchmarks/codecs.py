"""Speed, size and memory of the wire formats (issue: the wire formats).

Targets, each a ratio measured in this one run:
  * a 1 GiB random-RAM guest goes legacy -> ferry -> legacy at at least 50%
    of ``cp`` throughput on the same bytes: QEMU's stream read from a file,
    encoded as ferry, decoded again and written as QEMU's stream to a file,
    streamed in one process as a transcoding proxy would, against ``cp IN
    OUT``.  Shown too: the same through a pipe between two ``vmferry
    convert`` processes (which share the machine's 2 cores with the pipe's
    copies), and the two legs file to file.  Every run starts with the disk
    synced;
  * ferry with zstd makes an idle guest's stream (mostly zero pages: a 1 GiB
    guest that never ran) at least 5x smaller than QEMU's; the 64 MiB
    ``pc-7.2-paused`` stream is shown too;
  * peak RSS under 200 MB for every codec, both directions, on the 1 GiB stream.

``--table`` also measures every format on every stream of the corpus (size,
encode and decode speed, in this process) and writes the tables into
docs/format.md between the ``BEGIN/END GENERATED TABLES`` markers.

    .venv/bin/python benchmarks/codecs.py [--workdir DIR] [--repeat N] [--table] [--no-rss]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the corpus recipes
from _bench import REPO, Run, run_once, verdict, vmferry  # noqa: E402

BEGIN = "<!-- BEGIN GENERATED TABLES (benchmarks/codecs.py --table) -->"
END = "<!-- END GENERATED TABLES -->"


def corpus(workdir: Path):
    from qemu_recipes import Corpus

    return Corpus(workdir / "corpus", reuse=True)


def idle_guest(workdir: Path) -> Path:
    """A 1 GiB pc guest that never ran: its RAM is zero pages (made once by QEMU, then reused)."""
    from qemu_recipes import RECIPES, generate

    out = workdir / "idle"
    path = out / "pc-7.2-1g-idle.mig"
    if not path.exists():
        base = RECIPES["pc-7.2-paused"]
        import dataclasses

        recipe = dataclasses.replace(base, name="pc-7.2-1g-idle", summary="pc 7.2, 1 GiB, never started",
                                     memory="1G")
        print("saving a 1 GiB idle guest with QEMU ...", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        generate(recipe, out)
    return path


def sh(cmd: list[str]) -> list[str]:
    import shlex

    return ["bash", "-c", " ".join(shlex.quote(c) if c != "|" else c for c in cmd)]


def measure_synced(label: str, argv: list[str], repeat: int) -> Run:
    """Like _bench.measure, but every run starts with the disk synced: earlier writes must not slow it."""
    times, rss = [], []
    for i in range(repeat + 1):
        os.sync()
        time.sleep(1)
        t, r = run_once(argv)
        if i:  # the first run warms the page cache and the imports
            times.append(t)
            rss.append(r)
    result = Run(label, statistics.median(times), max(rss))
    print(f"  {label:<40} {result.seconds:8.3f} s  peak RSS {result.peak_rss_mb:7.1f} MB", file=sys.stderr)
    return result


def chain(src: str, dst: str) -> None:
    """legacy -> ferry -> legacy in one process, streamed: what a transcoding proxy does (``--chain``)."""
    from vmferry.cli.files import decode_input, open_input
    from vmferry.encode import ferry, legacy

    with open(dst, "wb") as out:
        events = decode_input(open_input(src))
        out.writelines(legacy.encode(ferry.decode(ferry.encode(events), ferry.DecodeOptions(legacy_records=True))))


def throughput(stream: Path, workdir: Path, repeat: int) -> list[tuple[str, str, str, bool]]:
    nbytes = stream.stat().st_size
    copy, fry, out, pipe_out, chain_out = (workdir / n for n in ("copy.mig", "leg.fry", "leg.mig", "pipe.mig",
                                                                 "chain.mig"))
    cp = measure_synced("cp (anchor)", ["cp", str(stream), str(copy)], repeat)
    one = measure_synced("legacy -> ferry -> legacy, one process",
                         [sys.executable, __file__, "--chain", str(stream), str(chain_out)], repeat)
    pipe = measure_synced("legacy | ferry | legacy, two processes",
                          sh(vmferry("convert", "-q", str(stream), "-", "--to", "ferry") + ["|"]
                             + vmferry("convert", "-q", "-", str(pipe_out), "--to", "legacy")), repeat)
    leg1 = measure_synced("legacy -> ferry (file)", vmferry("convert", "-q", str(stream), str(fry), "--to", "ferry"),
                          repeat)
    leg2 = measure_synced("ferry -> legacy (file)", vmferry("convert", "-q", str(fry), str(out), "--to", "legacy"),
                          repeat)
    same = all(filecmp.cmp(stream, p, shallow=False) for p in (out, pipe_out, chain_out))
    for p in (copy, fry, out, pipe_out, chain_out):
        p.unlink(missing_ok=True)
    share = one.rate(nbytes) / cp.rate(nbytes)
    piped = pipe.rate(nbytes) / cp.rate(nbytes)
    legs = cp.seconds / (leg1.seconds + leg2.seconds)
    return [
        ("legacy->ferry->legacy vs cp (streamed)", f"{share:.0%} of cp ({one.rate(nbytes):.0f} vs "
         f"{cp.rate(nbytes):.0f} MB/s)", ">= 50%", share >= 0.5),
        ("  the same through a pipe", f"{piped:.0%} of cp ({pipe.rate(nbytes):.0f} MB/s, two vmferry processes "
         "on 2 cores)", "(info)", True),
        ("  file to file, one leg after the other", f"{legs:.0%} of cp (legs {leg1.seconds:.2f} s + "
         f"{leg2.seconds:.2f} s, each {cp.seconds / leg1.seconds:.0%} / {cp.seconds / leg2.seconds:.0%} of cp)",
         "(info)", True),
        ("  round trip outputs identical", "yes" if same else "NO", "byte-exact", same),
        ("  peak RSS of the legs", f"{max(one.peak_rss_mb, pipe.peak_rss_mb, leg1.peak_rss_mb, leg2.peak_rss_mb):.0f} MB",
         "< 200 MB", max(one.peak_rss_mb, pipe.peak_rss_mb, leg1.peak_rss_mb, leg2.peak_rss_mb) < 200),
    ]


def compression(workdir: Path) -> list[tuple[str, str, str, bool]]:
    rows = []
    for label, path, target in (("idle 1 GiB guest", idle_guest(workdir), True),
                                ("pc-7.2-paused (64 MiB)", corpus(workdir).get("pc-7.2-paused"), False)):
        size = path.stat().st_size
        got = {}
        for comp in ("zstd", "lz4", "none"):
            dst = workdir / f"c.{comp}.fry"
            import subprocess

            subprocess.run(vmferry("convert", "-q", str(path), str(dst), "--to", "ferry", "--compress", comp),
                           check=True)
            got[comp] = dst.stat().st_size
            dst.unlink()
        ratio = size / got["zstd"]
        rows.append((f"ferry+zstd vs legacy, {label}",
                     f"{ratio:.1f}x smaller ({size:,} -> {got['zstd']:,} B; lz4 {size / got['lz4']:.1f}x, "
                     f"none {size / got['none']:.1f}x)", ">= 5x" if target else "(info)",
                     ratio >= 5 if target else True))
    return rows


def once(label: str, argv: list[str]) -> Run:
    os.sync()
    t, r = run_once(argv)
    print(f"  {label:<40} {t:8.3f} s  peak RSS {r:7.1f} MB", file=sys.stderr)
    return Run(label, t, r)


def rss(stream: Path, workdir: Path) -> tuple[list[tuple[str, str, str, bool]], dict[str, tuple[float, float]]]:
    """Peak RSS of every codec, both directions, on ``stream``; also returns MB/s per codec."""
    from vmferry.encode import names

    nbytes = stream.stat().st_size
    rows, speeds = [], {}
    back = workdir / "rss-back.mig"
    same_fmt = once("legacy -> legacy", vmferry("convert", "-q", str(stream), str(back), "--to", "legacy"))
    speeds["legacy"] = (same_fmt.rate(nbytes), same_fmt.rate(nbytes))
    back.unlink()
    rows.append(("peak RSS legacy", f"{same_fmt.peak_rss_mb:.0f} MB ({same_fmt.rate(nbytes):.0f} MB/s)", "< 200 MB",
                 same_fmt.peak_rss_mb < 200))
    for name in names()[1:]:
        mid = workdir / f"rss.{name}"
        enc = once(f"legacy -> {name}", vmferry("convert", "-q", str(stream), str(mid), "--to", name))
        dec = once(f"{name} -> legacy", vmferry("convert", "-q", str(mid), str(back), "--to", "legacy"))
        same = filecmp.cmp(stream, back, shallow=False)
        mid.unlink()
        back.unlink()
        peak = max(enc.peak_rss_mb, dec.peak_rss_mb)
        speeds[name] = (enc.rate(nbytes), dec.rate(nbytes))
        rows.append((f"peak RSS {name}", f"{peak:.0f} MB ({enc.rate(nbytes):.0f} / {dec.rate(nbytes):.0f} MB/s)"
                     + ("" if same else " OUTPUT DIFFERS"), "< 200 MB", peak < 200 and same))
    return rows, speeds


# ---------------------------------------------------------------------------
# the tables of docs/format.md
# ---------------------------------------------------------------------------


def _timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tables(workdir: Path, big_speeds: dict[str, tuple[float, float]] | None) -> str:
    from qemu_recipes import names as corpus_names

    from vmferry.cli.files import load_schema_file
    from vmferry.encode import codec, legacy, names

    schema_for = {"pc-2.2-novmdesc": "pc-2.3-nocfg", "pc-7.2-xen-devices": "pc-7.2-paused"}
    c = corpus(workdir)
    fmts = names()
    sizes: dict[str, dict[str, int]] = {}
    enc_t = {f: 0.0 for f in fmts}
    dec_t = {f: 0.0 for f in fmts}
    total = 0
    for stream in corpus_names():
        data = c.get(stream).read_bytes()
        opts = legacy.DecodeOptions()
        if stream in schema_for:
            opts = legacy.DecodeOptions(fallback_schemas=load_schema_file(str(c.get(schema_for[stream]))))
        events = list(legacy.decode([data], opts))
        total += len(data)
        row = sizes[stream] = {}
        print(f"  table: {stream}", file=sys.stderr)
        for f in fmts:
            mod = codec(f)
            out = b"".join(bytes(x) for x in mod.encode(events))
            row[f] = len(out)
            enc_t[f] += _timed(lambda: b"".join(bytes(x) for x in mod.encode(events)))
            if f == "legacy":
                dec_t[f] += _timed(lambda: list(legacy.decode([out], opts)))
            else:
                dec_t[f] += _timed(lambda: list(mod.decode([out])))
        row["ferry+zstd"] = sum(len(x) for x in codec("ferry").encode(events, compress="zstd"))
        row["ferry+lz4"] = sum(len(x) for x in codec("ferry").encode(events, compress="lz4"))
    cols = fmts[:2] + ["ferry+zstd", "ferry+lz4"] + fmts[2:]
    lines = [BEGIN, "",
             f"Measured by `benchmarks/codecs.py --table` ({time.strftime('%Y-%m-%d')}, QEMU "
             f"{c.qemu.split()[3] if len(c.qemu.split()) > 3 else c.qemu}, 2 cores).", "",
             "### Size of each format on the corpus streams (bytes)", "",
             "| stream | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for stream, row in sizes.items():
        lines.append(f"| {stream} | " + " | ".join(f"{row[k]:,}" for k in cols) + " |")
    sums = {k: sum(r[k] for r in sizes.values()) for k in cols}
    lines.append("| **all** | " + " | ".join(f"**{sums[k]:,}**" for k in cols) + " |")
    lines.append("| **vs legacy** | " + " | ".join(f"{sums[k] / sums['legacy']:.2f}" for k in cols) + " |")
    lines += ["", "### Encode and decode speed", "",
              "MB of QEMU stream per second, single-threaded, in one process (events in memory for encoding, "
              "bytes in memory for decoding).  *Corpus*: all the corpus streams above together "
              f"({total / 1e6:.1f} MB, mostly zero pages and device state).  *1 GiB random*: "
              "`vmferry convert` file to file on the 1 GiB random-RAM guest (decode + encode in one command, "
              "so each figure includes QEMU's format on the other side; one run each, with the disk synced before, and the disk makes single runs vary by up to 2x on this shared machine).", "",
              "| format | corpus encode | corpus decode | 1 GiB random: legacy -> format | 1 GiB random: format -> legacy |",
              "|---|---:|---:|---:|---:|"]
    for f in fmts:
        big = ("", "")
        if big_speeds and f in big_speeds:
            big = (f"{big_speeds[f][0]:.0f}", f"{big_speeds[f][1]:.0f}")
        lines.append(f"| {f} | {total / enc_t[f] / 1e6:.0f} | {total / dec_t[f] / 1e6:.0f} | {big[0]} | {big[1]} |")
    lines += ["", END]
    return "\n".join(lines)


def write_tables(text: str) -> None:
    doc = REPO / "docs" / "format.md"
    old = doc.read_text()
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(new)
    print(f"tables written to {doc.relative_to(REPO)}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--stream", type=Path, help="the 1 GiB stream to use instead of the corpus one")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--table", action="store_true", help="also write the size/speed tables into docs/format.md")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-codec runs on the 1 GiB stream")
    ap.add_argument("--chain", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chain:
        chain(*args.chain)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    stream = args.stream or corpus(args.workdir).get("pc-7.2-1g-random")
    print(f"stream: {stream} ({stream.stat().st_size:,} bytes)", file=sys.stderr)
    os.sync()

    rows = throughput(stream, args.workdir, args.repeat)
    rows += compression(args.workdir)
    speeds = None
    if not args.no_rss:
        more, speeds = rss(stream, args.workdir)
        rows += more
    print(f"\n{'figure':<44} {'measured':<62} {'target':<10} result")
    for name, value, target, ok in rows:
        print(f"{name:<44} {value:<62} {target:<10} {verdict(ok)}")
    if args.table:
        write_tables(tables(args.workdir, speeds))
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
