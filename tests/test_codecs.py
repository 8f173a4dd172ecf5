"""Every codec of the registry: round trips, the ferry format's framing, corruption, hostile bytes.

* legacy -> X -> legacy is byte-exact for every codec X, on streams built
  here, on random streams around random schemas and trees (Hypothesis), and
  on every stream of the golden corpus (``qemu``); so is the chain
  legacy -> ferry -> cbor -> asn1-ber -> json -> msgpack -> legacy.
* ferry: every flipped bit is caught at its frame's offset, every cut is
  reported as truncated, unknown frames are skipped or refused by their
  must-understand bit and kept by a re-encoder, the END totals catch a
  dropped frame.
* Random and mutated bytes make every decoder raise DecodeError and nothing else.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_corpus import SCHEMA_FOR
from qemu_recipes import names as corpus_names
from strategies import trees, vmsds
from test_legacy_codec import TIMER, build, full_stream

from vmferry import caps
from vmferry.cli.files import load_schema_file
from vmferry.cli import main
from vmferry.encode import asn1, codec, ferry, legacy, names, sniff
from vmferry.encode.configuration import configuration_state
from vmferry.encode.records import UnknownFrame
from vmferry.errors import DecodeError, TruncatedError
from vmferry.events import (
    SECTION_END,
    SECTION_FULL,
    SECTION_PART,
    SECTION_START,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Header,
    IterBegin,
    IterEnd,
    OpaqueSection,
    RamBlock,
    RamEos,
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
    Vmdesc,
)
from vmferry.serialize.describe import describe_section
from vmferry.serialize.drive import visit_vmsd
from vmferry.serialize.qemu_vmdesc import vmsd_from_desc
from vmferry.serialize.schema import SchemaSet
from vmferry.serialize.visitor import LegacyReader

CODECS = names()
CHAIN = ["ferry", "cbor", "asn1-ber", "json", "msgpack", "legacy"]
PS = 4096


def encode_with(name: str, events, **kw) -> bytes:
    return b"".join(bytes(c) for c in codec(name).encode(events, **kw))


def schemas_of(events) -> SchemaSet:
    """The schemas of a stream's devices, for QEMU's stream when it has no vmdesc."""
    out = SchemaSet()
    for ev in events:
        for e in ([ev] + list(ev.packaged or [])) if isinstance(ev, Command) else [ev]:
            if isinstance(e, DeviceSection):
                out.sections[(e.idstr, e.instance_id)] = e.schema
    return out


def decode_with(name: str, data: bytes, chunk: int = 1 << 20, events=None) -> list:
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    if name == "legacy":
        return list(legacy.decode(pieces, legacy.DecodeOptions(fallback_schemas=schemas_of(events or []))))
    return list(codec(name).decode(pieces))


def through(name: str, events, chunk: int = 1 << 20) -> bytes:
    """legacy bytes of ``events`` after a trip through codec ``name``."""
    return build(decode_with(name, encode_with(name, events), chunk, events))


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


def test_registry_names_and_surface():
    assert CODECS == ["legacy", "ferry", "jsonl", "json", "cbor", "msgpack", "asn1-ber", "asn1-der", "asn1-per",
                      "asn1-xer"]
    for name in CODECS:
        c = codec(name)
        assert c.NAME == name
        assert callable(c.sniff) and callable(c.decode) and callable(c.encode)
        assert (getattr(c, "CAP", caps.Cap.NONE) == caps.Cap.NONE) == (name == "legacy")
    bits = [int(getattr(codec(n), "CAP", 0)) for n in CODECS]
    assert len(set(bits)) == len(bits) and all(b & caps.CODECS == b for b in bits)


@pytest.mark.parametrize("name", CODECS)
def test_every_codec_round_trips_every_record_type(name):
    for footer, config, vmdesc in [(True, True, True), (False, False, True), (True, True, False)]:
        events = full_stream(footer, config, vmdesc)
        data = build(events)
        out = encode_with(name, events)
        assert sniff(out[:64]) == name
        for chunk in (1, 7, 1 << 20):
            if chunk == 1 and len(out) > 40000:
                continue
            assert build(decode_with(name, out, chunk, events)) == data


@pytest.mark.parametrize("name", CODECS[1:])  # QEMU's stream cannot say a FULL section is opaque
def test_commands_packaged_and_opaque_sections(name):
    dev = DeviceSection(9, "timer", 0, 2, {"cpu_ticks_offset": 1, "unused": bytes(8), "cpu_clock_offset": 2},
                        TIMER, describe_section(TIMER, {"cpu_ticks_offset": 1, "unused": bytes(8),
                                                        "cpu_clock_offset": 2}, "timer", 0), True)
    events = [Header(), Configuration(configuration_state("pc-q35-7.2")), Command(1), Command(2, b"\x00\x00\x00\x01"),
              Command(3, struct.pack(">QQ", PS, PS)), Command(7, b"", [Command(4), dev, Command(5)]),
              OpaqueSection(SECTION_FULL, 4, "slirp", 0, 4, b"\x01\x02\x03", True,
                            {"name": "slirp", "instance_id": 0, "size": 3, "fields": []}),
              Command(11), Eof()]
    data = build(events)
    assert through(name, events) == data


def test_chain_of_codecs_is_byte_exact():
    events = full_stream()
    data = build(events)
    cur = events
    for name in CHAIN[:-1]:
        cur = decode_with(name, encode_with(name, cur))
    assert build(cur) == data


# ---------------------------------------------------------------------------
# random streams around random schemas and trees
# ---------------------------------------------------------------------------


@st.composite
def streams(draw):
    """A random stream: header, configuration, RAM runs and records, random devices, EOF, vmdesc."""
    events = [Header()]
    if draw(st.booleans()):
        events.append(Configuration(configuration_state(draw(st.sampled_from(["pc-i440fx-7.2", "pc-q35-2.4"])))))
    footer = draw(st.booleans())
    blocks = [("pc.ram", 64 * PS), ("/rom@etc/acpi/tables", 8 * PS)]
    events += [IterBegin(SECTION_START, 2, "ram", 0, 4),
               RamMemSize(sum(n for _, n in blocks), [RamBlock(b, n) for b, n in blocks]), RamEos(), IterEnd(2, footer)]
    rnd = random.Random(draw(st.integers(0, 1 << 30)))
    for _ in range(draw(st.integers(0, 2))):
        events.append(IterBegin(SECTION_PART, 2))
        named_block = None
        for _ in range(draw(st.integers(0, 4))):
            block, size = draw(st.sampled_from(blocks))
            named = named_block != block or draw(st.booleans())
            named_block = block
            count = draw(st.integers(1, 3))
            offset = draw(st.integers(0, size // PS - count)) * PS
            kind = draw(st.sampled_from(["pages", "zeros", "fill", "xbzrle"]))
            if kind == "pages":
                events.append(RamPages(block, offset, count, named, data=rnd.randbytes(count * PS)))
            elif kind == "zeros":
                events.append(RamZeros(block, offset, count, named))
            elif kind == "fill":
                events.append(RamZeros(block, offset, count, named, fill=bytes(rnd.randrange(256)
                                                                            for _ in range(count))))
            else:
                payload = rnd.randbytes(rnd.randrange(1, 40))
                events.append(RamRecord(0x40 | (0 if named else 0x20), offset, block, named,
                                        b"\x01" + struct.pack(">H", len(payload)) + payload))
        events += [RamEos(), IterEnd(2, footer)]
    events += [IterBegin(SECTION_END, 2), RamEos(), IterEnd(2, footer)]
    descs = []
    for i in range(draw(st.integers(0, 3))):
        vmsd = draw(vmsds(prefix=f"dev{i}"))
        tree = draw(trees(vmsd))
        idstr = f"dev{i}"
        desc = describe_section(vmsd, tree, idstr, 0, vmsd.version_id)
        # As the legacy decoder hands them out: the schema read back from the description, and the
        # tree read with it (a description leaves out what the bytes do not show, e.g. empty arrays).
        schema = vmsd_from_desc(desc, "$", 0)
        state = visit_vmsd(LegacyReader(_legacy_state(vmsd, tree)), schema, None, vmsd.version_id)
        descs.append(desc)
        events.append(DeviceSection(10 + i, idstr, 0, vmsd.version_id, state, schema, desc, footer))
        if draw(st.booleans()):  # the same schema again: sent once by the record formats
            again = dict(desc, instance_id=1)
            events.append(DeviceSection(20 + i, idstr, 1, vmsd.version_id, state, schema, again, footer))
            descs.append(again)
    events.append(Eof())
    how = draw(st.sampled_from(["vmdesc", "text", "none"]))
    if how == "vmdesc":
        events.append(Vmdesc(json.dumps({"page_size": PS, "devices": descs}).encode()))
    elif how == "text":  # opaque bytes in the vmdesc's place: a "{" there starts a vmdesc, which must be JSON
        events.append(Vmdesc(draw(st.binary(max_size=40).filter(lambda b: not b.startswith(b"{")))))
    return events


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=streams())
def test_random_streams_round_trip(name, events):
    data = build(events)
    out = encode_with(name, events)
    assert sniff(out[:64]) == name
    back = decode_with(name, out, chunk=997, events=events)
    assert build(back) == data
    devices = [e for e in events if isinstance(e, DeviceSection)]
    for a, b in zip(devices, [e for e in back if isinstance(e, DeviceSection)]):
        assert json.dumps(b.desc) == json.dumps(a.desc) and b.idstr == a.idstr


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=streams(), comp=st.sampled_from(["none", "zstd", "lz4"]))
def test_random_streams_through_compressed_ferry(events, comp):
    assert build(ferry.decode([encode_with("ferry", events, compress=comp)])) == build(events)


# ---------------------------------------------------------------------------
# ferry: framing, corruption, truncation, unknown frames, totals
# ---------------------------------------------------------------------------


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, total length) of each ferry frame."""
    out, pos = [], ferry.HEADER_LEN
    while pos < len(data):
        t, _, _, n, _ = struct.unpack_from(">BBHII", data, pos)
        out.append((pos, t, 16 + n))
        pos += 16 + n
    return out


