"""The live transcoder: a migration stream decoded, transformed and re-encoded in flight.

A :class:`Proxy` listens where a QEMU migrates to (``unix:``/``tcp:``/``tls:``),
reads the incoming stream as it arrives (QEMU's own format or ``ferry``,
told apart by the first bytes), optionally converts the device state to
another machine type with :mod:`vmferry.compat`, and writes it on to
``forward`` in QEMU's format (for a destination QEMU's ``migrate-incoming``)
or in ``ferry`` (for a second proxy near the destination).

RAM flows through as views of the received chunks, never copied per page;
between two plain sockets with QEMU's format in and out, page runs do not
pass through the proxy's memory at all (:mod:`vmferry.live.splice`).  QEMU's
device sections are held by the decoder until the vmdesc at the end of the
stream describes them.  When either side fails the proxy closes both, so
the source QEMU sees its migration fail and keeps its guest running, and the
destination QEMU sees a truncated stream and refuses it.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..caps import Cap
from ..encode import ferry, legacy
from ..encode import return_path as rp
from ..errors import DecodeError, FerryError, TransportError
from ..events import CMD_PACKAGED, Command, Event, Flush, RamMemSize
from ..serialize.schema import SchemaSet
from .channels import ChannelStats, Renames, classify, relay_multifd, relay_ram_records, relay_return_path
from .splice import PipedInput, can_splice, write_legacy
from .transport import CHUNK, ByteStream, Listener, TlsOptions, connect, listen, parse_uri

WIRES = ("legacy", "ferry")

#: QEMU capabilities a proxy carries (docs/proxy.md has the table of every capability of QEMU 7.2 and 10.0,
#: and why the others are not).  ``migrate --via-proxy`` switches every other one off.
QEMU_CAPABILITIES = frozenset({"events", "auto-converge", "late-block-activate", "validate-uuid", "return-path",
                               "multifd", "xbzrle", "compress", "switchover-ack", "postcopy-ram",
                               "postcopy-preempt"})


def capabilities() -> Cap:
    """The mask a proxy offers to the proxy at the other end of a ferry wire: ferry and its installed features."""
    return Cap.CODEC_FERRY | ferry.available_caps()


class ProxyError(FerryError):
    """The proxied migration failed; both sides have been closed."""


@dataclass
class ProxyStats:
    """What one proxied migration carried: the main channel's totals, and every channel's own."""

    input_format: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_spliced: int = 0  # of bytes_out, page runs spliced from socket to socket
    error: str | None = None
    done: bool = False
    phase: str = "waiting"  # waiting, precopy, postcopy, completed, failed
    destination_status: int | None = None  # SHUT's value on the return path (0: loaded; None: none came)
    channels: list[ChannelStats] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"input_format": self.input_format, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "bytes_spliced": self.bytes_spliced, "error": self.error, "done": self.done, "phase": self.phase,
                "destination_status": self.destination_status,
                "channels": [c.as_dict() for c in self.channels]}


def _sniff(stream: ByteStream, head: bytes) -> tuple[str, bytes]:
    """The main channel's format (``legacy`` or ``ferry``) and its first 8 bytes (``head`` read already)."""
    while len(head) < 8:
        data = stream.read(8 - len(head))
        if not data:
            break
        head += data
    if legacy.sniff(head):
        return "legacy", head
    if ferry.sniff(head):
        return "ferry", head
    raise ProxyError(f"{stream.name}: neither a QEMU migration stream nor a ferry stream "
                     f"(starts with {head.hex() or 'nothing'})")


