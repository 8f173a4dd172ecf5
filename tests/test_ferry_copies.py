"""ferry page copies (docs/format.md §2.5): pages that repeat a page of their GROUP travel as its number; the round
trip stays byte-exact, and a copy that names a page the group never carried, or any other malformed copy table,
is a DecodeError at the group's offset."""

from __future__ import annotations

import random
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_codecs import encode_with, frames
from test_ferry_groups import GROUPED, PS, _frame, _group, ram_stream, x86_like
from test_legacy_codec import build
from vmferry import caps
from vmferry.encode import copies, ferry, legacy
from vmferry.errors import DecodeError
from vmferry.events import RamPages

_INNER = struct.Struct(">BBHIII")


def inner_frames(data: bytes) -> tuple[int, int, bytearray, list[tuple[int, int, int, int]]]:
    """The first GROUP of ``data``: its offset and length (header included), its frames decompressed, and each inner frame as
    (offset in the inner bytes, type, flags, body length)."""
    o, t, n = frames(data)[0]
    assert t & 0x7F == ferry.T_GROUP
    inner = bytearray(zstandard.ZstdDecompressor().decompressobj().decompress(data[o + 20:o + n]))
    out, pos = [], 0
    while pos < len(inner):
        ftype, flags, _, size, _, _ = _INNER.unpack_from(inner, pos)
        out.append((pos, ftype, flags, size))
        pos += 16 + size
    return o, n, inner, out


def copy_frames(data: bytes) -> list[bytes]:
    """The bodies of the PAGES frames with copies in the first GROUP of ``data``."""
    _, _, inner, fs = inner_frames(data)
    return [bytes(inner[p + 16:p + 16 + n]) for p, t, f, n in fs
            if t & 0x7F == ferry.T_PAGES and _run_flags(inner, p) & ferry.RUN_COPIES]


def _run_flags(inner: bytes | bytearray, pos: int) -> int:
    return inner[pos + 16 + 16]


def round_trip(qemu: bytes, chunk: int = 1 << 20) -> bytes:
    fry = b"".join(bytes(c) for c in ferry.encode(legacy.decode([qemu]), **GROUPED))
    pieces = [fry[i:i + chunk] for i in range(0, len(fry), chunk)]
    return b"".join(bytes(c) for c in legacy.encode(ferry.decode(pieces, ferry.DecodeOptions(legacy_records=True))))


def test_repeated_pages_travel_as_copies_and_come_back_byte_for_byte():
    code, other = x86_like(4 * PS, seed=5), random.Random(2).randbytes(PS)
    fill = b"\xcc" * PS
    pages = code + fill * 6 + other + code[PS:2 * PS] + other + fill
    qemu = build(ram_stream(pages))
    assert round_trip(qemu) == qemu
    data = encode_with("ferry", ram_stream(pages), **GROUPED)
    (body,) = copy_frames(data)
    head = 18 + len("pc.ram")
    (k,) = struct.unpack_from(">I", body, head)
    entries = [copies.ENTRY.unpack_from(body, head + 4 + 8 * j) for j in range(k)]
    # the fill page once, then its five repeats; page 1 of the code again; the random page again; the fill again
    assert entries == [(5, 4), (6, 4), (7, 4), (8, 4), (9, 4), (11, 1), (12, 10), (13, 4)]
    assert len(body) == head + 4 + 8 * k + (14 - k) * PS
    runs = [e for e in ferry.decode([data]) if isinstance(e, RamPages)]
    assert b"".join(bytes(r.contiguous()) for r in runs) == pages


def test_copies_stay_inside_their_group(monkeypatch):
    """A page equal to a page of an earlier GROUP is carried again (the reader forgets a group's pages)."""
    page = random.Random(3).randbytes(PS)
    monkeypatch.setattr(ferry, "GROUP_BYTES", 2 * PS)
    monkeypatch.setattr(ferry, "PAGES_PER_FRAME", 3)  # frames of 3 pages: a group after each
    rnd = random.Random(4)
    events = ram_stream(b"".join(page + rnd.randbytes(2 * PS) for _ in range(3)))  # each frame: the page, 2 others
    data = encode_with("ferry", events, **GROUPED)
    assert sum(1 for _, t, _ in frames(data) if t & 0x7F == ferry.T_GROUP) >= 3
    assert build(ferry.decode([data])) == build(events)  # a copy naming a page of an earlier group would fail
    assert not copy_frames(data)


