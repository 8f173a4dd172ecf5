"""How QEMU releases spell the same vmdesc: array indexes (5.2/7.2, 10.0, 11.1) and QJSON spacing (5.2).

Pure tests, no QEMU: the three spellings of one array parse to the same
schema, the Describer writes each of them, and the QJSON writer spaces
like QEMU 5.2's ``migration/qjson.c``.  tests/test_qemu_release_streams.py
checks the same against real 5.2 and 11.1 streams.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from vmferry.encode.legacy import vmdesc_text
from vmferry.errors import SchemaError
from vmferry.serialize.describe import describe_section
from vmferry.serialize.qemu_vmdesc import schemas_from_vmdesc
from vmferry.serialize.visitor import ARRAY_INDEX_BY_QEMU, Describer

BMDMA = {"type": "struct", "struct": {"vmsd_name": "ide bmdma", "version": 3, "fields": [
    {"name": "cmd", "type": "uint8", "size": 1}]}, "size": 1}


def _ide(indexes: list[int | None]) -> dict[str, Any]:
    fields: list[dict[str, Any]] = [{"name": "irq", "type": "uint32", "size": 4}]
    for i in indexes:
        e: dict[str, Any] = {"name": "bmdma"}
        if i is not None:
            e["index"] = i
        fields.append({**e, **BMDMA})
    fields.append({"name": "tail", "type": "uint8", "size": 1})
    return {"page_size": 4096, "devices": [
        {"name": "ide", "instance_id": 0, "vmsd_name": "ide", "version": 3, "fields": fields}]}


#: QEMU -> how it marks the three elements of a non-compressed array
SPELLINGS = {"7.2": [0, 1, 2], "10.0": [0, 1, None], "11.1": [None, None, None]}


@pytest.mark.parametrize("qemu", SPELLINGS)
def test_every_spelling_parses_to_the_same_array(qemu: str) -> None:
    vmsd = schemas_from_vmdesc(_ide(SPELLINGS[qemu])).sections[("ide", 0)]
    names = [f.name for f in vmsd.fields]
    assert names == ["irq", "bmdma", "tail"]
    bmdma = vmsd.fields[1]
    assert bmdma.is_array and bmdma.elements is not None and len(bmdma.elements) == 3


@pytest.mark.parametrize("qemu", SPELLINGS)
def test_the_describer_writes_each_spelling(qemu: str) -> None:
    obj = _ide(SPELLINGS[qemu])
    vmsd = schemas_from_vmdesc(obj).sections[("ide", 0)]
    state = {"irq": 7, "bmdma": [{"cmd": 1}, {"cmd": 2}, {"cmd": 3}], "tail": 9}
    desc = describe_section(vmsd, state, "ide", 0, 3, array_index=ARRAY_INDEX_BY_QEMU[qemu])
    assert json.dumps(desc) == json.dumps(obj["devices"][0])


def test_an_indexed_array_of_one_and_a_plain_field_stay_apart() -> None:
    one = _ide([0])  # an "index" alone still makes an array (of one)
    assert schemas_from_vmdesc(one).sections[("ide", 0)].fields[1].elements is not None
    plain = _ide([None])  # no index and no twin: a plain field
    assert schemas_from_vmdesc(plain).sections[("ide", 0)].fields[1].elements is None


def test_a_name_that_comes_back_later_is_still_refused() -> None:
    obj = _ide([None, None])
    obj["devices"][0]["fields"].append({"name": "bmdma", **BMDMA})  # after "tail": not the same array
    with pytest.raises(SchemaError, match="'bmdma' appears twice"):
        schemas_from_vmdesc(obj)


def test_unknown_index_style_is_refused() -> None:
    with pytest.raises(ValueError, match="array_index"):
        Describer("sometimes")


def test_qjson_spacing_is_qemu_5_2s() -> None:
    obj = {"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "fields": [
        {"name": "unused", "type": "unused_buffer", "size": 8}], "subsections": [], "more": {}}]}
    assert vmdesc_text(obj, qjson=True) == (
        b'{ "page_size" : 4096, "devices" : [ { "name" : "timer", "instance_id" : 0, "fields" : '
        b'[ { "name" : "unused", "type" : "unused_buffer", "size" : 8 } ], "subsections" : [  ], "more" : {  } } ] }')
    assert json.loads(vmdesc_text(obj, qjson=True)) == obj
    assert vmdesc_text(obj) == json.dumps(obj).encode()
