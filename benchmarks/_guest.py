"""A busy guest for the postcopy benchmark: a 512-byte boot sector that reads pages all over its RAM.

The counting guest (vmferry.live.qemu.guest) touches a few pages below
1 MiB, so a destination in postcopy faults on a handful of pages and then
has everything it needs.  This one keeps asking for pages it does not have
yet, as a guest with a large working set does:

* it enters "unreal mode" (FS gets a flat 4 GiB limit through a brief
  switch to protected mode, then real mode again) and enables A20, so
  ``mov al, fs:[esi]`` reads any byte of the guest's RAM;
* it sets the PIT to ``hz`` interrupts per second and, after each
  (``hlt`` between them, so the vCPU does not spin a host CPU), reads one
  byte of each of ``pages_per_tick`` pages picked by a 32-bit linear
  congruential generator (the top bits of its state select one of the
  RAM's pages, uniformly);
* it counts the pages read in the dword at :data:`TOUCHES_ADDRESS`.

It only reads, so it dirties no page but the counter's: a precopy pass
sends each page once, and every page the destination has not received
when the guest reads it is a fault the destination must request.  Reads
are paced so that the rate of faults is bounded by the guest's pace or by
the time each fault takes, whichever is slower, and the faults come one
at a time (one vCPU), so each one's latency is its own.

The machine code is written out by hand, one instruction per line with its
assembly in the comment (checked with ``objdump -D -b binary -m i8086``).
"""

from __future__ import annotations

import struct

from vmferry.live.qemu.guest import BOOT_SECTOR_SIZE, LOAD_ADDRESS, _Asm

#: Linear address of the dword that counts the pages read.
TOUCHES_ADDRESS = 0x0600
#: Where the GDT register image and the GDT sit (the end of the boot sector, before 55 AA).
GDTR_OFFSET = 0x1E0
PIT_HZ = 1193182
LCG_MUL, LCG_ADD = 1664525, 1013904223  # Numerical Recipes' 32-bit LCG (full period)


def _imm16(value: int) -> bytes:
    return struct.pack("<H", value)


def _imm32(value: int) -> bytes:
    return struct.pack("<I", value)


