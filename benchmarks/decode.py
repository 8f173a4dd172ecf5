"""Reading a 1 GiB QEMU stream file: ``vmferry inspect`` and ``convert --to legacy`` beside their anchors.

Targets (issue 15), each a ratio measured in this one run on the same file, every command run in turn
(``--repeat`` rounds after a warm-up round), medians:

  * ``vmferry inspect`` at least 10x as fast as QEMU's own ``scripts/analyze-migration.py -f``;
  * ``vmferry convert --to legacy`` at least 0.9 of ``cp``'s throughput on the same file (the disk synced
    before each copy);
  * peak RSS under 100 MB for both.

The stream is saved by real QEMU from a guest whose RAM is a file-backed memory backend filled with random
data (tests/qemu_recipes.py), or given with ``--stream``.  QEMU's analyze-migration.py comes from Debian's QEMU
source package (``apt-get source qemu``, needs a deb-src line) unless ``--analyze`` points at it.

The page cache matters: how much a mapping of the file costs the kernel depends on the size of the pages
(folios) it caches the file in, and that depends on who put the file there.  ``--cache`` measures the file

  * ``written``: as a writer leaves it in the cache (copied afresh with ``cp``, as QEMU's ``cat`` wrote the
    corpus stream): small folios;
  * ``reread``: as read back from the disk (its cached pages dropped with ``posix_fadvise``, then read once
    with ``cat``): large folios, with this kernel's readahead;

and ``both`` (the default) measures one, then the other.  Times are wall times; CPU times (user + system) are
shown beside them, since this machine is shared and they move less.

    .venv/bin/python benchmarks/decode.py [--workdir DIR] [--stream FILE] [--repeat N] [--cache written|reread|both]
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the corpus recipes
from _bench import REPO, interleaved, median, verdict, vmferry  # noqa: E402


def analyze_script(cache: Path) -> Path:
    """QEMU 7.2's scripts/analyze-migration.py from Debian's source package, fetched once."""
    found = glob.glob(str(cache / "qemu-*" / "scripts" / "analyze-migration.py"))
    if found:
        return Path(found[0])
    cache.mkdir(parents=True, exist_ok=True)
    print("fetching QEMU's source package for analyze-migration.py (apt-get source qemu) ...", file=sys.stderr)
    subprocess.run(["apt-get", "source", "-q", "qemu"], cwd=cache, check=True, stdout=subprocess.DEVNULL)
    found = glob.glob(str(cache / "qemu-*" / "scripts" / "analyze-migration.py"))
    if not found:
        raise SystemExit("analyze-migration.py not found in the QEMU source package")
    return Path(found[0])


def make_stream(workdir: Path) -> Path:
    from qemu_recipes import Corpus

    print("saving (or reusing) a 1 GiB random-RAM guest saved by QEMU ...", file=sys.stderr)
    return Corpus(workdir / "corpus", reuse=True).get("pc-7.2-1g-random")


def set_cache(stream: Path, state: str) -> None:
    """Leave ``stream``'s page cache as a writer leaves it (``written``) or as read back from disk (``reread``)."""
    fd = os.open(stream, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if state == "reread":
        subprocess.run(["cat", str(stream)], stdout=subprocess.DEVNULL, check=True)


def measure(stream: Path, analyze: Path, workdir: Path, repeat: int, state: str) -> list[tuple[str, str, str, bool]]:
    nbytes = stream.stat().st_size
    copy, out = workdir / "copy.mig", workdir / "convert.mig"
    commands = {
        "analyze-migration.py -f": [sys.executable, str(analyze), "-f", str(stream)],
        "vmferry inspect": vmferry("inspect", str(stream)),
        "cp": ["cp", str(stream), str(copy)],
        "vmferry convert --to legacy": vmferry("convert", "-q", str(stream), str(out), "--to", "legacy"),
    }

    def before(name: str) -> None:
        if name in ("cp", "vmferry convert --to legacy"):
            for p in (copy, out):
                p.unlink(missing_ok=True)
            os.sync()  # earlier writes must not be flushed during this copy
            time.sleep(0.5)

    print(f"\n== page cache {state!r}", file=sys.stderr)
    runs = {k: median(v) for k, v in interleaved(commands, repeat, before).items()}
    for k, s in runs.items():
        print(f"  {k:<30} {s.wall:7.3f} s  CPU {s.cpu:6.3f} s  peak RSS {s.rss_mb:6.1f} MB", file=sys.stderr)
    same = filecmp.cmp(stream, out, shallow=False)
    for p in (copy, out):
        p.unlink(missing_ok=True)

    a, i = runs["analyze-migration.py -f"], runs["vmferry inspect"]
    c, v = runs["cp"], runs["vmferry convert --to legacy"]
    speedup, share = a.wall / i.wall, c.wall / v.wall
    tag = f"[{state}] "
    return [
        (tag + "inspect vs analyze-migration.py", f"{speedup:.1f}x faster ({i.wall:.3f} vs {a.wall:.3f} s; CPU "
         f"{i.cpu:.3f} vs {a.cpu:.3f} s, {a.cpu / i.cpu:.1f}x)", ">= 10x", speedup >= 10),
        (tag + "convert --to legacy vs cp", f"{share:.2f} of cp ({nbytes / v.wall / 1e6:.0f} vs "
         f"{nbytes / c.wall / 1e6:.0f} MB/s; CPU {v.cpu:.2f} vs {c.cpu:.2f} s)", ">= 0.9", share >= 0.9),
        (tag + "inspect peak RSS", f"{i.rss_mb:.0f} MB", "< 100 MB", i.rss_mb < 100),
        (tag + "convert peak RSS", f"{v.rss_mb:.0f} MB", "< 100 MB", v.rss_mb < 100),
        (tag + "convert output identical", "yes" if same else "NO", "byte-exact", same),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--stream", type=Path, help="use this stream instead of saving one")
    ap.add_argument("--analyze", type=Path, help="path of QEMU's analyze-migration.py")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cache", choices=["written", "reread", "both"], default="both")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.stream or make_stream(args.workdir)
    analyze = args.analyze or analyze_script(args.workdir / "qemu-source")
    # Our own copy, written afresh: the state "written" whatever state the source is in; removed at the end.
    stream = args.workdir / "input.mig"
    print(f"stream: {source} ({source.stat().st_size:,} bytes), measured as {stream}", file=sys.stderr)
    rows = []
    try:
        shutil.copyfile(source, stream)
        os.sync()
        for state in (["written", "reread"] if args.cache == "both" else [args.cache]):
            if state == "reread":
                set_cache(stream, "reread")
            rows += measure(stream, analyze, args.workdir, args.repeat, state)
    finally:
        stream.unlink(missing_ok=True)
    print(f"\n{'figure':<44} {'measured':<62} {'target':<10} result")
    for name, value, target, ok in rows:
        print(f"{name:<44} {value:<62} {target:<10} {verdict(ok)}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
