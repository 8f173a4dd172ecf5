"""The MC146818 real-time clock as a Python device model.

Mirrors QEMU 7.2's vmsd ``mc146818rtc`` (version 3, minimum 1;
``hw/rtc/mc146818rtc.c``) with its one subsection
``mc146818rtc/irq_reinject_on_ack_count`` (version 1), sent iff
``irq_reinject_on_ack_count != 0``.

The two ``VMSTATE_UNUSED`` gaps travel as zeros and are dropped on load,
as QEMU does; their vmdesc names are ``unused[0]`` and ``unused[1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..visitor import Visitor
from .base import TIMER_DISARMED, DeviceModel, visited_version

__all__ = ["CMOS_SIZE", "RTCState"]

CMOS_SIZE = 128  # RTCState.cmos_data

# CMOS register indexes and their reset values (hw/rtc/mc146818rtc.c, rtc_realizefn;
# include/hw/rtc/mc146818rtc_regs.h).
RTC_REG_A = 10
RTC_REG_B = 11
RTC_REG_C = 12
RTC_REG_D = 13
_CMOS_RESET = {RTC_REG_A: 0x26, RTC_REG_B: 0x02, RTC_REG_C: 0x00, RTC_REG_D: 0x80}


def _reset_cmos() -> bytes:
    data = bytearray(CMOS_SIZE)
    for reg, value in _CMOS_RESET.items():
        data[reg] = value
    return bytes(data)


def _visit_reinject(v: Visitor, s: RTCState) -> RTCState:
    s.irq_reinject_on_ack_count = v.u16("irq_reinject_on_ack_count", s.irq_reinject_on_ack_count)
    return s


@dataclass
class RTCState(DeviceModel):
    """QEMU's ``RTCState``, migrated part.  Times are ns of the RTC's clock."""

    VMSD_NAME: ClassVar[str] = "mc146818rtc"
    VERSION: ClassVar[int] = 3
    MINIMUM_VERSION: ClassVar[int] = 1

    cmos_data: bytes = field(default_factory=_reset_cmos)
    cmos_index: int = 0
    periodic_timer: int = TIMER_DISARMED
    next_periodic_time: int = 0
    irq_coalesced: int = 0  # since version 2
    period: int = 0  # since version 2
    base_rtc: int = 0  # since version 3
    last_update: int = 0  # since version 3
    offset: int = 0  # since version 3
    update_timer: int = TIMER_DISARMED  # since version 3
    next_alarm_time: int = 0  # since version 3
    irq_reinject_on_ack_count: int = 0  # subsection mc146818rtc/irq_reinject_on_ack_count

    @staticmethod
    def visit(v: Visitor, s: RTCState) -> RTCState:
        version = visited_version(v, RTCState.VERSION)
        s.cmos_data = v.buffer("cmos_data", s.cmos_data, CMOS_SIZE)
        s.cmos_index = v.u8("cmos_index", s.cmos_index)
        v.unused("unused[0]", 7 * 4)
        s.periodic_timer = v.timer("periodic_timer", s.periodic_timer)
        s.next_periodic_time = v.i64("next_periodic_time", s.next_periodic_time)
        v.unused("unused[1]", 3 * 8)
        if version >= 2:
            s.irq_coalesced = v.u32("irq_coalesced", s.irq_coalesced)
            s.period = v.u32("period", s.period)
        if version >= 3:
            s.base_rtc = v.u64("base_rtc", s.base_rtc)
            s.last_update = v.u64("last_update", s.last_update)
            s.offset = v.i64("offset", s.offset)
            s.update_timer = v.timer("update_timer", s.update_timer)
            s.next_alarm_time = v.u64("next_alarm_time", s.next_alarm_time)
        v.subsection("mc146818rtc/irq_reinject_on_ack_count", 1, s.irq_reinject_on_ack_count != 0,
                     _visit_reinject, s)
        v.end_subsections("mc146818rtc")
        return s

