"""Visitors and schema driving: round trips over random schemas, and errors that name the field."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings

from strategies import schema_and_tree
from vmferry import (
    DecodeError,
    EncodeError,
    Field,
    LegacyReader,
    LegacyWriter,
    Subsection,
    TreeBuilder,
    TreeReader,
    TruncatedError,
    Vmsd,
    describe_section,
    visit_vmsd,
)
from vmferry.encode.json import tree_from_json, tree_to_json
from vmferry.serialize.qemu_vmdesc import vmsd_from_desc


def _legacy(vmsd, tree) -> bytes:
    w = LegacyWriter()
    visit_vmsd(w, vmsd, tree)
    return bytes(w.out)


@settings(max_examples=300, deadline=None)
@given(schema_and_tree())
def test_legacy_round_trip(case):
    vmsd, tree = case
    data = _legacy(vmsd, tree)
    reader = LegacyReader(data)
    back = visit_vmsd(reader, vmsd, None)
    assert reader.pos == len(data)
    assert _legacy(vmsd, back) == data
    assert json.dumps(tree_to_json(back), sort_keys=True) == json.dumps(tree_to_json(tree), sort_keys=True)


@settings(max_examples=200, deadline=None)
@given(schema_and_tree())
def test_tree_visitors_round_trip(case):
    vmsd, tree = case
    built = TreeBuilder()
    visit_vmsd(built, vmsd, tree)
    loaded = visit_vmsd(TreeReader(tree), vmsd, None)
    assert _legacy(vmsd, loaded) == _legacy(vmsd, tree)


@settings(max_examples=200, deadline=None)
@given(schema_and_tree())
def test_json_tree_round_trip(case):
    vmsd, tree = case
    text = json.dumps(tree_to_json(tree))
    assert _legacy(vmsd, tree_from_json(json.loads(text))) == _legacy(vmsd, tree)


@settings(max_examples=200, deadline=None)
@given(schema_and_tree())
def test_description_parses_back_to_an_equivalent_schema(case):
    """describe(schema, tree) read as a vmdesc decodes the same bytes into the same tree."""
    vmsd, tree = case
    data = _legacy(vmsd, tree)
    desc = describe_section(vmsd, tree, "dev", 0)
    assert desc["vmsd_name"] == vmsd.name
    concrete = vmsd_from_desc(json.loads(json.dumps(desc)), "$", 0)
    back = visit_vmsd(LegacyReader(data), concrete, None)
    assert _legacy(concrete, back) == data


RTC_LIKE = Vmsd("rtc", 3, 1, (
    Field("cmos", "buffer", 4),
    Field("index", "uint8", 1),
    Field("period", "uint32", 4, since=2),
    Field("regs", "uint16", 2, count=2, array=True),
), (Subsection(Vmsd("rtc/extra", 1, 1, (Field("x", "int64", 8),)), needed=lambda s: s["index"] == 7),))


def test_since_version_and_needed_rules():
    tree = {"cmos": b"abcd", "index": 7, "period": 9, "regs": [1, 2], "rtc/extra": {"x": -5}}
    v3 = _legacy(RTC_LIKE, tree)
    assert v3 == b"abcd\x07\x00\x00\x00\x09\x00\x01\x00\x02" + b"\x05\x09rtc/extra\x00\x00\x00\x01" + \
        (-5).to_bytes(8, "big", signed=True)
    w = LegacyWriter()
    visit_vmsd(w, RTC_LIKE, dict(tree, index=1), version=1)  # v1: no period; needed() false: no subsection
    assert bytes(w.out) == b"abcd\x01\x00\x01\x00\x02"
    back = visit_vmsd(LegacyReader(bytes(w.out)), RTC_LIKE, None, version=1)
    assert "period" not in back and "rtc/extra" not in back


def test_truncation_names_the_field_and_offset():
    data = _legacy(RTC_LIKE, {"cmos": b"abcd", "index": 1, "period": 9, "regs": [1, 2]})
    with pytest.raises(TruncatedError) as e:
        visit_vmsd(LegacyReader(data[:7], base=0x100), RTC_LIKE, None)
    assert e.value.path == "$.period"
    assert e.value.offset == 0x105
    assert "period" in str(e.value) and "0x105" in str(e.value)
    with pytest.raises(TruncatedError) as e:
        visit_vmsd(LegacyReader(data[:-1]), RTC_LIKE, None)
    assert e.value.path == "$.regs[1]"


def test_encode_errors_name_the_field():
    with pytest.raises(EncodeError) as e:
        _legacy(RTC_LIKE, {"cmos": b"abcd", "index": 256, "period": 9, "regs": [1, 2]})
    assert e.value.path == "$.index" and "out of range" in str(e.value)
    with pytest.raises(EncodeError) as e:
        _legacy(RTC_LIKE, {"cmos": b"abc", "index": 1, "period": 9, "regs": [1, 2]})
    assert e.value.path == "$.cmos"
    with pytest.raises(EncodeError, match="missing field 'regs'"):
        _legacy(RTC_LIKE, {"cmos": b"abcd", "index": 1, "period": 9})


def test_tree_reader_errors_name_the_field():
    with pytest.raises(DecodeError) as e:
        visit_vmsd(TreeReader({"cmos": b"abcd", "index": 1, "period": "x", "regs": [1, 2]}), RTC_LIKE, None)
    assert e.value.path == "$.period"


def test_unknown_subsection_is_refused():
    data = _legacy(RTC_LIKE, {"cmos": b"abcd", "index": 1, "period": 9, "regs": [1, 2]})
    data += b"\x05\x09rtc/bogus\x00\x00\x00\x01"
    with pytest.raises(DecodeError, match="unknown or out-of-order subsection 'rtc/bogus'"):
        visit_vmsd(LegacyReader(data), RTC_LIKE, None)


def test_huge_count_allocates_nothing():
    vmsd = Vmsd("big", 1, 1, (Field("n", "uint32", 4), Field("items", "uint64", 8, count_field="n"),
                              Field("len", "uint32", 4), Field("blob", "buffer", 0, size_field="len")))
    with pytest.raises(TruncatedError):
        visit_vmsd(LegacyReader(b"\xff\xff\xff\xff" + bytes(16)), vmsd, None)
    with pytest.raises(TruncatedError):
        visit_vmsd(LegacyReader(bytes(4) + b"\xff\xff\xff\xf0"), vmsd, None)


def test_float64_and_bool_oddities_are_kept():
    vmsd = Vmsd("f", 1, 1, (Field("x", "float64", 8), Field("b", "bool", 1)))
    data = (1.5).hex() and b"\x3f\xf8" + bytes(6) + b"\x02"
    tree = visit_vmsd(LegacyReader(data), vmsd, None)
    assert math.isclose(tree["x"], 1.5) and tree["b"] == 2
    assert _legacy(vmsd, tree) == data


def test_unknown_keys_are_refused_not_lost():
    tree = {"cmos": b"abcd", "index": 1, "period": 9, "regs": [1, 2], "perod": 3}
    with pytest.raises(EncodeError, match="unknown field 'perod'"):
        _legacy(RTC_LIKE, tree)
    nested = Vmsd("outer", 1, 1, (Field("inner", "struct", 0, struct=RTC_LIKE),))
    reader = TreeReader({"inner": dict(tree)})
    with pytest.raises(DecodeError, match="unknown field 'perod'") as e:
        visit_vmsd(reader, nested, None)
    assert e.value.path == "$.inner"
    top = TreeReader(dict(tree))
    visit_vmsd(top, RTC_LIKE, None)
    with pytest.raises(DecodeError, match="unknown field 'perod'"):
        top.finish()


def test_cut_subsection_header_is_truncation():
    data = _legacy(RTC_LIKE, {"cmos": b"abcd", "index": 7, "period": 9, "regs": [1, 2], "rtc/extra": {"x": 1}})
    cut = data.index(b"\x05\x09rtc/extra") + 4
    with pytest.raises(TruncatedError, match="subsection header cut short"):
        visit_vmsd(LegacyReader(data[:cut], more_follows=True), RTC_LIKE, None)
    # At the true end of the input QEMU reads such bytes as "no subsection".
    reader = LegacyReader(data[:cut])
    visit_vmsd(reader, RTC_LIKE, None)
    assert reader.pos == cut - 4
