"""ferry GROUP frames and the x86 filter (docs/format.md §2.2, §2.4): lossless, refused by older readers,
hostile groups and filtered runs raise only DecodeError at the group's offset."""

from __future__ import annotations

import lzma
import os
import random
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_codecs import encode_with, frames, streams
from test_legacy_codec import build, full_stream
from vmferry import caps
from vmferry.cli import main
from vmferry.encode import bcj, ferry, legacy
from vmferry.errors import DecodeError, TruncatedError
from vmferry.events import (
    SECTION_FULL,
    Eof,
    Header,
    IterBegin,
    IterEnd,
    RamBlock,
    RamEos,
    RamMemSize,
    RamPages,
    RamZeros,
)
from vmferry.encode.records import UnknownFrame

PS = 4096
GROUPED = {"compress": "zstd", "groups": True}


def x86_like(n: int, seed: int = 1) -> bytes:
    """Bytes with the statistics of x86 code: instructions from a small vocabulary (code compresses to about
    half), and E8 calls to a few functions, whose relative displacements differ at every call site."""
    rnd = random.Random(seed)
    vocabulary = [bytes(rnd.randrange(256) for _ in range(rnd.randrange(2, 7))) for _ in range(300)]
    vocabulary = [v for v in vocabulary if 0xE8 not in v and 0xE9 not in v]
    out = bytearray()
    while len(out) < n:
        if rnd.random() < 0.1:
            target = rnd.choice([0x1000, 0x2400, 0x9000, 0x12000, 0x3300, 0x4710])
            out += b"\xe8" + ((target - len(out) - 5) & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            out += rnd.choice(vocabulary)
    return bytes(out[:n])


def ram_stream(pages: bytes, zeros: int = 50) -> list:
    n = len(pages) // PS
    size = (n + zeros) * PS
    return [Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4), RamMemSize(size, [RamBlock("pc.ram", size)]),
            RamPages("pc.ram", 0, n, True, data=pages), RamZeros("pc.ram", n * PS, zeros, False), RamEos(),
            IterEnd(1), Eof()]


def test_groups_round_trip_and_follow_the_spec():
    events = full_stream()
    data = encode_with("ferry", events, **GROUPED)
    mask = struct.unpack_from(">Q", data, 12)[0]
    assert caps.names(mask) == ["ferry-framing", "frame-crc32c", "zstd", "self-describing", "frame-groups",
                                "x86-filter", "page-copies", "page-planes"]
    top = frames(data)
    assert [t for _, t, _ in top] == [ferry.MUST_UNDERSTAND | ferry.T_GROUP, 0xFF]
    assert build(ferry.decode([data])) == build(events)
    # the END frame counts the GROUP and every frame in it; stream bytes are those of the stream itself
    per_frame = encode_with("ferry", events)
    end = struct.unpack_from(">7Q", data, top[-1][0] + 16)
    assert end[0] == len(frames(per_frame)) - 1 + 1 and end[6] == top[-1][0]


def test_group_frames_carry_no_crcs_and_pages_go_packed():
    src = build(full_stream())
    data = encode_with("ferry", list(legacy.decode([src])), **GROUPED)
    o, _, n = frames(data)[0]
    body = data[o + 16:o + n]
    inner = zstandard.ZstdDecompressor().decompressobj().decompress(body[4:])  # the stream's open zstd frame
    assert len(inner) == struct.unpack(">I", body[:4])[0]
    pos, kinds = 0, []
    while pos < len(inner):
        t, flags, _, size, bcrc, hcrc = struct.unpack_from(">BBHIII", inner, pos)
        assert (bcrc, hcrc, flags) == (0, 0, 0)
        kinds.append(t & 0x7F)
        if t & 0x7F == ferry.T_PAGES:
            assert not inner[pos + 16 + 16] & ferry.RUN_QEMU_LAYOUT
        pos += 16 + size
    assert pos == len(inner) and ferry.T_PAGES in kinds and ferry.T_ZEROS in kinds
    assert build(ferry.decode([data], ferry.DecodeOptions(legacy_records=True))) == src


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=streams(), comp=st.sampled_from(["zstd", "lz4"]), chunk=st.sampled_from([1, 7, 4096, 1 << 20]),
       group=st.sampled_from([64, 1000, 1 << 22]))
