"""A tiny guest that visibly keeps running: a 512-byte counting boot sector.

This module promises two pure functions and no I/O:

* :func:`counting_boot_sector` returns the bytes of an x86 real-mode boot
  sector (512 bytes, ending ``55 AA``).  Booted by the BIOS, it programs COM1
  (I/O port 0x3F8) for 115200 8N1 and prints ``1``, ``2``, ``3``, ... one
  number per line (``"1\\r\\n2\\r\\n..."``) forever.
* :func:`parse_counts` turns what the guest printed back into numbers.

The counter is a 32-bit value in guest RAM at linear address
:data:`COUNTER_ADDRESS` (and is copied into the first dword of
``dirty_pages`` further pages from :data:`DIRTY_BASE` up, so that a running
guest dirties memory on every count).  Guest RAM and CPU registers both
travel in a migration stream, so after a migration the destination goes on
counting from where the source stopped.

Between two numbers the guest busy-waits (``pause`` in a loop, no ``hlt``)
until the BIOS timer tick counter at 0040:006C has advanced ``ticks`` times;
each turn of that loop increments a heartbeat dword at
:data:`HEARTBEAT_ADDRESS`, so a running guest always has a dirty page (which
keeps a live migration iterating, e.g. to produce XBZRLE records).

Each turn of the wait loop also toggles CR0.WP, which has no effect in real
mode except that QEMU flushes the vCPU's TLB.  That works around a QEMU 7.2
TCG bug: the fast path of its migration dirty-bitmap sync clears a page's
dirty bit without resetting TCG's cached writable TLB entry, so a guest that
never flushes its TLB (like a tiny real-mode loop) can write to a page after
the first pass without the page being sent again.  Observed here: a
multi-pass live migration left the destination with a stale counter and the
count went backwards.  With the flush, every write after a flush is tracked.
SeaBIOS advances it at 18.2 Hz from the PIT interrupt, so the guest prints
about 18 numbers per second with ``ticks=1`` whatever the speed of the host;
under TCG the timer follows the host clock.

The machine code is written out by hand below, one instruction per line with
its assembly in the comment; the only "assembler" is :class:`_Asm`, which
resolves the relative displacements of jumps and calls to labels.
"""

from __future__ import annotations

import struct

__all__ = [
    "BOOT_SECTOR_SIZE",
    "COUNTER_ADDRESS",
    "DIRTY_BASE",
    "HEARTBEAT_ADDRESS",
    "MAX_DIRTY_PAGES",
    "counting_boot_sector",
    "parse_counts",
]

BOOT_SECTOR_SIZE = 512
#: Where the BIOS loads the boot sector (0000:7C00).
LOAD_ADDRESS = 0x7C00
#: Linear address of the 32-bit counter (a free byte range after the BIOS data area).
COUNTER_ADDRESS = 0x0600
#: Linear address of a 32-bit "heartbeat" the wait loop increments all the time.
HEARTBEAT_ADDRESS = 0x0604
#: The BIOS data area's timer tick counter (0040:006C), advanced at 18.2 Hz.
BIOS_TICKS_ADDRESS = 0x046C
#: First page the guest dirties on every count (segment 0x1000).
DIRTY_BASE = 0x10000
#: Pages from DIRTY_BASE up stay below the EBDA at 0x9FC00.
MAX_DIRTY_PAGES = 128

#: CR0.WP: meaningless in real mode (no paging), but changing it makes QEMU flush the TLB.
CR0_WP = 0x10000

COM1 = 0x3F8