@st.composite
def repeating_pages(draw):
    """Pages drawn from a small pool (x86-like code, random bytes, fills), so that many repeat."""
    rnd = random.Random(draw(st.integers(0, 1 << 30)))
    pool = [x86_like(PS, seed=rnd.randrange(1 << 20)), rnd.randbytes(PS), bytes([rnd.randrange(256)]) * PS,
            bytes(PS - 1) + b"\x01"]
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=40))
    return b"".join(pool[i] for i in picks)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=repeating_pages(), group=st.sampled_from([PS, 3 * PS, 1 << 22]), chunk=st.sampled_from([1, 509, 1 << 20]),
       zeros=st.integers(0, 5))
def test_legacy_to_ferry_to_legacy_is_byte_exact_with_copies(pages, group, chunk, zeros):
    qemu = build(ram_stream(pages, zeros=zeros))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ferry, "GROUP_BYTES", group)
        assert round_trip(qemu, chunk) == qemu


# --- hostile copies ------------------------------------------------------------------------------------------------


def _forged(edit) -> tuple[bytes, int]:
    """A grouped stream of three pages (the third repeats the first) whose copy table ``edit`` rewrites; and the
    GROUP's offset."""
    a, b = random.Random(4).randbytes(PS), random.Random(5).randbytes(PS)
    data = encode_with("ferry", ram_stream(a + b + a), **GROUPED)

    def checked(body: bytearray, at: int) -> bytearray:
        assert body[16] & ferry.RUN_COPIES
        return edit(body, at)

    return rewrite_pages(data, checked)


def rewrite_pages(data: bytes, edit) -> tuple[bytes, int]:
    """``data`` (a grouped stream whose first GROUP holds one PAGES frame, of block pc.ram, and is followed by the
    END frame) with that frame's body rewritten by ``edit(body, offset of its tables)``; and the GROUP's offset."""
    o, n, inner, fs = inner_frames(data)
    (pos, t, f, size), = [x for x in fs if x[1] & 0x7F == ferry.T_PAGES]
    body = edit(bytearray(inner[pos + 16:pos + 16 + size]), 18 + len("pc.ram"))
    inner[pos:pos + 16 + size] = _INNER.pack(t, f, 0, len(body), 0, 0) + body
    head = data[:o] + _group(bytes(inner))
    (end, _, _), = [x for x in frames(data) if x[1] & 0x7F == ferry.T_END]
    assert end == o + n  # the group, then the END frame: its stream bytes follow the group's new size
    totals = list(struct.unpack_from(">7Q", data, end + 16))
    totals[6] = len(head)
    return head + _frame(ferry.MUST_UNDERSTAND | ferry.T_END, struct.pack(">7Q", *totals)), o


def _entry(index: int, ref: int):
    def edit(body: bytearray, at: int) -> bytearray:
        body[at + 4:at + 12] = copies.ENTRY.pack(index, ref)
        return body
    return edit


def _count(k: int):
    def edit(body: bytearray, at: int) -> bytearray:
        body[at:at + 4] = struct.pack(">I", k)
        return body
    return edit


def _size(ps: int):
    def edit(body: bytearray, at: int) -> bytearray:
        body[12:16] = struct.pack(">I", ps)
        return body
    return edit


@pytest.mark.parametrize("edit,message", [
    (_entry(2, 0), None),  # the untouched table decodes
    (_entry(2, 2), "repeats page 2 of its GROUP, which has carried only 2 pages"),
    (_entry(2, 1 << 31), "which has carried only 2 pages"),
    (_entry(1, 0), None),  # page 1 as the copy of page 0: a valid table, another stream (its END frame still fits)
    (_entry(3, 0), "names page 3 of a run of 3"),
    (_count(0), "names 0 copies"),
    (_count(4), "names 4 copies"),
    (_count(2), "bytes for 3 pages of 4096, 2 of them copies"),
    (lambda body, at: body[:-1], "bytes for 3 pages of 4096, 1 of them copies"),
    (lambda body, at: body[:at + 2], "too short for its copy table"),
    (_size(8192), "do not fit block|bytes for 3 pages of 8192"),
])
def test_a_copy_of_a_page_never_sent_is_a_decode_error(edit, message):
    decodes_or_fails_at(*_forged(edit), message)