def test_random_streams_through_groups(events, comp, chunk, group):
    """Any group size (many small groups: zstd's context runs through all of them), any chunking."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ferry, "GROUP_BYTES", group)
        data = encode_with("ferry", events, compress=comp, groups=True)
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    assert build(ferry.decode(pieces)) == build(events)


def test_zstd_groups_share_one_context(monkeypatch):
    """Pages repeated in a later group cost a few bytes: the later group matches against the earlier one."""
    code = x86_like(32 * PS, seed=3)
    size = 200 * PS
    events = [Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4), RamMemSize(size, [RamBlock("pc.ram", size)]),
              RamPages("pc.ram", 0, 32, True, data=code), RamZeros("pc.ram", 32 * PS, 32, False),
              # 256 KiB further: the x86 filter makes the same bytes of both copies (format.md §2.2)
              RamPages("pc.ram", 64 * PS, 32, False, data=code), RamEos(), IterEnd(1), Eof()]
    monkeypatch.setattr(ferry, "GROUP_BYTES", 16 * PS)
    data = encode_with("ferry", events, **GROUPED)
    groups = [n for _, t, n in frames(data) if t & 0x7F == ferry.T_GROUP]
    assert len(groups) >= 3 and build(ferry.decode([data])) == build(events)
    once = encode_with("ferry", events[:4] + events[6:], **GROUPED)
    assert len(data) < len(once) + 2000  # the second copy of 128 KiB of code costs next to nothing


def test_code_goes_through_the_x86_filter_and_comes_back(monkeypatch):
    code = x86_like(64 * PS)
    events = ram_stream(code)
    data = encode_with("ferry", events, **GROUPED)
    plain = encode_with("ferry", events, compress="zstd", groups=True, level=3)  # zstd's own parameters
    assert build(ferry.decode([data])) == build(events) == build(ferry.decode([plain]))
    runs = [e for e in ferry.decode([data]) if isinstance(e, RamPages)]
    assert b"".join(bytes(r.contiguous()) for r in runs) == code
    assert any(e.data is not None for e in runs)
    assert len(data) < 0.9 * len(encode_with("ferry", events, compress="zstd"))
    # the filter made the difference: the same groups without it are larger
    monkeypatch.setattr(bcj, "looks_like_x86", lambda data, per_mib=1024: False)
    assert len(data) < len(encode_with("ferry", events, **GROUPED))


def test_the_filter_is_xz_s_x86_filter():
    """bcj.encode equals liblzma's x86 encoder (checked by undoing it with liblzma's decoder), for any start."""
    rnd = random.Random(5)
    for i in range(200):
        n = rnd.randrange(0, 600)
        data = bytes(rnd.choice([0, 0xFF, 0xE8, 0xE9, 1, 0x7F, 0x80]) for _ in range(n))
        start = rnd.randrange(0, 1 << 32)
        enc = bcj.encode(data, start)
        assert len(enc) == n and bcj.decode(enc, start) == data
        raw = lzma.compress(enc, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}])
        undone = lzma.decompress(raw, format=lzma.FORMAT_RAW,
                                 filters=[{"id": lzma.FILTER_X86, "start_offset": start},
                                          {"id": lzma.FILTER_LZMA2, "preset": 0}])
        assert undone == data, (i, n, start)
        assert bcj._convert(enc, start, False) == data  # the Python decoder agrees with liblzma's, which decode is
    code = x86_like(3 * bcj.SEGMENT // 2, seed=9)
    for offset in (0, 5 * PS, bcj.SEGMENT - PS):
        assert bcj.decode_pages(bcj.encode_pages(code, offset), offset) == code
    # pages at the same offset modulo 256 KiB filter alike (a ROM and its shadow copy in low RAM)
    assert bcj.encode_pages(code[:PS], 0x2A000) == bcj.encode_pages(code[:PS], 0xEA000)
    assert bcj.looks_like_x86(code) and not bcj.looks_like_x86(os.urandom(1 << 16))
    assert not bcj.looks_like_x86(bytes(1 << 16))
    # pieces over one stored LZMA2 chunk (64 KiB), and x86-like code at every start
    for n, start in ((1 << 16, 3), ((1 << 16) + 1, 0), (200000, 0xFFFFFFF0)):
        piece = x86_like(n, seed=n)
        enc = bcj.encode(piece, start)
        assert bcj.decode(enc, start) == bcj._convert(enc, start, False) == piece


def test_incompressible_pages_stay_out_of_groups_in_qemu_layout(monkeypatch):
    """After the first group (which takes every frame, and decides zstd's parameters), page data that does not
    compress goes in frames of its own, in QEMU's layout when it came from QEMU's stream."""
    monkeypatch.setattr(ferry, "GROUP_BYTES", 16 * PS)
    size = 100 * PS
    src = build([Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4), RamMemSize(size, [RamBlock("pc.ram", size)]),
                 RamPages("pc.ram", 0, 20, True, data=x86_like(20 * PS)),
                 RamPages("pc.ram", 30 * PS, 40, False, data=os.urandom(40 * PS)), RamEos(), IterEnd(1), Eof()])
    data = encode_with("ferry", list(legacy.decode([src])), **GROUPED)
    top = frames(data)
    pages = [o for o, t, _ in top if t & 0x7F == ferry.T_PAGES]
    assert pages and all(data[o + 16 + 16] & ferry.RUN_QEMU_LAYOUT for o in pages)
    assert any(t & 0x7F == ferry.T_GROUP for _, t, _ in top)
    assert build(ferry.decode([data])) == src


def test_unknown_frames_stay_in_place_around_groups():
    events = full_stream()
    extra = UnknownFrame(0x33, 0, b"hello")
    mixed = events[:3] + [extra] + events[3:]
    data = encode_with("ferry", mixed, **GROUPED)
    kept = list(ferry.decode([data], ferry.DecodeOptions(keep_unknown=True)))
    assert [e for e in kept if isinstance(e, UnknownFrame)] == [extra]
    assert build(e for e in kept if not isinstance(e, UnknownFrame)) == build(events)


def test_a_reader_without_groups_refuses_naming_them(monkeypatch):
    data = encode_with("ferry", full_stream(), **GROUPED)
    monkeypatch.setattr(ferry, "STREAM_CAPS", ferry.STREAM_CAPS & ~(caps.Cap.FRAME_GROUPS | caps.Cap.X86_FILTER
                                                                    | caps.Cap.PAGE_COPIES))
    with pytest.raises(DecodeError, match="lacks: frame-groups, x86-filter, page-copies") as e:
        list(ferry.decode([data]))
    assert e.value.offset == 12


# --- hostile groups ------------------------------------------------------------------------------------------------


def _frame(ftype: int, body: bytes, flags: int = 0, crcs: bool = True) -> bytes:
    if not crcs:
        return struct.pack(">BBHIII", ftype, flags, 0, len(body), 0, 0) + body
    return ferry.frame_header(ftype, flags, len(body), ferry.crc32c(body)) + body


def _group(inner: bytes, compress: bool = True, declared: int | None = None) -> bytes:
    if compress:
        body = struct.pack(">I", len(inner) if declared is None else declared) + zstandard.compress(inner)
        return _frame(ferry.MUST_UNDERSTAND | ferry.T_GROUP, body, ferry.COMP_ZSTD)
    return _frame(ferry.MUST_UNDERSTAND | ferry.T_GROUP, inner)


def _stream(*frames_: bytes, mask: int | None = None) -> bytes:
    cap = caps.Cap
    m = int(cap.FERRY_FRAMING | cap.FRAME_CRC32C | cap.SELF_DESCRIBING | cap.ZSTD | cap.FRAME_GROUPS
            | cap.X86_FILTER) if mask is None else mask
    return ferry.header(m) + b"".join(frames_)


@pytest.mark.parametrize("case,message", [
    ("no cap", "does not announce frame-groups"),
    ("inner crc", "carries CRCs"),
    ("overrun", "runs past the end of its GROUP"),
    ("cut header", "ends inside the header"),
    ("nested", "holds a GROUP frame"),
    ("end inside", "holds a END frame"),
    ("compressed inner", "holds a type 0x33 frame"),
    ("inflates larger", "inflate to more bytes than they announce"),
    ("x86 qemu layout", "unknown RAM frame flags"),
    ("x86 without cap", "does not announce x86-filter"),
])
def test_hostile_groups_are_refused_at_the_group(case, message):
    inner_ok = _frame(0x33, b"skippable", crcs=False)  # a frame any reader skips: the group's shape is what fails
    mask = None
    if case == "no cap":
        group = _group(inner_ok)
        mask = int(caps.Cap.FERRY_FRAMING | caps.Cap.FRAME_CRC32C | caps.Cap.ZSTD)
    elif case == "inner crc":
        group = _group(_frame(0x33, b"skippable"))
    elif case == "overrun":
        group = _group(inner_ok[:-3])
    elif case == "cut header":
        group = _group(inner_ok + inner_ok[:9])
    elif case == "nested":
        group = _group(inner_ok + _frame(ferry.MUST_UNDERSTAND | ferry.T_GROUP, inner_ok, crcs=False))
    elif case == "end inside":
        group = _group(_frame(0xFF, bytes(56), crcs=False))
    elif case == "compressed inner":
        group = _group(_frame(0x33, b"skippable", flags=ferry.COMP_ZSTD, crcs=False))
    elif case == "inflates larger":  # found at the END frame, which the group's frames reach intact
        group = _group(inner_ok + inner_ok, declared=len(inner_ok))
        totals = struct.pack(">7Q", 2, 0, 0, 0, 0, 0, ferry.HEADER_LEN + len(group))
        group += _frame(ferry.MUST_UNDERSTAND | ferry.T_END, totals)
    else:
        flags = ferry.RUN_NAMED | ferry.RUN_X86 | (ferry.RUN_QEMU_LAYOUT if case == "x86 qemu layout" else 0)
        body = struct.pack(">QIIBB", 0, 1, PS, flags, 6) + b"pc.ram" + bytes(PS)
        group = _group(_frame(ferry.MUST_UNDERSTAND | ferry.T_PAGES, body, crcs=False))
        if case == "x86 without cap":
            mask = int(caps.Cap.FERRY_FRAMING | caps.Cap.FRAME_CRC32C | caps.Cap.ZSTD | caps.Cap.FRAME_GROUPS)
    with pytest.raises(DecodeError, match=message) as e:
        list(ferry.decode([_stream(group, mask=mask)]))
    assert e.value.offset == ferry.HEADER_LEN + (len(group) - 16 - 56 if case == "inflates larger" else 0), str(e.value)


def test_every_flipped_bit_of_a_grouped_stream_is_caught_at_its_frame():
    data = encode_with("ferry", full_stream(), **GROUPED)
    starts = [0] + [o for o, _, _ in frames(data)]
    rnd = random.Random(11)
    for pos in sorted(set(rnd.sample(range(len(data)), min(len(data), 1200)))):
        bad = bytearray(data)
        bad[pos] ^= 1 << rnd.randrange(8)
        with pytest.raises(DecodeError) as e:
            list(ferry.decode([bytes(bad)]))
        assert e.value.offset == max(s for s in starts if s <= pos), (pos, str(e.value))


def test_every_cut_of_a_grouped_stream_is_truncated():
    data = encode_with("ferry", full_stream(), **GROUPED)
    for n in range(len(data)):
        with pytest.raises(TruncatedError):
            list(ferry.decode([data[:n]]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_grouped_streams_raise_only_decode_error(data):
    """Mutations with valid CRCs (recomputed), so that they reach the group's contents."""
    code = x86_like(8 * PS)  # and two pages again, as copies (format.md §2.5): mutations reach the copy table
    src = bytearray(encode_with("ferry", ram_stream(code + code[PS:3 * PS], zeros=3), compress="zstd", groups=True,
                                level=1))
    o, _, n = frames(bytes(src))[0]
    inner = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(bytes(src[o + 20:o + n])))
    for _ in range(data.draw(st.integers(1, 4))):
        inner[data.draw(st.integers(0, len(inner) - 1))] = data.draw(st.integers(0, 255))
    forged = bytes(src[:o]) + _group(bytes(inner)) + bytes(src[o + n:])
    try:
        list(ferry.decode([forged]))
    except DecodeError:
        pass


