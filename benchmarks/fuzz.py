"""The full fuzz run of issue 17: every codec's decoder and everything after it, against mutated streams.

Targets:
  * at least 100,000 inputs per codec, each run through decode, inspect (--json), convert (to QEMU's format
    and to one other format) and the proxy's transcoder (tests/fuzzing.py, ``exercise``), with no internal
    error (anything but a vmferry error, which the CLI reports with exit 2), every DecodeError naming an
    offset inside the input, no hang;
  * peak RSS under 200 MB for every input under 10 MB: the fuzzed inputs, measured one by one, and the
    large hostile shapes of ``fuzzing.large_inputs`` (~10 MB each: the blow-ups of issue 17 and the densest
    structures each format can spell), each in a fresh process.

The seeds are vmferry's own device models in every format, and with ``--corpus`` real QEMU streams made
small (their device sections, schemas and a few pages).  Inputs run in-process, in worker processes (``--workers``, 2 by default: the machine has two CPUs), in
batches of ``--batch`` inputs; each worker's address space is capped (``--memory-limit``) so that a
blow-up ends as a counted MemoryError instead of taking the host down.  Peak RSS is read per input from
/proc (VmHWM, reset through /proc/self/clear_refs before each input); it includes the worker's own
~65 MB (Python, vmferry and every codec's library) and whatever earlier inputs left in it, so the table gives
beside it the most one input raised the RSS above where it stood, and which input (seed, number in its batch,
size: rerun it with ``fuzzing.Generator``), and the most the worker held before an input (its baseline).
The inputs are the same for the same ``--seed``.

Workers are not recycled when they grow, nor trimmed (malloc_trim) between inputs, on purpose: what an
input leaves behind is part of what it cost, a long-lived proxy would hold it too, and a baseline that
climbs is a finding.  One did: workers ended at 263-286 MB after ~20 batches, in steps of 128 and 64 MB
(glibc's mmapped chunks, live, not freed memory it kept: its free lists stayed at 4-7 MB).  Those were
vmferry.encode.scan's cached address-word templates for page sizes of 1 and 2 bytes (a word per page of a
16 MiB segment), built when the generator encoded mutated events as QEMU's stream and kept by the module;
scan now makes no template under 1 KiB pages (the smallest a decoder accepts) and keeps at most 2 MiB.  The
harness's own ASN.1 encoding memo, kept by the module too (~1 MB per 2000 ASN.1 inputs), is now each
generator's.

    .venv/bin/python benchmarks/fuzz.py [--per-codec 100000] [--codecs legacy,json,...] [--workers 2]
                                        [--batch 2000] [--seed S] [--no-large] [--save DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzzing  # noqa: E402

MAX_RSS_MB = 200
QEMU_SEEDS = ("pc-7.2-paused", "q35-7.2-e1000e", "pc-7.2-postcopy-ram", "pc-10.0-paused")


def _init(limit: int) -> None:
    os.nice(10)
    fuzzing.limit_memory(limit)


def _batch(task: tuple[str, str, int, tuple[str, ...]]) -> fuzzing.Stats:
    codec, seed, count, streams = task
    return fuzzing.run_batch(codec, seed, count, keep_failures=10, qemu_streams=streams)


def _large(task: tuple[str, str, str]) -> dict[str, Any]:
    codec, name, path = task
    data = Path(path).read_bytes()
    os.unlink(path)
    per_input = fuzzing._reset_hwm()
    start = time.monotonic()
    import signal

    def alarm(signum: int, frame: Any) -> None:
        raise fuzzing.Hang()

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 600)
    try:
        out = fuzzing.exercise(data, codec, 1)
    except fuzzing.Hang:
        out = fuzzing.Outcome("hang", "", "over 600 s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    rss = fuzzing._hwm_kib() if per_input else None
    return {"codec": codec, "shape": name, "bytes": len(data), "outcome": out.kind, "step": out.step,
            "detail": out.detail[:160], "rss_mb": round(rss / 1024, 1) if rss else None,
            "seconds": round(time.monotonic() - start, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-codec", type=int, default=100_000)
    ap.add_argument("--codecs", default=",".join(fuzzing.CODECS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--seed", default="issue17")
    ap.add_argument("--memory-limit", type=float, default=2.0, help="GiB of address space per worker")
    ap.add_argument("--no-large", action="store_true", help="skip the large hostile inputs")
    ap.add_argument("--corpus", default=os.environ.get("VMFERRY_CORPUS_DIR"),
                    help="a directory of the test corpus (tests/qemu_corpus.py): its real QEMU streams "
                         f"{', '.join(QEMU_SEEDS)} join the seeds, made small (default: $VMFERRY_CORPUS_DIR)")
    ap.add_argument("--save", help="directory for the inputs that failed (hex in a JSON file per codec)")
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    codecs = args.codecs.split(",")
    limit = int(args.memory_limit * (1 << 30))
    fuzzing.limit_memory(limit + (1 << 30))  # this process builds the large inputs
    ctx = multiprocessing.get_context("fork")
    totals = {c: fuzzing.Stats(c) for c in codecs}
    streams = tuple(str(Path(args.corpus, f"{n}.mig")) for n in QEMU_SEEDS
                    if args.corpus and Path(args.corpus, f"{n}.mig").is_file())
    print(f"seeds: vmferry's device models{', and ' + ', '.join(Path(p).stem for p in streams) if streams else ''}")
    tasks = [(c, f"{args.seed}/{i}", min(args.batch, args.per_codec - i * args.batch), streams)
             for i in range((args.per_codec + args.batch - 1) // args.batch) for c in codecs]
    start = time.monotonic()
    print(f"{len(tasks)} batches of up to {args.batch} inputs, {len(codecs)} codecs, {args.workers} workers",
          flush=True)
    with ctx.Pool(args.workers, initializer=_init, initargs=(limit,), maxtasksperchild=20) as pool:
        done = 0
        for stats in pool.imap_unordered(_batch, tasks):
            totals[stats.codec].add(stats)
            done += 1
            for f in stats.failures:
                print(f"  FAILURE {f['codec']} batch {f['seed']} input {f['index']}: {f['kind']} at {f['step']}: "
                      f"{f['detail']}", flush=True)
            if done % max(1, len(tasks) // 20) == 0 or done == len(tasks):
                n = sum(t.inputs for t in totals.values())
                print(f"  {done}/{len(tasks)} batches, {n} inputs, {n / (time.monotonic() - start):.0f}/s, "
                      f"failures {sum(t.failed for t in totals.values())}", flush=True)
    wall = time.monotonic() - start

    large: list[dict[str, Any]] = []
    if not args.no_large:
        with tempfile.TemporaryDirectory(prefix="vmferry-fuzz-") as tmp:
            jobs = []
            for c in codecs:
                for k, (name, data) in enumerate(fuzzing.large_inputs(c).items()):
                    path = os.path.join(tmp, f"{c}-{k}")
                    Path(path).write_bytes(data)
                    jobs.append((c, name, path))
            # spawned, not forked: a fork of this process (which built the inputs) would count its pages
            spawn = multiprocessing.get_context("spawn")
            with spawn.Pool(args.workers, initializer=_init, initargs=(limit,), maxtasksperchild=1) as pool:
                large = list(pool.imap(_large, jobs))

    print(f"\nfuzzed inputs ({wall:.0f} s wall, {args.workers} workers; RSS per input, worker included)\n")
    print("| codec | inputs | through every step | refused by the decoder | refused later (exit 2) | capped output "
          "| internal | no offset | hang | memory | max RSS | most one input added (seed, number, bytes) "
          "| worker baseline | largest input |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    failed = 0
    for c in codecs:
        t = totals[c]
        k = t.counts
        failed += t.failed
        print(f"| {c} | {t.inputs:,} | {k.get('ok', 0):,} | {k.get('refused', 0):,} | {k.get('refused-later', 0):,} "
              f"| {k.get('capped', 0):,} | {k.get('internal', 0)} | {k.get('no-offset', 0)} | {k.get('hang', 0)} "
              f"| {k.get('memory', 0)} | {t.max_rss_kib / 1024:.0f} MB | {t.max_growth_kib / 1024:.0f} MB "
              f"{t.max_growth_at} | {t.max_base_kib / 1024:.0f} MB | {t.largest_input:,} B |")
    print(f"\ntotal: {sum(t.inputs for t in totals.values()):,} inputs, {failed} failures")
    later: dict[str, int] = {}
    for t in totals.values():
        for key, v in t.steps.items():
            later[key] = later.get(key, 0) + v
    if later:
        print("\nrefused after decoding, or output capped (all codecs):")
        for key, v in sorted(later.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  {v:8,}  {key}")
    for t in totals.values():
        for f in t.failures[:5]:
            print(f"FAILURE {f['codec']} {f['kind']} at {f['step']}: {f['detail']}")
    if large:
        print("\nlarge hostile inputs (each in a fresh worker)\n")
        print("| codec | shape | bytes | outcome | where, why | peak RSS |")
        print("|---|---|---:|---|---|---:|")
        for r in large:
            why = f"{r['step']}: {r['detail'][:90]}" if r["outcome"] != "ok" else ""
            print(f"| {r['codec']} | {r['shape']} | {r['bytes']:,} | {r['outcome']} | {why} | {r['rss_mb']} MB |")
        over = [r for r in large if (r["rss_mb"] or 0) >= MAX_RSS_MB or r["outcome"] in fuzzing.FAILURES]
        print(f"\nlarge inputs over {MAX_RSS_MB} MB or failing: {len(over)}")
        failed += len(over)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for c, t in totals.items():
            if t.failures:
                Path(args.save, f"{c}.json").write_text(json.dumps(t.failures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "wall_seconds": wall, "workers": args.workers, "seed": args.seed,
            "codecs": {c: {"inputs": t.inputs, "counts": t.counts, "max_rss_kib": t.max_rss_kib,
                           "max_rss_input": t.max_rss_input, "max_growth_kib": t.max_growth_kib,
                           "max_growth_at": t.max_growth_at, "max_base_kib": t.max_base_kib,
                           "per_input_rss": t.per_input_rss, "bytes_in": t.bytes_in, "largest_input": t.largest_input,
                           "later": t.steps, "failures": [dict(f, input=None) for f in t.failures]}
                       for c, t in totals.items()},
            "large": large}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
