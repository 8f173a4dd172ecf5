"""The fuzzer of tests/fuzzing.py, a few seconds per codec (benchmarks/fuzz.py is the full run).

Mutated streams of each format go through decode, inspect, convert (to QEMU's format and to another
format) and the proxy's transcoder, in a child process whose address space is capped: no input may end in
anything but a clean vmferry error (the CLI's exit 2), every DecodeError names an offset inside the input,
and no input takes the process over 200 MB.  The inputs are the same on every run (a fixed seed and
count: about two seconds per codec here; asn1tools is the slowest).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor

import pytest

import fuzzing

COUNT = 400
COUNTS = {"asn1-ber": 120, "asn1-der": 120, "asn1-per": 120, "asn1-xer": 100}
MAX_RSS_MB = 200
ADDRESS_SPACE = 2 << 30  # a blow-up fails the child with MemoryError instead of eating the host


def _batch(codec: str) -> fuzzing.Stats:
    return fuzzing.run_batch(codec, "ci", COUNTS.get(codec, COUNT), keep_failures=5)


@pytest.mark.parametrize("codec", fuzzing.CODECS)
def test_fuzz_codec(codec):
    # A spawned child, not a fork of pytest: a forked child's RSS starts at whatever the test run has grown to
    # (236 MB once, 2,000 tests in), which would be charged to the inputs.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=fuzzing.limit_memory,
                             initargs=(ADDRESS_SPACE,)) as pool:
        stats = pool.submit(_batch, codec).result()
    assert stats.counts.get("ok", 0) > 0, f"no input got through every step: {fuzzing.describe(stats)}"
    assert stats.failed == 0, "\n".join([fuzzing.describe(stats)] + [
        f"{f['kind']} at {f['step']}: {f['detail']} (input {f['index']}: {f['input'][:120]}...)"
        for f in stats.failures])
    assert stats.max_rss_kib < MAX_RSS_MB * 1024, fuzzing.describe(stats)


REGRESSIONS = sorted((Path(__file__).parent / "fuzz-regressions").glob("*.mig"))


def test_the_regression_inputs_are_in_the_checkout() -> None:
    assert len(REGRESSIONS) >= 2, "tests/fuzz-regressions/*.mig missing (.gitignore ignores *.mig elsewhere)"


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_inputs_the_full_run_found(path: Path) -> None:
    """Inputs benchmarks/fuzz.py found an internal error with, named CODEC-K-WHAT (K: the input's number in its
    batch, which picks the steps after decoding): each now ends as a vmferry error, or not at all."""
    codec, k, _ = path.stem.split("-", 2)
    out = fuzzing.exercise(path.read_bytes(), codec, int(k))
    assert out.kind not in fuzzing.FAILURES, (out.kind, out.step, out.detail)