def test_cli_compress_uses_groups_unless_per_frame(tmp_path, capsys):
    src = tmp_path / "s.mig"
    src.write_bytes(build(full_stream()))
    out = {}
    for extra in ([], ["--per-frame"]):
        dst = tmp_path / f"s{len(extra)}.fry"
        assert main(["convert", "-q", str(src), str(dst), "--to", "ferry", "--compress", "zstd", *extra]) == 0
        out[bool(extra)] = dst.read_bytes()
        assert main(["convert", "-q", str(dst), str(tmp_path / "back.mig"), "--to", "legacy"]) == 0
        assert (tmp_path / "back.mig").read_bytes() == src.read_bytes()
    assert any(t & 0x7F == ferry.T_GROUP for _, t, _ in frames(out[False]))
    assert not any(t & 0x7F == ferry.T_GROUP for _, t, _ in frames(out[True]))
    assert main(["convert", "-q", str(src), str(tmp_path / "x.fry"), "--to", "ferry", "--per-frame"]) == 2
    assert "--per-frame applies to --compress" in capsys.readouterr().err
    dst = tmp_path / "l19.fry"
    assert main(["convert", "-q", str(src), str(dst), "--to", "ferry", "--compress", "zstd", "--level", "19"]) == 0
    assert main(["convert", "-q", str(dst), str(tmp_path / "back.mig"), "--to", "legacy"]) == 0
    assert (tmp_path / "back.mig").read_bytes() == src.read_bytes()
    assert main(["convert", "-q", str(src), str(dst), "--to", "ferry", "--compress", "lz4", "--level", "3"]) == 2
    assert "--level applies to --compress zstd" in capsys.readouterr().err
