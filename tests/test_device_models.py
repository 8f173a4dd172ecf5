"""Python device models (vmferry.serialize.devices) on their own and against real QEMU 7.2 streams.

Unmarked tests need no QEMU: every model round-trips through the legacy and
tree visitors, with subsections sent and not sent, at every version it
accepts, and errors name the field.  Tests marked ``qemu`` save real QEMU
7.2 streams (a machine fresh from reset, and a busy one whose guest ran and
whose devices were poked over HMP until subsections got sent) and check,
section by section, that each model reproduces QEMU's bytes, vmdesc entry
and decoded tree exactly, and that QEMU loads what a model wrote.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from vmferry.encode.legacy import decode
from vmferry.errors import DecodeError, EncodeError, SchemaError, TruncatedError
from vmferry.events import DeviceSection
from vmferry.serialize.describe import describe_visit
from vmferry.serialize.devices import (
    MODELS,
    TIMER_DISARMED,
    DeviceModel,
    Fifo8,
    ISAKBDState,
    ISASerialState,
    KBDState,
    PITChannelState,
    PITCommonState,
    PS2KbdState,
    PS2Queue,
    PS2State,
    RTCState,
    SerialState,
    load,
    model_for,
    save,
)
from vmferry.serialize.drive import visit_vmsd
from vmferry.serialize.qemu_vmdesc import vmsd_from_desc
from vmferry.serialize.visitor import LegacyReader, LegacyWriter, TreeBuilder, TreeReader

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def legacy_bytes(model: DeviceModel, version: int | None = None) -> bytes:
    w = LegacyWriter()
    save(model, w, version)
    return bytes(w.out)


def legacy_load(cls: type[DeviceModel], data: bytes, version: int | None = None) -> Any:
    r = LegacyReader(data)
    out = load(cls, r, version)
    assert r.pos == len(data), f"{len(data) - r.pos} bytes left over"
    return out


def tree_of(model: DeviceModel, version: int | None = None) -> dict[str, Any]:
    b = TreeBuilder()
    save(model, b, version)
    return b.tree


def describe(model: DeviceModel, idstr: str | None = None, instance_id: int = 0) -> dict[str, Any]:
    cls = type(model)
    return describe_visit(cls.visit, model, idstr or cls.VMSD_NAME, instance_id, cls.VMSD_NAME, cls.VERSION)


def subsection_names(tree: Any) -> set[str]:
    """Every subsection sent, at any depth (subsection keys always contain '/' or are pckbd_outport)."""
    out: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if "/" in k or k == "pckbd_outport":
                out.add(k)
            out |= subsection_names(v)
    elif isinstance(tree, list):
        for v in tree:
            out |= subsection_names(v)
    return out


def described_subsections(desc: Any) -> set[str]:
    """Every subsection a vmdesc entry lists, at any depth."""
    out: set[str] = set()
    if isinstance(desc, dict):
        out |= {s["vmsd_name"] for s in desc.get("subsections", [])}
        for v in desc.values():
            out |= described_subsections(v)
    elif isinstance(desc, list):
        for v in desc:
            out |= described_subsections(v)
    return out


def busy_serial() -> SerialState:
    """A UART with every subsection needed."""
    return SerialState(
        divider=1, rbr=0x41, ier=0x0F, iir=0xC4, lcr=0x03, mcr=0x0B, lsr=0x01, msr=0x30, scr=0x5A, fcr_vmstate=0xC7,
        thr_ipending=1, tsr_retry=2, thr=0x42, tsr=0x43,
        recv_fifo=Fifo8(data=b"hello world!\0\0\0\xff", head=3, num=5),
        xmit_fifo=Fifo8(data=bytes(range(16)), head=15, num=16),
        fifo_timeout_timer=123_456_789, timeout_ipending=1, poll_msl=1, modem_status_poll=987_654_321,
    )


# name -> (model factory, subsections the model must send)
SAMPLES: dict[str, tuple[Callable[[], DeviceModel], set[str]]] = {
    "rtc-reset": (RTCState, set()),
    "rtc-busy": (lambda: RTCState(
        cmos_data=bytes(range(128)), cmos_index=0x0C, periodic_timer=1_000_000, next_periodic_time=-5,
        irq_coalesced=845, period=32, base_rtc=1_795_632_775, last_update=2**63 + 1, offset=-(2**63),
        update_timer=TIMER_DISARMED, next_alarm_time=2**64 - 2, irq_reinject_on_ack_count=17,
    ), {"mc146818rtc/irq_reinject_on_ack_count"}),
    "i8254-reset": (PITCommonState, set()),
    "i8254-busy": (lambda: PITCommonState(channels=[
        PITChannelState(count=0x1234, latched_count=0xFFFF, count_latched=1, status_latched=2, status=0x36,
                        read_state=3, write_state=3, write_latch=0x12, rw_mode=3, mode=2, bcd=1, gate=1,
                        count_load_time=-1, next_transition_time=2_054_473_796, irq_disabled=1),
        PITChannelState(count=18, mode=2, gate=1, count_load_time=7),
        PITChannelState(count=0x10000, mode=3, gate=0, next_transition_time=2**63 - 1),
    ]), set()),
    "pckbd-reset": (ISAKBDState, {"pckbd/extended_state"}),
    "pckbd-outport": (lambda: ISAKBDState(KBDState(
        write_cmd=0xD1, status=0x1D, mode=0x61, pending_tmp=0x10, outport=0xCD,
        migration_flags=1, obsrc=4, obdata=0xFA, cbdata=0x55,
    )), {"pckbd_outport", "pckbd/extended_state"}),
    "pckbd-compat": (lambda: ISAKBDState(KBDState(
        status=0x19, mode=0x03, pending_tmp=0x01, outport=0xDF, extended_state=False, obsrc=1,
    )), set()),
    "ps2kbd-reset": (PS2KbdState, set()),
    "ps2kbd-busy": (lambda: PS2KbdState(
        parent_obj=PS2State(write_cmd=0xED, queue=PS2Queue(
            data=bytes((i * 7) & 0xFF for i in range(256)), rptr=255, wptr=1, cwptr=0, count=2)),
        scan_enabled=0, translate=1, scancode_set=3, ledstate=7, need_high_bit=True,
    ), {"ps2kbd/ledstate", "ps2kbd/need_high_bit", "ps2kbd/command_reply_queue"}),
    "serial-reset": (ISASerialState, set()),
    "serial-busy": (lambda: ISASerialState(busy_serial()), {
        "serial/thr_ipending", "serial/tsr", "serial/recv_fifo", "serial/xmit_fifo",
        "serial/fifo_timeout_timer", "serial/timeout_ipending", "serial/poll"}),
    "serial-some": (lambda: ISASerialState(SerialState(
        ier=0x02, iir=0xC2, thr_ipending=1, xmit_fifo=Fifo8(num=1, data=b"x" * 16), poll_msl=0,
    )), {"serial/xmit_fifo", "serial/poll"}),
}

# ---------------------------------------------------------------------------
# no QEMU
# ---------------------------------------------------------------------------


def test_registry() -> None:
    assert dict(MODELS) == {"mc146818rtc": RTCState, "i8254": PITCommonState, "pckbd": ISAKBDState,
                            "ps2kbd": PS2KbdState, "serial": ISASerialState}
    for name, cls in MODELS.items():
        assert model_for(name) is cls
        assert cls.VMSD_NAME == name
        assert 0 <= cls.MINIMUM_VERSION <= cls.VERSION
        assert callable(cls.visit)
    with pytest.raises(SchemaError, match="no Python device model for vmsd 'cpu'"):
        model_for("cpu")


@pytest.mark.parametrize("name", SAMPLES)
def test_legacy_round_trip(name: str) -> None:
    factory, _ = SAMPLES[name]
    model = factory()
    data = legacy_bytes(model)
    back = legacy_load(type(model), data)
    assert back == model
    assert legacy_bytes(back) == data


@pytest.mark.parametrize("name", SAMPLES)
def test_tree_round_trip(name: str) -> None:
    factory, sent = SAMPLES[name]
    model = factory()
    tree = tree_of(model)
    assert subsection_names(tree) == sent
    back = load(type(model), TreeReader(tree))
    assert back == model
    assert tree_of(back) == tree
    # the tree goes through JSON-like copies unharmed (no shared objects, no model types in it)
    assert load(type(model), TreeReader(json_copy(tree))) == model


def json_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: json_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [json_copy(v) for v in tree]
    assert isinstance(tree, (int, bytes)), type(tree)
    return tree


@pytest.mark.parametrize("name", SAMPLES)
def test_description_is_a_schema_for_the_bytes(name: str) -> None:
    """The model's own vmdesc entry, read back as a schema, decodes its bytes into its tree."""
    factory, sent = SAMPLES[name]
    model = factory()
    data = legacy_bytes(model)
    desc = describe(model)
    assert described_subsections(desc) == sent
    vmsd = vmsd_from_desc(json.loads(json.dumps(desc)), "$", 0)
    reader = LegacyReader(data)
    tree = visit_vmsd(reader, vmsd, None)
    assert reader.pos == len(data)
    assert tree == tree_of(model)
    w = LegacyWriter()
    visit_vmsd(w, vmsd, tree)
    assert bytes(w.out) == data


