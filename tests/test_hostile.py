"""Hostile input against real golden streams: truncation, mutation, lying length fields.

Whatever the bytes, the decoders raise only DecodeError, with an offset and
a field path, and never allocate for a length they have not seen.

Truncation: the device-only stream (every device section of a pc machine,
12.8 KB) is cut at every offset.  Every other golden stream is cut at every
offset of its first 4 KiB, on both sides of its record boundaries (the end
of every event, found by re-encoding the events one by one; a fixed sample
of 150 of them where a stream has more) and at 100 random offsets.  A sweep
of every offset of the larger streams would take hours: what it leaves out
is mostly the inside of page data and of the vmdesc JSON, where a cut takes
the same path wherever it falls, and the inside of device sections, which
the device-only stream covers field by field.
"""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest
from qemu_corpus import SCHEMA_FOR
from qemu_recipes import names

from vmferry import DecodeError
from vmferry.cli.files import load_schema_file
from vmferry.encode import legacy
from vmferry.encode.legacy import encode_event

pytestmark = pytest.mark.qemu

MAX_BOUNDARIES = 150
RANDOM_CUTS = 100
MUTATIONS = 25


def _options(qemu_corpus, name):
    if name not in SCHEMA_FOR:
        return legacy.DecodeOptions()
    return legacy.DecodeOptions(fallback_schemas=load_schema_file(str(qemu_corpus.get(SCHEMA_FOR[name]))))


def _decode_fails_cleanly(data: bytes, options, expect_failure: bool = True) -> None:
    try:
        for _ in legacy.decode([data], options):
            pass
    except DecodeError as e:
        assert e.offset is not None and 0 <= e.offset <= len(data), e
        assert e.path.startswith("$"), e
        return
    assert not expect_failure, f"a {len(data)}-byte prefix decoded without error"


def _boundaries(data: bytes, options) -> list[int]:
    out, pos = [], 0
    for ev in legacy.decode([data], options):
        buf = bytearray()
        encode_event(buf, ev)
        pos += len(buf)
        out.append(pos)
    assert pos == len(data)
    return out


def test_device_stream_truncated_at_every_offset(qemu_corpus):
    name = "pc-7.2-xen-devices"
    data = qemu_corpus.get(name).read_bytes()
    options = _options(qemu_corpus, name)
    for n in range(len(data)):
        _decode_fails_cleanly(data[:n], options)


@pytest.mark.parametrize("name", names())
def test_truncation_at_boundaries_and_random_offsets(name, qemu_corpus):
    data = qemu_corpus.get(name).read_bytes()
    options = _options(qemu_corpus, name)
    rng = random.Random(name)
    cuts = set(range(min(4096, len(data))))
    boundaries = _boundaries(data, options)
    if len(boundaries) > MAX_BOUNDARIES:  # streams with thousands of short runs: a fixed sample of them
        boundaries = boundaries[-20:] + rng.sample(boundaries, MAX_BOUNDARIES - 20)
    for b in boundaries:
        cuts.update((b - 1, b, b + 1))
    cuts.update(rng.randrange(len(data)) for _ in range(RANDOM_CUTS))
    for n in sorted(c for c in cuts if 0 <= c < len(data)):
        _decode_fails_cleanly(data[:n], options)


@pytest.mark.parametrize("name", names())
def test_random_mutations(name, qemu_corpus):
    data = qemu_corpus.get(name).read_bytes()
    options = _options(qemu_corpus, name)
    rng = random.Random(f"mutate-{name}")
    for _ in range(MUTATIONS):
        stream = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 8))):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        try:
            out = b"".join(bytes(c) for c in legacy.encode(legacy.decode([bytes(stream)], options)))
        except DecodeError as e:
            assert e.offset is not None and e.path.startswith("$")
            continue
        assert out == bytes(stream)  # what decodes re-encodes exactly


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def _lying_vmdesc(data: bytes, at: int) -> bytes:
    text = data[at + 5:].replace(b'"array_len": 16,', b'"array_len": 2147483647,', 1)
    assert text != data[at + 5:]
    return data[:at + 1] + struct.pack(">I", len(text)) + text


def test_lying_lengths_allocate_nothing_big(qemu_corpus):
    data = qemu_corpus.get("pc-7.2-paused").read_bytes()
    vmdesc_at = legacy.find_vmdesc(data)[0]
    mem_size_at = data.index(b"\x00\x00\x00\x00\x04\x08\x20\x04")  # total | MEM_SIZE (spec appendix A)
    cases = {
        "vmdesc length": _patched(data, vmdesc_at + 1, b"\xff\xff\xff\xf0"),
        "configuration name length": _patched(data, 9, b"\xff\xff\xff\xff"),
        "MEM_SIZE total": _patched(data, mem_size_at, b"\x7f\xff\xff\xff\xff\xff\xf0\x04"),
        "block length": _patched(data, mem_size_at + 8 + 7, struct.pack(">Q", 1 << 62)),
        "vmdesc array_len": _lying_vmdesc(data, vmdesc_at),
    }
    for what, stream in cases.items():
        tracemalloc.start()
        try:
            with pytest.raises(DecodeError):
                for _ in legacy.decode([stream]):
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * len(data), f"{what}: peak allocation {peak} bytes"