def test_ferry_header_and_frames_follow_the_spec():
    data = encode_with("ferry", full_stream(), compress="zstd")
    assert data[:8] == b"\x89FRY\r\n\x1a\n"
    version, hlen, mask, payload = struct.unpack_from(">HHQB", data, 8)
    assert (version, hlen, payload) == (1, 32, 1)
    assert caps.names(mask) == ["ferry-framing", "frame-crc32c", "zstd", "self-describing"]
    assert struct.unpack_from(">I", data, 28)[0] == ferry.crc32c(data[:28])
    fr = frames(data)
    assert fr[-1][1] == 0xFF and fr[-1][0] + fr[-1][2] == len(data)
    kinds = {t & 0x7F for _, t, _ in fr}
    assert {ferry.T_RECORD, ferry.T_SCHEMA, ferry.T_DEVICE, ferry.T_PAGES, ferry.T_ZEROS, ferry.T_END} <= kinds
    assert all(t & ferry.MUST_UNDERSTAND for _, t, _ in fr)
    end = struct.unpack_from(">7Q", data, fr[-1][0] + 16)
    assert end[0] == len(fr) - 1 and end[6] == fr[-1][0]
    assert end[2] == 3 and end[3] == 3 and end[4] == 3  # pages, zero pages, other RAM records