def test_sizes() -> None:
    """Body sizes QEMU 7.2 writes for these devices at reset (spec, appendix B) and a few more."""
    assert len(legacy_bytes(RTCState())) == 245
    assert len(legacy_bytes(PITCommonState())) == 108
    assert len(legacy_bytes(PS2KbdState())) == 284
    assert len(legacy_bytes(ISAKBDState())) == 40
    assert len(legacy_bytes(ISASerialState())) == 11
    # each subsection costs 0x05, a counted name and a be32 version before its fields
    assert len(legacy_bytes(SAMPLES["rtc-busy"][0]())) == 245 + 1 + 1 + 37 + 4 + 2
    assert len(legacy_bytes(SAMPLES["pckbd-outport"][0]())) == 40 + 1 + 1 + 13 + 4 + 1
    assert len(legacy_bytes(SAMPLES["pckbd-compat"][0]())) == 4


def test_reset_state() -> None:
    rtc = RTCState()
    assert (rtc.cmos_data[10], rtc.cmos_data[11], rtc.cmos_data[12], rtc.cmos_data[13]) == (0x26, 0x02, 0, 0x80)
    assert rtc.periodic_timer == rtc.update_timer == TIMER_DISARMED == 2**64 - 1
    pit = PITCommonState()
    assert [(c.count, c.mode, c.gate) for c in pit.channels] == [(65536, 3, 1), (65536, 3, 1), (65536, 3, 0)]
    kbd = ISAKBDState().kbd
    assert (kbd.status, kbd.mode, kbd.outport, kbd.extended_state) == (0x18, 0x03, 0xCF, True)
    ps2 = PS2KbdState()
    assert (ps2.parent_obj.write_cmd, ps2.parent_obj.queue.cwptr, ps2.scancode_set) == (-1, -1, 2)
    uart = ISASerialState().state
    assert (uart.divider, uart.iir, uart.lsr, uart.msr, uart.mcr, uart.poll_msl) == (12, 1, 0x60, 0xB0, 8, -1)
    assert ISASerialState().state.recv_fifo is not ISASerialState().state.recv_fifo


