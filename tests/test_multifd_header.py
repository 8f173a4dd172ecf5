"""vmferry.encode.multifd.parse_header: the page offsets of a packet header (no QEMU needed; the proxy tests
of tests/test_proxy_channels.py carry real QEMU 7.2 and 10.0 channels through it)."""

from __future__ import annotations

import struct

import pytest

from vmferry.encode import multifd
from vmferry.errors import DecodeError


def ram_header(offsets: list[int], normal: int, page_size: int = 4096, *, number: int = 9, flags: int = 0,
               block: bytes = b"pc.ram") -> bytes:
    """A RAM packet header (QEMU 7.2's layout): ``offsets`` lists the normal pages' offsets, then the zero pages'."""
    h = bytearray(multifd._ram_header_size(page_size))
    struct.pack_into(">III", h, 0, multifd.MAGIC, multifd.VERSION, flags)
    struct.pack_into(">IIIQI", h, 12, multifd.PACKET_BYTES // page_size, normal, normal * page_size, number,
                     len(offsets) - normal)
    h[64:64 + len(block)] = block
    struct.pack_into(f">{len(offsets)}Q", h, 320, *offsets)
    return bytes(h)


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_aligned_offsets_pass(page_size):
    slots = multifd.PACKET_BYTES // page_size
    packet = multifd.parse_header(ram_header([(1 << 40) + i * page_size for i in range(slots)], slots - 2, page_size),
                                  page_size=page_size)
    assert (packet.normal_pages, packet.zero_pages, packet.size, packet.block) == \
        (slots - 2, 2, (slots - 2) * page_size, "pc.ram")


@pytest.mark.parametrize("page_size, bad, low", [(4096, 0, 8), (4096, 127, 0x800), (4096, 126, 1),
                                                 (65536, 7, 0x8000)])
def test_a_misaligned_offset_is_named_with_its_place(page_size, bad, low):
    """The word at fault is found, normal or zero page (the last two are zero pages), however low its bits."""
    slots = multifd.PACKET_BYTES // page_size
    offsets = [i * page_size for i in range(slots)]
    offsets[bad] += low
    with pytest.raises(DecodeError) as e:
        multifd.parse_header(ram_header(offsets, slots - 2, page_size), 1000, page_size=page_size)
    assert e.value.offset == 1000 + 320 + 8 * bad
    assert f"{offsets[bad]:#x} is not page-aligned" in str(e.value)
