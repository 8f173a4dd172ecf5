"""ferry byte planes (docs/format.md §2.6): pages of words travel as their byte planes inside a GROUP, the round
trip stays byte-exact beside copies and the x86 filter, and a bad plane code, a short table, or planes where the
stream does not allow them are a DecodeError at the group's offset."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_codecs import encode_with
from test_ferry_copies import decodes_or_fails_at, inner_frames, rewrite_pages, round_trip
from test_ferry_groups import GROUPED, PS, ram_stream, x86_like
from test_legacy_codec import build
from vmferry import caps
from vmferry.encode import ferry, planes
from vmferry.errors import DecodeError
from vmferry.events import RamPages

HEAD = 18 + len("pc.ram")  # a PAGES body of block pc.ram: the run header and the name, then the tables


def word_table(seed: int, width: int = 8) -> bytes:
    """A page of little-endian words as a kernel keeps them: 8-byte pointers to consecutive 64-byte structs, or
    4-byte words whose low byte varies."""
    rnd = random.Random(seed)
    if width == 8:
        start = 0xFFFF888000000000 + rnd.randrange(1 << 20) * PS
        return b"".join((start + i * 64).to_bytes(8, "little") for i in range(PS // 8))
    return b"".join((0xC1000000 + rnd.randrange(256)).to_bytes(4, "little") for _ in range(PS // 4))


def pages_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The flags and bodies of the PAGES frames in the first GROUP of ``data``."""
    _, _, inner, fs = inner_frames(data)
    return [(inner[p + 16 + 16], bytes(inner[p + 16:p + 16 + n])) for p, t, _, n in fs if t & 0x7F == ferry.T_PAGES]


@settings(max_examples=60, deadline=None)
@given(code=st.sampled_from(planes.CODES), size=st.sampled_from([512, 4096, 65536]), seed=st.integers(0, 1 << 30))
def test_planes_join_back_to_the_page(code, size, seed):
    page = random.Random(seed).randbytes(size)
    stored = planes.split(page, code)
    w = 1 << code
    assert len(stored) == size and stored[:size // w] == page[::w] and stored[-(size // w):] == page[w - 1::w]
    assert planes.join(stored, code) == page


def test_tables_of_words_travel_as_planes_and_come_back_byte_for_byte():
    table8, table4, noise = word_table(1), word_table(2, width=4), random.Random(3).randbytes(PS)
    pages = table8 + noise + table4 + word_table(4)
    qemu = build(ram_stream(pages))
    assert round_trip(qemu) == qemu
    data = encode_with("ferry", ram_stream(pages), **GROUPED)
    (flags, body), = pages_frames(data)
    assert flags & ferry.RUN_PLANES and not flags & ferry.RUN_COPIES
    codes = body[HEAD:HEAD + 4]
    assert codes[1] == 0 and all(codes[i] in planes.TRIED for i in (0, 2, 3))
    assert body[HEAD + 4:HEAD + 4 + PS] == planes.split(table8, codes[0])
    assert body[HEAD + 4 + 2 * PS:HEAD + 4 + 3 * PS] == planes.split(table4, codes[2])
    assert body[HEAD + 4 + PS:HEAD + 4 + 2 * PS] == noise
    assert len(body) == HEAD + 4 + 4 * PS
    runs = [e for e in ferry.decode([data]) if isinstance(e, RamPages)]
    assert b"".join(bytes(r.contiguous()) for r in runs) == pages


def test_planes_follow_copies_and_the_x86_filter():
    """In one frame: code (x86-filtered), a table of words, a copy of it; the table goes as planes, one code per
    carried page, the copy as its number."""
    code, table = x86_like(2 * PS, seed=9), word_table(5)
    pages = code + table + table
    qemu = build(ram_stream(pages))
    assert round_trip(qemu) == qemu
    data = encode_with("ferry", ram_stream(pages), **GROUPED)
    (flags, body), = pages_frames(data)
    assert flags & ferry.RUN_PLANES and flags & ferry.RUN_COPIES and flags & ferry.RUN_X86
    (k,) = struct.unpack_from(">I", body, HEAD)
    assert k == 1
    codes_at = HEAD + 4 + 8 * k
    assert body[codes_at + 2] in planes.TRIED and len(body) == codes_at + 3 + 3 * PS


def test_pages_that_planes_do_not_shrink_go_as_they_are():
    pages = random.Random(7).randbytes(3 * PS) + x86_like(2 * PS, seed=2)
    data = encode_with("ferry", ram_stream(pages), **GROUPED)
    assert not any(flags & ferry.RUN_PLANES for flags, _ in pages_frames(data))
    assert build(ferry.decode([data])) == build(ram_stream(pages))


@st.composite
def word_pages(draw):
    """Pages drawn from tables of words, code, random bytes and fills, repeats among them."""
    rnd = random.Random(draw(st.integers(0, 1 << 30)))
    pool = [word_table(rnd.randrange(1 << 20)), word_table(rnd.randrange(1 << 20), width=4),
            x86_like(PS, seed=rnd.randrange(1 << 20)), rnd.randbytes(PS), bytes([rnd.randrange(256)]) * PS]
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=30))
    return b"".join(pool[i] for i in picks)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=word_pages(), group=st.sampled_from([PS, 3 * PS, 1 << 22]), chunk=st.sampled_from([1, 509, 1 << 20]))