# --- versions --------------------------------------------------------------


@pytest.mark.parametrize("cls, version, size", [
    (RTCState, 1, 245 - 8 - 40),
    (RTCState, 2, 245 - 40),
    (RTCState, 3, 245),
    (PITCommonState, 2, 104),
    (PITCommonState, 3, 108),
    (PS2KbdState, 2, 280),
    (PS2KbdState, 3, 284),
    (ISAKBDState, 3, 40),
    (ISASerialState, 2, 11),  # the nested "serial" struct keeps its own version 3
    (ISASerialState, 3, 11),
])
def test_versions(cls: type[DeviceModel], version: int, size: int) -> None:
    data = legacy_bytes(cls(), version)
    assert len(data) == size
    back = legacy_load(cls, data, version)
    assert legacy_bytes(back, version) == data
    tree = tree_of(back, version)
    assert tree_of(load(cls, TreeReader(tree), version), version) == tree


def test_old_versions_keep_reset_values() -> None:
    busy = SAMPLES["rtc-busy"][0]()
    assert isinstance(busy, RTCState)
    back = legacy_load(RTCState, legacy_bytes(busy, 1), 1)
    assert (back.cmos_data, back.next_periodic_time) == (busy.cmos_data, busy.next_periodic_time)
    assert (back.irq_coalesced, back.base_rtc, back.update_timer) == (0, 0, TIMER_DISARMED)
    pit = SAMPLES["i8254-busy"][0]()
    assert isinstance(pit, PITCommonState)
    back_pit = legacy_load(PITCommonState, legacy_bytes(pit, 2), 2)
    assert back_pit.channels[0].irq_disabled == 0 and back_pit.channels[1] == pit.channels[1]
    ps2 = PS2KbdState(scancode_set=1)
    data = legacy_bytes(ps2, 2)
    template = PS2KbdState(scancode_set=3)
    assert PS2KbdState.visit(_at(LegacyReader(data), 2), template).scancode_set == 2  # ps2_kbd_post_load