def test_ferry_crc32c_is_castagnoli():
    assert ferry.crc32c(b"123456789") == 0xE3069283
    assert ferry._table_crc32c()(b"123456789") == 0xE3069283


@pytest.mark.parametrize("comp", ["none", "zstd"])
def test_every_flipped_bit_is_caught_at_its_frame(comp):
    data = encode_with("ferry", full_stream(), compress=comp)
    starts = [0] + [o for o, _, _ in frames(data)]
    rnd = random.Random(7)
    positions = range(len(data)) if len(data) < 4000 else sorted(
        set(rnd.sample(range(len(data)), 1500)) | set(p + d for p in starts for d in range(20) if p + d < len(data)))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << rnd.randrange(8)
        with pytest.raises(DecodeError) as e:
            list(ferry.decode([bytes(bad)]))
        frame_start = max(s for s in starts if s <= pos)
        assert e.value.offset == frame_start, (pos, str(e.value))
        assert "CRC" in str(e.value) or (pos < 8 and "magic" in str(e.value)), str(e.value)


def test_every_cut_is_reported_as_truncated():
    data = encode_with("ferry", full_stream())
    for n in range(len(data)):
        with pytest.raises(TruncatedError) as e:
            list(ferry.decode([data[:n]]))
        assert "truncated" in str(e.value) or "empty" in str(e.value) or "header" in str(e.value)
        assert e.value.offset is not None and e.value.offset <= n