def _ferry_chunks(stream: ByteStream, head: bytes, size: int) -> Iterator[bytes | memoryview]:
    """A ferry stream read a frame at a time: each chunk is one frame's body and the next frame's header,
    so no body spans two chunks and the decoder joins nothing (a spanning body would be copied whole); when
    the sender pauses after a frame, the body comes alone, then an empty chunk, then the next header.
    At a header that does not check out, the rest comes in plain chunks and the decoder says what is wrong."""
    first = head + stream.read_exact(ferry.HEADER_LEN - len(head) + ferry.FRAME_HEADER_LEN, "the ferry header")
    yield first
    frame_head: bytes | memoryview = first[-ferry.FRAME_HEADER_LEN:]
    while (extent := ferry.frame_extent(frame_head)) is not None:
        body, last = extent
        if not stream.ready():
            yield b""  # nothing more now: the writers flush (a postcopy page must not wait in a batch)
        buf = memoryview(bytearray(body if last else body + ferry.FRAME_HEADER_LEN))
        stream.read_into_exact(buf[:body], "a ferry frame")
        if not last and not stream.ready():
            # The sender paused after this frame (QEMU waits for the destination to load it, e.g. multifd's
            # sync after a RAM section's EOS): hand it on now, not once the next frame's header has come.
            yield buf[:body].toreadonly()
            yield b""
            frame_head = stream.read_exact(ferry.FRAME_HEADER_LEN, "a ferry frame header")
            yield frame_head
            continue
        stream.read_into_exact(buf[body:], "a ferry frame")
        chunk = buf.toreadonly()  # read-only: the decoder keeps views instead of copying
        yield chunk
        if last:
            return
        frame_head = chunk[-ferry.FRAME_HEADER_LEN:]
    yield from stream.chunks(size, idle_markers=True)


def _ferry_events(chunks: Iterable[bytes | memoryview], options: ferry.DecodeOptions) -> Iterator[Event]:
    """Like :func:`vmferry.encode.ferry.decode`, but done at the END frame without waiting for the
    sender to close: TLS has no half-close, so the sending proxy cannot say where the stream ends."""
    dec = ferry.FerryDecoder(options)
    try:
        for chunk in chunks:
            if not chunk:
                yield Flush()
                continue
            dec.feed(chunk)
            while True:
                ev = dec.next_event()
                if ev is ferry.DONE:
                    return
                if ev is ferry.NEED_DATA:
                    break
                yield ev
        dec.feed_eof()
        while (ev := dec.next_event()) is not ferry.DONE:
            yield ev
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), dec.offset, "$") from None


def transcode_events(chunks: Iterable[bytes | memoryview], input_format: str, wire: str = "legacy",
                     machine: str | None = None, from_machine: str | None = None, *,
                     observe: Callable[[Event], None] | None = None,
                     schema: SchemaSet | None = None) -> Iterator[Event]:
    """The events of the input ``chunks`` of ``input_format``, converted to ``machine`` (to be written as
    ``wire``); ``observe`` sees every event as it arrives (before the transforms).

    ``schema`` describes the source's devices for a postcopy migration, whose device state comes in a
    PACKAGED command with no vmdesc to read it by; without it that state travels undecoded (and cannot be
    converted to another machine type)."""
    if wire not in WIRES:
        raise ProxyError(f"unknown wire format {wire!r} (known: {', '.join(WIRES)})")
    events: Iterable[Event]
    if input_format == "legacy":
        events = legacy.decode(chunks, legacy.DecodeOptions(live=True, fallback_schemas=schema))
    else:
        events = _ferry_events(chunks, ferry.DecodeOptions(keep_unknown=wire != "legacy",
                                                           legacy_records=wire == "legacy"))
        if schema is not None:
            events = _unpacked(events, schema)
    if observe is not None:
        events = _observed(events, observe)
    if machine:
        from ..compat import qemu_registry, transform_events

        registry = qemu_registry()
        registry.release(machine)
        if from_machine:
            registry.release(from_machine)
        events = transform_events(events, registry, machine, from_machine)
    return iter(events)


def transcode(chunks: Iterable[bytes | memoryview], input_format: str, wire: str = "legacy",
              machine: str | None = None, from_machine: str | None = None, *, compress: str = "none",
              observe: Callable[[Event], None] | None = None) -> Iterator[bytes | memoryview]:
    """The output chunks for the input ``chunks`` of ``input_format``, re-encoded as ``wire``.

    ``compress`` applies to a ferry wire; ``observe`` sees every event as it arrives (before the transforms).
    """
    events = transcode_events(chunks, input_format, wire, machine, from_machine, observe=observe)
    return legacy.encode(events) if wire == "legacy" else ferry.encode(events, compress=compress)


def _unpacked(events: Iterable[Event], schema: SchemaSet) -> Iterator[Event]:
    """``events``, a PACKAGED command that came undecoded decoded with ``schema``."""
    for ev in events:
        yield legacy.unpack(ev, schema) if isinstance(ev, Command) and ev.packaged_raw is not None else ev


