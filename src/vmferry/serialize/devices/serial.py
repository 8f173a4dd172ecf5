"""The 16550A UART on the ISA bus (``isa-serial``) as a Python device model.

Mirrors QEMU 7.2's vmsd ``serial`` of ``isa-serial`` (version 3, minimum 2;
``hw/char/serial-isa.c``): one field ``state``, a struct of the UART's own
vmsd, also named ``serial`` (version 3; ``hw/char/serial.c``), whose
subsections, all version 1, are sent when:

* ``serial/thr_ipending``: THR interrupts are enabled and ``thr_ipending``
  differs from what the IIR shows;
* ``serial/tsr``: a transmission is being retried (``tsr_retry != 0``);
* ``serial/recv_fifo`` / ``serial/xmit_fifo``: that FIFO is not empty (a
  struct of vmsd ``Fifo8`` version 1, ``util/fifo8.c``: its whole buffer,
  ``capacity`` bytes that do not travel themselves, then ``head`` and ``num``);
* ``serial/fifo_timeout_timer``: that timer is armed;
* ``serial/timeout_ipending``: ``timeout_ipending != 0``;
* ``serial/poll``: the modem status lines are polled (``poll_msl >= 0``).

QEMU visits a nested struct at the nested vmsd's own version, so the
``state`` fields introduced in versions 2 and 3 (``divider``,
``fcr_vmstate``) travel whatever the section's version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..visitor import Visitor
from .base import TIMER_DISARMED, DeviceModel

__all__ = ["Fifo8", "ISASerialState", "SerialState"]

UART_FIFO_LENGTH = 16  # include/hw/char/serial.h
# Register bits (hw/char/serial.c).
UART_IER_THRI = 0x02
UART_IIR_NO_INT = 0x01
UART_IIR_ID = 0x06
UART_IIR_THRI = 0x02
UART_MCR_OUT2 = 0x08
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_DCD = 0x80


@dataclass
class Fifo8:
    """QEMU's ``Fifo8``: ``data`` is the whole ring, ``capacity`` bytes, used or not."""

    capacity: int = UART_FIFO_LENGTH  # set at creation; not on the wire
    data: bytes = bytes(UART_FIFO_LENGTH)
    head: int = 0
    num: int = 0


def visit_fifo8(v: Visitor, f: Fifo8) -> Fifo8:
    """vmsd ``Fifo8`` version 1."""
    f.data = v.buffer("data", f.data, f.capacity)
    f.head = v.u32("head", f.head)
    f.num = v.u32("num", f.num)
    return f


@dataclass
class SerialState:
    """QEMU's ``SerialState``, migrated part, reset as ``serial_reset`` leaves it.

    ``poll_msl`` resets to -1: QEMU sets it so for every chardev that cannot
    report modem lines (null, socket, file...); it is 0 for a host tty.
    """

    divider: int = 0x0C  # 9600 baud
    rbr: int = 0
    ier: int = 0
    iir: int = UART_IIR_NO_INT
    lcr: int = 0
    mcr: int = UART_MCR_OUT2
    lsr: int = UART_LSR_TEMT | UART_LSR_THRE
    msr: int = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
    scr: int = 0
    fcr_vmstate: int = 0
    thr_ipending: int = 0  # subsection serial/thr_ipending
    tsr_retry: int = 0  # subsection serial/tsr, with thr and tsr
    thr: int = 0
    tsr: int = 0
    recv_fifo: Fifo8 = field(default_factory=Fifo8)  # subsection serial/recv_fifo
    xmit_fifo: Fifo8 = field(default_factory=Fifo8)  # subsection serial/xmit_fifo
    fifo_timeout_timer: int = TIMER_DISARMED  # subsection serial/fifo_timeout_timer
    timeout_ipending: int = 0  # subsection serial/timeout_ipending
    poll_msl: int = -1  # subsection serial/poll, with modem_status_poll
    modem_status_poll: int = TIMER_DISARMED

    def thr_ipending_expected(self) -> bool:
        """The ``thr_ipending`` the IIR implies (what QEMU assumes when none was sent)."""
        return (self.iir & UART_IIR_ID) == UART_IIR_THRI


