"""Streams written by real QEMU 10.0: byte-exact round trips and the claims of spec section 11.

Every 10.0 stream of the corpus (``names(qemu="10.0")``: pc-i440fx-10.0 and
pc-q35-10.0 paused and running, e1000 + slirp, virtio-net-pci, the 7.2
machine type run under 10.0, send-switchover-start=off, validate-uuid +
x-ignore-shared, return-path, postcopy-ram, xbzrle) must come back byte for
byte through legacy, JSON and ferry.  The other tests check, on those real
streams, what section 11 says changed (docs/qemu-10.md records the
results), and a few claims about QEMU 10.0's loader are checked by loading
streams vmferry edited into real QEMU 10.0 and 7.2.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from qemu_recipes import RECIPES, names

from vmferry import DecodeError
from vmferry.cli import main
from vmferry.cli.summary import StreamSummary
from vmferry.encode import legacy
from vmferry.events import (
    CMD_SWITCHOVER_START,
    COMMAND_NAMES,
    RAM_MULTIFD_FLUSH,
    RAM_XBZRLE,
    SECTION_END,
    SECTION_PART,
    SECTION_START,
    Command,
    Configuration,
    DeviceSection,
    Event,
    IterBegin,
    IterEnd,
    RamRecord,
    RamZeros,
    Vmdesc,
)
from vmferry.live.qemu.process import QemuError, QemuVM
from vmferry.serialize.describe import describe_section

pytestmark = [pytest.mark.qemu, pytest.mark.qemu10]

NAMES10 = names(qemu="10.0")
#: files whose RAM is not a stream (mapped-ram, spec 11.6): vmferry refuses them
FILE_LAYOUT = ["pc-10.0-mapped-ram"]
STREAMS10 = [n for n in NAMES10 if n not in FILE_LAYOUT]
SWITCHOVER_BYTES = bytes.fromhex("08000b0000")
#: streams whose machine type sends SWITCHOVER_START (10.0 types, unless turned off; never background-snapshot)
WITH_SWITCHOVER = [n for n in STREAMS10 if RECIPES[n].machine_type.endswith("-10.0")
                   and n not in ("pc-10.0-no-switchover", "pc-10.0-background-snapshot")]
WITH_SWITCHOVER.append("pc-7.2-on-10.0-switchover-on")  # -global migration.send-switchover-start=on


def _events(path: Path) -> list[Event]:
    return list(legacy.decode([path.read_bytes()]))


def _encode(events: list[Event]) -> bytes:
    return b"".join(bytes(c) for c in legacy.encode(events))


def _convert(src: Path, dst: Path, to: str) -> None:
    assert main(["convert", "-q", str(src), str(dst), "--to", to]) == 0


def _devices(path: Path) -> list[DeviceSection]:
    return [e for e in _events(path) if isinstance(e, DeviceSection)]


def test_the_corpus_has_the_asked_for_flavours() -> None:
    machines = {RECIPES[n].machine_type for n in NAMES10}
    assert {"pc-i440fx-10.0", "pc-q35-10.0", "pc-i440fx-7.2"} <= machines
    kinds = {RECIPES[n].kind for n in NAMES10}
    assert {"paused", "running", "postcopy", "xbzrle"} <= kinds
    assert all(RECIPES[n].memory == "64M" for n in NAMES10)
    assert not set(NAMES10) & set(names())  # the 7.2 corpus is unchanged


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", STREAMS10)
def test_round_trips_byte_exact(name: str, qemu_corpus: Any, tmp_path: Path) -> None:
    src = qemu_corpus[name]
    original = src.read_bytes()
    assert qemu_corpus.provenance(name)["qemu"].startswith("QEMU emulator version 10.0")
    _convert(src, tmp_path / "same.mig", "legacy")
    assert (tmp_path / "same.mig").read_bytes() == original
    for to in ("json", "ferry"):
        _convert(src, tmp_path / f"state.{to}", to)
        _convert(tmp_path / f"state.{to}", tmp_path / f"back-{to}.mig", "legacy")
        assert (tmp_path / f"back-{to}.mig").read_bytes() == original, to


# ------------------------------------------------------ SWITCHOVER_START (11.4)


@pytest.mark.parametrize("name", STREAMS10)
def test_switchover_start_where_section_11_4_says(name: str, qemu_corpus: Any) -> None:
    path = qemu_corpus[name]
    events = _events(path)
    commands = [e for e in events if isinstance(e, Command) and e.cmd == CMD_SWITCHOVER_START]
    data = path.read_bytes()
    if name not in WITH_SWITCHOVER:  # machine types <= 9.2, send-switchover-start=off, background-snapshot
        assert commands == []
        ends = [e for e in events if isinstance(e, IterBegin) and e.kind == SECTION_END]
        assert len(ends) == (0 if RECIPES[name].kind == "background-snapshot" else 1)
        return
    assert len(commands) == 1 and commands[0].payload == b"" and commands[0].name == "switchover-start"
    i = events.index(commands[0])
    # after the last ram PART (its IterEnd), before the ram END, which is the last iterative section
    assert isinstance(events[i - 1], IterEnd)
    part = max(j for j in range(i) if isinstance(events[j], IterBegin))
    assert events[part].kind == SECTION_PART  # type: ignore[union-attr]
    end = events[i + 1]
    assert isinstance(end, IterBegin) and end.kind == SECTION_END
    assert not any(isinstance(e, IterBegin) for e in events[i + 2:])
    # the 5 bytes sit right before the END section header: 03, be32 ram's section id
    at = data.index(SWITCHOVER_BYTES)
    assert data.count(SWITCHOVER_BYTES + b"\x03") == 1 and data[at + 5] == SECTION_END
    assert data[at - 5] == 0x7E  # the last PART's footer


def test_switchover_start_is_the_only_difference_in_layout(qemu_corpus: Any) -> None:
    """pc-i440fx-10.0 vs pc-i440fx-7.2 on 10.0: one byte of name + 5 bytes of command (11.1)."""
    new, old = qemu_corpus["pc-10.0-paused"], qemu_corpus["pc-7.2-on-10.0-paused"]
    assert new.stat().st_size - old.stat().st_size == 1 + len(SWITCHOVER_BYTES)
    assert qemu_corpus["pc-10.0-no-switchover"].stat().st_size == new.stat().st_size - len(SWITCHOVER_BYTES)
    rows = [[(d.idstr, d.instance_id, d.version_id, d.size) for d in _devices(p)] for p in (new, old)]
    assert rows[0] == rows[1]


def test_switchover_start_has_a_name_and_shows_in_inspect(qemu_corpus: Any, capsys: Any) -> None:
    assert COMMAND_NAMES[0x0B] == "switchover-start"
    assert main(["inspect", str(qemu_corpus["pc-10.0-paused"])]) == 0
    out = capsys.readouterr().out
    assert "commands: switchover-start" in out and "machine type: pc-i440fx-10.0" in out


# ------------------------------------------------ sections, order, ids (11.1, 11.3)

#: Spec 11.3, FULL sections in stream order with their section ids.
PC10_ORDER = [
    ("timer", 0), ("cpu_common", 3), ("cpu", 4), ("kvm-tpr-opt", 5), ("apic", 6), ("0000:00:00.0/I440FX", 7),
    ("PCIHost", 8), ("PCIBUS", 9), ("fw_cfg", 10), ("dma", 11), ("dma", 12), ("mc146818rtc", 13),
    ("0000:00:01.1/ide", 14), ("i2c_bus", 15), ("0000:00:01.3/piix4_pm", 16), ("0000:00:01.0/PIIX3", 17),
    ("i8259", 18), ("i8259", 19), ("ioapic", 20), ("hpet", 21), ("i8254", 22), ("pcspk", 23), ("fdc", 24),
    ("ps2kbd", 25), ("ps2mouse", 26), ("pckbd", 27), ("vmmouse", 28), ("port92", 29), ("acpi_build", 38),
    ("globalstate", 39),
]
Q35_10_ORDER = [
    ("timer", 0), ("cpu_common", 3), ("cpu", 4), ("kvm-tpr-opt", 5), ("apic", 6), ("fw_cfg", 7),
    ("0000:00:00.0/mch", 8), ("PCIHost", 9), ("PCIBUS", 10), ("dma", 11), ("dma", 12), ("mc146818rtc", 13),
    ("0000:00:1f.0/ICH9LPC", 14), ("i8259", 15), ("i8259", 16), ("ioapic", 17), ("hpet", 18), ("i8254", 19),
    ("pcspk", 20), ("ps2kbd", 21), ("ps2mouse", 22), ("pckbd", 23), ("vmmouse", 24), ("port92", 25),
    ("0000:00:1f.2/ich9_ahci", 26), ("i2c_bus", 27), ("0000:00:1f.3/ich9_smb", 28), ("acpi_build", 37),
    ("globalstate", 38),
]


@pytest.mark.parametrize(("name", "order"), [("pc-10.0-paused", PC10_ORDER), ("pc-7.2-on-10.0-paused", PC10_ORDER),
                                             ("q35-10.0-paused", Q35_10_ORDER)])
def test_full_sections_in_the_order_of_section_11_3(name: str, order: list[tuple[str, int]], qemu_corpus: Any) -> None:
    events = _events(qemu_corpus[name])
    assert [(d.idstr, d.section_id) for d in events if isinstance(d, DeviceSection)] == order
    starts = [e for e in events if isinstance(e, IterBegin) and e.kind == SECTION_START]
    assert [(s.idstr, s.section_id, s.version_id) for s in starts] == [("ram", 1, 4)]  # no block handler


def test_slirp_takes_section_id_1_and_ram_2(qemu_corpus: Any) -> None:
    events = _events(qemu_corpus["pc-10.0-e1000-slirp"])
    slirp = next(e for e in events if isinstance(e, DeviceSection) and e.idstr == "slirp")
    assert (slirp.section_id, slirp.size) == (1, 131)
    start = next(e for e in events if isinstance(e, IterBegin) and e.kind == SECTION_START)
    assert (start.idstr, start.section_id) == ("ram", 2)


@pytest.mark.parametrize(("old", "new"), [
    ("pc-7.2-paused", "pc-10.0-paused"), ("q35-7.2-paused", "q35-10.0-paused"),
    ("pc-7.2-e1000-slirp", "pc-10.0-e1000-slirp"), ("pc-7.2-virtio-net", "pc-10.0-virtio-net"),
    ("pc-7.2-paused", "pc-7.2-on-10.0-paused"),
])
def test_same_sections_versions_and_body_sizes_as_7_2(old: str, new: str, qemu_corpus: Any) -> None:
    """Spec 11.1: same sections, versions and byte-identical body sizes as QEMU 7.2 (only the order differs)."""
    def rows(p: Path) -> list[tuple[str, int, int, int]]:
        return sorted((d.idstr, d.instance_id, d.version_id, d.size) for d in _devices(p))

    assert qemu_corpus.provenance(old)["qemu"].startswith("QEMU emulator version 7.2")
    assert rows(qemu_corpus[old]) == rows(qemu_corpus[new])


# -------------------------------------------------- configuration, RAM (11.1, 11.5)


def test_configuration_bytes_as_in_7_2_but_the_name(qemu_corpus: Any) -> None:
    def config_bytes(name: str) -> bytes:
        data = qemu_corpus[name].read_bytes()
        start = data.index(b"\x00\x00\x00\x01\x0fx-ignore-shared")
        return data[8:start + 20 + 16 + 6]  # through the uuid subsection

    new, old = config_bytes("pc-10.0-uuid-ignore-shared"), config_bytes("pc-7.2-uuid-ignore-shared")
    assert new.replace(b"\x00\x00\x00\x0epc-i440fx-10.0", b"\x00\x00\x00\x0dpc-i440fx-7.2") == old
    config = next(e for e in _events(qemu_corpus["pc-10.0-uuid-ignore-shared"]) if isinstance(e, Configuration))
    assert config.capabilities == ["x-ignore-shared"]


@pytest.mark.parametrize("name", STREAMS10)
def test_ram_records_of_10_0(name: str, qemu_corpus: Any) -> None:
    """ZERO records keep fill 0; no COMPRESS_PAGE; MULTIFD_FLUSH only with multifd on 10.0 types (11.5)."""
    events = _events(qemu_corpus[name])
    zeros = [e for e in events if isinstance(e, RamZeros)]
    assert all(z.fill is None for z in zeros)
    records = [e for e in events if isinstance(e, RamRecord)]
    flags = {e.flags & 0x3FF & ~0x20 for e in records}
    rec = RECIPES[name]
    if rec.kind == "xbzrle":
        assert flags == {RAM_XBZRLE}
    elif rec.kind == "multifd" and rec.machine_type.endswith("-10.0"):
        # zero-page-detection=multifd: no ZERO/PAGE records on the main channel, a flush per round
        assert flags == {RAM_MULTIFD_FLUSH} and not zeros
        assert all(r.payload == b"" and r.flags == RAM_MULTIFD_FLUSH and not r.block for r in records)
        data = qemu_corpus[name].read_bytes()  # spec 11.5: START ends FLUSH, EOS; END starts with a FLUSH
        assert bytes.fromhex("0000000000000200" "0000000000000010" "7e00000001") in data
        assert bytes.fromhex("08000b0000" "0300000001" "0000000000000200") in data
    else:  # also multifd with a 7.2 machine type: flush at every EOS (hw_compat_8_0), ZERO records kept
        assert flags == set() and zeros
    if rec.kind == "multifd":
        assert sorted(qemu_corpus.provenance(name)["facts"]["channels"]) == ["11223344", "11223344", "main"]


def test_return_path_and_postcopy_commands(qemu_corpus: Any) -> None:
    def commands(name: str) -> list[tuple[str, str]]:
        return [(e.name, e.payload.hex()) for e in _events(qemu_corpus[name]) if isinstance(e, Command)]

    assert commands("pc-10.0-return-path") == [("open-return-path", ""), ("ping", "00000001"),
                                               ("switchover-start", "")]
    assert commands("pc-10.0-postcopy-ram") == [("open-return-path", ""), ("ping", "00000001"),
                                                ("postcopy-advise", "0000000000001000" * 2),
                                                ("switchover-start", "")]
    data = qemu_corpus["pc-10.0-return-path"].read_bytes()
    config_end = 13 + int.from_bytes(data[9:13], "big")
    assert data[config_end:config_end + 5] == bytes.fromhex("0800010000")  # OPEN_RETURN_PATH after the config


# ------------------------------------------------------------- vmdesc (11.8)


@pytest.mark.parametrize("name", STREAMS10)
def test_vmdesc_of_10_0(name: str, qemu_corpus: Any) -> None:
    events = _events(qemu_corpus[name])
    text = next(e for e in events if isinstance(e, Vmdesc)).text
    doc = json.loads(text)
    assert json.dumps(doc).encode() == text  # Python's json.dumps reproduces it
    assert list(doc) == ["configuration", "page_size", "devices"]
    assert b'"nullptr"' not in text  # only arrays of pointers (none in x86 pc/q35) use it
    config = doc["configuration"]
    machine = RECIPES[name].machine_type
    assert config["vmsd_name"] == "configuration" and config["fields"] == [
        {"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": len(machine)}]
    assert ("subsections" in config) == bool(RECIPES[name].caps.get("x-ignore-shared"))
    hpet = next(d for d in doc["devices"] if d["name"] == "hpet")
    assert "num_timers_save" in [f["name"] for f in hpet["fields"]]


def _strip_last_index(node: Any) -> Any:
    """7.2's vmdesc form -> 10.0's: drop ``index`` from the last element of each array run."""
    if isinstance(node, list):
        out = [_strip_last_index(n) for n in node]
        for i, n in enumerate(out):
            if isinstance(n, dict) and "index" in n:
                nxt = out[i + 1] if i + 1 < len(out) else None
                if not (isinstance(nxt, dict) and nxt.get("name") == n["name"] and "index" in node[i + 1]):
                    out[i] = {k: v for k, v in n.items() if k != "index"}
        return out
    if isinstance(node, dict):
        return {k: _strip_last_index(v) for k, v in node.items()}
    return node


@pytest.mark.parametrize("name", ["pc-10.0-running", "q35-10.0-running", "pc-10.0-e1000-slirp"])
def test_vmdesc_differs_from_7_2s_form_only_by_the_last_index(name: str, qemu_corpus: Any) -> None:
    changed = []
    for ev in _devices(qemu_corpus[name]):
        again = describe_section(ev.schema, ev.state, ev.idstr, ev.instance_id, ev.version_id)
        if again != ev.desc:
            assert _strip_last_index(again) == ev.desc, ev.idstr
            changed.append(ev.idstr)
    expected = {"pc-10.0-running": {"0000:00:01.1/ide", "0000:00:01.3/piix4_pm", "fdc"},
                "q35-10.0-running": {"0000:00:1f.2/ich9_ahci", "fdc"},
                "pc-10.0-e1000-slirp": {"0000:00:01.1/ide", "0000:00:01.3/piix4_pm", "fdc"}}[name]
    assert set(changed) == expected


def test_globalstate_has_vm_was_suspended(qemu_corpus: Any) -> None:
    for name in ("pc-10.0-paused", "q35-10.0-running", "pc-7.2-on-10.0-paused"):
        gs = next(d for d in _devices(qemu_corpus[name]) if d.idstr == "globalstate")
        assert gs.size == 104 and gs.state["has_vm_was_suspended"] == 1, name
        assert bytes(gs.state["runstate"]).rstrip(b"\0") in (b"prelaunch", b"running")


# --------------------------------------------------- which QEMU wrote it (inspect)


@pytest.mark.parametrize("name", STREAMS10)
def test_inspect_tells_the_writer(name: str, qemu_corpus: Any) -> None:
    summary = StreamSummary().feed(_events(qemu_corpus[name]))
    if name in WITH_SWITCHOVER or RECIPES[name].machine_type.endswith("-10.0"):
        assert summary.writer.range_text() == "QEMU >= 10.0"
    else:  # 7.2 machine type: the vmdesc shape still says "not 7.2"
        assert summary.writer.range_text() == "QEMU >= 8.0"
    assert summary.as_dict()["writer"]["min"] in ("10.0", "8.0")


def test_inspect_of_a_7_2_stream_says_it_cannot_tell_more(qemu_corpus: Any, capsys: Any) -> None:
    assert main(["inspect", str(qemu_corpus["pc-7.2-paused"])]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "written by: QEMU >= 7.2 (machine type pc-i440fx-7.2; nothing else in the stream tells" in out
    assert main(["inspect", str(qemu_corpus["pc-10.0-paused"])]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "written by: QEMU >= 10.0 (machine type pc-i440fx-10.0; SWITCHOVER_START (new in 10.0)" in out


# -------------------------------------------------------------- hostile input


@pytest.mark.parametrize("name", ["pc-10.0-running", "pc-10.0-postcopy-ram", "q35-10.0-virtio-net"])
def test_truncation_and_corruption_raise_only_decode_error(name: str, qemu_corpus: Any) -> None:
    data = qemu_corpus[name].read_bytes()
    rng = random.Random(name)
    at = data.index(SWITCHOVER_BYTES) if name in WITH_SWITCHOVER else len(data) // 2
    vmdesc_at = legacy.find_vmdesc(data)[0]  # type: ignore[index]
    cuts = set(range(0, 600)) | set(range(at - 40, at + 40)) | set(range(vmdesc_at - 40, vmdesc_at + 40))
    cuts |= {rng.randrange(len(data)) for _ in range(150)}
    for n in sorted(c for c in cuts if 0 <= c < len(data)):
        with pytest.raises(DecodeError) as err:
            for _ in legacy.decode([data[:n]]):
                pass
        assert err.value.offset is not None and 0 <= err.value.offset <= n and err.value.path.startswith("$")
    for i in range(40):
        stream = bytearray(data)
        for _ in range(rng.choice((1, 2, 8))):
            pos = rng.randrange(at - 64, at + 64) if i % 2 else rng.randrange(len(stream))
            stream[pos] = rng.randrange(256)
        try:
            out = _encode(list(legacy.decode([bytes(stream)])))
        except DecodeError as e:
            assert e.offset is not None and e.path.startswith("$")
            continue
        assert out == bytes(stream)  # what decodes re-encodes exactly


# --------------------------------------- claims about the loaders, on real QEMU


def _with_command_after_configuration(events: list[Event], command: Command) -> list[Event]:
    i = next(i for i, e in enumerate(events) if isinstance(e, Configuration))
    return events[:i + 1] + [command] + events[i + 1:]


def _load(stream: Path, machine: str, qemu_version: str | None, workdir: Path) -> str:
    with QemuVM(machine, incoming=True, workdir=workdir, serial=False, qemu_version=qemu_version) as dst:
        return dst.load(stream)


def test_qemu10_accepts_switchover_start_anywhere_and_refuses_a_payload(qemu_corpus: Any, tmp_path: Path) -> None:
    events = _events(qemu_corpus["pc-10.0-paused"])
    extra = tmp_path / "extra.mig"
    extra.write_bytes(_encode(_with_command_after_configuration(events, Command(CMD_SWITCHOVER_START))))
    assert _load(extra, "pc-i440fx-10.0", "10.0", tmp_path / "a") in ("paused", "prelaunch")
    bad = tmp_path / "bad.mig"
    bad.write_bytes(_encode(_with_command_after_configuration(events, Command(CMD_SWITCHOVER_START, b"\x01"))))
    with pytest.raises(QemuError) as err:
        _load(bad, "pc-i440fx-10.0", "10.0", tmp_path / "b")
    assert "SWITCHOVER_START received with bad length - expecting 0, got 1" in str(err.value)
    unknown = tmp_path / "cmd12.mig"
    unknown.write_bytes(_encode(_with_command_after_configuration(events, Command(12))))
    with pytest.raises(QemuError) as err:
        _load(unknown, "pc-i440fx-10.0", "10.0", tmp_path / "c")
    assert "MIG_CMD 0xc unknown (len 0x0)" in str(err.value)


def test_qemu72_refuses_switchover_start(qemu_corpus: Any, tmp_path: Path) -> None:
    events = _events(qemu_corpus["pc-7.2-paused"])
    i = next(i for i, e in enumerate(events) if isinstance(e, IterBegin) and e.kind == SECTION_END)
    stream = tmp_path / "with-switchover.mig"
    stream.write_bytes(_encode(events[:i] + [Command(CMD_SWITCHOVER_START)] + events[i:]))
    with pytest.raises(QemuError) as err:
        _load(stream, "pc-i440fx-7.2", None, tmp_path / "dst")
    assert "MIG_CMD 0xb unknown" in str(err.value)


def _with_fill(events: list[Event], fill: int) -> list[Event]:
    """The events with the fill byte of the first ZERO record of pc.ram set to ``fill``."""
    i = next(i for i, e in enumerate(events) if isinstance(e, RamZeros) and e.block == "pc.ram")
    z = events[i]
    assert isinstance(z, RamZeros)
    changed = RamZeros(z.block, z.offset, z.count, z.named, z.page_size, bytes([fill]) + bytes(z.count - 1))
    return events[:i] + [changed] + events[i + 1:]


def test_zero_page_fill_byte_10_0_refuses_7_2_accepts(qemu_corpus: Any, tmp_path: Path) -> None:
    new = tmp_path / "new-fill.mig"
    new.write_bytes(_encode(_with_fill(_events(qemu_corpus["pc-10.0-paused"]), 0x55)))
    with pytest.raises(QemuError) as err:
        _load(new, "pc-i440fx-10.0", "10.0", tmp_path / "a")
    assert "Found a zero page with value 85" in str(err.value)
    old = tmp_path / "old-fill.mig"
    old.write_bytes(_encode(_with_fill(_events(qemu_corpus["pc-7.2-paused"]), 0x55)))
    assert _load(old, "pc-i440fx-7.2", None, tmp_path / "b") in ("paused", "prelaunch")


# ----------------------------------------------------------- mapped-ram (11.6)


def test_mapped_ram_layout_and_a_clean_refusal(qemu_corpus: Any) -> None:
    """Walk the mapped-ram file by spec 11.6 (header, LE bitmap, 1 MiB aligned pages); vmferry refuses it cleanly."""
    path = qemu_corpus["pc-10.0-mapped-ram"]
    data = path.read_bytes()
    config = data.index(b"\x0amapped-ram")
    assert data[config - 4:config] == b"\x00\x00\x00\x01"  # caps_count 1: a validated capability
    pos = data.index(b"\x06pc.ram")
    rows = []
    while True:
        name_len = data[pos]
        name = data[pos + 1:pos + 1 + name_len].decode()
        length = int.from_bytes(data[pos + 1 + name_len:pos + 9 + name_len], "big")
        header = pos + 9 + name_len
        version = int.from_bytes(data[header:header + 4], "big")
        page_size, bitmap_offset, pages_offset = (int.from_bytes(data[header + 4 + 8 * i:header + 12 + 8 * i], "big")
                                                  for i in range(3))
        assert (version, page_size, bitmap_offset) == (1, 4096, header + 28), name
        pages = length // page_size
        bitmap_end = bitmap_offset + (pages + 63) // 64 * 8
        assert pages_offset == (bitmap_end + 0xFFFFF) // 0x100000 * 0x100000, name
        bitmap = data[bitmap_offset:bitmap_end]
        for k in range(pages):  # a set bit (little-endian words) <=> a stored, non-zero page
            stored = bool(bitmap[k // 8] >> (k % 8) & 1)
            page = data[pages_offset + k * page_size:pages_offset + (k + 1) * page_size]
            assert stored == any(page), (name, k)
        rows.append((name, header, bitmap_offset, pages_offset, pages_offset + length))
        pos = pages_offset + length
        if data[pos:pos + 8] == (0x10).to_bytes(8, "big"):  # EOS: the last block
            break
    assert rows[0] == ("pc.ram", 0x72, 0x8E, 0x100000, 0x4100000)
    assert [r[0] for r in rows] == ["pc.ram", "/rom@etc/acpi/tables", "pc.bios", "pc.rom",
                                    "/rom@etc/table-loader", "/rom@etc/acpi/rsdp"]
    with pytest.raises(DecodeError) as err:
        for _ in legacy.decode([data]):
            pass
    assert "mapped-ram" in str(err.value) and err.value.offset == 0x72 and err.value.path == "$.ram"
