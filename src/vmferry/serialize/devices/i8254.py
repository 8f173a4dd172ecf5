"""The i8254 programmable interval timer (PIT) as a Python device model.

Mirrors QEMU 7.2's vmsd ``i8254`` (version 3, minimum 2;
``hw/timer/i8254_common.c``): channel 0's ``irq_disabled`` (since version
3), the three channels as a struct array of vmsd ``pit channel`` (version
2), then channel 0's ``next_transition_time`` once more (where QEMU < 1.5
kept its ``irq_timer``).  No subsections.

Channel 0's ``next_transition_time`` therefore travels twice.  Like QEMU,
the model keeps one value: the second copy wins on load, and both copies
carry it on save.  ``irq_disabled`` travels for channel 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..visitor import Visitor
from .base import DeviceModel, visited_version

__all__ = ["PITChannelState", "PITCommonState"]

PIT_CHANNELS = 3


@dataclass
class PITChannelState:
    """One counter (QEMU's ``PITChannelState``), reset as ``pit_reset_common`` leaves it."""

    count: int = 0x10000  # 0 programmed means 65536
    latched_count: int = 0
    count_latched: int = 0
    status_latched: int = 0
    status: int = 0
    read_state: int = 0
    write_state: int = 0
    write_latch: int = 0
    rw_mode: int = 0
    mode: int = 3
    bcd: int = 0
    gate: int = 1
    count_load_time: int = 0
    next_transition_time: int = 0
    irq_disabled: int = 0  # not in vmsd "pit channel"; channel 0's travels in "i8254"


def visit_pit_channel(v: Visitor, c: PITChannelState) -> PITChannelState:
    """vmsd ``pit channel`` version 2."""
    c.count = v.i32("count", c.count)
    c.latched_count = v.u16("latched_count", c.latched_count)
    c.count_latched = v.u8("count_latched", c.count_latched)
    c.status_latched = v.u8("status_latched", c.status_latched)
    c.status = v.u8("status", c.status)
    c.read_state = v.u8("read_state", c.read_state)
    c.write_state = v.u8("write_state", c.write_state)
    c.write_latch = v.u8("write_latch", c.write_latch)
    c.rw_mode = v.u8("rw_mode", c.rw_mode)
    c.mode = v.u8("mode", c.mode)
    c.bcd = v.u8("bcd", c.bcd)
    c.gate = v.u8("gate", c.gate)
    c.count_load_time = v.i64("count_load_time", c.count_load_time)
    c.next_transition_time = v.i64("next_transition_time", c.next_transition_time)
    return c


def _channel_element(v: Visitor, name: str, c: Any) -> PITChannelState:
    return v.struct(name, c if c is not None else PITChannelState(), visit_pit_channel, "pit channel", 2)


def _reset_channels() -> list[PITChannelState]:
    return [PITChannelState(gate=int(i != 2)) for i in range(PIT_CHANNELS)]


@dataclass
class PITCommonState(DeviceModel):
    """QEMU's ``PITCommonState``, migrated part (the ``i8254`` ISA device)."""

    VMSD_NAME: ClassVar[str] = "i8254"
    VERSION: ClassVar[int] = 3
    MINIMUM_VERSION: ClassVar[int] = 2

    channels: list[PITChannelState] = field(default_factory=_reset_channels)

    @staticmethod
    def visit(v: Visitor, s: PITCommonState) -> PITCommonState:
        version = visited_version(v, PITCommonState.VERSION)
        if version >= 3:
            c0 = s.channels[0]
            c0.irq_disabled = v.u32("channels[0].irq_disabled", c0.irq_disabled)
        # Loading visitors hand each element of s.channels back as the template, so
        # channel 0 keeps the irq_disabled just read.
        s.channels = v.array("channels", s.channels, PIT_CHANNELS, _channel_element, compressible=True)
        c0 = s.channels[0]
        c0.next_transition_time = v.i64("channels[0].next_transition_time", c0.next_transition_time)
        v.end_subsections("i8254")
        return s
