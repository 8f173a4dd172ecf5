"""Checking many QEMU RAM record headers at once (no I/O).

The records of a page run lie at a fixed stride: an 8-byte big-endian
address word (offset | flags) and the page, or, for a zero page, the word and
one fill byte.  :func:`leading_pages` and :func:`leading_zeros` say how many
consecutive records from a position carry the address words ``first, first +
page size, ...`` (and, for zero pages, a zero fill byte).  They read the
headers in one C-level pass (a strided view over the buffer, so the page data
in between is never touched: on a mapped file it is never even read from the
page cache) and compare them with the expected words in one comparison; only
where a run ends does a binary search find the record that differs.
"""

from __future__ import annotations

from array import array

_LITTLE = array("H", [1]).tobytes() == b"\x01\x00"  # the machine's byte order (no sys here: a pure layer)
_MAX_WORD = (1 << 64) - 1


_SEGMENT = 1 << 24  # words are built per 16 MiB-aligned segment from a template of one segment's low 3 bytes
#: The smallest page size a template is made for: a template holds a word per page of a segment, 128 KiB at
#: this page size (the smallest any decoder accepts: limits.MIN_PAGE_SIZE), 128 MiB at a page size of 1.
#: Smaller page sizes (only an API caller's events can carry one) get their words built directly.
_TEMPLATE_MIN_PAGE = 1 << 10
_TEMPLATES_KEPT = 16  # at most 16 templates of at most 128 KiB: 2 MiB, whatever the inputs
_TEMPLATES: dict[tuple[int, int], bytes] = {}


def _template(ps: int, flags: int) -> bytes:
    """Big-endian words ``t * ps | flags`` for every page ``t`` of one segment."""
    found = _TEMPLATES.get((ps, flags))
    if found is None:
        if len(_TEMPLATES) >= _TEMPLATES_KEPT:
            _TEMPLATES.clear()
        found = _TEMPLATES[(ps, flags)] = _array_words(flags, ps, _SEGMENT // ps)
    return found


def _array_words(first: int, step: int, n: int) -> bytes:
    words = array("Q", range(first, first + n * step, step))
    if _LITTLE:
        words.byteswap()
    return words.tobytes()


def expected_words(first: int, ps: int, n: int) -> bytes:
    """The big-endian 64-bit words ``first, first + ps, ...`` (``n`` of them, all below 2**64).

    For a power-of-two page size from 1 KiB up to 16 MiB (``first`` being a page offset plus flags below ``ps``)
    they are cut from a cached template, one 16 MiB segment at a time, with the segment's high bytes filled in: a
    few C-level copies instead of one Python integer per page.  Other page sizes get theirs one by one: a
    template for a page size under 1 KiB would cost 128 KiB * 1024 / ``ps`` (kept for later calls), whatever
    ``n``.
    """
    flags = first % ps
    if ps & (ps - 1) or ps > _SEGMENT or ps < _TEMPLATE_MIN_PAGE:
        return _array_words(first, ps, n)
    template = _template(ps, flags)
    per = _SEGMENT // ps
    out = bytearray()
    addr = first - flags
    while n > 0:
        segment = addr & ~(_SEGMENT - 1)
        t = (addr - segment) // ps
        take = min(n, per - t)
        piece = bytearray(template[t * 8:(t + take) * 8])
        high = segment.to_bytes(8, "big")
        for c in range(5):  # bytes 0..4 hold bits 24..63: the segment's, the same for every word
            if high[c]:
                piece[c::8] = high[c:c + 1] * take
        out += piece
        addr += take * ps
        n -= take
    return bytes(out)


def common_units(a: bytes, b: bytes, unit: int) -> int:
    """How many leading ``unit``-byte units of ``a`` and ``b`` (equal lengths) are equal."""
    if a == b:
        return len(a) // unit
    lo, hi = 0, len(a) // unit  # a and b agree on lo units and differ within hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo * unit:mid * unit] == b[lo * unit:mid * unit]:
            lo = mid
        else:
            hi = mid
    return lo


def _bytes_view(view: memoryview) -> memoryview:
    return view if view.format == "B" else view.cast("B")


def _bounded(first: int, ps: int, n: int) -> int:
    """``n``, or fewer if the words would leave 64 bits (such records cannot match)."""
    if first > _MAX_WORD:
        return 0
    return min(n, (_MAX_WORD - first) // ps + 1)


FIRST_PROBE = 64  # records checked first; each further probe doubles, so a short run costs little in a long buffer


def _leading(check, n: int) -> int:
    """Run ``check(done, k)`` (how many of the next ``k`` records match) over probes of doubling size."""
    done = 0
    k = min(n, FIRST_PROBE)
    while k > 0:
        m = check(done, k)
        done += m
        if m < k:
            break
        k = min(n - done, 2 * k)
    return done


def leading_pages(view: memoryview, pos: int, n: int, step: int, first: int, ps: int) -> int:
    """How many of the ``n`` records at ``pos``, ``pos + step``, ... begin with the words ``first, first + ps, ...``.

    ``step`` is a page record's length (8 + page size); the caller makes sure ``n`` records fit in ``view``.
    """
    n = _bounded(first, ps, n)
    view = _bytes_view(view)

    def check(done: int, k: int) -> int:
        at = pos + done * step
        if step % 8:
            got = b"".join(view[p:p + 8] for p in range(at, at + k * step, step))
        else:
            # The words as raw bytes, one per record: a strided view of 8-byte items, copied out in one pass.
            got = view[at:at + k * step].cast("Q")[::step // 8].tobytes()
        return common_units(got, expected_words(first + done * ps, ps, k), 8)

    return _leading(check, n)


def leading_zeros(view: memoryview, pos: int, n: int, first: int, ps: int) -> int:
    """How many of the ``n`` zero-page records (9 bytes each) at ``pos`` carry ``first, first + ps, ...`` and fill 0."""
    n = _bounded(first, ps, n)
    view = _bytes_view(view)

    def check(done: int, k: int) -> int:
        words = expected_words(first + done * ps, ps, k)
        want = bytearray(9 * k)  # fill bytes stay 0
        for c in range(8):
            want[c::9] = words[c::8]
        at = pos + done * 9
        return common_units(view[at:at + 9 * k].tobytes(), bytes(want), 9)

    return _leading(check, n)


def zero_records(first: int, ps: int, n: int, fill: bytes | None = None) -> bytes:
    """``n`` zero-page records (word, fill byte) with the words ``first, first + ps, ...`` (below 2**64), built
    with a few C-level copies; ``fill`` holds their fill bytes (all 0 when None)."""
    words = expected_words(first, ps, n)
    out = bytearray(9 * n)
    for c in range(8):
        out[c::9] = words[c::8]
    if fill is not None:
        out[8::9] = fill
    return bytes(out)