def _at(v: Any, version: int) -> Any:
    v.version = version
    return v


@pytest.mark.parametrize("cls, version", [(RTCState, 0), (RTCState, 4), (PITCommonState, 1), (ISAKBDState, 2),
                                          (PS2KbdState, 1), (ISASerialState, 1)])
def test_versions_out_of_range(cls: type[DeviceModel], version: int) -> None:
    with pytest.raises(DecodeError, match="outside the supported range"):
        load(cls, LegacyReader(bytes(400)), version)
    with pytest.raises(EncodeError, match="outside the supported range"):
        save(cls(), LegacyWriter(), version)


def test_i8254_channel0_next_transition_time_travels_twice() -> None:
    pit = PITCommonState()
    pit.channels[0].next_transition_time = 0x1122334455667788
    data = bytearray(legacy_bytes(pit))
    assert data[4 + 24:4 + 32] == data[-8:] == bytes.fromhex("1122334455667788")
    data[4 + 24:4 + 32] = bytes(8)  # copies that disagree: like QEMU, the second one wins
    back = legacy_load(PITCommonState, bytes(data))
    assert back.channels[0].next_transition_time == 0x1122334455667788
    assert legacy_bytes(back) == legacy_bytes(pit)


# --- what an absent subsection means ---------------------------------------


def test_pckbd_outport_absent_means_default() -> None:
    # status OBF | MOUSE_OBF: the default output port has both OBF bits
    s = ISAKBDState(KBDState(status=0x39, outport=0xCF | 0x10 | 0x20))
    data = legacy_bytes(s)
    assert b"pckbd_outport" not in data
    back = load(ISAKBDState, LegacyReader(data), None)
    assert back.kbd.outport == 0xFF
    # a loading template with another outport still ends up with the default
    template = ISAKBDState(KBDState(outport=0x00))
    assert ISAKBDState.visit(LegacyReader(data), template).kbd.outport == 0xFF


def test_pckbd_without_extended_state_derives_obsrc() -> None:
    s = ISAKBDState(KBDState(status=0x21 | 0x18, extended_state=False, obsrc=0))
    data = legacy_bytes(s)
    assert s.kbd.obsrc == 0  # saving leaves the model alone
    back = legacy_load(ISAKBDState, data)
    assert back.kbd.extended_state is False
    assert back.kbd.obsrc == 2  # KBD_OBSRC_MOUSE, as kbd_post_load derives it
    assert legacy_bytes(back) == data


def test_serial_absent_subsections_on_load() -> None:
    # THRI enabled and the IIR shows THRI: thr_ipending is implied, not sent
    s = ISASerialState(SerialState(ier=0x02, iir=0xC2, thr_ipending=1))
    data = legacy_bytes(s)
    assert b"serial/thr_ipending" not in data
    template = ISASerialState(SerialState(thr_ipending=0, poll_msl=3))
    back = ISASerialState.visit(LegacyReader(data), template)
    assert back.state.thr_ipending == 1
    assert back.state.poll_msl == -1  # serial_pre_load: not polled unless sent
    # saving never rewrites what was not sent
    odd = ISASerialState(SerialState(ier=0, thr_ipending=5, poll_msl=-7))
    legacy_bytes(odd)
    assert (odd.state.thr_ipending, odd.state.poll_msl) == (5, -7)


