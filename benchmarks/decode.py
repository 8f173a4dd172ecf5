"""Decode speed and memory of the legacy codec on a 1 GiB random-RAM guest.

Targets (issue: foundation), each a ratio measured in this one run:
  * ``vmferry inspect`` at least 3x as fast as QEMU's own
    ``scripts/analyze-migration.py -f`` on the same stream;
  * ``vmferry convert --to legacy`` at least 40% of ``cp`` throughput on the same file;
  * peak RSS under 200 MB for both.

The stream is saved by real QEMU from a guest whose RAM is a file-backed
memory backend filled with random data (tests/qemu_recipes.py).  QEMU's
analyze-migration.py comes from Debian's QEMU source package (``apt-get
source qemu``, needs a deb-src line) unless ``--analyze`` points at it.

    .venv/bin/python benchmarks/decode.py [--workdir DIR] [--stream FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the corpus recipes
from _bench import REPO, measure, verdict, vmferry  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--stream", type=Path, help="use this stream instead of saving one")
    ap.add_argument("--analyze", type=Path, help="path of QEMU's analyze-migration.py")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    stream = args.stream or make_stream(args.workdir)
    analyze = args.analyze or analyze_script(args.workdir / "qemu-source")
    nbytes = stream.stat().st_size
    copy = args.workdir / "copy.mig"
    out = args.workdir / "convert.mig"
    print(f"stream: {stream} ({nbytes:,} bytes)", file=sys.stderr)

    cp = measure("cp (anchor)", ["cp", str(stream), str(copy)], args.repeat)
    analyze_run = measure("analyze-migration.py -f (anchor)", [sys.executable, str(analyze), "-f", str(stream)],
                          args.repeat)
    inspect = measure("vmferry inspect", vmferry("inspect", str(stream)), args.repeat)
    convert = measure("vmferry convert --to legacy", vmferry("convert", "-q", str(stream), str(out), "--to",
                                                             "legacy"), args.repeat)
    same = filecmp.cmp(stream, out, shallow=False)
    for p in (copy, out):
        os.unlink(p)

    speedup = analyze_run.seconds / inspect.seconds
    share = convert.rate(nbytes) / cp.rate(nbytes)
    rows = [
        ("inspect vs analyze-migration.py", f"{speedup:.1f}x faster", ">= 3x", speedup >= 3),
        ("convert --to legacy vs cp", f"{share:.0%} of cp ({convert.rate(nbytes):.0f} vs {cp.rate(nbytes):.0f} MB/s)",
         ">= 40%", share >= 0.40),
        ("inspect peak RSS", f"{inspect.peak_rss_mb:.0f} MB", "< 200 MB", inspect.peak_rss_mb < 200),
        ("convert peak RSS", f"{convert.peak_rss_mb:.0f} MB", "< 200 MB", convert.peak_rss_mb < 200),
        ("convert output identical", "yes" if same else "NO", "byte-exact", same),
    ]
    print(f"\n{'figure':<34} {'measured':<40} {'target':<10} result")
    for name, value, target, ok in rows:
        print(f"{name:<34} {value:<40} {target:<10} {verdict(ok)}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
