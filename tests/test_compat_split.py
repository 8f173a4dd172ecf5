"""A split transform end to end on a Python device model.

The MC146818 RTC model (vmsd ``mc146818rtc``, version 3) is one device.  In
a made-up release ``rtc-4`` it becomes two devices at version 4: the CMOS
(``mc146818rtc``: the registers, the base time and the reinjection
subsection) and its timers (``mc146818rtc-timers``).  The model's state is
saved as a QEMU stream of ``rtc-3``, transformed to ``rtc-4`` through the
codec, the registry and the stream runner, written and read back, and
transformed back to ``rtc-3``: the bytes come back identical and the model
loads the same state.
"""

from __future__ import annotations

import json
from typing import Iterable

from vmferry.compat import Machine, Registry, transform_events
from vmferry.compat.ops import Part, merge_sections, split_section
from vmferry.encode import legacy
from vmferry.encode.configuration import configuration_state
from vmferry.events import Configuration, DeviceSection, Eof, Event, Header, Vmdesc
from vmferry.serialize.describe import describe_visit
from vmferry.serialize.devices import RTCState, load, save
from vmferry.serialize.qemu_vmdesc import vmsd_from_desc
from vmferry.serialize.visitor import TreeBuilder, TreeReader

CMOS = ("cmos_data", "cmos_index", "unused[0]", "base_rtc", "last_update", "offset")
TIMERS = ("periodic_timer", "next_periodic_time", "unused[1]", "irq_coalesced", "period", "update_timer",
          "next_alarm_time")
REINJECT = "mc146818rtc/irq_reinject_on_ack_count"
ORDER = ("cmos_data", "cmos_index", "unused[0]", "periodic_timer", "next_periodic_time", "unused[1]",
         "irq_coalesced", "period", "base_rtc", "last_update", "offset", "update_timer", "next_alarm_time", REINJECT)


def rtc_registry() -> Registry:
    reg = Registry()
    reg.line("rtc", ["rtc-3", "rtc-4"])

    def split(m: Machine) -> Machine:
        return split_section(m, "mc146818rtc", 0, [
            Part("mc146818rtc", 4, CMOS, (REINJECT,), idstr="mc146818rtc"),
            Part("mc146818rtc-timers", 4, TIMERS, idstr="mc146818rtc-timers"),
        ])

    def merge(m: Machine) -> Machine:
        return merge_sections(m, [("mc146818rtc", 0), ("mc146818rtc-timers", 0)], "mc146818rtc", 0,
                              "mc146818rtc", 3, order=ORDER)

    reg.machine("rtc-3", "rtc-4", split, lossless=True, name="rtc-split", mirrors="the RTC's timers become a device")
    reg.machine("rtc-4", "rtc-3", merge, lossless=True, name="rtc-merge", mirrors="and back")
    return reg


def model_stream(rtc: RTCState, machine: str = "rtc-3") -> list[Event]:
    builder = TreeBuilder()
    save(rtc, builder, 3)
    desc = describe_visit(RTCState.visit, rtc, "mc146818rtc", 0, "mc146818rtc", 3)
    sec = DeviceSection(7, "mc146818rtc", 0, 3, builder.tree, vmsd_from_desc(desc, "$", 0), desc)
    vmdesc = Vmdesc(json.dumps({"page_size": 4096, "devices": [desc]}).encode())
    return [Header(), Configuration(configuration_state(machine)), sec, Eof(), vmdesc]


def to_bytes(events: Iterable[Event]) -> bytes:
    return b"".join(bytes(c) for c in legacy.encode(events))


def sections(data: bytes) -> list[DeviceSection]:
    return [e for e in legacy.decode([data]) if isinstance(e, DeviceSection)]


def test_rtc_splits_into_two_devices_and_back() -> None:
    rtc = RTCState(cmos_index=0x0B, periodic_timer=123_456_789, next_periodic_time=42, irq_coalesced=3, period=512,
                   base_rtc=1_700_000_000, last_update=99, offset=-5, update_timer=77, next_alarm_time=88,
                   irq_reinject_on_ack_count=2)
    reg = rtc_registry()
    v3 = to_bytes(model_stream(rtc))

    v4 = to_bytes(transform_events(legacy.decode([v3]), reg, "rtc-4"))
    cmos, timers = sections(v4)
    assert (cmos.idstr, cmos.version_id, cmos.schema.name) == ("mc146818rtc", 4, "mc146818rtc")
    assert (timers.idstr, timers.version_id, timers.schema.name) == ("mc146818rtc-timers", 4, "mc146818rtc-timers")
    assert list(cmos.state) == [*CMOS, REINJECT] and list(timers.state) == list(TIMERS)
    assert timers.state["periodic_timer"] == 123_456_789 and cmos.state[REINJECT] == {"irq_reinject_on_ack_count": 2}
    assert cmos.section_id == 7 and timers.section_id != 7
    head = [e for e in legacy.decode([v4]) if isinstance(e, (Configuration, Vmdesc))]
    assert head[0].machine == "rtc-4"
    described = json.loads(head[1].text)["devices"]
    assert [d["name"] for d in described] == ["mc146818rtc", "mc146818rtc-timers"]
    assert [d["version"] for d in described] == [4, 4]

    back = to_bytes(transform_events(legacy.decode([v4]), reg, "rtc-3"))
    assert back == v3  # the round trip is byte for byte
    (sec,) = sections(back)
    loaded = load(RTCState, TreeReader(sec.state), 3)
    assert loaded == rtc


def test_split_plan_is_lossless_both_ways() -> None:
    reg = rtc_registry()
    assert reg.plan("rtc-3", "rtc-4").lossless and reg.plan("rtc-4", "rtc-3").lossless


def test_default_model_round_trips_too() -> None:
    rtc = RTCState()
    reg = rtc_registry()
    v3 = to_bytes(model_stream(rtc))
    v4 = to_bytes(transform_events(legacy.decode([v3]), reg, "rtc-4"))
    assert len(sections(v4)) == 2 and REINJECT not in sections(v4)[0].state  # not needed: not sent
    assert to_bytes(transform_events(legacy.decode([v4]), reg, "rtc-3")) == v3


