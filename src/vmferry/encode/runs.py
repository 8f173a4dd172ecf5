"""Page runs regrouped the same way whatever chunks the input came in (no I/O).

A decoder ends a run of pages (:class:`~vmferry.events.RamPages`,
:class:`~vmferry.events.RamZeros`) where its input chunk ends, so the same
stream read from a mapped file (32 MiB windows) or from a pipe (whatever
each ``read`` returns) gives the same pages cut into different events.  An
encoder that writes one frame or record per event would then write
different bytes for the same stream.

:func:`regroup` undoes that: it joins runs that continue each other (same
block and page size, the next starting where the last ended, the next not
naming its block) and cuts the joined run every ``per`` pages from its
start.  Its output depends only on the pages, never on the chunking, and a
stream written from it regroups to the same cuts when read back.  Page data
is not copied: a :class:`PageGroup` holds the pieces as views, and
:meth:`PageGroup.as_event` joins them only when there is more than one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from ..events import Event, RamPages, RamZeros

__all__ = ["PageGroup", "regroup"]


@dataclass(slots=True)
class PageGroup:
    """``count`` pages of ``block`` from ``offset``, held as contiguous pieces (RamPages events)."""

    block: str
    offset: int
    named: bool
    page_size: int
    parts: list[RamPages] = field(default_factory=list)
    count: int = 0

    def add(self, part: RamPages) -> None:
        self.parts.append(part)
        self.count += part.count

    @property
    def end(self) -> int:
        return self.offset + self.count * self.page_size

    def qemu_records(self) -> list[Any] | None:
        """The pieces as QEMU's own PAGE records (spec §5.1), when every piece came as such."""
        if all(p.legacy is not None for p in self.parts):
            return [p.legacy for p in self.parts]
        return None

    def data(self) -> list[Any]:
        """The page data, ``count * page_size`` bytes in pieces (views where the events had them packed)."""
        out: list[Any] = []
        for p in self.parts:
            if p.data is not None:
                out.append(p.data)
            else:
                out.extend(p.pages())
        return out

    def as_event(self) -> RamPages:
        """One RamPages event of the group (a copy of the page data only when it came in pieces)."""
        if len(self.parts) == 1:
            return self.parts[0]
        return RamPages(self.block, self.offset, self.count, self.named, self.page_size,
                        data=b"".join(self.data()))


def _slice(ev: RamPages, i: int, n: int) -> RamPages:
    """Pages ``i .. i+n-1`` of a run, as a run of their own (views, no copy)."""
    if i == 0 and n == ev.count:
        return ev
    ps = ev.page_size
    named = ev.named and i == 0
    if ev.data is not None:
        return RamPages(ev.block, ev.offset + i * ps, n, named, ps, data=memoryview(ev.data)[i * ps:(i + n) * ps])
    assert ev.legacy is not None
    begin = 0 if i == 0 else ev.page_start(i) - 8
    return RamPages(ev.block, ev.offset + i * ps, n, named, ps,
                    legacy=memoryview(ev.legacy)[begin:ev.page_start(i + n - 1) + ps])


def _join_zeros(a: RamZeros, b: RamZeros) -> RamZeros:
    fill = None
    if a.fill is not None or b.fill is not None:
        fill = (a.fill if a.fill is not None else bytes(a.count)) + (b.fill if b.fill is not None else bytes(b.count))
    return RamZeros(a.block, a.offset, a.count + b.count, a.named, a.page_size, fill)


def regroup(events: Iterable[Event], per: Callable[[int], int] | int) -> Iterator[Event | PageGroup]:
    """``events`` with every run of pages as :class:`PageGroup` s of ``per`` pages (the last of a run fewer)
    and every run of zero pages as one :class:`RamZeros`, however the decoder had cut them.

    ``per`` is a number of pages, or a function of the page size giving it.
    """
    def size(page_size: int) -> int:
        return per(page_size) if callable(per) else per

    group: PageGroup | None = None
    zeros: RamZeros | None = None
    for ev in events:
        if isinstance(ev, RamPages):
            if zeros is not None:
                yield zeros
                zeros = None
            if group is not None and not (not ev.named and ev.block == group.block
                                          and ev.page_size == group.page_size and ev.offset == group.end):
                yield group
                group = None
            limit = max(1, size(ev.page_size))
            i = 0
            while i < ev.count:
                if group is None:
                    group = PageGroup(ev.block, ev.offset + i * ev.page_size, ev.named and i == 0, ev.page_size)
                n = min(limit - group.count, ev.count - i)
                group.add(_slice(ev, i, n))
                i += n
                if group.count >= limit:
                    yield group
                    group = None
            continue
        if group is not None:
            yield group
            group = None
        if isinstance(ev, RamZeros):
            if zeros is not None:
                if (not ev.named and ev.block == zeros.block and ev.page_size == zeros.page_size
                        and ev.offset == zeros.offset + zeros.count * zeros.page_size):
                    zeros = _join_zeros(zeros, ev)
                    continue
                yield zeros
            zeros = ev
            continue
        if zeros is not None:
            yield zeros
            zeros = None
        yield ev
    if group is not None:
        yield group
    if zeros is not None:
        yield zeros