def test_sans_io_decoder_byte_by_byte():
    data = encode_with("ferry", full_stream())
    dec = ferry.FerryDecoder()
    assert dec.state is ferry.State.HEADER and dec.next_event() is ferry.NEED_DATA
    events = []
    for i in range(len(data)):
        dec.feed(data[i:i + 1])
        while (ev := dec.next_event()) not in (ferry.NEED_DATA, ferry.DONE):
            events.append(ev)
    assert dec.state is ferry.State.DONE and dec.next_event() is ferry.DONE
    dec.feed_eof()
    assert build(events) == build(full_stream())
    dec = ferry.FerryDecoder()
    dec.feed(data[:100])
    dec.feed_eof()
    with pytest.raises(TruncatedError):
        while dec.next_event() is not ferry.DONE:
            pass
    assert dec.state is ferry.State.ERROR


def test_unknown_frames_skipped_kept_or_refused(tmp_path):
    events = full_stream()
    skippable = UnknownFrame(0x40, 0, b"future data")
    data = encode_with("ferry", events[:3] + [skippable] + events[3:])
    plain = build(events)
    assert build(ferry.decode([data])) == plain  # skipped
    kept = list(ferry.decode([data], ferry.DecodeOptions(keep_unknown=True)))
    assert skippable in kept
    again = encode_with("ferry", kept)
    assert again == data  # a re-encoder keeps it, byte for byte
    for name in ("cbor", "msgpack", "jsonl", "asn1-der"):  # the record formats carry it too
        via = decode_with(name, encode_with(name, kept))
        assert encode_with("ferry", via) == data
    src = tmp_path / "s.fry"
    src.write_bytes(data)
    assert main(["convert", "-q", str(src), str(tmp_path / "c.cbor"), "--to", "cbor"]) == 0
    assert main(["convert", "-q", str(tmp_path / "c.cbor"), str(tmp_path / "back.fry"), "--to", "ferry"]) == 0
    assert (tmp_path / "back.fry").read_bytes() == data
    assert main(["convert", "-q", str(src), str(tmp_path / "back.mig"), "--to", "legacy"]) == 0
    assert (tmp_path / "back.mig").read_bytes() == plain
    assert main(["convert", "-q", str(tmp_path / "c.cbor"), str(tmp_path / "back2.mig"), "--to", "legacy"]) == 0
    assert (tmp_path / "back2.mig").read_bytes() == plain

    must = encode_with("ferry", events[:3] + [UnknownFrame(0xC0, 0, b"x")] + events[3:])
    with pytest.raises(DecodeError, match="must be understood") as e:
        list(ferry.decode([must]))
    assert e.value.offset == [o for o, t, _ in frames(must) if t == 0xC0][0]
    odd_flags = encode_with("ferry", events[:3] + [UnknownFrame(0x81, 0x80, b"x")] + events[3:])
    with pytest.raises(DecodeError, match="must be understood"):
        list(ferry.decode([odd_flags]))


def test_end_totals_catch_a_dropped_frame():
    data = encode_with("ferry", full_stream())
    for off, t, n in frames(data):
        if t & 0x7F == ferry.T_ZEROS:
            break
    with pytest.raises(DecodeError, match="totals do not match.*frames: .* announced"):
        list(ferry.decode([data[:off] + data[off + n:]]))


def _reheader(data: bytes, version: int = 1, mask: int | None = None, payload: int = 1) -> bytes:
    _, _, _, old_mask, _ = struct.unpack_from(">8sHHQB", data, 0)
    head = struct.pack(">8sHHQB7x", ferry.MAGIC, version, 32, old_mask if mask is None else mask, payload)
    return head + struct.pack(">I", ferry.crc32c(head)) + data[32:]