def test_ps2kbd_need_high_bit_odd_byte_kept() -> None:
    data = bytearray(legacy_bytes(SAMPLES["ps2kbd-busy"][0]()))
    i = data.index(b"ps2kbd/need_high_bit") + len("ps2kbd/need_high_bit") + 4
    assert data[i] == 1
    data[i] = 2  # QEMU reads any non-zero byte as true; the model keeps it as it came
    back = legacy_load(PS2KbdState, bytes(data))
    assert back.need_high_bit == 2
    assert legacy_bytes(back) == bytes(data)


# --- errors ----------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_every_truncation_is_a_decode_error(name: str) -> None:
    model = SAMPLES[name][0]()
    data = legacy_bytes(model)
    for n in range(len(data)):
        try:
            r = LegacyReader(data[:n])
            load(type(model), r)
        except DecodeError as e:
            assert e.path.startswith("$") and e.offset is not None and e.offset <= n
            continue
        # a cut before or inside a subsection header reads as "no subsection": the
        # reader stops at the 0x05 marker and leaves the rest for its caller to notice
        assert r.pos <= n and data[r.pos] == 0x05, f"cut at {n} of {len(data)} loaded without error"


@pytest.mark.parametrize("name, cut, path", [
    ("rtc-busy", 244, "$.next_alarm_time"),
    ("rtc-busy", 10, "$.cmos_data"),
    ("rtc-busy", 289, "$.mc146818rtc/irq_reinject_on_ack_count.irq_reinject_on_ack_count"),
    ("i8254-busy", 3, "$.channels[0].irq_disabled"),
    ("i8254-busy", 101, "$.channels[0].next_transition_time"),
    ("pckbd-outport", 2, "$.kbd.mode"),
    ("pckbd-outport", 56, "$.kbd.pckbd/extended_state.obsrc"),
    ("ps2kbd-busy", 10, "$.parent_obj.queue.wptr"),
    ("ps2kbd-busy", 100, "$.parent_obj.queue.data"),
    ("ps2kbd-busy", 307, "$.ps2kbd/ledstate.ledstate"),
    ("serial-busy", 5, "$.state.lcr"),
    ("serial-busy", 90, "$.state.serial/recv_fifo.recv_fifo.data"),
])
def test_truncation_names_the_field(name: str, cut: int, path: str) -> None:
    data = legacy_bytes(SAMPLES[name][0]())
    with pytest.raises(TruncatedError) as info:
        load(type(SAMPLES[name][0]()), LegacyReader(data[:cut]))
    assert info.value.path == path
    assert info.value.path.endswith(path.rsplit(".", 1)[-1])


def test_truncation_inside_an_array_names_the_element_field() -> None:
    data = legacy_bytes(PITCommonState())
    with pytest.raises(TruncatedError) as info:
        load(PITCommonState, LegacyReader(data[:4 + 32 * 2 + 28]))
    assert info.value.path == "$.channels[2].next_transition_time"
    assert info.value.offset == 4 + 32 * 2 + 24


def test_tree_errors_name_the_field() -> None:
    tree = tree_of(SAMPLES["serial-busy"][0]())
    del tree["state"]["serial/recv_fifo"]["recv_fifo"]["head"]
    with pytest.raises(DecodeError, match="missing field 'head'") as info:
        load(ISASerialState, TreeReader(tree))
    assert info.value.path == "$.state.serial/recv_fifo.recv_fifo.head"
    tree = tree_of(PITCommonState())
    tree["channels"][1]["mode"] = 256
    with pytest.raises(DecodeError, match="out of range for uint8") as info:
        load(PITCommonState, TreeReader(tree))
    assert info.value.path == "$.channels[1].mode"
    tree = tree_of(PS2KbdState())
    tree["parent_obj"]["queue.data"] = b"short"
    with pytest.raises(DecodeError, match="expected 256 bytes, got 5"):
        load(PS2KbdState, TreeReader(tree))


def test_encode_errors_name_the_field() -> None:
    with pytest.raises(EncodeError) as info:
        legacy_bytes(RTCState(cmos_index=256))
    assert info.value.path == "$.cmos_index"
    with pytest.raises(EncodeError, match="expected 16 bytes, got 3") as info:
        legacy_bytes(ISASerialState(SerialState(recv_fifo=Fifo8(data=b"abc", num=1))))
    assert info.value.path == "$.state.serial/recv_fifo.recv_fifo.data"
    with pytest.raises(EncodeError, match="expected 3 elements, got 2"):
        legacy_bytes(PITCommonState(channels=[PITChannelState(), PITChannelState()]))


