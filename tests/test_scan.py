"""vmferry.encode.scan: the expected address words of RAM records, and the templates it keeps for them."""

from __future__ import annotations

import struct

import pytest

from vmferry.encode import legacy, scan
from vmferry.events import RAM_CONTINUE, RAM_ZERO, RamZeros

PAGE_SIZES = [1 << s for s in range(22)]  # 1 B .. 2 MiB: every power of two an event can carry up to QEMU's largest


def _naive_zero_records(offset: int, ps: int, n: int) -> bytes:
    return b"".join(struct.pack(">QB", (offset + i * ps) | RAM_ZERO | RAM_CONTINUE, 0) for i in range(n))


def test_the_kept_templates_stay_small_whatever_the_page_sizes() -> None:
    """The fuzz run's workers grew by 128 MiB and then 64 MiB and kept it: mutated events with a page size of
    1 and 2 bytes, encoded as QEMU's stream, had each left a template of a word per page of a 16 MiB segment
    (16 MiB / page size * 8 bytes) in the module's cache.  Whatever page sizes and flags come by, what the
    cache keeps stays within 16 templates of 128 KiB (the template of the smallest page size a decoder
    accepts, 1 KiB), and every zero run still encodes to its records (where they mean something: the flags
    lie in the low 6 bits of the address word, below any page size from 64 bytes up)."""
    scan._TEMPLATES.clear()
    for ps in PAGE_SIZES:
        for offset in (0, 7 * ps, (1 << 24) + 3 * ps):
            ev = RamZeros("pc.ram", offset, 3, False, ps)
            buf = bytearray()
            legacy.encode_event(buf, ev)
            if ps >= 64:
                assert bytes(buf) == _naive_zero_records(offset, ps, 3), (ps, offset)
            held = [len(t) for t in scan._TEMPLATES.values()]
            assert max(held, default=0) <= 128 << 10, (ps, sorted(held)[-3:])
            assert sum(held) <= 16 * (128 << 10), (ps, sum(held))


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_expected_words_at_every_page_size(ps: int) -> None:
    """Across a 16 MiB segment boundary and at the top of the 64-bit space, from the template or without one."""
    for first, n in (((1 << 24) - 2 * ps + 0x28 % ps, 5), ((1 << 64) - 3 * ps + 8 % ps, 3), (0x22 % ps, 4)):
        want = b"".join(struct.pack(">Q", first + i * ps) for i in range(n))
        assert scan.expected_words(first, ps, n) == want, (ps, hex(first))
