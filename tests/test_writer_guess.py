"""Which QEMU wrote a stream, from its events alone (vmferry.cli.summary.WriterGuess); no QEMU needed."""

from __future__ import annotations

import json

from vmferry.cli.summary import StreamSummary
from vmferry.events import (
    CMD_SWITCHOVER_START,
    RAM_COMPRESS_PAGE,
    RAM_MULTIFD_FLUSH,
    SECTION_START,
    Command,
    Configuration,
    IterBegin,
    RamRecord,
    Vmdesc,
)


def _config(machine: str, caps: tuple[bytes, ...] = ()) -> Configuration:
    state: dict = {"len": len(machine), "name": machine.encode()}
    if caps:
        state["configuration/capabilities"] = {"caps_count": len(caps), "capabilities": list(caps)}
    return Configuration(state)


def test_nothing_tells() -> None:
    s = StreamSummary().feed([Command(2, b"\x00\x00\x00\x01")])
    assert not s.writer.known and s.writer.range_text() == "cannot tell"
    assert s.writer.text.startswith("cannot tell from the content")
    assert s.as_dict()["writer"] == {"min": None, "max": None, "text": s.writer.text, "evidence": []}


def test_machine_type_alone_is_a_lower_bound_and_says_so() -> None:
    s = StreamSummary().feed([_config("pc-q35-6.2")])
    assert s.writer.range_text() == "QEMU >= 6.2"
    assert "nothing else in the stream tells" in s.writer.text
    assert StreamSummary().feed([_config("isapc")]).writer.range_text() == "cannot tell"


def test_switchover_start_means_10_0() -> None:
    s = StreamSummary().feed([_config("pc-i440fx-7.2"), Command(CMD_SWITCHOVER_START)])
    assert s.writer.range_text() == "QEMU >= 10.0" and "SWITCHOVER_START" in s.writer.text


def test_block_section_and_compress_mean_at_most_9_0() -> None:
    s = StreamSummary().feed([_config("pc-i440fx-7.2"), IterBegin(SECTION_START, 1, "block", 0, 1)])
    assert s.writer.range_text() == "QEMU 7.2 .. 9.0"
    s = StreamSummary().feed([RamRecord(RAM_COMPRESS_PAGE | 0x20, 0)])
    assert s.writer.range_text() == "QEMU <= 9.0"


def test_newer_features_and_contradictions() -> None:
    s = StreamSummary().feed([_config("pc-i440fx-8.2", (b"mapped-ram",)), RamRecord(RAM_MULTIFD_FLUSH, 0)])
    assert s.writer.range_text() == "QEMU >= 9.0"
    s = StreamSummary().feed([_config("pc-i440fx-10.0"), IterBegin(SECTION_START, 1, "block", 0, 1)])
    assert not s.writer.consistent and s.writer.range_text() == "contradictory"


def test_vmdesc_shape() -> None:
    old = {"page_size": 4096, "devices": [{"name": "fdc", "fields": [
        {"name": "drives", "index": 0, "type": "struct"}, {"name": "drives", "index": 1, "type": "struct"}]}]}
    assert not StreamSummary().feed([Vmdesc(json.dumps(old).encode())]).writer.known
    new = {"configuration": {}, **old}
    del new["devices"][0]["fields"][1]["index"]
    s = StreamSummary().feed([Vmdesc(json.dumps(new).encode())])
    assert s.writer.range_text() == "QEMU >= 8.0" and len(s.writer.evidence) == 2
    assert not StreamSummary().feed([Vmdesc(b"{not json")]).writer.known