def test_unknown_subsection_is_refused() -> None:
    data = legacy_bytes(PS2KbdState()) + b"\x05\x0bps2kbd/oops\x00\x00\x00\x01"
    with pytest.raises(DecodeError, match="unknown or out-of-order subsection 'ps2kbd/oops'") as info:
        load(PS2KbdState, LegacyReader(data))
    assert info.value.offset == 284


def test_subsection_newer_than_the_model_is_refused() -> None:
    data = bytearray(legacy_bytes(SAMPLES["rtc-busy"][0]()))
    i = data.index(b"mc146818rtc/irq_reinject_on_ack_count") + 37
    data[i:i + 4] = struct.pack(">I", 2)
    with pytest.raises(DecodeError, match="subsection version 2 is newer than 1"):
        load(RTCState, LegacyReader(bytes(data)))


# ---------------------------------------------------------------------------
# real QEMU 7.2
# ---------------------------------------------------------------------------

try:
    from vmferry.live.qemu.process import QemuVM
except ImportError:  # pragma: no cover - the orchestration module is optional here
    QemuVM = None  # type: ignore[assignment,misc]

# A busy machine: COM1 is the counting guest's console (a file); COM2 is a socket
# the test types into while the guest runs; COM3 is a host pty, whose modem lines
# QEMU polls; COM4 is a pipe pair: the test types into it while the guest is
# stopped, and clogs its output so that what COM4 transmits waits in the UART.
# The RTC slews lost ticks, so that masked periodic interrupts pile up and get
# re-injected on ack.
BUSY_ARGS = ["-global", "mc146818rtc.lost_tick_policy=slew"]

# HMP commands; port numbers from the PC's ISA map.
RUNNING_POKES = [
    "o /b 0x70 0x0b", "o /b 0x71 0x42",  # RTC: register B = 24h | periodic interrupt enable
    "o /b 0x2fa 0x07", "o /b 0x2f9 0x03",  # COM2: FIFOs on and reset; RX and THR interrupts on
    "o /b 0x2ea 0x07", "o /b 0x2e9 0x03",  # COM4: idem
    "sendkey a", "sendkey shift-b",
]
STOPPED_POKES = [
    "o /b 0x60 0xed", "o /b 0x60 0x07",  # PS/2 keyboard: set LEDs, all on; two ACKs stay queued
    "o /b 0x64 0xd1", "o /b 0x60 0xcd",  # i8042: write the output port, A20 off
    "o /b 0x70 0x0c", "i /b 0x71", "o /b 0x70 0x0c", "i /b 0x71",  # RTC: ack twice (re-injects)
    "o /b 0x2e8 0x41", "o /b 0x2e8 0x42",  # COM4: the first byte waits in TSR, the second in the FIFO
]


@pytest.fixture(scope="module")
def qemu_streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if QemuVM is None:
        pytest.skip("vmferry.live.qemu.process is not available")
    binary = os.environ.get("VMFERRY_QEMU") or "qemu-system-x86_64"
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not found")
    out = tmp_path_factory.mktemp("device-models")
    streams = {"fresh": _fresh_stream(out / "fresh.mig"), "busy": _busy_stream(out / "busy.mig")}
    return streams


def _fresh_stream(path: Path) -> bytes:
    """A machine straight from reset (-S), with a UART on a null chardev."""
    with QemuVM(serial=False, args=["-chardev", "null,id=com1", "-device", "isa-serial,chardev=com1"]) as vm:
        vm.save(path)
    return path.read_bytes()


