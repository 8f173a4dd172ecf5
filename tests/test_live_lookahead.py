"""A live decoder hands on every record without waiting for bytes the source has not sent yet.

With multifd, QEMU's main channel is nearly silent: the header, the
configuration and the RAM setup section (ended by EOS) come in one flush,
and the source sends more only once its multifd channels have been drained,
which the destination does only after loading that EOS.  A proxy that
waited for a few KiB more, or for the byte after the EOS (is it a section
footer?), before passing the records on would wait forever; it did, with
a random-RAM guest (benchmarks/proxy.py --multifd).  Here a real QEMU
stream is cut where the source pauses (just after that EOS), and the pause
(an empty chunk) must reach the consumer as a Flush after those records
before the decoder asks for anything more.  (The decoder may need one byte
after a device state, to see whether a subsection follows: QEMU sends the
next record in the same flush.)
"""

from __future__ import annotations

from typing import Callable, Iterator

from vmferry.encode import legacy
from vmferry.events import Configuration, Event, Flush, RamEos


def _end_of(data: bytes, events: list[Event], first: Callable[[Event], bool]) -> int:
    """The stream offset just past the first event ``first`` picks (the events re-encoded up to it)."""
    i = next(i for i, ev in enumerate(events) if first(ev))
    prefix = b"".join(bytes(c) for c in legacy.encode(events[:i + 1]))
    assert data.startswith(prefix)
    return len(prefix)


def _paused_at(data: bytes, cut: int, seen: list[Event], wanted: Callable[[list[Event]], bool]) -> Iterator[bytes]:
    yield data[:cut]
    yield b""  # the source pauses until the destination has loaded what it sent
    assert wanted(seen), f"the decoder asked for more before handing on what came: {seen[-3:]}"
    yield data[cut:]


def _flushed_after(kind: type) -> Callable[[list[Event]], bool]:
    def check(seen: list[Event]) -> bool:
        at = [i for i, ev in enumerate(seen) if isinstance(ev, kind)]
        return bool(at) and any(isinstance(ev, Flush) for ev in seen[at[0] + 1:])
    return check


def test_the_records_up_to_the_first_eos_pass_before_more_is_read(qemu_corpus) -> None:
    data = qemu_corpus["pc-7.2-running"].read_bytes()
    events = list(legacy.decode([data]))
    cut = _end_of(data, events, lambda ev: isinstance(ev, RamEos))
    assert cut < 4096  # less than the decoder used to read ahead for the configuration
    seen: list[Event] = []
    for ev in legacy.decode(_paused_at(data, cut, seen, _flushed_after(RamEos)), legacy.DecodeOptions(live=True)):
        seen.append(ev)
    assert any(isinstance(ev, Configuration) for ev in seen)
    assert b"".join(bytes(c) for c in legacy.encode(seen)) == data
