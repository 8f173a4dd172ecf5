"""The i8042 keyboard controller and the PS/2 keyboard behind it, as Python device models.

Mirrors two QEMU 7.2 vmsds:

* ``pckbd`` (version 3, minimum 3; ``hw/input/pckbd.c``, ``vmstate_kbd_isa``):
  one field ``kbd``, a struct of the controller's own vmsd, also named
  ``pckbd`` (version 3), whose subsections are ``pckbd_outport`` (version 1,
  sent iff the output port differs from what the status register implies)
  and ``pckbd/extended_state`` (version 0, sent iff the controller's
  ``extended-state`` property is on, QEMU's default).
* ``ps2kbd`` (version 3, minimum 2; ``hw/input/ps2.c``): ``parent_obj``, a
  struct of vmsd ``PS2 Common State`` (version 3), then ``scan_enabled``,
  ``translate``, ``scancode_set`` (since version 3), and the subsections
  ``ps2kbd/ledstate`` (version 3, sent iff ``ledstate != 0``),
  ``ps2kbd/need_high_bit`` (version 1, iff ``need_high_bit``) and
  ``ps2kbd/command_reply_queue`` (version 0, iff the queue holds command
  replies, ``queue.cwptr != -1``).

QEMU's pre_save/post_load hooks are mirrored only where they say what an
absent subsection means; the models otherwise hold the values as they
travel (e.g. ``pending_tmp`` rather than the controller's internal
``pending``, and the PS/2 queue pointers unsanitised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..visitor import Visitor
from .base import DeviceModel, visited_version

__all__ = ["ISAKBDState", "KBDState", "PS2KbdState", "PS2Queue", "PS2State", "kbd_outport_default"]

# Controller status, mode and output port bits (hw/input/pckbd.c).
KBD_STAT_OBF = 0x01
KBD_STAT_CMD = 0x08
KBD_STAT_UNLOCKED = 0x10
KBD_STAT_MOUSE_OBF = 0x20
KBD_MODE_KBD_INT = 0x01
KBD_MODE_MOUSE_INT = 0x02
KBD_OUT_RESET = 0x01
KBD_OUT_A20 = 0x02
KBD_OUT_OBF = 0x10
KBD_OUT_MOUSE_OBF = 0x20
KBD_OUT_ONES = 0xCC
KBD_OBSRC_KBD = 0x01
KBD_OBSRC_MOUSE = 0x02

PS2_BUFFER_SIZE = 256  # include/hw/input/ps2.h


def kbd_outport_default(status: int) -> int:
    """The output port value that the status register implies (what QEMU assumes when none was sent)."""
    return (KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES
            | (KBD_OUT_OBF if status & KBD_STAT_OBF else 0)
            | (KBD_OUT_MOUSE_OBF if status & KBD_STAT_MOUSE_OBF else 0))


# ---------------------------------------------------------------------------
# i8042 controller: vmsd "pckbd"
# ---------------------------------------------------------------------------


@dataclass
class KBDState:
    """QEMU's ``KBDState``, migrated part, reset as ``kbd_reset`` leaves it."""

    write_cmd: int = 0
    status: int = KBD_STAT_CMD | KBD_STAT_UNLOCKED
    mode: int = KBD_MODE_KBD_INT | KBD_MODE_MOUSE_INT
    pending_tmp: int = 0
    outport: int = KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES  # subsection pckbd_outport
    migration_flags: int = 0  # subsection pckbd/extended_state, with the next three
    obsrc: int = 0
    obdata: int = 0
    cbdata: int = 0
    #: The ``extended-state`` device property: not a field, but it decides whether
    #: pckbd/extended_state is sent; loading records whether it was.
    extended_state: bool = True


def _visit_outport(v: Visitor, s: KBDState) -> KBDState:
    s.outport = v.u8("outport", s.outport)
    return s


def _visit_extended_state(v: Visitor, s: KBDState) -> KBDState:
    s.migration_flags = v.u32("migration_flags", s.migration_flags)
    s.obsrc = v.u32("obsrc", s.obsrc)
    s.obdata = v.u8("obdata", s.obdata)
    s.cbdata = v.u8("cbdata", s.cbdata)
    return s


def visit_kbd(v: Visitor, s: KBDState) -> KBDState:
    """The controller's own vmsd ``pckbd`` version 3 (``vmstate_kbd``)."""
    s.write_cmd = v.u8("write_cmd", s.write_cmd)
    s.status = v.u8("status", s.status)
    s.mode = v.u8("mode", s.mode)
    s.pending_tmp = v.u8("pending_tmp", s.pending_tmp)
    sent = v.subsection("pckbd_outport", 1, s.outport != kbd_outport_default(s.status), _visit_outport, s)
    if sent is None:  # not sent: it is the default (saving), or becomes it (loading)
        s.outport = kbd_outport_default(s.status)
    s.extended_state = v.subsection("pckbd/extended_state", 0, s.extended_state,
                                    _visit_extended_state, s) is not None
    if v.loading and not s.extended_state:  # kbd_post_load derives the source of the output buffer
        s.obsrc = ((KBD_OBSRC_MOUSE if s.status & KBD_STAT_MOUSE_OBF else KBD_OBSRC_KBD)
                   if s.status & KBD_STAT_OBF else 0)
    v.end_subsections("pckbd")
    return s