def _observed(events: Iterable[Event], observe: Callable[[Event], None]) -> Iterator[Event]:
    for ev in events:
        observe(ev)
        yield ev


@dataclass
class Proxy:
    """One proxied migration: ``bind()``, then ``run()`` (or ``start()`` for a thread).

    ``listen_uri`` is where the source (a QEMU or another proxy) connects;
    ``forward_uri`` is where the re-encoded stream goes (a destination QEMU's
    ``migrate-incoming`` URI, or another proxy's listen URI).  ``machine``
    converts the device state to that machine type; ``wire`` is the output
    format (``compress`` its compression when it is ferry); ``observe`` sees
    every event received (e.g. a :class:`vmferry.cli.summary.StreamSummary`'s ``add``).
    """

    listen_uri: str
    forward_uri: str
    machine: str | None = None
    wire: str = "legacy"
    from_machine: str | None = None
    compress: str = "none"
    observe: Callable[[Event], None] | None = None
    tls: TlsOptions | None = None
    schema: SchemaSet | None = None  # the source's devices, for postcopy's device state (see transcode_events)
    renames: dict[str, str] | None = None  # RAM block renames of an earlier proxy, for a postcopy recovery
    accept_timeout: float | None = None
    connect_timeout: float = 30.0
    chunk_size: int = CHUNK
    drain_timeout: float = 60.0
    on_done: Callable[[ProxyStats], None] | None = None
    stats: ProxyStats = field(default_factory=ProxyStats)
    _listener: Listener | None = field(default=None, repr=False)
    _streams: list[ByteStream] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _renames: Renames = field(default_factory=lambda: Renames({}), repr=False)
    _failure: BaseException | None = field(default=None, repr=False)
    _main_done: threading.Event = field(default_factory=threading.Event, repr=False)
    _blocks_in: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.wire not in WIRES:
            raise ProxyError(f"unknown wire format {self.wire!r} (known: {', '.join(WIRES)})")
        if self.compress not in ferry.COMPRESSIONS or (self.compress != "none" and self.wire != "ferry"):
            raise ProxyError(f"compression {self.compress!r}: choose one of {', '.join(ferry.COMPRESSIONS)}, "
                             "and only for a ferry wire")
        listen_addr = parse_uri(self.listen_uri, self.tls)
        forward_addr = parse_uri(self.forward_uri, self.tls)
        for what, addr in (("--listen", listen_addr), ("--forward", forward_addr)):
            if not addr.is_socket:
                raise ProxyError(f"{what} {addr}: the proxy needs a unix:, tcp: or tls: URI")
        if self.machine:  # an unknown machine type fails before anyone connects
            from ..compat import qemu_registry

            registry = qemu_registry()
            registry.release(self.machine)
            if self.from_machine:
                registry.release(self.from_machine)

    # ------------------------------------------------------------------ life cycle

    def bind(self) -> Proxy:
        """Start listening (the source may connect from now on)."""
        if self._listener is None:
            self._listener = listen(parse_uri(self.listen_uri, self.tls))
        return self

    @property
    def uri(self) -> str:
        """The listen URI (with the real port when ``tcp:...:0`` was asked for)."""
        return self.bind()._listener.uri  # type: ignore[union-attr]

    def run(self) -> ProxyStats:
        """Accept one source, carry its stream to ``forward``; raises :class:`ProxyError` on failure."""
        self.bind()
        try:
            self._run()
        except (FerryError, OSError) as e:
            first = self._failure or e  # a channel's failure, not what closing the others then caused
            self.stats.error = str(first)
            self.abort()
            if isinstance(first, ProxyError):
                raise first from None
            raise ProxyError(f"proxy {self.listen_uri} -> {self.forward_uri}: {first}") from None
        except BaseException as e:
            self.stats.error = f"{type(e).__name__}: {e}"
            self.abort()
            raise
        finally:
            self._close_listener()
            if self.on_done is not None:
                self.on_done(self.stats)
        return self.stats

    def start(self) -> threading.Thread:
        """Bind, then :meth:`run` in a daemon thread (failures land in ``stats.error``)."""
        self.bind()

        def target() -> None:
            try:
                self.run()
            except BaseException:  # noqa: BLE001 - recorded in stats.error
                pass

        self._thread = threading.Thread(target=target, name=f"vmferry-proxy {self.listen_uri}", daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> ProxyStats:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.stats

    def abort(self) -> None:
        """Close both sides at once (the source QEMU's migration fails; its guest keeps running)."""
        with self._lock:
            self._closed = True
            streams, self._streams = self._streams, []
        for s in streams:
            s.abort()
        self._close_listener()

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:  # noqa: BLE001 - closing must not fail
                pass

    def _track(self, stream: ByteStream) -> ByteStream:
        with self._lock:
            if self._closed:
                stream.abort()
                raise ProxyError("the proxy was closed")
            self._streams.append(stream)
        return stream

    # ------------------------------------------------------------------ the channels

    def _run(self) -> None:
        """Accept the main channel, then every further channel until the main one is done; carry each in a
        thread of its own, its destination connection opened at once, in the order the source's arrive."""
        assert self._listener is not None
        if self.renames is not None:
            self._renames = Renames(self.renames)
        elif self.machine:
            self._renames = Renames()  # known once the main channel has seen the RAM blocks
        threads = [self._open_channel(self._listener.accept(self.accept_timeout, cancelled=lambda: self._closed))]
        while not self._main_done.is_set() and not self._closed:
            try:
                source = self._listener.accept(0.2, cancelled=lambda: self._closed or self._main_done.is_set())
            except TransportError:
                continue  # nobody yet: look again, until the main channel is done
            threads.append(self._open_channel(source))
        self._close_listener()
        for thread in threads:
            while thread.is_alive() and self._failure is None:
                thread.join(0.2)
        if self._failure is not None:
            raise self._failure
        main = self.stats.channels[0]
        self.stats.bytes_in, self.stats.bytes_out = main.bytes_in, main.bytes_out
        self.stats.phase = "completed"
        self.stats.done = True

    def _open_channel(self, source: ByteStream) -> threading.Thread:
        self._track(source)
        number = len(self.stats.channels)
        stats = ChannelStats(number, source=source)
        self.stats.channels.append(stats)
        dest = self._track(connect(parse_uri(self.forward_uri, self.tls), timeout=self.connect_timeout))
        thread = threading.Thread(target=self._carry, args=(number, source, dest, stats),
                                  name=f"vmferry-proxy channel {number}", daemon=True)
        thread.start()
        return thread

    def _alive(self) -> bool:
        return not self._closed

    def _carry(self, number: int, source: ByteStream, dest: ByteStream, stats: ChannelStats) -> None:
        try:
            first = b""
            while len(first) < 4:
                data = source.read(4 - len(first))
                if not data:
                    break
                first += data
            if first and number and classify(first, number) == "unknown":
                first += source.read_exact(8 - len(first), "the first bytes of a channel")
            stats.kind = classify(first, number) if first else "empty"
            if stats.kind == "unknown" or (number == 0 and not stats.kind.startswith("main")):
                what = "the main channel" if number == 0 else "a multifd channel (11223344) or postcopy pages"
                raise DecodeError(f"the channel starts with {first.hex()}: not {what}", 0, f"$.channel[{number}]")
            if stats.kind.startswith("main"):
                self._carry_main(first, source, dest, stats)
            else:
                if stats.kind == "multifd":
                    relay_multifd(first, source, dest, stats, self._renames, self._alive)
                elif stats.kind == "preempt":
                    relay_ram_records(first, source, dest, stats, self._renames, self._alive, resumed=False)
                dest.close_write()  # "empty": a channel closed before its first byte (an idle preempt channel)
            stats.done = True
            for s in (source, dest):
                s.close()
        except BaseException as e:  # noqa: BLE001 - any failure closes every channel
            self._fail(stats, e)
        finally:
            if number == 0:
                self._main_done.set()
                self._renames.release()

    def _fail(self, stats: ChannelStats, e: BaseException) -> None:
        with self._lock:
            first = self._failure is None and not self._closed
            if first:
                text = str(e) if isinstance(e, (FerryError, OSError)) else f"{type(e).__name__}: {e}"
                self._failure = ProxyError(f"channel {stats.number} ({stats.kind}): {text}")
        stats.error = str(e)
        if first:
            self.stats.phase = "failed"
            self.abort()

    def _carry_main(self, first: bytes, source: ByteStream, dest: ByteStream, stats: ChannelStats) -> None:
        """The main channel: transcoded forward, the return path relayed back beside it."""
        back = threading.Thread(target=self._return_path, args=(dest, source, stats),
                                name="vmferry-proxy return path", daemon=True)
        back.start()
        if stats.kind == "main (resumed)":
            # A postcopy recovery through this (fresh) proxy: no RAM section says which blocks a transform
            # renames, so the names are the ones given (``renames``), else kept.
            self.stats.phase = "postcopy"
            if not self._renames.known:
                self._renames.release()
            relay_ram_records(first, source, dest, stats, self._renames, self._alive, resumed=True)
        else:
            self._transcode_main(first, source, dest, stats)
        dest.close_write()
        # The destination closes its end once it has loaded the stream (after SHUT, with a return path).
        back.join(self.drain_timeout)
        if back.is_alive():
            raise ProxyError(f"{dest.name}: the destination did not finish within {self.drain_timeout:.0f} s "
                             "of the end of the stream")

    def _return_path(self, dest: ByteStream, source: ByteStream, stats: ChannelStats) -> None:
        try:
            relay_return_path(dest, source, stats, self._renames, self._on_return_message)
            source.close_write()
        except BaseException as e:  # noqa: BLE001 - any failure closes every channel
            if not self._closed:
                self._fail(stats, e)

    def _on_return_message(self, msg: rp.RpMessage) -> None:
        if msg.type == rp.SHUT:
            self.stats.destination_status = msg.value
        elif msg.type in (rp.REQ_PAGES, rp.REQ_PAGES_ID):
            self.stats.phase = "postcopy"

    def _transcode_main(self, first: bytes, source: ByteStream, dest: ByteStream, stats: ChannelStats) -> None:
        fmt, head = _sniff(source, first)
        self.stats.input_format = fmt
        self.stats.phase = "precopy"
        observe = self._observer()
        if fmt == "legacy" and self.wire == "legacy" and can_splice(source, dest):
            piped = PipedInput(source, dest, len(head), self.chunk_size)  # type: ignore[arg-type]
            try:
                events = transcode_events(itertools.chain([head], piped.chunks(idle_markers=True)), "legacy",
                                          "legacy", self.machine, self.from_machine, observe=observe,
                                          schema=self.schema)
                write_legacy(self._learning(events), piped)
            finally:
                piped.close()
                self.stats.bytes_spliced = stats.spliced = piped.spliced
        else:
            chunks = itertools.chain([head], source.chunks(self.chunk_size, idle_markers=True)) \
                if fmt == "legacy" else _ferry_chunks(source, head, self.chunk_size)
            events = self._learning(transcode_events(chunks, fmt, self.wire, self.machine, self.from_machine,
                                                     observe=observe, schema=self.schema))
            out = legacy.encode(events) if self.wire == "legacy" else ferry.encode(events, compress=self.compress)
            dest.write_chunks(out)
        stats.bytes_in, stats.bytes_out = source.bytes_read, dest.bytes_written

    def _observer(self) -> Callable[[Event], None]:
        """Sees every event as the source sent it: the user's ``observe``, and the blocks before any rename."""
        user = self.observe

        def observe(ev: Event) -> None:
            if isinstance(ev, RamMemSize):
                self._blocks_in = [b.name for b in ev.blocks]
            elif isinstance(ev, Command) and ev.cmd == CMD_PACKAGED:
                self.stats.phase = "postcopy"
            if user is not None:
                user(ev)

        return observe

    def _learning(self, events: Iterable[Event]) -> Iterator[Event]:
        """``events`` (after the transforms), learning the block renames from the first RAM section."""
        for ev in events:
            if isinstance(ev, RamMemSize) and not self._renames.known:
                self._renames.learn(dict(zip(self._blocks_in, (b.name for b in ev.blocks))))
            yield ev


__all__ = ["ChannelStats", "QEMU_CAPABILITIES", "Proxy", "ProxyError", "ProxyStats", "WIRES", "capabilities", "transcode",
           "transcode_events"]