class _Asm:
    """Collects hand-written machine code and patches relative jumps to labels."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        # (offset of the displacement, size in bytes, label, offset of the next instruction)
        self.fixups: list[tuple[int, int, str, int]] = []

    def emit(self, *parts: bytes | int) -> None:
        for part in parts:
            if isinstance(part, int):
                self.code.append(part)
            else:
                self.code += part

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = len(self.code)

    def rel8(self, opcode: int, label: str) -> None:
        """A short jump (``jcc``/``jmp``/``loop`` rel8) to ``label``."""
        self.code.append(opcode)
        self.fixups.append((len(self.code), 1, label, len(self.code) + 1))
        self.code.append(0)

    def rel16(self, opcode: int, label: str) -> None:
        """A near ``call``/``jmp`` rel16 to ``label``."""
        self.code.append(opcode)
        self.fixups.append((len(self.code), 2, label, len(self.code) + 2))
        self.code += b"\0\0"

    def assemble(self) -> bytes:
        for at, size, label, next_ip in self.fixups:
            disp = self.labels[label] - next_ip
            if size == 1:
                if not -128 <= disp <= 127:
                    raise ValueError(f"short jump to {label!r} out of range ({disp})")
                self.code[at] = disp & 0xFF
            else:
                self.code[at : at + 2] = struct.pack("<h", disp)
        return bytes(self.code)


def _imm16(value: int) -> bytes:
    return struct.pack("<H", value)


def counting_boot_sector(*, ticks: int = 1, dirty_pages: int = 16) -> bytes:
    """Return the 512-byte counting boot sector.

    ``ticks``: BIOS timer ticks (1/18.2 s each) to busy-wait between numbers
    (1..65535).  ``dirty_pages``: how many 4 KiB pages, from
    :data:`DIRTY_BASE` up, receive the new count on every step (0..128).
    """
    if not 1 <= ticks <= 0xFFFF:
        raise ValueError(f"ticks must be in 1..65535, got {ticks}")
    if not 0 <= dirty_pages <= MAX_DIRTY_PAGES:
        raise ValueError(f"dirty_pages must be in 0..{MAX_DIRTY_PAGES}, got {dirty_pages}")

    a = _Asm(LOAD_ADDRESS)
    # --- set up flat real-mode segments and a stack below the boot sector
    a.emit(0xFA)                                  # cli
    a.emit(0x31, 0xC0)                            # xor ax, ax
    a.emit(0x8E, 0xD8)                            # mov ds, ax
    a.emit(0x8E, 0xD0)                            # mov ss, ax
    a.emit(0xBC, _imm16(LOAD_ADDRESS))            # mov sp, 0x7C00
    a.emit(0xFC)                                  # cld
    # --- COM1: no interrupts, 115200 baud (divisor 1), 8N1, DTR+RTS
    a.emit(0xBA, _imm16(COM1 + 1))                # mov dx, 0x3F9   (IER)
    a.emit(0x30, 0xC0)                            # xor al, al
    a.emit(0xEE)                                  # out dx, al      IER = 0
    a.emit(0xBA, _imm16(COM1 + 3))                # mov dx, 0x3FB   (LCR)
    a.emit(0xB0, 0x80)                            # mov al, 0x80
    a.emit(0xEE)                                  # out dx, al      DLAB = 1
    a.emit(0xBA, _imm16(COM1 + 0))                # mov dx, 0x3F8   (DLL)
    a.emit(0xB0, 0x01)                            # mov al, 1
    a.emit(0xEE)                                  # out dx, al      divisor low = 1
    a.emit(0xBA, _imm16(COM1 + 1))                # mov dx, 0x3F9   (DLM)
    a.emit(0x30, 0xC0)                            # xor al, al
    a.emit(0xEE)                                  # out dx, al      divisor high = 0
    a.emit(0xBA, _imm16(COM1 + 3))                # mov dx, 0x3FB   (LCR)
    a.emit(0xB0, 0x03)                            # mov al, 3
    a.emit(0xEE)                                  # out dx, al      8N1, DLAB = 0
    a.emit(0xBA, _imm16(COM1 + 4))                # mov dx, 0x3FC   (MCR)
    a.emit(0xB0, 0x03)                            # mov al, 3
    a.emit(0xEE)                                  # out dx, al      DTR | RTS
    # --- counter = 0; let the BIOS timer interrupt run
    a.emit(0x66, 0x31, 0xC0)                      # xor eax, eax
    a.emit(0x66, 0xA3, _imm16(COUNTER_ADDRESS))   # mov [0x0600], eax
    a.emit(0xFB)                                  # sti

    a.label("main")
    a.emit(0x66, 0xFF, 0x06, _imm16(COUNTER_ADDRESS))  # inc dword [0x0600]
    a.emit(0x66, 0xA1, _imm16(COUNTER_ADDRESS))   # mov eax, [0x0600]
    if dirty_pages:
        # --- store the count in the first dword of each dirty page
        a.emit(0xBA, _imm16(DIRTY_BASE >> 4))     # mov dx, 0x1000  (segment of DIRTY_BASE)
        a.emit(0xB9, _imm16(dirty_pages))         # mov cx, dirty_pages
        a.label("dirty")
        a.emit(0x8E, 0xC2)                        # mov es, dx
        a.emit(0x26, 0x66, 0xA3, _imm16(0))       # mov es:[0x0000], eax
        a.emit(0x81, 0xC2, _imm16(0x100))         # add dx, 0x100   (next 4 KiB page)
        a.rel8(0xE2, "dirty")                     # loop dirty
    # --- push the decimal digits of eax, least significant first
    a.emit(0x66, 0xBB, struct.pack("<I", 10))     # mov ebx, 10
    a.emit(0x31, 0xC9)                            # xor cx, cx      (digit count)
    a.label("digits")
    a.emit(0x66, 0x31, 0xD2)                      # xor edx, edx
    a.emit(0x66, 0xF7, 0xF3)                      # div ebx         eax = q, edx = r
    a.emit(0x52)                                  # push dx
    a.emit(0x41)                                  # inc cx
    a.emit(0x66, 0x85, 0xC0)                      # test eax, eax
    a.rel8(0x75, "digits")                        # jnz digits
    # --- print them most significant first, then CR LF
    a.label("emit")
    a.emit(0x58)                                  # pop ax
    a.emit(0x04, ord("0"))                        # add al, '0'
    a.rel16(0xE8, "putc")                         # call putc
    a.rel8(0xE2, "emit")                          # loop emit
    a.emit(0xB0, 0x0D)                            # mov al, 13
    a.rel16(0xE8, "putc")                         # call putc
    a.emit(0xB0, 0x0A)                            # mov al, 10
    a.rel16(0xE8, "putc")                         # call putc
    # --- busy-wait until the BIOS tick counter has changed `ticks` times
    a.emit(0xB9, _imm16(ticks))                   # mov cx, ticks
    a.label("tick")
    a.emit(0xA1, _imm16(BIOS_TICKS_ADDRESS))      # mov ax, [0x046C]
    a.label("spin")
    a.emit(0xF3, 0x90)                            # pause
    a.emit(0x0F, 0x20, 0xC2)                      # mov edx, cr0
    a.emit(0x66, 0x81, 0xF2, struct.pack("<I", CR0_WP))  # xor edx, 0x10000  (toggle CR0.WP)
    a.emit(0x0F, 0x22, 0xC2)                      # mov cr0, edx    -> TCG flushes the TLB
    a.emit(0x66, 0xFF, 0x06, _imm16(HEARTBEAT_ADDRESS))  # inc dword [0x0604]
    a.emit(0x3B, 0x06, _imm16(BIOS_TICKS_ADDRESS))  # cmp ax, [0x046C]
    a.rel8(0x74, "spin")                          # je spin
    a.rel8(0xE2, "tick")                          # loop tick
    a.rel16(0xE9, "main")                         # jmp main

    # --- putc: send al on COM1 once the transmit holding register is empty
    a.label("putc")
    a.emit(0x88, 0xC4)                            # mov ah, al
    a.emit(0xBA, _imm16(COM1 + 5))                # mov dx, 0x3FD   (LSR)
    a.label("thre")
    a.emit(0xEC)                                  # in al, dx
    a.emit(0xA8, 0x20)                            # test al, 0x20   (THR empty)
    a.rel8(0x74, "thre")                          # jz thre
    a.emit(0xBA, _imm16(COM1))                    # mov dx, 0x3F8   (THR)
    a.emit(0x88, 0xE0)                            # mov al, ah
    a.emit(0xEE)                                  # out dx, al
    a.emit(0xC3)                                  # ret

    code = a.assemble()
    if len(code) > BOOT_SECTOR_SIZE - 2:
        raise AssertionError(f"boot sector code is {len(code)} bytes, more than 510")
    return code.ljust(BOOT_SECTOR_SIZE - 2, b"\0") + b"\x55\xAA"


def parse_counts(text: str) -> list[int]:
    """Return the numbers the counting guest printed, in order.

    Only complete lines count (a line ends with ``\\n``; ``\\r`` is ignored);
    lines that are not plain decimal numbers (e.g. BIOS messages) are
    skipped.  A log that starts in the middle of a line (the destination's
    log after a migration) may start with the tail of a number: concatenate
    the source's and the destination's logs to read a migrated count.
    """
    lines = text.split("\n")
    counts: list[int] = []
    for line in lines[:-1]:  # the last piece has no newline yet
        line = line.strip()
        if line.isascii() and line.isdigit():
            counts.append(int(line))
    return counts