def decodes_or_fails_at(data: bytes, at: int, message: str | None) -> None:
    """``data`` decodes (``message`` None), or fails with a DecodeError matching ``message`` at offset ``at``."""
    if message is None:
        list(ferry.decode([data]))
        return
    with pytest.raises(DecodeError, match=message) as e:
        list(ferry.decode([data]))
    assert e.value.offset == at, str(e.value)


def test_copies_outside_a_group_or_unannounced_are_refused():
    a = random.Random(6).randbytes(PS)
    data = encode_with("ferry", ram_stream(a + a), **GROUPED)
    o, n, inner, fs = inner_frames(data)
    (pos, t, f, size), = [x for x in fs if x[1] & 0x7F == ferry.T_PAGES]
    body = bytes(inner[pos + 16:pos + 16 + size])
    # the PAGES frame taken out of its group, with its CRCs
    outside = data[:o] + _group(bytes(inner[:pos])) + _frame(t, body) + _group(bytes(inner[pos + 16 + size:]))
    with pytest.raises(DecodeError, match="with copies outside a GROUP"):
        list(ferry.decode([outside + data[o + n:]]))
    mask = struct.unpack_from(">Q", data, 12)[0] & ~int(caps.Cap.PAGE_COPIES)
    unannounced = ferry.header(mask) + data[ferry.HEADER_LEN:]
    with pytest.raises(DecodeError, match="does not announce page-copies") as e:
        list(ferry.decode([unannounced]))
    assert e.value.offset == o


def test_copies_cannot_repeat_more_than_a_group_may_hold():
    """A group's copies hand out at most 64 MiB of pages: a few bytes of copy table cannot make a reader build much
    more than a group's worth of pages."""
    tail = memoryview(struct.pack(">I", 1) + copies.ENTRY.pack(1, 0) + bytes(PS))
    k, data_at = copies.table_length(tail, 2, 7, "$.ram")
    assert (k, data_at) == (1, 12)
    refs = copies.read_table(tail, k, 2, PS, 0, PS, 7, "$.ram")
    assert refs == {1: 0}
    table: list[memoryview] = []
    data = copies.rebuild(tail[data_at:], 2, PS, refs, table, None, 7, "$.ram")
    assert bytes(data) == bytes(2 * PS) and len(table) == 2
    with pytest.raises(DecodeError, match="repeat more than 4095 bytes") as e:
        copies.read_table(tail, k, 2, PS, 0, PS - 1, 7, "$.ram")
    assert e.value.offset == 7
    data, at = _forged(_entry(2, 0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(copies, "MAX_REPEATED", PS - 1)
        with pytest.raises(DecodeError, match="repeat more than 4095 bytes") as e:
            list(ferry.decode([data]))
    assert e.value.offset == at


def test_a_writer_keeps_within_the_copy_budget(monkeypatch):
    """A guest of one repeated page: a group's copies stop at the budget, and the rest is carried again."""
    monkeypatch.setattr(copies, "MAX_REPEATED", 5 * PS)
    events = ram_stream(b"\xcc" * 20 * PS)
    data = encode_with("ferry", events, **GROUPED)
    (body,) = copy_frames(data)
    assert struct.unpack_from(">I", body, 18 + len("pc.ram"))[0] == 5
    assert build(ferry.decode([data])) == build(events)


def test_an_old_reader_refuses_copies_naming_them(monkeypatch):
    data = encode_with("ferry", ram_stream(b"\xcc" * 2 * PS), **GROUPED)
    monkeypatch.setattr(ferry, "STREAM_CAPS", ferry.STREAM_CAPS & ~caps.Cap.PAGE_COPIES)
    with pytest.raises(DecodeError, match="lacks: page-copies") as e:
        list(ferry.decode([data]))
    assert e.value.offset == 12