@dataclass
class ISAKBDState(DeviceModel):
    """The ISA ``i8042`` device (QEMU's ``ISAKBDState``): the controller as ``kbd``."""

    VMSD_NAME: ClassVar[str] = "pckbd"
    VERSION: ClassVar[int] = 3
    MINIMUM_VERSION: ClassVar[int] = 3

    kbd: KBDState = field(default_factory=KBDState)

    @staticmethod
    def visit(v: Visitor, s: ISAKBDState) -> ISAKBDState:
        s.kbd = v.struct("kbd", s.kbd, visit_kbd, "pckbd", 3)
        v.end_subsections("pckbd")
        return s


# ---------------------------------------------------------------------------
# PS/2 keyboard: vmsd "ps2kbd"
# ---------------------------------------------------------------------------


@dataclass
class PS2Queue:
    """QEMU's ``PS2Queue``: a ring of scancodes and command replies."""

    data: bytes = bytes(PS2_BUFFER_SIZE)
    rptr: int = 0
    wptr: int = 0
    cwptr: int = -1  # end of the command replies, -1 when there are none
    count: int = 0


@dataclass
class PS2State:
    """QEMU's ``PS2State``, the part common to keyboard and mouse."""

    write_cmd: int = -1
    queue: PS2Queue = field(default_factory=PS2Queue)


def visit_ps2_common(v: Visitor, s: PS2State) -> PS2State:
    """vmsd ``PS2 Common State`` version 3."""
    q = s.queue
    s.write_cmd = v.i32("write_cmd", s.write_cmd)
    q.rptr = v.i32("queue.rptr", q.rptr)
    q.wptr = v.i32("queue.wptr", q.wptr)
    q.count = v.i32("queue.count", q.count)
    q.data = v.buffer("queue.data", q.data, PS2_BUFFER_SIZE)
    return s


def _visit_ledstate(v: Visitor, s: PS2KbdState) -> PS2KbdState:
    s.ledstate = v.i32("ledstate", s.ledstate)
    return s


def _visit_need_high_bit(v: Visitor, s: PS2KbdState) -> PS2KbdState:
    s.need_high_bit = v.bool("need_high_bit", s.need_high_bit)
    return s


def _visit_command_reply_queue(v: Visitor, s: PS2KbdState) -> PS2KbdState:
    q = s.parent_obj.queue
    q.cwptr = v.i32("parent_obj.queue.cwptr", q.cwptr)
    return s


@dataclass
class PS2KbdState(DeviceModel):
    """QEMU's ``PS2KbdState`` (device ``ps2-kbd``), reset as ``ps2_kbd_reset`` leaves it."""

    VMSD_NAME: ClassVar[str] = "ps2kbd"
    VERSION: ClassVar[int] = 3
    MINIMUM_VERSION: ClassVar[int] = 2

    parent_obj: PS2State = field(default_factory=PS2State)
    scan_enabled: int = 1
    translate: int = 0
    scancode_set: int = 2  # since version 3; version 2 streams mean set 2
    ledstate: int = 0  # subsection ps2kbd/ledstate
    need_high_bit: bool | int = False  # subsection ps2kbd/need_high_bit

    @staticmethod
    def visit(v: Visitor, s: PS2KbdState) -> PS2KbdState:
        version = visited_version(v, PS2KbdState.VERSION)
        s.parent_obj = v.struct("parent_obj", s.parent_obj, visit_ps2_common, "PS2 Common State", 3)
        s.scan_enabled = v.i32("scan_enabled", s.scan_enabled)
        s.translate = v.i32("translate", s.translate)
        if version >= 3:
            s.scancode_set = v.i32("scancode_set", s.scancode_set)
        elif v.loading:  # ps2_kbd_post_load: a version 2 stream means set 2
            s.scancode_set = 2
        v.subsection("ps2kbd/ledstate", 3, s.ledstate != 0, _visit_ledstate, s)
        v.subsection("ps2kbd/need_high_bit", 1, bool(s.need_high_bit), _visit_need_high_bit, s)
        v.subsection("ps2kbd/command_reply_queue", 0, s.parent_obj.queue.cwptr != -1,
                     _visit_command_reply_queue, s)
        v.end_subsections("ps2kbd")
        return s