def test_header_refusals_name_the_problem():
    data = encode_with("ferry", full_stream())
    with pytest.raises(DecodeError, match="version 2; this reader knows version 1"):
        list(ferry.decode([_reheader(data, version=2)]))
    with pytest.raises(DecodeError, match="capabilities this reader lacks: bit-40"):
        list(ferry.decode([_reheader(data, mask=(1 << 40) | 1)]))
    with pytest.raises(DecodeError, match="payload codec 9"):
        list(ferry.decode([_reheader(data, payload=9)]))
    with pytest.raises(DecodeError, match="bytes after the END frame"):
        list(ferry.decode([data + b"\x00"]))
    # a compressed frame in a stream whose header does not announce it
    z = encode_with("ferry", full_stream(), compress="zstd")
    with pytest.raises(DecodeError, match="does not announce"):
        list(ferry.decode([_reheader(z, mask=int(caps.Cap.FERRY_FRAMING | caps.Cap.FRAME_CRC32C))]))


def test_schemas_travel_once():
    events = full_stream()
    dev = next(e for e in events if isinstance(e, DeviceSection))
    twice = events[:-2] + [DeviceSection(7, "timer", 1, 2, dev.state, dev.schema, dev.desc, True)] + events[-2:]
    data = encode_with("ferry", twice)
    assert sum(1 for _, t, _ in frames(data) if t & 0x7F == ferry.T_SCHEMA) == 1
    assert sum(1 for _, t, _ in frames(data) if t & 0x7F == ferry.T_DEVICE) == 2
    assert build(ferry.decode([data])) == build(twice)


def test_zero_runs_collapse_and_compression_shrinks():
    size = 100300 * PS
    big = [Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4), RamMemSize(size, [RamBlock("pc.ram", size)]),
           RamZeros("pc.ram", 0, 100000, True),
           RamPages("pc.ram", 100000 * PS, 300, False, data=bytes(range(256)) * 16 * 300), RamEos(), IterEnd(1),
           Eof()]
    legacy_size = len(build(big))
    sizes = {c: len(encode_with("ferry", big, compress=c)) for c in ("none", "zstd", "lz4")}
    assert sizes["none"] < legacy_size - 100000 * 8
    assert sizes["zstd"] * 20 < sizes["none"] and sizes["lz4"] * 20 < sizes["none"]
    for c in sizes:
        assert build(ferry.decode([encode_with("ferry", big, compress=c)])) == build(big)


@pytest.mark.parametrize("name", CODECS[1:])
@pytest.mark.parametrize("run", ["beyond", "unsized"])
def test_a_run_of_pages_outside_its_block_is_refused(name, run):
    """A page count read from the input cannot outgrow the block MEM_SIZE sized (found by the mutation test:
    a mutated count made the QEMU-format encoder write billions of zero-page records)."""
    size = 16 * PS
    sized = [] if run == "unsized" else [RamMemSize(size, [RamBlock("pc.ram", size)])]
    evs = [Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4), *sized, RamZeros("pc.ram", 8 * PS, 1 << 30, True),
           RamEos(), IterEnd(1), Eof()]
    with pytest.raises(DecodeError, match="pc.ram"):
        list(codec(name).decode([encode_with(name, evs)]))


def test_der_elements_with_a_foreign_tag_are_refused():
    """Every SEQUENCE tag turned into one no CHOICE knows: asn1tools' DER decoder used to loop for ever on the
    ones inside a SEQUENCE OF (vmferry.encode.asn1 gives it BER's element check)."""
    data = encode_with("asn1-der", full_stream())
    refused = []
    for i in [i for i, b in enumerate(data) if b == 0x30]:  # tags, and bytes of values that happen to be 0x30
        try:
            list(codec("asn1-der").decode([data[:i] + b"\x96" + data[i + 1:]]))
        except DecodeError as e:
            refused.append(str(e))
    assert sum("got '96'" in m for m in refused) > 20


def _refresh_crcs(data: bytearray, off: int) -> None:
    """Recompute both CRCs of the frame at ``off`` (to forge a frame that passes its checksums)."""
    n = struct.unpack_from(">I", data, off + 4)[0]
    struct.pack_into(">I", data, off + 8, ferry.crc32c(bytes(data[off + 16:off + 16 + n])))
    struct.pack_into(">I", data, off + 12, ferry.crc32c(bytes(data[off:off + 12])))