def _clogged_pipe(path: Path) -> int:
    """Open the FIFO ``path`` (QEMU's COM4 output) and fill it, so that QEMU's writes get EAGAIN."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096)
    try:
        while True:
            os.write(fd, bytes(4096))
    except BlockingIOError:
        pass
    return fd


def _wait_for_bits(vm: Any, port: int, bits: int, timeout: float = 10.0) -> None:
    """Poll an I/O port over HMP until all of ``bits`` are set (for side-effect-free registers only)."""
    deadline = time.monotonic() + timeout
    while True:
        value = int(vm.hmp(f"i /b {port:#x}").rsplit("=", 1)[1], 16)
        if value & bits == bits:
            return
        assert time.monotonic() < deadline, f"port {port:#x} = {value:#04x}, waited for {bits:#04x}"
        time.sleep(0.02)


def _busy_stream(path: Path) -> bytes:
    sockdir = Path(tempfile.mkdtemp(prefix="vmf-"))  # short: unix socket paths are limited
    com2, com4 = sockdir / "com2", sockdir / "com4"
    os.mkfifo(com4.with_suffix(".in"))
    fds = [_clogged_pipe(com4.with_suffix(".out")), os.open(com4.with_suffix(".in"), os.O_RDWR)]
    master, slave = os.openpty()
    fds += [master, slave]
    args = BUSY_ARGS + [
        "-chardev", f"socket,id=com2,path={com2},server=on,wait=off", "-device", "isa-serial,chardev=com2,index=1",
        "-chardev", f"serial,id=com3,path={os.ttyname(slave)}", "-device", "isa-serial,chardev=com3,index=2",
        "-chardev", f"pipe,id=com4,path={com4}", "-device", "isa-serial,chardev=com4,index=3",
    ]
    peer = socket.socket(socket.AF_UNIX)
    try:
        with QemuVM(boot_sector=True, args=args) as vm:
            peer.connect(str(com2))
            vm.cont()
            vm.wait_for_count(3)
            mask = int(vm.hmp("i /b 0xa1").rsplit("=", 1)[1], 16)
            vm.hmp(f"o /b 0xa1 {mask | 0x01:#x}")  # mask IRQ 8 at the slave PIC: RTC ticks get lost
            for cmd in RUNNING_POKES:
                vm.hmp(cmd)
            peer.sendall(b"hello")  # received while running: the FIFO timeout fires
            _wait_for_bits(vm, 0x2FD, 0x01)  # COM2 LSR: data ready
            time.sleep(0.3)  # the timeout is 4 character times; the RTC loses ticks meanwhile
            vm.stop()
            os.write(fds[1], b"world")  # received while stopped: the FIFO timeout stays armed
            _wait_for_bits(vm, 0x2ED, 0x01)  # COM4 LSR: data ready
            for cmd in STOPPED_POKES:
                vm.hmp(cmd)
            vm.save(path)
    finally:
        peer.close()
        for fd in fds:
            os.close(fd)
        shutil.rmtree(sockdir, ignore_errors=True)
    return path.read_bytes()


def device_sections(stream: bytes) -> list[tuple[DeviceSection, bytes, int]]:
    """Every section with a model, its body as QEMU wrote it (cut from the raw stream) and where that starts."""
    out = []
    for ev in decode([stream]):
        if isinstance(ev, DeviceSection) and ev.schema.name in MODELS:
            name = ev.idstr.encode()
            head = (b"\x04" + struct.pack(">I", ev.section_id) + bytes([len(name)]) + name
                    + struct.pack(">II", ev.instance_id, ev.version_id))
            start = stream.rindex(head) + len(head)
            body = stream[start:start + ev.size]
            assert stream[start + ev.size:start + ev.size + 5] == b"\x7e" + struct.pack(">I", ev.section_id)
            out.append((ev, body, start))
    return out


@pytest.mark.qemu
@pytest.mark.parametrize("stream", ["fresh", "busy"])
@pytest.mark.parametrize("vmsd_name", sorted(MODELS))
def test_qemu_sections(qemu_streams: dict[str, bytes], stream: str, vmsd_name: str) -> None:
    found = [(ev, body) for ev, body, _ in device_sections(qemu_streams[stream]) if ev.schema.name == vmsd_name]
    assert found, f"no {vmsd_name} section in the {stream} stream"
    cls = model_for(vmsd_name)
    for ev, body in found:
        where = f"{stream}: {ev.idstr} instance {ev.instance_id}"
        # (1) QEMU's bytes -> model -> the same bytes
        model = legacy_load(cls, body, ev.version_id)
        assert legacy_bytes(model, ev.version_id) == body, where
        # (2) the model describes itself as QEMU did, key order included
        desc = describe_visit(cls.visit, model, ev.idstr, ev.instance_id, cls.VMSD_NAME, ev.version_id)
        assert json.dumps(desc) == json.dumps(ev.desc), where
        # (3) the model's tree is the vmdesc-driven decoder's, and loads back into the same model
        assert tree_of(model, ev.version_id) == ev.state, where
        assert load(cls, TreeReader(ev.state), ev.version_id) == model, where


@pytest.mark.qemu
def test_qemu_busy_stream_sends_subsections(qemu_streams: dict[str, bytes]) -> None:
    sent = set()
    for ev, _, _ in device_sections(qemu_streams["busy"]):
        sent |= subsection_names(ev.state)
    # all but ps2kbd/need_high_bit, which QEMU sets and clears within one key event
    must = {"mc146818rtc/irq_reinject_on_ack_count", "pckbd_outport", "pckbd/extended_state", "ps2kbd/ledstate",
            "ps2kbd/command_reply_queue", "serial/thr_ipending", "serial/tsr", "serial/recv_fifo",
            "serial/xmit_fifo", "serial/fifo_timeout_timer", "serial/timeout_ipending", "serial/poll"}
    assert must <= sent, f"missing {sorted(must - sent)}; sent {sorted(sent)}"


@pytest.mark.qemu
def test_qemu_reset_state_is_the_constructors(qemu_streams: dict[str, bytes]) -> None:
    """A machine that never ran holds the models' reset state, except for clock readings."""
    models = {ev.schema.name: legacy_load(model_for(ev.schema.name), body, ev.version_id)
              for ev, body, _ in device_sections(qemu_streams["fresh"])}
    assert models["pckbd"] == ISAKBDState()
    assert models["ps2kbd"] == PS2KbdState()
    assert models["serial"] == ISASerialState()
    pit = models["i8254"]
    expected = PITCommonState()
    expected.channels[0].next_transition_time = pit.channels[0].next_transition_time
    assert pit == expected
    rtc = models["mc146818rtc"]
    assert rtc.cmos_data[10:14] == RTCState().cmos_data[10:14]  # registers A-D; the rest is clock and firmware data
    clock = ("cmos_data", "base_rtc", "last_update", "update_timer", "next_alarm_time")
    assert dataclasses.replace(rtc, **{k: getattr(RTCState(), k) for k in clock}) == RTCState()


