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
from ..errors import DecodeError, FerryError, TransportError
from ..events import Event
from .splice import PipedInput, can_splice, write_legacy
from .transport import CHUNK, ByteStream, Listener, SocketStream, TlsOptions, connect, listen, parse_uri

WIRES = ("legacy", "ferry")

#: QEMU capabilities a proxy can carry: they neither change how the stream is framed nor need a
#: channel back to the source (the proxy carries one way).  Every other one is switched off.
QEMU_CAPABILITIES = frozenset({"events", "auto-converge", "late-block-activate", "validate-uuid"})


def capabilities() -> Cap:
    """The mask a proxy offers to the proxy at the other end of a ferry wire: ferry and its installed features."""
    return Cap.CODEC_FERRY | ferry.available_caps()


class ProxyError(FerryError):
    """The proxied migration failed; both sides have been closed."""


@dataclass
class ProxyStats:
    """What one proxied migration carried."""

    input_format: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_spliced: int = 0  # of bytes_out, page runs spliced from socket to socket
    error: str | None = None
    done: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"input_format": self.input_format, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "bytes_spliced": self.bytes_spliced, "error": self.error, "done": self.done}


def _sniff(stream: ByteStream) -> tuple[str, bytes]:
    """The stream's format (``legacy`` or ``ferry``) and the 8 bytes read to tell."""
    head = b""
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
    so no body spans two chunks and the decoder joins nothing (a spanning body would be copied whole).
    At a header that does not check out, the rest comes in plain chunks and the decoder says what is wrong."""
    first = head + stream.read_exact(ferry.HEADER_LEN - len(head) + ferry.FRAME_HEADER_LEN, "the ferry header")
    yield first
    frame_head: bytes | memoryview = first[-ferry.FRAME_HEADER_LEN:]
    while (extent := ferry.frame_extent(frame_head)) is not None:
        body, last = extent
        buf = bytearray(body if last else body + ferry.FRAME_HEADER_LEN)
        stream.read_into_exact(memoryview(buf), "a ferry frame")
        chunk = memoryview(buf).toreadonly()  # read-only: the decoder keeps views instead of copying
        yield chunk
        if last:
            return
        frame_head = chunk[-ferry.FRAME_HEADER_LEN:]
    yield from stream.chunks(size)


def _ferry_events(chunks: Iterable[bytes | memoryview], options: ferry.DecodeOptions) -> Iterator[Event]:
    """Like :func:`vmferry.encode.ferry.decode`, but done at the END frame without waiting for the
    sender to close: TLS has no half-close, so the sending proxy cannot say where the stream ends."""
    dec = ferry.FerryDecoder(options)
    try:
        for chunk in chunks:
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
                     observe: Callable[[Event], None] | None = None) -> Iterator[Event]:
    """The events of the input ``chunks`` of ``input_format``, converted to ``machine`` (to be written as
    ``wire``); ``observe`` sees every event as it arrives (before the transforms)."""
    if wire not in WIRES:
        raise ProxyError(f"unknown wire format {wire!r} (known: {', '.join(WIRES)})")
    events: Iterable[Event]
    if input_format == "legacy":
        events = legacy.decode(chunks)
    else:
        events = _ferry_events(chunks, ferry.DecodeOptions(keep_unknown=wire != "legacy",
                                                           legacy_records=wire == "legacy"))
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
            self.stats.error = str(e)
            self.abort()
            if isinstance(e, ProxyError):
                raise
            raise ProxyError(f"proxy {self.listen_uri} -> {self.forward_uri}: {e}") from None
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

    # ------------------------------------------------------------------ the pump

    def _run(self) -> None:
        assert self._listener is not None
        source = self._track(self._listener.accept(self.accept_timeout, cancelled=lambda: self._closed))
        self._close_listener()
        fmt, head = _sniff(source)
        self.stats.input_format = fmt
        dest = self._track(connect(parse_uri(self.forward_uri, self.tls), timeout=self.connect_timeout))
        if fmt == "legacy" and self.wire == "legacy" and can_splice(source, dest):
            self._splice_through(source, head, dest)  # type: ignore[arg-type]
        else:
            chunks = itertools.chain([head], source.chunks(self.chunk_size)) if fmt == "legacy" else \
                _ferry_chunks(source, head, self.chunk_size)
            dest.write_chunks(transcode(chunks, fmt, self.wire, self.machine, self.from_machine,
                                        compress=self.compress, observe=self.observe))
        dest.close_write()
        self.stats.bytes_in = source.bytes_read
        self.stats.bytes_out = dest.bytes_written
        with self._lock:
            streams, self._streams = self._streams, []
        # Let the destination read everything before the socket goes: it closes its end once loaded.
        dest.set_timeout(self.drain_timeout)
        try:
            while dest.read(4096):
                pass
        except TransportError:
            pass
        for s in streams:
            s.close()
        self.stats.done = True

    def _splice_through(self, source: SocketStream, head: bytes, dest: SocketStream) -> None:
        """QEMU's format in and out between plain sockets: page runs are spliced (see :mod:`vmferry.live.splice`)."""
        piped = PipedInput(source, dest, len(head), self.chunk_size)
        try:
            events = transcode_events(itertools.chain([head], piped.chunks()), "legacy", "legacy", self.machine,
                                      self.from_machine, observe=self.observe)
            write_legacy(events, piped)
        finally:
            piped.close()
            self.stats.bytes_spliced = piped.spliced


__all__ = ["QEMU_CAPABILITIES", "Proxy", "ProxyError", "ProxyStats", "WIRES", "capabilities", "transcode",
           "transcode_events"]
