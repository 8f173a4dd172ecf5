"""The legacy codec on streams built here: every record type of spec §0-§6, and bad input."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmferry import DecodeError, Field, SchemaSet, TruncatedError, Vmsd
from vmferry.encode import json as json_codec
from vmferry.encode import legacy
from vmferry.encode.configuration import configuration_state
from vmferry.events import (
    RAM_COMPRESS_PAGE,
    RAM_CONTINUE,
    RAM_MULTIFD_FLUSH,
    RAM_XBZRLE,
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
    RamBlock,
    RamEos,
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
    Vmdesc,
)
from vmferry.serialize.describe import describe_section

PS = 4096
TIMER = Vmsd("timer", 2, 1, (Field("cpu_ticks_offset", "int64", 8), Field("unused", "unused_buffer", 8),
                             Field("cpu_clock_offset", "int64", 8)))
TIMER_STATE = {"cpu_ticks_offset": 5, "unused": bytes(8), "cpu_clock_offset": -3}


def page(n: int) -> bytes:
    return bytes([n % 251]) * PS


def build(events) -> bytes:
    return b"".join(bytes(c) for c in legacy.encode(events))


def decode(data: bytes, chunk: int = 7919, **opts):
    return list(legacy.decode([data[i:i + chunk] for i in range(0, len(data), chunk)],
                              legacy.DecodeOptions(**opts)))


def timer_section(footer: bool = True) -> DeviceSection:
    desc = describe_section(TIMER, TIMER_STATE, "timer", 0)
    return DeviceSection(0, "timer", 0, 2, TIMER_STATE, TIMER, desc, footer)


def full_stream(footer: bool = True, config: bool = True, vmdesc: bool = True, caps=None) -> list:
    dev = timer_section(footer)
    evs = [Header()]
    if config:
        evs.append(Configuration(configuration_state("pc-i440fx-7.2", caps)))
    ignore_shared = bool(caps and "x-ignore-shared" in caps)
    gpa = 0 if ignore_shared else None
    evs += [
        IterBegin(SECTION_START, 2, "ram", 0, 4),
        RamMemSize(0x6000 + 0x1000, [RamBlock("pc.ram", 0x6000, gpa=gpa), RamBlock("pc.rom", 0x1000, gpa=gpa)]),
        RamEos(),
        IterEnd(2, footer),
        IterBegin(SECTION_PART, 2),
        RamZeros("pc.ram", 0, 2, True),
        RamPages("pc.ram", 0x2000, 2, False, data=page(1) + page(2)),
        RamEos(),
        IterEnd(2, footer),
        IterBegin(SECTION_PART, 2),
        # CONTINUE carried across the section boundary: the block is still pc.ram.
        RamRecord(RAM_XBZRLE | RAM_CONTINUE, 0x2000, "pc.ram", False, b"\x01\x00\x04\xec\x08\x01\xbe"),
        RamZeros("pc.ram", 0x4000, 1, False, fill=b"\x55"),
        RamPages("pc.rom", 0, 1, True, data=page(3)),
        RamRecord(RAM_COMPRESS_PAGE | RAM_CONTINUE, 0, "pc.rom", False, b"\x00\x00\x00\x03abc"),
        RamRecord(RAM_MULTIFD_FLUSH, 0),
        RamEos(),
        IterEnd(2, footer),
        IterBegin(SECTION_END, 2),
        RamEos(),
        IterEnd(2, footer),
        dev,
        Eof(),
    ]
    if vmdesc:
        evs.append(Vmdesc(json.dumps({"page_size": PS, "devices": [dev.desc]}).encode()))
    return evs


@pytest.mark.parametrize("footer,config,vmdesc", [(True, True, True), (False, False, True), (True, True, False)])
def test_every_record_round_trips(footer, config, vmdesc):
    data = build(full_stream(footer, config, vmdesc))
    schemas = None if vmdesc else SchemaSet(sections={("timer", 0): TIMER})
    events = decode(data, fallback_schemas=schemas)
    assert build(events) == data
    doc = b"".join(json_codec.encode(events))
    assert build(json_codec.decode([doc])) == data
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("RamRecord") == 3 and "DeviceSection" in kinds
    zero = [e for e in events if isinstance(e, RamZeros)]
    assert zero[1].fill == b"\x55"


def test_ignore_shared_block_addresses_and_uuid():
    evs = full_stream(caps=["x-ignore-shared"])
    evs[1].state["configuration/uuid"] = {"uuid": bytes(range(16))}
    data = build(evs)
    assert b"\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0fx-ignore-shared" in data
    back = decode(data)
    mem = next(e for e in back if isinstance(e, RamMemSize))
    assert [b.gpa for b in mem.blocks] == [0, 0]
    assert back[1].capabilities == ["x-ignore-shared"]
    assert build(back) == data


def test_commands_and_packaged_records():
    dev = timer_section()
    evs = [Header(), Configuration(configuration_state("pc-q35-7.2")), Command(1), Command(2, b"\x00\x00\x00\x01"),
           Command(3, struct.pack(">QQ", PS, PS)), Command(7, b"", [Command(4), dev, Command(5)]),
           Command(11), Eof()]
    data = build(evs)
    back = decode(data, schemas=SchemaSet(sections={("timer", 0): TIMER}))
    assert [c.name for c in back if isinstance(c, Command)] == [
        "open-return-path", "ping", "postcopy-advise", "packaged", "switchover-start"]
    assert build(back) == data


def test_section_without_schema_names_the_section():
    data = build(full_stream(vmdesc=False))
    with pytest.raises(DecodeError, match=r"no schema for section 'timer' instance 0.*--schema"):
        decode(data)


def test_wrong_schema_is_detected_at_the_footer():
    data = build(full_stream(vmdesc=False))
    short = Vmsd("timer", 2, 1, (Field("cpu_ticks_offset", "int64", 8),))
    with pytest.raises(DecodeError, match="does not end where its schema"):
        decode(data, fallback_schemas=SchemaSet(sections={("timer", 0): short}), chunk=1 << 20)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: b"QEVX" + d[4:], "not a QEMU migration stream"),
    (lambda d: d[:4] + b"\x00\x00\x00\x02" + d[8:], "unsupported stream version 2"),
    (lambda d: d + b"\x00", "no schema for section 'timer'"),  # the vmdesc is no longer at the end
])
def test_bad_streams(mutate, message):
    with pytest.raises(DecodeError, match=message):
        decode(mutate(build(full_stream())))


def test_bytes_after_the_vmdesc():
    with pytest.raises(DecodeError, match="unexpected bytes after the vmdesc"):
        decode(build(full_stream()) + b"\x00", schemas=SchemaSet(sections={("timer", 0): TIMER}))


def test_continue_without_a_block_is_refused():
    data = build([Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4),
                  RamPages("pc.ram", 0, 1, False, data=page(0)), RamEos(), IterEnd(1), Eof()])
    with pytest.raises(DecodeError, match="no block was named"):
        decode(data)


def test_unknown_ram_flags_and_record_types():
    head = build([Header(), IterBegin(SECTION_FULL, 1, "ram", 0, 4)])
    with pytest.raises(DecodeError, match="unknown RAM record flags 0x400"):
        decode(head + struct.pack(">Q", 0x400))
    with pytest.raises(DecodeError, match="unknown record type 0x09"):
        decode(build([Header()]) + b"\x09")


def test_every_truncation_of_a_built_stream_is_a_decode_error():
    data = build(full_stream())
    for n in range(len(data)):
        with pytest.raises(DecodeError) as e:
            decode(data[:n], chunk=1 << 20)
        assert e.value.offset is not None and e.value.offset <= len(data)


def test_huge_vmdesc_length_allocates_nothing():
    data = build([Header(), Eof()]) + b"\x06\xff\xff\xff\xf0{"
    with pytest.raises(DecodeError, match="exceeds"):
        decode(data)
    data = build([Header(), Configuration(configuration_state("pc"))])
    with pytest.raises(TruncatedError):
        decode(data[:-2] + b"\xff\xff")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_decode_error(blob):
    for data in (blob, b"QEVM\x00\x00\x00\x03" + blob):
        try:
            for _ in legacy.decode([data]):
                pass
        except DecodeError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_stream_raises_only_decode_error(data):
    stream = bytearray(build(full_stream()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    try:
        out = build(decode(bytes(stream)))
    except DecodeError:
        return
    assert out == bytes(stream)  # whatever decodes must re-encode exactly


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_page_runs_decode_the_same_in_any_chunking(data):
    """Runs of PAGE and ZERO records, broken by gaps and changes of kind at any place, read in chunks of any
    size (the batched header check must stop exactly where a run ends, and never read past a chunk)."""
    blocks = 96
    offsets = sorted(data.draw(st.sets(st.integers(0, blocks - 1), min_size=1, max_size=blocks)))
    zero = data.draw(st.lists(st.booleans(), min_size=len(offsets), max_size=len(offsets)))
    ram = [RamZeros("pc.ram", o * PS, 1, i == 0) if z else RamPages("pc.ram", o * PS, 1, i == 0, data=page(o))
           for i, (o, z) in enumerate(zip(offsets, zero))]
    events = [Header(), IterBegin(SECTION_START, 2, "ram", 0, 4),
              RamMemSize(blocks * PS, [RamBlock("pc.ram", blocks * PS)]), RamEos(), IterEnd(2, True),
              IterBegin(SECTION_PART, 2), *ram, RamEos(), IterEnd(2, True), Eof()]
    stream = build(events)
    chunk = data.draw(st.integers(1, 40 * (8 + PS)))
    decoded = decode(stream, chunk=chunk)
    pages = [(ev.offset + i * PS, bytes(ev.page(i)))
             for ev in decoded if isinstance(ev, RamPages) for i in range(ev.count)]
    zeros = [ev.offset + i * PS for ev in decoded if isinstance(ev, RamZeros) for i in range(ev.count)]
    assert pages == [(o * PS, page(o)) for o, z in zip(offsets, zero) if not z]
    assert zeros == [o * PS for o, z in zip(offsets, zero) if z]
    assert build(decoded) == stream
