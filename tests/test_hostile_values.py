"""Values the decoders once accepted and that blew up later (issue 17), each a regression test.

Every decoder now checks every value against what QEMU allows (vmferry.encode.limits) and refuses with a
DecodeError naming an offset; memory is asserted with tracemalloc (the peak of Python allocations while
decoding, converting or transcoding), never with timing.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any, Callable

import pytest

import fuzzing
from vmferry import DecodeError, encode
from vmferry.encode import legacy, limits
from vmferry.events import Configuration, DeviceSection, Header, IterBegin, SECTION_START
from vmferry.cli.files import Input, decode_input
from vmferry.live.proxy import transcode
from vmferry.cli.summary import StreamSummary

RECORD_CODECS = ("ferry", *fuzzing.RECORD_CODECS)


def _peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result (or the exception it raised) and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        try:
            out: Any = fn()
        except Exception as e:  # noqa: BLE001 - returned to the test, which says what it expects
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _decode_all(data: bytes, codec: str) -> list[Any]:
    return list(encode.codec(codec).decode(iter([data])))


def _stream(codec: str, edit: Callable[[list[Any]], None], seed: str = "devices") -> bytes:
    """A seed stream of ``codec`` with its records edited (ferry: its structured frames)."""
    events = fuzzing.seed_events()[seed]
    spelled = "msgpack" if codec == "ferry" else codec
    records = fuzzing.seed_records(events, spelled)
    edit(records)
    if codec == "ferry":
        return fuzzing._ferry_from_records(records)
    out = fuzzing.records_to_bytes(records, codec, fuzzing._NoReformat(0))
    assert out is not None
    return out


def _record(records: list[Any], t: str) -> dict[str, Any]:
    return next(r for r in records if r["t"] == t)


def _refused(data: bytes, codec: str, what: str = "") -> DecodeError:
    with pytest.raises(DecodeError) as info:
        _decode_all(data, codec)
    e = info.value
    assert e.offset is not None and 0 <= e.offset <= len(data), e
    assert what in str(e), e
    return e


# --- a machine name that is an integer: bytes(n) allocated n bytes (6.6 KB of JSON -> 8.8 GB)


@pytest.mark.parametrize("codec", RECORD_CODECS)
def test_machine_name_integer_is_refused_at_decode(codec):
    data = _stream(codec, lambda recs: _record(recs, "configuration").update(state={"len": 13,
                                                                                    "name": 1_500_000_000}))
    err, peak = _peak(lambda: _decode_all(data, codec))
    assert isinstance(err, DecodeError) and err.offset is not None, err
    assert "name" in err.path
    assert peak < 16 << 20, peak


def test_configuration_machine_never_allocates_for_a_non_bytes_name():
    for name in (1_500_000_000, 2.5, None, ["a"], {"x": 1}):
        c = Configuration({"len": 13, "name": name, "configuration/capabilities": {"capabilities": name}})
        out, peak = _peak(lambda: (c.machine, c.capabilities))
        assert out == ("", []) and peak < 1 << 20


def test_machine_name_longer_than_any_machine_type_is_refused():
    data = fuzzing.large_inputs("legacy", 1 << 20, only=("machine name of 9.9 MB",))["machine name of 9.9 MB"]
    _refused(data, "legacy", "machine type name")


# --- RAM: a zero run in a block the input sized at 2^62 bytes grew convert/proxy by 50 MB/s


def _zeros(length: int, count: int) -> Callable[[list[Any]], None]:
    def edit(records: list[Any]) -> None:
        at = next(i for i, r in enumerate(records) if r["t"] == "eof")
        records[at:at] = [
            {"t": "begin", "kind": "start", "id": 2, "idstr": "ram", "instance": 0, "version": 4},
            {"t": "mem_size", "total": length, "blocks": [{"name": "pc.ram", "length": length}]},
            {"t": "zeros", "block": "pc.ram", "offset": 0, "count": count, "named": True},
            {"t": "eos"}, {"t": "end", "id": 2, "footer": True}]
    return edit


@pytest.mark.parametrize("codec", RECORD_CODECS)
def test_block_length_over_the_largest_guest_is_refused(codec):
    data = _stream(codec, _zeros(1 << 62, (1 << 32) - 1))
    _refused(data, codec, "RAM total")


def test_legacy_mem_size_over_the_largest_guest_is_refused():
    data = fuzzing.large_inputs("legacy", 1 << 20, only=("MEM_SIZE of 2^62 bytes",))["MEM_SIZE of 2^62 bytes"]
    _refused(data, "legacy", "64 TiB")


@pytest.mark.parametrize("codec", ("ferry", "msgpack", "json"))
def test_a_huge_zero_run_streams_to_qemus_format_in_bounded_memory(codec):
    """2^32-1 zero pages in a 64 TiB block are a valid stream of 36 GB in QEMU's format: the legacy encoder
    and the proxy write it in pieces, never holding more than a piece."""
    data = _stream(codec, _zeros(limits.MAX_GUEST_RAM, (1 << 32) - 1))

    def first_16_mib(chunks: Any) -> int:
        n = 0
        for c in chunks:
            n += len(c)
            if n > 16 << 20:
                return n
        raise AssertionError("the run ended early")

    n, peak = _peak(lambda: first_16_mib(legacy.encode(
        decode_input(Input(iter([data]), codec, len(data), "x"), None, target="legacy"))))
    assert isinstance(n, int), n
    assert peak < 4 << 20, peak
    if codec == "ferry":
        n, peak = _peak(lambda: first_16_mib(transcode(iter([data]), "ferry", wire="legacy")))
        assert isinstance(n, int), n
        assert peak < 4 << 20, peak


def test_zero_run_pieces_match_qemus_records():
    from vmferry.events import RamZeros

    for named in (True, False):
        for fill in (None, bytes(range(256)) * 40):
            ev = RamZeros("pc.ram", 8 * 4096, 10240, named, 4096, fill)
            expect = bytearray()
            for i in range(ev.count):
                first = i == 0 and named
                expect += struct.pack(">Q", (ev.offset + i * 4096) | 0x02 | (0 if first else 0x20))
                if first:
                    expect += b"\x06pc.ram"
                expect.append(fill[i] if fill is not None else 0)
            assert b"".join(legacy._zeros_pieces(ev)) == bytes(expect)


# --- 10 MB of MessagePack or CBOR empty maps took inspect to 1.45 GB (1 MB here: the bound is per byte;
# benchmarks/fuzz.py measures the 10 MB ones)


@pytest.mark.parametrize("codec", ("msgpack", "cbor", "ferry", "jsonl", "json"))
@pytest.mark.parametrize("shape", ("empty maps", "empty lists"))
def test_megabytes_of_empty_containers_are_refused_before_they_are_built(codec, shape):
    data = fuzzing.large_inputs(codec, 1 << 20, only=(shape,))[shape]
    assert len(data) > 900_000
    err, peak = _peak(lambda: _decode_all(data, codec))
    assert isinstance(err, DecodeError) and err.offset is not None, err
    assert "Python objects" in str(err)
    assert peak < 8 << 20, f"{codec} {shape}: peak {peak}"  # the objects alone would be 64-72 MB


@pytest.mark.parametrize("codec", ("asn1-ber", "asn1-per", "asn1-xer"))
def test_asn1_records_other_than_pages_are_bounded_before_asn1tools_decodes_them(codec):
    data = fuzzing.large_inputs(codec, 9 << 19, only=("empty lists",))["empty lists"]  # one 1.1 MB record
    err, peak = _peak(lambda: _decode_all(data, codec))
    assert isinstance(err, DecodeError) and "other than pages" in str(err), err
    assert peak < 16 << 20, peak


def test_legacy_trees_are_bounded_per_byte_read():
    """A vmdesc may describe millions of one-byte structs: a dict each, 184 bytes for one byte of input."""
    data = fuzzing.large_inputs("legacy", 4 << 20, only=("one-byte structs", "vmdesc of empty objects"))
    for shape in ("one-byte structs",):
        err, peak = _peak(lambda: _decode_all(data[shape], "legacy"))
        assert isinstance(err, DecodeError) and "memory" in str(err), (shape, err)
        assert peak < 64 << 20, (shape, peak)
    err, peak = _peak(lambda: _decode_all(data["vmdesc of empty objects"], "legacy"))
    assert isinstance(err, DecodeError) and "vmdesc" in str(err), err
    assert peak < 32 << 20, peak


@pytest.mark.parametrize("codec", ("msgpack", "jsonl"))
def test_a_vmdesc_rebuilt_from_one_shared_schema_is_bounded(codec, monkeypatch):
    """One schema record and hundreds of devices naming it: the rebuilt vmdesc repeats the schema per device.
    (Its floor, 4 MiB, lowered here to 64 KiB so that a small input shows it.)"""
    from vmferry.encode.records import RecordDecoder

    shape = "one schema, many devices (vmdesc rebuilt)"
    data = fuzzing.large_inputs(codec, 200_000, only=(shape,))[shape]
    events, _ = _peak(lambda: _decode_all(data, codec))
    assert isinstance(events, list)  # under the floor: decoded
    monkeypatch.setattr(RecordDecoder, "VMDESC_FLOOR", 64 << 10)
    err, peak = _peak(lambda: _decode_all(data, codec))
    assert isinstance(err, DecodeError) and "vmdesc rebuilt" in str(err), err
    assert peak < 16 << 20, peak


# --- decoded-but-invalid values that ended in struct.error, TypeError, ... with exit 1


def _device(records: list[Any]) -> dict[str, Any]:
    return next(r for r in records if r["t"] == "device")


CASES: dict[str, tuple[Callable[[list[Any]], None], str]] = {
    "section id over u32": (lambda recs: _device(recs).update(id=1 << 32), "section id"),
    "version over u32": (lambda recs: _device(recs).update(version=(1 << 32) + 3), "version id"),
    "idstr not latin-1": (lambda recs: _device(recs).update(idstr="€"), "latin-1"),
    "idstr of 300 bytes": (lambda recs: _device(recs).update(idstr="x" * 300), "255"),
    "an int where an array is": (lambda recs: _device(recs)["state"].update(cmos_data=5), "cmos_data"),
    "a u8 field of 300": (lambda recs: _device(recs)["state"].update(cmos_index=300), "cmos_index"),
    "an unknown field": (lambda recs: _device(recs)["state"].update(x=1), "unknown field"),
    "command number over u16": (lambda recs: recs.insert(3, {"t": "command", "cmd": 1 << 16, "name": "x",
                                                             "payload": b""}), "command number"),
    "vmdesc before EOF": (lambda recs: recs.insert(3, dict(_record(recs, "vmdesc"))), "EOF"),
    "a second header": (lambda recs: recs.insert(3, {"t": "header", "version": 3}), "second header"),
    "stream version 4": (lambda recs: _record(recs, "header").update(version=4), "version"),
    "RAM outside a RAM section": (lambda recs: recs.insert(3, {"t": "eos"}), "outside a RAM section"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("codec", ("ferry", "jsonl", "msgpack", "cbor", "asn1-der"))
def test_values_qemu_cannot_hold_are_refused_at_decode(codec, case):
    edit, what = CASES[case]
    native = codec not in ("jsonl", "json")

    def spelled(recs: list[Any]) -> None:
        edit(recs)
        if not native:  # the JSON spellings: buffers as hex
            for r in recs:
                if r.get("t") == "command":
                    r["payload"] = ""
    try:
        data = _stream(codec, spelled)
    except AssertionError:
        pytest.skip(f"{codec} cannot spell {case}")
    e = _refused(data, codec)
    assert what in str(e), e


def test_decoded_events_always_encode_in_every_format():
    """What a decoder hands out, every encoder writes (the check the legacy writer does is run at decode)."""
    for codec in ("json", "msgpack", "ferry"):
        data = _stream(codec, lambda recs: None, seed="commands")
        events = _decode_all(data, codec)
        for target in encode.names():
            if target == "legacy":
                events_for = [e for e in events if type(e).__name__ != "UnknownFrame"]
            else:
                events_for = events
            out = b"".join(bytes(c) for c in encode.codec(target).encode(iter(events_for)))
            assert out


# --- every DecodeError names an offset


@pytest.mark.parametrize("text", [
    b'{"records": [{"t": "header", "version": 3}, {"t": 5}], "format": "vmferry-json", "version": 1}',
    b'{"format": "vmferry-json", "version": 1, "records": [{"t": "header", "version": 3}, ]}',
    b'{"format": "vmferry-json", "version": 1, "records": [{"t": "header", "version": 3}]',
    b'{"format": "vmferry-json", "version": 1, "records": []}',
    b'{"format": "vmferry-json",\n "version": 1, "records": [\n{"t": "header", "version": 3},\n{"t": "eos"}]}',
])
def test_reformatted_json_documents_name_the_offset(text):
    e = _refused(text, "json")
    assert e.offset is not None


def test_a_reformatted_json_document_decodes_record_by_record():
    import json

    data = _stream("json", lambda recs: None)
    records = [json.loads(line.rstrip(b",")) for line in data.splitlines()[1:-1]]
    doc = json.dumps({"version": 1, "records": records, "format": "vmferry-json"}, indent=2).encode()
    assert len(_decode_all(doc, "json")) == len(_decode_all(data, "json"))
    bad = doc.replace(b'"t": "eof"', b'"t": 7')
    e = _refused(bad, "json", "'t' should be str")
    assert bad[e.offset:e.offset + 1] == b"{"  # the offset of the record that says it


@pytest.mark.parametrize("codec", ("jsonl", "msgpack", "cbor"))
def test_a_bad_fin_record_names_its_offset(codec):
    def edit(recs: list[Any]) -> None:
        recs[-1] = {"t": "fin", "records": "many"}
    data = _stream(codec, edit)
    e = _refused(data, codec, "records")
    assert e.offset > len(data) // 2


def test_limits_check_events_made_by_hand():
    with pytest.raises(DecodeError, match="section id"):
        limits.check_event(IterBegin(SECTION_START, 1 << 32, "ram", 0, 4))
    with pytest.raises(DecodeError, match="version"):
        limits.check_event(Header(2))
    order = limits.StreamOrder()
    order.step(Header(), "$")
    with pytest.raises(DecodeError, match="iterative section 'block'"):
        order.step(IterBegin(SECTION_START, 3, "block", 0, 1), "$")


def test_inspect_summary_of_a_checked_stream():
    """The summary (vmferry inspect) of a decoded stream: machine and capabilities read from checked trees."""
    data = _stream("msgpack", lambda recs: None, seed="commands")
    s = StreamSummary().feed(_decode_all(data, "msgpack"))
    assert s.machine == "pc-q35-7.2" and "postcopy-ram" in s.capabilities
    assert any(isinstance(e, DeviceSection) for e in _decode_all(data, "msgpack"))


# --- found by benchmarks/fuzz.py, each once in its first 100,000 inputs


def _subsections(desc: Any) -> list[Any]:
    """Every subsection description inside ``desc``."""
    out: list[Any] = []
    stack = [desc]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            out += d.get("subsections", []) if isinstance(d.get("subsections"), list) else []
            stack.extend(d.values())
        elif isinstance(d, list):
            stack.extend(d)
    return out


@pytest.mark.parametrize("codec", ("msgpack", "asn1-per", "jsonl"))
def test_a_schema_subsection_version_over_u32_is_refused_at_decode(codec):
    """A device tree's subsection is written with the schema's version (u32): 2^46 was a struct.error."""
    def edit(recs: list[Any]) -> None:
        for r in recs:
            if r["t"] == "schema" and _subsections(r["desc"]):
                for sub in _subsections(r["desc"]):
                    sub["version"] = 1 << 46
    data = _stream(codec, edit)
    assert any(_subsections(r.get("desc")) for r in fuzzing.seed_records(fuzzing.seed_events()["devices"], "json"))
    _refused(data, codec, "u32 version")


@pytest.mark.parametrize("codec", ("json", "asn1-xer"))
def test_descriptions_hold_only_integers_every_format_carries(codec):
    """A 2^64 in a description decoded from JSON or XER made the MessagePack and ferry encoders overflow."""
    data = _stream(codec, lambda recs: next(r for r in recs if r["t"] in ("schema", "device") and "desc" in r)
                   ["desc"]["fields"][0].update(size=1 << 64))
    _refused(data, codec, "does not fit 64 bits")


def test_the_vmdesc_rewrite_of_a_machine_type_transform_takes_any_json():
    from vmferry.compat.stream import _configuration_desc

    desc = {"fields": [[1], "x", {"name": "name", "size": 3}, {"name": "len"}]}
    out = _configuration_desc(desc, "pc-i440fx-2.12")
    assert out["fields"] == [[1], "x", {"name": "name", "size": 14}, {"name": "len"}]
    assert _configuration_desc({"fields": 5}, "pc-i440fx-2.12") == {"fields": 5}


def test_undecoded_packaged_records_cross_every_record_format() -> None:
    """A live postcopy stream read without schemas keeps PACKAGED's records as bytes (``packaged_raw``): the
    record formats carry them (proxy -> ferry -> proxy), bounded like decoded ones; only PACKAGED has them."""
    from vmferry.events import CMD_PACKAGED, Command, Eof

    raw = bytearray()  # any legacy records will do: they stay undecoded
    legacy.encode_event(raw, IterBegin(SECTION_START, 2, "ram", 0, 4))
    cmd = Command(CMD_PACKAGED, struct.pack(">I", len(raw)), None, bytes(raw))
    limits.check_event(cmd)
    for fmt in ("ferry", "msgpack", "cbor", "jsonl"):
        codec = encode.codec(fmt)
        events = list(codec.decode(codec.encode([Header(3), cmd, Eof()])))
        assert [e for e in events if isinstance(e, Command)] == [cmd], fmt
    with pytest.raises(DecodeError, match="packaged bytes of"):
        limits.check_event(Command(CMD_PACKAGED, b"", None, bytes(limits.MAX_PACKAGED + 1)))
    with pytest.raises(DecodeError, match="only PACKAGED"):
        limits.check_event(Command(CMD_PACKAGED + 1, b"", None, b"\x00"))
    with pytest.raises(DecodeError, match="without its packaged records"):
        limits.check_event(Command(CMD_PACKAGED))
