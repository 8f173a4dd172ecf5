"""Pages repeated inside a ferry GROUP, sent as copies of earlier pages (docs/format.md §2.5; no I/O).

Within a GROUP frame the pages carried by its PAGES frames are numbered from
0 in order.  A PAGES frame with the *copies* flag names, for some of its
pages, the number of an earlier page of the same GROUP that it equals, and
carries only the data of the others.  The reader needs nothing beyond the
group it holds anyway: references never leave the group.

:class:`GroupPages` is the writer's side (which pages of a run repeat a page
of the open group, found by their BLAKE2b digests); :func:`table_length`,
:func:`read_table` and :func:`rebuild` are the reader's (the run's page data
rebuilt, every number and length checked before anything is allocated).
"""

from __future__ import annotations

import struct
from hashlib import blake2b
from typing import Any, Callable

from ..errors import DecodeError

__all__ = ["ENTRY", "MAX_REPEATED", "GroupPages", "pack_copies", "read_table", "rebuild", "table_length"]

MAX_REPEATED = 64 << 20  # bytes of pages the copies of one GROUP may repeat, at most (§2.5)
ENTRY = struct.Struct(">II")  # the page's index in its run, the number of the earlier page it repeats
_COUNT = struct.Struct(">I")


class GroupPages:
    """The writer's record of the pages of the open GROUP: the number of each distinct page, by its BLAKE2b
    digest (256 bits: two different pages never share one in practice, and no page bytes are kept)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0  # pages numbered so far in the open group
        self.repeated = 0  # bytes of pages its copies repeat
        self._numbers: dict[bytes, int] = {}

    def split(self, pages: list[Any]) -> list[tuple[int, int]]:
        """Number the pages of a run and return its copies: (index in the run, number of the earlier page of the
        group it equals).  Pages that repeat no earlier page are remembered; a repeat that would take the group's
        copies over :data:`MAX_REPEATED` is carried."""
        copies: list[tuple[int, int]] = []
        numbers = self._numbers
        for i, page in enumerate(pages):
            key = blake2b(page, digest_size=32).digest()
            ref = numbers.get(key)
            if ref is None:
                numbers[key] = self.count + i
            elif self.repeated + len(page) <= MAX_REPEATED:
                copies.append((i, ref))
                self.repeated += len(page)
        self.count += len(pages)
        return copies


def pack_copies(copies: list[tuple[int, int]]) -> bytes:
    """The copy table of a PAGES frame: its length, then (index, number) for each copy."""
    return _COUNT.pack(len(copies)) + b"".join(ENTRY.pack(i, ref) for i, ref in copies)


def stretches(count: int, copied: set[int]) -> list[tuple[int, int]]:
    """The maximal stretches ``[first, end)`` of a run's pages that are carried (not copies)."""
    out: list[tuple[int, int]] = []
    first = None
    for i in range(count + 1):
        carried = i < count and i not in copied
        if carried and first is None:
            first = i
        elif not carried and first is not None:
            out.append((first, i))
            first = None
    return out


def table_length(tail: Any, count: int, at: int, path: str) -> tuple[int, int]:
    """How many copies a PAGES frame names (``tail``: its body after the run header) and the length of its copy
    table."""
    if len(tail) < _COUNT.size:
        raise DecodeError("PAGES frame too short for its copy table", at, path)
    (k,) = _COUNT.unpack_from(tail, 0)
    if not 1 <= k <= count:
        raise DecodeError(f"PAGES frame of {count} pages names {k} copies", at, path)
    return k, _COUNT.size + k * ENTRY.size


def read_table(tail: Any, k: int, count: int, ps: int, known: int, budget: int, at: int,
               path: str) -> dict[int, int]:
    """The ``k`` copies of a run of ``count`` pages (whose frame has the length its tables say): page index ->
    number of the page of the group it repeats.  ``known`` pages of the group came before the run; ``budget``
    is how many bytes of copies the group may still hand out."""
    if k * ps > budget:
        raise DecodeError(f"the copies of a GROUP repeat more than {budget} bytes of pages", at, path)
    refs: dict[int, int] = {}
    last = -1
    for j in range(k):
        index, ref = ENTRY.unpack_from(tail, _COUNT.size + j * ENTRY.size)
        if index <= last or index >= count:
            raise DecodeError(f"copy {j} names page {index} of a run of {count} (indexes must ascend)", at, path)
        if ref >= known + index:
            raise DecodeError(f"page {index} repeats page {ref} of its GROUP, which has carried only "
                              f"{known + index} pages before it", at, path)
        refs[index] = ref
        last = index
    return refs


def rebuild(data: Any, count: int, ps: int, refs: dict[int, int], table: list[memoryview],
            unfilter: Callable[[Any, int], bytes] | None, at: int, path: str) -> memoryview:
    """The page data of a run from the pages it carries (``data``, in order) and its copies (``refs``, from
    :func:`read_table`).  ``table`` holds the pages of the group so far (this run's are appended);
    ``unfilter(data, index)`` undoes the x86 filter of a stretch of carried pages starting at page ``index``."""
    out = bytearray(count * ps)
    pos = 0
    for first, end in stretches(count, set(refs)):
        piece = data[pos:pos + (end - first) * ps]
        out[first * ps:end * ps] = piece if unfilter is None else unfilter(piece, first)
        pos += (end - first) * ps
    view = memoryview(out)
    base = len(table)
    for i in range(count):
        ref = refs.get(i)
        if ref is not None:
            source = table[ref]
            if len(source) != ps:
                raise DecodeError(f"page {i} of {ps} bytes repeats page {ref} of {len(source)} bytes", at, path)
            view[i * ps:(i + 1) * ps] = source
        table.append(view[i * ps:(i + 1) * ps])
    assert len(table) == base + count
    return view.toreadonly()