def test_pages_from_qemu_travel_in_qemu_layout_uncopied():
    src = build(full_stream())
    events = list(legacy.decode([src]))
    data = encode_with("ferry", events)
    page_frames = [(o, n) for o, t, n in frames(data) if t & 0x7F == ferry.T_PAGES]
    for o, _ in page_frames:
        assert data[o + 16 + 16] & ferry.RUN_QEMU_LAYOUT  # the run header's flags byte
    runs = [e for e in ferry.decode([data]) if isinstance(e, RamPages)]
    assert runs and all(r.data is None and isinstance(r.legacy, memoryview) and r.legacy.obj is data for r in runs)
    assert build(ferry.decode([data])) == src
    # an address word that disagrees with its run header is refused, even with valid CRCs
    o, n = page_frames[0]
    bad = bytearray(data)
    name_len = bad[o + 16 + 17]
    second = o + 16 + 18 + name_len + 8 + (1 + name_len if bad[o + 16 + 16] & 1 else 0) + PS
    bad[second + 6] ^= 0x10  # the second page's address
    _refresh_crcs(bad, o)
    with pytest.raises(DecodeError, match="QEMU record header does not match") as e:
        list(ferry.decode([bytes(bad)]))
    assert e.value.offset == o


def test_long_qemu_runs_split_into_frames():
    pages = b"".join(bytes([i % 251]) * PS for i in range(600))
    evs = [Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4), RamMemSize(600 * PS, [RamBlock("pc.ram", 600 * PS)]),
           RamPages("pc.ram", 0, 600, True, data=pages), RamEos(), IterEnd(1), Eof()]
    src = build(evs)
    data = encode_with("ferry", list(legacy.decode([src])))
    assert sum(1 for _, t, _ in frames(data) if t & 0x7F == ferry.T_PAGES) == 3
    assert build(ferry.decode([data])) == src
    assert build(ferry.decode([encode_with("ferry", evs)])) == src  # packed layout


def test_page_data_stays_a_view_of_the_input():
    data = encode_with("ferry", full_stream())
    pages = [e for e in ferry.decode([data]) if isinstance(e, RamPages)]
    assert pages and all(isinstance(p.data, memoryview) and p.data.obj is data for p in pages)


# ---------------------------------------------------------------------------
# hostile bytes, every decoder
# ---------------------------------------------------------------------------