@pytest.mark.qemu
def test_qemu_loads_what_a_model_wrote(qemu_streams: dict[str, bytes], tmp_path: Path) -> None:
    """Edit the fresh stream through the models; QEMU loads it and shows the new values."""
    stream = qemu_streams["fresh"]
    edits: list[tuple[int, int, bytes]] = []
    for ev, body, start in device_sections(stream):
        cls = model_for(ev.schema.name)
        model = legacy_load(cls, body, ev.version_id)
        if isinstance(model, ISASerialState):
            model.state.scr = 0x5A  # the UART's scratch register
            model.state.lcr = 0x03
        elif isinstance(model, RTCState):
            cmos = bytearray(model.cmos_data)
            cmos[0x50] = 0xA5  # a free byte of the CMOS RAM
            model.cmos_data = bytes(cmos)
        elif isinstance(model, ISAKBDState):
            model.kbd.outport = 0xCD  # A20 off: now sent as pckbd_outport
        else:
            continue
        new = legacy_bytes(model, ev.version_id)
        edits.append((start, start + len(body), new))
    assert len(edits) == 3
    for start, end, new in sorted(edits, reverse=True):
        stream = stream[:start] + new + stream[end:]
    path = tmp_path / "edited.mig"
    path.write_bytes(stream)
    args = ["-chardev", "null,id=com1", "-device", "isa-serial,chardev=com1"]
    with QemuVM(serial=False, incoming=True, args=args) as vm:
        vm.load(path)
        assert vm.hmp("i /b 0x3ff").strip().endswith("0x5a")
        assert vm.hmp("i /b 0x3fb").strip().endswith("0x03")
        vm.hmp("o /b 0x70 0x50")
        assert vm.hmp("i /b 0x71").strip().endswith("0xa5")
        vm.hmp("o /b 0x64 0xd0")  # i8042: read the output port
        assert vm.hmp("i /b 0x60").strip().endswith("0xcd")