def page_reader_boot_sector(ram_bytes: int, *, hz: int = 1000, pages_per_tick: int = 4,
                            seed: int = 12345) -> bytes:
    """The boot sector of a guest with ``ram_bytes`` of RAM (a power of two, 1 MiB .. 4 GiB) that reads
    ``pages_per_tick`` random pages ``hz`` times a second."""
    if ram_bytes & (ram_bytes - 1) or not 1 << 20 <= ram_bytes <= 1 << 32:
        raise ValueError(f"the guest's RAM must be a power of two from 1 MiB to 4 GiB, not {ram_bytes}")
    divisor = PIT_HZ // hz
    if not 1 <= divisor <= 0xFFFF:
        raise ValueError(f"hz must be in {PIT_HZ // 0xFFFF + 1}..{PIT_HZ}, got {hz}")
    if not 1 <= pages_per_tick <= 0xFFFF:
        raise ValueError(f"pages_per_tick must be in 1..65535, got {pages_per_tick}")
    page_bits = ram_bytes.bit_length() - 1 - 12  # the page number's bits
    gdtr = LOAD_ADDRESS + GDTR_OFFSET
    gdt = gdtr + 8

    a = _Asm(LOAD_ADDRESS)
    a.emit(0xFA)                                  # cli
    a.emit(0x31, 0xC0)                            # xor ax, ax
    a.emit(0x8E, 0xD8)                            # mov ds, ax
    a.emit(0x8E, 0xD0)                            # mov ss, ax
    a.emit(0xBC, _imm16(LOAD_ADDRESS))            # mov sp, 0x7C00
    # --- A20 on (the "fast A20" bit of port 0x92; bit 0 would reset the machine)
    a.emit(0xE4, 0x92)                            # in al, 0x92
    a.emit(0x0C, 0x02)                            # or al, 2
    a.emit(0x24, 0xFE)                            # and al, 0xFE
    a.emit(0xE6, 0x92)                            # out 0x92, al
    # --- unreal mode: load FS from a flat data descriptor in protected mode, then back to real mode
    a.emit(0x0F, 0x01, 0x16, _imm16(gdtr))        # lgdt [gdtr]
    a.emit(0x0F, 0x20, 0xC0)                      # mov eax, cr0
    a.emit(0x0C, 0x01)                            # or al, 1          (PE)
    a.emit(0x0F, 0x22, 0xC0)                      # mov cr0, eax
    a.emit(0xBB, _imm16(0x08))                    # mov bx, 8         (the flat descriptor)
    a.emit(0x8E, 0xE3)                            # mov fs, bx        -> FS limit 4 GiB
    a.emit(0x24, 0xFE)                            # and al, 0xFE
    a.emit(0x0F, 0x22, 0xC0)                      # mov cr0, eax      real mode again
    a.emit(0x31, 0xDB)                            # xor bx, bx
    a.emit(0x8E, 0xE3)                            # mov fs, bx        base 0, the 4 GiB limit stays
    # --- PIT channel 0: rate generator at `hz` (the BIOS's IRQ 0 handler acknowledges each tick)
    a.emit(0xB0, 0x34)                            # mov al, 0x34      (channel 0, lo/hi, mode 2)
    a.emit(0xE6, 0x43)                            # out 0x43, al
    a.emit(0xB8, _imm16(divisor))                 # mov ax, divisor
    a.emit(0xE6, 0x40)                            # out 0x40, al
    a.emit(0x88, 0xE0)                            # mov al, ah
    a.emit(0xE6, 0x40)                            # out 0x40, al
    # --- counter = 0, generator seeded
    a.emit(0x66, 0x31, 0xC0)                      # xor eax, eax
    a.emit(0x66, 0xA3, _imm16(TOUCHES_ADDRESS))   # mov [TOUCHES], eax
    a.emit(0x66, 0xBF, _imm32(seed))              # mov edi, seed
    a.emit(0xFB)                                  # sti

    a.label("tick")
    a.emit(0xF4)                                  # hlt               (until the next PIT interrupt)
    a.emit(0xB9, _imm16(pages_per_tick))          # mov cx, pages_per_tick
    a.label("touch")
    a.emit(0x66, 0x69, 0xFF, _imm32(LCG_MUL))     # imul edi, edi, LCG_MUL
    a.emit(0x66, 0x81, 0xC7, _imm32(LCG_ADD))     # add edi, LCG_ADD
    a.emit(0x66, 0x89, 0xFE)                      # mov esi, edi
    a.emit(0x66, 0xC1, 0xEE, 32 - page_bits)      # shr esi, 32 - page_bits   (the top bits: a page number)
    a.emit(0x66, 0xC1, 0xE6, 12)                  # shl esi, 12               (its address)
    a.emit(0x64, 0x67, 0x8A, 0x06)                # mov al, fs:[esi]
    a.emit(0x66, 0xFF, 0x06, _imm16(TOUCHES_ADDRESS))  # inc dword [TOUCHES]
    a.rel8(0xE2, "touch")                         # loop touch
    a.rel8(0xEB, "tick")                          # jmp tick

    code = a.assemble()
    if len(code) > GDTR_OFFSET:
        raise AssertionError(f"the code is {len(code)} bytes, past the GDT at {GDTR_OFFSET}")
    flat_data = struct.pack("<HHBBBB", 0xFFFF, 0, 0, 0x92, 0xCF, 0)  # base 0, limit 4 GiB, read/write
    tables = struct.pack("<HI", 15, gdt).ljust(8, b"\0") + bytes(8) + flat_data
    sector = code.ljust(GDTR_OFFSET, b"\0") + tables
    return sector.ljust(BOOT_SECTOR_SIZE - 2, b"\0") + b"\x55\xAA"