def _thr_ipending_needed(s: SerialState) -> bool:
    if not s.ier & UART_IER_THRI:
        return False  # enabling THR interrupts recomputes it from LSR.THRE anyway
    return s.thr_ipending != s.thr_ipending_expected()


def _visit_thr_ipending(v: Visitor, s: SerialState) -> SerialState:
    s.thr_ipending = v.i32("thr_ipending", s.thr_ipending)
    return s


def _visit_tsr(v: Visitor, s: SerialState) -> SerialState:
    s.tsr_retry = v.u32("tsr_retry", s.tsr_retry)
    s.thr = v.u8("thr", s.thr)
    s.tsr = v.u8("tsr", s.tsr)
    return s


def _visit_recv_fifo(v: Visitor, s: SerialState) -> SerialState:
    s.recv_fifo = v.struct("recv_fifo", s.recv_fifo, visit_fifo8, "Fifo8", 1)
    return s


def _visit_xmit_fifo(v: Visitor, s: SerialState) -> SerialState:
    s.xmit_fifo = v.struct("xmit_fifo", s.xmit_fifo, visit_fifo8, "Fifo8", 1)
    return s


def _visit_fifo_timeout_timer(v: Visitor, s: SerialState) -> SerialState:
    s.fifo_timeout_timer = v.timer("fifo_timeout_timer", s.fifo_timeout_timer)
    return s


def _visit_timeout_ipending(v: Visitor, s: SerialState) -> SerialState:
    s.timeout_ipending = v.i32("timeout_ipending", s.timeout_ipending)
    return s


def _visit_poll(v: Visitor, s: SerialState) -> SerialState:
    s.poll_msl = v.i32("poll_msl", s.poll_msl)
    s.modem_status_poll = v.timer("modem_status_poll", s.modem_status_poll)
    return s


def visit_serial(v: Visitor, s: SerialState) -> SerialState:
    """The UART's own vmsd ``serial`` version 3 (``vmstate_serial``)."""
    s.divider = v.u16("divider", s.divider)  # since version 2
    s.rbr = v.u8("rbr", s.rbr)
    s.ier = v.u8("ier", s.ier)
    s.iir = v.u8("iir", s.iir)
    s.lcr = v.u8("lcr", s.lcr)
    s.mcr = v.u8("mcr", s.mcr)
    s.lsr = v.u8("lsr", s.lsr)
    s.msr = v.u8("msr", s.msr)
    s.scr = v.u8("scr", s.scr)
    s.fcr_vmstate = v.u8("fcr_vmstate", s.fcr_vmstate)  # since version 3
    sent = v.subsection("serial/thr_ipending", 1, _thr_ipending_needed(s), _visit_thr_ipending, s)
    if sent is None and v.loading:  # serial_post_load derives it from the IIR
        s.thr_ipending = int(s.thr_ipending_expected())
    v.subsection("serial/tsr", 1, s.tsr_retry != 0, _visit_tsr, s)
    v.subsection("serial/recv_fifo", 1, s.recv_fifo.num != 0, _visit_recv_fifo, s)
    v.subsection("serial/xmit_fifo", 1, s.xmit_fifo.num != 0, _visit_xmit_fifo, s)
    v.subsection("serial/fifo_timeout_timer", 1, s.fifo_timeout_timer != TIMER_DISARMED,
                 _visit_fifo_timeout_timer, s)
    v.subsection("serial/timeout_ipending", 1, s.timeout_ipending != 0, _visit_timeout_ipending, s)
    sent = v.subsection("serial/poll", 1, s.poll_msl >= 0, _visit_poll, s)
    if sent is None and v.loading:  # serial_pre_load: not polled unless the source says so
        s.poll_msl = -1
    v.end_subsections("serial")
    return s


@dataclass
class ISASerialState(DeviceModel):
    """The ``isa-serial`` device (QEMU's ``ISASerialState``): the UART as ``state``."""

    VMSD_NAME: ClassVar[str] = "serial"
    VERSION: ClassVar[int] = 3
    MINIMUM_VERSION: ClassVar[int] = 2

    state: SerialState = field(default_factory=SerialState)

    @staticmethod
    def visit(v: Visitor, s: ISASerialState) -> ISASerialState:
        s.state = v.struct("state", s.state, visit_serial, "serial", 3)
        v.end_subsections("serial")
        return s