def test_legacy_to_ferry_to_legacy_is_byte_exact_with_planes(pages, group, chunk):
    qemu = build(ram_stream(pages, zeros=3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ferry, "GROUP_BYTES", group)
        assert round_trip(qemu, chunk) == qemu


# --- hostile planes ------------------------------------------------------------------------------------------------


def _forged(edit) -> tuple[bytes, int]:
    """A grouped stream of two tables of words and a random page, whose PAGES body ``edit`` rewrites."""
    pages = word_table(11) + random.Random(12).randbytes(PS) + word_table(13, width=4)
    data = encode_with("ferry", ram_stream(pages), **GROUPED)

    def checked(body: bytearray, at: int) -> bytearray:
        assert body[16] & ferry.RUN_PLANES and not body[16] & ferry.RUN_COPIES
        assert body[at] in planes.TRIED and body[at + 1] == 0 and body[at + 2] in planes.TRIED
        return edit(body, at)

    return rewrite_pages(data, checked)


def _code(i: int, value: int):
    def edit(body: bytearray, at: int) -> bytearray:
        body[at + i] = value
        return body
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda body, at: body, None),  # the untouched table decodes
    (_code(1, 3), None),  # the random page read as 8-byte planes: valid, another stream (its END frame still fits)
    (_code(0, 4), "carried page 0 of a PAGES frame has plane code 4"),
    (_code(2, 255), "carried page 2 of a PAGES frame has plane code 255"),
    (lambda body, at: body[:-1], "holds 12290 bytes for 3 pages of 4096"),
    (lambda body, at: body[:at + 2] + body[at + 3:], "holds 12290 bytes for 3 pages of 4096"),
    (lambda body, at: body + b"\0", "holds 12292 bytes for 3 pages of 4096"),
])
def test_a_bad_plane_table_is_a_decode_error(edit, message):
    decodes_or_fails_at(*_forged(edit), message)


def test_planes_unannounced_or_in_qemu_layout_are_refused():
    data, at = _forged(lambda body, at: body)
    mask = struct.unpack_from(">Q", data, 12)[0] & ~int(caps.Cap.PAGE_PLANES)
    with pytest.raises(DecodeError, match="does not announce page-planes") as e:
        list(ferry.decode([ferry.header(mask) + data[ferry.HEADER_LEN:]]))
    assert e.value.offset == at

    def qemu_layout(body: bytearray, at: int) -> bytearray:
        body[16] |= ferry.RUN_QEMU_LAYOUT
        return body

    data, at = _forged(qemu_layout)
    with pytest.raises(DecodeError, match="unknown RAM frame flags") as e:
        list(ferry.decode([data]))
    assert e.value.offset == at


def test_planes_outside_a_group_are_refused():
    body = bytearray(struct.pack(">QIIBB", 0, 1, PS, ferry.RUN_NAMED | ferry.RUN_PLANES, 6) + b"pc.ram" + b"\x03")
    body += planes.split(word_table(1), 3)
    frame = ferry.frame_header(ferry.MUST_UNDERSTAND | ferry.T_PAGES, 0, len(body), ferry.crc32c(bytes(body)))
    data = encode_with("ferry", ram_stream(word_table(1)), **GROUPED)
    stream = data[:ferry.HEADER_LEN] + frame + bytes(body)
    with pytest.raises(DecodeError, match="with byte planes outside a GROUP") as e:
        list(ferry.decode([stream]))
    assert e.value.offset == ferry.HEADER_LEN


def test_an_old_reader_refuses_planes_naming_them(monkeypatch):
    data = encode_with("ferry", ram_stream(word_table(1)), **GROUPED)
    monkeypatch.setattr(ferry, "STREAM_CAPS", ferry.STREAM_CAPS & ~caps.Cap.PAGE_PLANES)
    with pytest.raises(DecodeError, match="lacks: page-planes") as e:
        list(ferry.decode([data]))
    assert e.value.offset == 12
