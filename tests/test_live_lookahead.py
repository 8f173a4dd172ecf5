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
before the decoder asks for anything more; the same for a ferry wire
between two proxies.  (The decoder may need one byte after a device
state, to see whether a subsection follows: QEMU sends the next record in
the same flush.)
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, Iterator

from vmferry.encode import ferry, legacy
from vmferry.events import Configuration, Event, Flush, RamEos
from vmferry.live.proxy import _ferry_chunks, _ferry_events
from vmferry.live.transport import SocketStream


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


def test_a_ferry_frame_passes_before_the_next_one_comes(qemu_corpus) -> None:
    """The receiving proxy of a ferry wire hands on the frame with that EOS while the sender pauses after it
    (it used to read each frame's body together with the next frame's header)."""
    data = qemu_corpus["pc-7.2-running"].read_bytes()
    events = list(legacy.decode([data]))
    whole = b"".join(bytes(c) for c in ferry.encode(events))
    upto = next(i for i, ev in enumerate(events) if isinstance(ev, RamEos))
    prefix = b"".join(bytes(c) for c in ferry.encode(events[:upto + 1]))
    cut = ferry.HEADER_LEN  # where the prefix's END frame starts: the same frames as the whole stream's before it
    while not (extent := ferry.frame_extent(prefix[cut:cut + ferry.FRAME_HEADER_LEN]))[1]:  # type: ignore[index]
        cut += ferry.FRAME_HEADER_LEN + extent[0]  # type: ignore[index]
    assert whole[:cut] == prefix[:cut]

    passed = threading.Event()
    waited: list[bool] = []
    a, b = socket.socketpair()

    def sender() -> None:
        a.sendall(whole[:cut])
        waited.append(passed.wait(10))  # the source pauses until the destination has loaded the EOS
        a.sendall(whole[cut:])
        a.close()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    seen: list[Event] = []
    stream = SocketStream(b, "test")
    for ev in _ferry_events(_ferry_chunks(stream, b"", 1 << 20), ferry.DecodeOptions(legacy_records=True)):
        seen.append(ev)
        if isinstance(ev, Flush) and _flushed_after(RamEos)(seen):
            passed.set()
    thread.join(10)
    b.close()
    assert waited == [True], "the EOS frame was held back until the next frame came"
    assert b"".join(bytes(c) for c in legacy.encode(seen)) == data
