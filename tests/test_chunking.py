"""The bytes an encoder writes depend on the stream, never on how its input was cut into chunks.

A decoder ends a page run where its input chunk ends; the ferry and record
encoders regroup runs (vmferry.encode.runs) so that a file (mapped in
windows) and a pipe (read as it comes) give the same output.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry import encode
from vmferry.encode import legacy
from vmferry.encode.runs import PageGroup, regroup
from vmferry.events import RamPages, RamZeros

FORMATS = ["ferry", "jsonl", "json", "cbor", "msgpack"]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in chunks of the given sizes (cycled), the way a pipe hands it over."""
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[pos:pos + n])
        pos += n
        i += 1
    return out


def encoded(fmt: str, chunks: list[bytes]) -> bytes:
    return b"".join(bytes(c) for c in encode.codec(fmt).encode(legacy.decode(chunks)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_qemu_stream_encodes_the_same_whatever_the_chunks(qemu_corpus, fmt):
    data = qemu_corpus["pc-7.2-running"].read_bytes()
    whole = encoded(fmt, [data])
    # the reader of a pipe: a 64-byte sniff, then what each read returned; odd sizes cut records too
    for sizes in ([64, 1 << 20], [4093], [65536, 9, 4105, 1]):
        assert encoded(fmt, cut(data, sizes)) == whole, sizes
    # and the result still decodes back to QEMU's bytes
    back = b"".join(bytes(c) for c in legacy.encode(encode.codec(fmt).decode([whole])))
    assert back == data


@pytest.mark.parametrize("fmt", ["ferry", "jsonl"])
def test_file_and_pipe_give_the_same_bytes(qemu_corpus, tmp_path, fmt):
    src = qemu_corpus["pc-7.2-paused"]
    cli = [sys.executable, "-m", "vmferry.cli", "convert", "-q"]
    from_file = subprocess.run([*cli, str(src), "-", "--to", fmt], capture_output=True, timeout=120)
    with open(src, "rb") as f:
        piped = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        from_pipe = subprocess.run([*cli, "-", "-", "--to", fmt], stdin=piped.stdout, capture_output=True,
                                   timeout=120)
        piped.wait()
    assert from_file.returncode == 0 and from_pipe.returncode == 0, from_pipe.stderr
    assert len(from_pipe.stdout) == len(from_file.stdout)
    assert from_pipe.stdout == from_file.stdout


def _split_run(ev: RamPages, cuts: list[int]) -> list[RamPages]:
    """A run of packed pages cut where ``cuts`` say (page indexes), as a decoder at chunk ends would."""
    out, start = [], 0
    ps = ev.page_size
    for c in sorted(set(c for c in cuts if 0 < c < ev.count)) + [ev.count]:
        assert ev.data is not None
        out.append(RamPages(ev.block, ev.offset + start * ps, c - start, ev.named and start == 0, ps,
                            data=memoryview(ev.data)[start * ps:c * ps]))
        start = c
    return out


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 700), cuts=st.lists(st.integers(1, 699), max_size=8), per=st.sampled_from([1, 7, 256]))
def test_regroup_cuts_runs_every_per_pages_from_their_start(count, cuts, per):
    ps = 16
    data = bytes(i % 251 for i in range(count * ps))
    run = RamPages("pc.ram", 4 * ps, count, True, ps, data=data)
    zeros = [RamZeros("pc.ram", (4 + count) * ps, 3, False, ps), RamZeros("pc.ram", (7 + count) * ps, 2, False, ps,
                                                                          fill=b"\x00\x05")]
    out = list(regroup([*_split_run(run, cuts), *zeros], per))
    groups = [g for g in out if isinstance(g, PageGroup)]
    assert [g.count for g in groups] == [min(per, count - i) for i in range(0, count, per)]
    assert [g.offset for g in groups] == [run.offset + i * ps for i in range(0, count, per)]
    assert [g.named for g in groups] == [i == 0 for i in range(len(groups))]
    assert b"".join(bytes(g.as_event().contiguous()) for g in groups) == data
    # contiguous zero runs become one, the fill bytes kept in place
    assert out[len(groups):] == [RamZeros("pc.ram", (4 + count) * ps, 5, False, ps, fill=b"\x00\x00\x00\x00\x05")]


def test_regroup_keeps_runs_that_do_not_continue_each_other_apart():
    ps = 16
    a = RamPages("a", 0, 2, True, ps, data=bytes(2 * ps))
    b = RamPages("a", 2 * ps, 2, True, ps, data=bytes(2 * ps))   # names its block again: a new run
    c = RamPages("a", 8 * ps, 1, False, ps, data=bytes(ps))      # not where b ended
    d = RamPages("b", 9 * ps, 1, False, ps, data=bytes(ps))      # another block
    groups = list(regroup([a, b, c, d], 256))
    assert [(g.block, g.offset, g.count, g.named) for g in groups] == [  # type: ignore[union-attr]
        ("a", 0, 2, True), ("a", 2 * ps, 2, True), ("a", 8 * ps, 1, False), ("b", 9 * ps, 1, False)]