def _only_decode_errors(name: str, blob: bytes) -> None:
    try:
        for _ in codec(name).decode([blob]):
            pass
    except DecodeError as e:
        assert e.path.startswith("$")


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=st.binary(max_size=400))
def test_random_bytes_raise_only_decode_error(name, blob):
    good = encode_with(name, full_stream(vmdesc=False))
    for data in (blob, good[:64] + blob, good[:len(good) // 2] + blob):
        _only_decode_errors(name, data)


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_streams_raise_only_decode_error(name, data):
    stream = bytearray(encode_with(name, full_stream()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    try:
        events = list(codec(name).decode([bytes(stream)]))
    except DecodeError:
        return
    try:
        build(events)  # whatever decodes is a stream of well-formed events
    except Exception as e:  # noqa: BLE001
        from vmferry.errors import FerryError

        assert isinstance(e, FerryError), repr(e)


@pytest.mark.parametrize("name", CODECS[1:])
def test_cuts_of_every_format_are_decode_errors(name):
    data = encode_with(name, full_stream())
    step = max(1, len(data) // 400)
    for n in list(range(0, len(data), step)) + [len(data) - 1]:
        if data[:n].rstrip() == data.rstrip():  # only the final newline is gone
            continue
        with pytest.raises(DecodeError):
            list(codec(name).decode([data[:n]]))


# ---------------------------------------------------------------------------
# ASN.1: the envelope module and the typed modules generated from schemas
# ---------------------------------------------------------------------------


def test_record_module_compiles_in_every_rule():
    assert asn1.MODULE == asn1.record_module()
    assert "Record ::= CHOICE" in asn1.MODULE and "pages SEQUENCE" in asn1.MODULE
    for rules in ("ber", "der", "per", "xer"):
        assert asn1.compiled(rules) is not None


def test_ber_stream_is_one_stream_value_and_xer_one_document():
    events = full_stream()
    ber = encode_with("asn1-ber", events)
    assert ber[:2] == b"\x30\x80" and ber[-2:] == b"\x00\x00"
    import asn1tools

    mod = asn1tools.compile_string(asn1.MODULE, "ber")
    values = mod.decode("Stream", ber)
    assert values[0][0] == "stream" and values[-1][0] == "fin"
    xer = encode_with("asn1-xer", events)
    values = asn1.compiled("xer").decode("Stream", xer)
    assert values[0][0] == "stream" and values[-1][0] == "fin"


def test_per_length_determinants():
    for n in (0, 1, 127, 128, 16383, 16384, 65536, 65537, 200000):
        pieces = asn1.per_length(n)
        assert sum(k for _, k in pieces) == n
        assert pieces[-1][1] < 16384


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rules=st.sampled_from(["ber", "der", "per", "xer"]))
def test_typed_schema_modules_round_trip_trees(data, rules):
    import asn1tools

    vmsd = data.draw(vmsds())
    tree = data.draw(trees(vmsd))
    mod = asn1.schema_module(vmsd)
    compiled = asn1tools.compile_string(mod.text(), rules)
    value = asn1.tree_to_typed(mod, tree)
    back = asn1.tree_from_typed(mod, compiled.decode(mod.root_type, compiled.encode(mod.root_type, value)))
    assert _legacy_state(vmsd, back) == _legacy_state(vmsd, tree)


def _legacy_state(vmsd, tree) -> bytes:
    from vmferry.serialize.drive import visit_vmsd
    from vmferry.serialize.visitor import LegacyWriter

    w = LegacyWriter()
    visit_vmsd(w, vmsd, tree)
    return bytes(w.out)


def test_typed_module_names_are_valid_identifiers():
    from vmferry.serialize.schema import Field, Subsection, Vmsd

    sub = Vmsd("cpu/poll_control_msr", 1, 1, (Field("env.poll_control_msr", "uint64", 8),))
    vmsd = Vmsd("cpu", 12, 11, (Field("env.regs", "uint64", 8, count=16), Field("unused[0]", "uint8", 1),
                                Field("unused[1]", "uint8", 1), Field("_private", "bool", 1),
                                Field("MSR", "int32", 4)), (Subsection(sub),))
    mod = asn1.schema_module(vmsd)
    text = mod.text()
    assert "env-regs SEQUENCE (SIZE (16)) OF INTEGER (0..18446744073709551615)" in text
    assert "unused-0 " in text and "unused-1 " in text and "  private Bool8" in text and "f-MSR" in text
    assert "cpu-poll-control-msr Cpu-poll-control-msr OPTIONAL" in text
    tree = {"env.regs": list(range(16)), "unused[0]": 1, "unused[1]": 2, "_private": 7, "MSR": -3,
            "cpu/poll_control_msr": {"env.poll_control_msr": 5}}
    import asn1tools

    compiled = asn1tools.compile_string(text, "per")
    value = asn1.tree_to_typed(mod, tree)
    assert asn1.tree_from_typed(mod, compiled.decode(mod.root_type, compiled.encode(mod.root_type, value))) == tree


# ---------------------------------------------------------------------------
# caps
# ---------------------------------------------------------------------------


def test_caps_masks():
    a = caps.Cap.FERRY_FRAMING | caps.Cap.ZSTD | caps.Cap.CODEC_CBOR
    b = caps.Cap.FERRY_FRAMING | caps.Cap.LZ4 | caps.Cap.CODEC_CBOR
    assert caps.intersect(a, b) == caps.Cap.FERRY_FRAMING | caps.Cap.CODEC_CBOR
    assert caps.intersect() == 0 and caps.union(a, b) == a | b
    assert caps.missing(a, b) == caps.Cap.ZSTD
    assert caps.names(a) == ["ferry-framing", "zstd", "codec-cbor"]
    assert caps.from_names(["zstd", "lz4"]) == caps.Cap.ZSTD | caps.Cap.LZ4
    with pytest.raises(ValueError, match="unknown capability"):
        caps.from_names(["warp-drive"])
    odd = caps.Cap(1 << 50) | caps.Cap.LZ4
    assert caps.unknown(odd) == 1 << 50 and caps.names(odd) == ["lz4", "bit-50"]
    assert caps.from_bytes(caps.to_bytes(odd)) == odd
    assert caps.restrict(a, caps.FEATURES) == caps.Cap.FERRY_FRAMING | caps.Cap.ZSTD


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_formats_lists_every_codec(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in CODECS:
        assert f"\n{name} " in "\n" + out
    assert "zstd" in out and "codec-asn1-per" in out
    assert main(["formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == CODECS


def test_compress_option(tmp_path, capsys):
    src = tmp_path / "s.mig"
    src.write_bytes(build(full_stream()))
    for comp in ("zstd", "lz4", "none"):
        assert main(["convert", "-q", str(src), str(tmp_path / f"{comp}.fry"), "--to", "ferry", "--compress",
                     comp]) == 0
        assert main(["convert", "-q", str(tmp_path / f"{comp}.fry"), str(tmp_path / "back.mig"), "--to",
                     "legacy"]) == 0
        assert (tmp_path / "back.mig").read_bytes() == src.read_bytes()
    assert main(["convert", "-q", str(src), str(tmp_path / "x.json"), "--to", "json", "--compress", "zstd"]) == 2
    assert "--compress none|zstd|lz4 applies to --to ferry" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the golden corpus (real QEMU)
# ---------------------------------------------------------------------------


def _corpus_events(qemu_corpus, name):
    options = legacy.DecodeOptions()
    if name in SCHEMA_FOR:
        options = legacy.DecodeOptions(fallback_schemas=load_schema_file(str(qemu_corpus.get(SCHEMA_FOR[name]))))
    data = qemu_corpus.get(name).read_bytes()
    return data, list(legacy.decode([data], options))


@pytest.mark.qemu
@pytest.mark.parametrize("name", corpus_names())
def test_corpus_round_trips_through_every_codec(name, qemu_corpus):
    data, events = _corpus_events(qemu_corpus, name)
    for x in CODECS[1:]:
        out = encode_with(x, events)
        assert sniff(out[:64]) == x
        assert build(decode_with(x, out, chunk=1 << 16)) == data, x
    for comp in ("zstd", "lz4"):
        assert build(ferry.decode([encode_with("ferry", events, compress=comp)])) == data
        grouped = encode_with("ferry", events, compress=comp, groups=True)  # GROUP frames (format.md §2.4)
        assert build(ferry.decode([grouped], ferry.DecodeOptions(legacy_records=True))) == data


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["pc-7.2-paused", "pc-7.2-postcopy-ram", "pc-2.2-novmdesc", "pc-7.2-xbzrle-running"])
def test_corpus_chain_through_the_cli(name, qemu_corpus, tmp_path):
    src = qemu_corpus.get(name)
    prev = src
    for i, to in enumerate(CHAIN):
        out = tmp_path / f"{i}.{to}"
        argv = ["convert", "-q", str(prev), str(out), "--to", to]
        if i == 0 and name in SCHEMA_FOR:
            argv += ["--schema", str(qemu_corpus.get(SCHEMA_FOR[name]))]
        assert main(argv) == 0, to
        prev = out
    assert prev.read_bytes() == src.read_bytes()


@pytest.mark.qemu
def test_typed_module_of_real_devices(qemu_corpus):
    import asn1tools

    _, events = _corpus_events(qemu_corpus, "pc-7.2-paused")
    done = 0
    for ev in events:
        if isinstance(ev, DeviceSection) and not ev.schema.old_style:
            mod = asn1.schema_module(ev.schema)
            compiled = asn1tools.compile_string(mod.text(), "per")
            value = asn1.tree_to_typed(mod, ev.state)
            back = asn1.tree_from_typed(mod, compiled.decode(mod.root_type, compiled.encode(mod.root_type, value)))
            assert _legacy_state(ev.schema, back) == _legacy_state(ev.schema, ev.state), ev.idstr
            done += 1
    assert done > 10
