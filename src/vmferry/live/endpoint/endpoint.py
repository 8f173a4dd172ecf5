"""A vmferry endpoint's live migration, behind QEMU's QMP migration commands.

Outgoing migration is QEMU's pre-copy: every page once while the workload
runs, then the pages dirtied meanwhile, pass after pass, until what is left
would go within ``downtime-limit``; then the workload stops, the last
dirty pages and the devices go, and the source waits in ``postmigrate``.
On a socket with ``return-path`` agreed, the source first says hello, the
destination answers with its mask and device versions (the source saves
each device at the version the destination runs) and finally confirms the
load; a source that hears no confirmation before the end of its stream
resumes its workload, and a failed migration never loses it.

Incoming migration (``--incoming``, like QEMU's ``-incoming defer``) loads
RAM as it arrives, holds the devices until the stream is complete and
checked, and only then starts; a truncated, corrupted or incomplete stream
leaves it in ``inmigrate`` with the migration ``failed``, refusing ``cont``.
The destination's counter goes on from the source's.

:class:`Endpoint` puts a :class:`~.machine.Machine` behind QMP
(:mod:`vmferry.live.qmp`): QEMU's migration commands plus
``query-migration-capabilities`` and ``set-migration-capabilities``.  I/O
lives here and in the transports; the codecs, device models and the
handshake logic stay pure.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from ... import __version__, caps, encode
from ...caps import Cap
from ...encode import legacy
from ...encode.configuration import configuration_state
from ...errors import DecodeError, FerryError, NegotiationError, TransportError
from ...events import (
    SECTION_END,
    SECTION_PART,
    SECTION_START,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Header,
    IterBegin,
    IterEnd,
    OpaqueSection,
    RamBlock,
    RamEos,
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
    Vmdesc,
)
from ...serialize.devices.base import DeviceModel, load
from ...serialize.visitor import TreeReader
from .. import handshake
from ..qmp.protocol import CommandFailed
from ..qmp.server import current_peer, not_found
from ..transport import ByteStream, Listener, TlsOptions, connect, listen, parse_uri
from .machine import (
    DEVICES,
    MACHINE_TYPE,
    PAGE_SIZE,
    RAM_BLOCK,
    RAM_SECTION_ID,
    GlobalState,
    Machine,
    dirty_runs,
    page_events,
    supported_caps,
)

MAX_PASSES = 30
DEFAULT_DOWNTIME_MS = 300
RESULT_TIMEOUT = 120.0


# ---------------------------------------------------------------------------
# Migration bookkeeping
# ---------------------------------------------------------------------------


class Cancelled(FerryError):
    """The migration was cancelled (``migrate_cancel``)."""


@dataclass
class MigrationInfo:
    """What ``query-migrate`` reports, QEMU's names."""

    status: str = "none"
    error: str | None = None
    started: float = 0.0
    setup_done: float = 0.0
    finished: float = 0.0
    downtime_ms: int | None = None
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0
    normal: int = 0
    passes: int = 0
    mbps: float = 0.0
    codec: str = ""
    mask: int = 0
    uri: str = ""
    return_path: bool = False
    devices: dict[str, Any] = field(default_factory=dict)
    incoming: bool = False

    def to_qmp(self) -> dict[str, Any]:
        if self.status == "none":
            return {}
        out: dict[str, Any] = {"status": self.status}
        now = self.finished or time.monotonic()
        if self.started:
            out["total-time"] = int((now - self.started) * 1000)
        if self.setup_done:
            out["setup-time"] = int((self.setup_done - self.started) * 1000)
        if self.downtime_ms is not None:
            out["downtime"] = self.downtime_ms
        if not self.incoming or self.transferred:
            out["ram"] = {
                "transferred": self.transferred, "remaining": self.remaining, "total": self.total,
                "duplicate": self.duplicate, "normal": self.normal, "normal-bytes": self.normal * PAGE_SIZE,
                "dirty-sync-count": self.passes, "mbps": round(self.mbps, 3), "skipped": 0,
                "page-size": PAGE_SIZE,
            }
        if self.error:
            out["error-desc"] = self.error
        out["x-vmferry"] = {"codec": self.codec, "mask": self.mask, "names": caps.names(self.mask),
                            "return-path": self.return_path, "uri": self.uri, "devices": self.devices}
        return out


def _writer(stream: ByteStream, rp: bool, info: MigrationInfo, max_bw: Callable[[], int],
            cancelled: Callable[[], bool]) -> Callable[[list[Any], int], None]:
    """A function that sends a batch of chunks (as one DATA message on the return path), throttled."""
    t0 = time.monotonic()
    sent = [0]

    def send(parts: list[Any], size: int) -> None:
        if cancelled():
            raise Cancelled("migration cancelled")
        if rp:
            stream.writev([handshake.pack_head(handshake.DATA, size), *parts])
        else:
            stream.writev(parts)
        sent[0] += size
        info.transferred = sent[0]
        elapsed = time.monotonic() - t0
        if elapsed > 0:
            info.mbps = sent[0] * 8 / elapsed / 1e6
        bw = max_bw()
        if bw:
            ahead = sent[0] / bw - elapsed
            while ahead > 0 and not cancelled():
                time.sleep(min(ahead, 0.05))
                ahead = sent[0] / bw - (time.monotonic() - t0)

    return send


def _pump(chunks: Iterator[Any], send: Callable[[list[Any], int], None], batch: int = 1 << 20) -> None:
    parts: list[Any] = []
    size = 0
    for chunk in chunks:
        n = len(chunk)
        if not n:
            continue
        parts.append(chunk)
        size += n
        if size >= batch or len(parts) >= 256:
            send(parts, size)
            parts, size = [], 0
    if parts:
        send(parts, size)


class RpReader:
    """Reads return-path messages from a stream (the preamble already consumed or not expected)."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream

    def message(self, what: str = "a return-path message") -> handshake.Message:
        head = self.stream.read_exact(handshake.HEAD.size, what)
        kind, length = handshake.HEAD.unpack(head)
        handshake.check_head(kind, length)
        if kind == handshake.DATA:
            buf = bytearray(length)
            self.stream.read_into_exact(memoryview(buf), "stream data")
            return handshake.Message(kind, memoryview(buf).toreadonly())
        body = self.stream.read_exact(length, what) if length else b""
        return handshake.decode_body(kind, body)

    def data(self) -> Iterator[memoryview]:
        """DATA payloads until DONE; ABORT or a broken connection end it with an error."""
        while True:
            try:
                msg = self.message("stream data")
            except TransportError as e:
                raise TransportError(f"the source went away before the end of the stream ({e})") from None
            if msg.kind == handshake.DATA:
                yield msg.body
            elif msg.kind == handshake.DONE:
                return
            elif msg.kind == handshake.ABORT:
                reason = msg.body.get("reason", "no reason given") if isinstance(msg.body, dict) else ""
                raise TransportError(f"the source aborted the migration: {reason}")
            else:
                raise NegotiationError(f"unexpected {msg.name} message in the stream")


# ---------------------------------------------------------------------------
# The endpoint: machine + migrations + QMP commands
# ---------------------------------------------------------------------------


class Endpoint:
    """A machine behind QMP commands.  ``emit(event, data)`` sends QMP events."""

    def __init__(self, machine: Machine, *, incoming: bool = False, paused: bool = False,
                 supported: int | None = None, capability_commands: bool = True,
                 tls: TlsOptions | None = None, emit: Callable[[str, dict[str, Any] | None], None] | None = None,
                 compress: str = "none", allow_remote_exec: bool = False) -> None:
        self.machine = machine
        #: whether a QMP client on another host may name exec:, file: and fd: migration URIs
        self.allow_remote_exec = allow_remote_exec
        self.supported = Cap(supported_caps() if supported is None else supported & supported_caps())
        self.mask = self.supported
        self.capability_commands = capability_commands
        self.tls = tls
        self.emit: Callable[[str, dict[str, Any] | None], None] = emit or _no_event
        self.params: dict[str, Any] = {"max-bandwidth": 0, "downtime-limit": DEFAULT_DOWNTIME_MS,
                                       "x-vmferry-compress": compress}
        self.info = MigrationInfo()
        self.incoming_expected = incoming
        self.autostart = not paused
        self.runstate = "inmigrate" if incoming else ("paused" if paused else "running")
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self._stream: ByteStream | None = None
        self.quit_requested = threading.Event()
        self.incoming_failed = False
        if self.runstate == "running":
            machine.resume()

    # -- state
    def _set_runstate(self, state: str) -> None:
        old, self.runstate = self.runstate, state
        if old == state:
            return
        if state == "running":
            self.emit("RESUME", None)
        elif old == "running":
            self.emit("STOP", None)

    def _set_status(self, status: str) -> None:
        self.info.status = status
        self.emit("MIGRATION", {"status": status})

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- QMP
    def handle(self, name: str, args: dict[str, Any]) -> Any:
        fn = self.COMMANDS.get(name)
        if fn is None or (not self.capability_commands and name in ("query-migration-capabilities",
                                                                    "set-migration-capabilities")):
            raise not_found(name)
        return fn(self, args)

    def cmd_query_status(self, args: dict[str, Any]) -> Any:
        return {"status": self.runstate, "running": self.runstate == "running", "singlestep": False}

    def cmd_query_version(self, args: dict[str, Any]) -> Any:
        major, minor, micro = (int(x) for x in (__version__.split(".") + ["0", "0"])[:3])
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"vmferry {__version__}"}

    def cmd_query_commands(self, args: dict[str, Any]) -> Any:
        names = ["qmp_capabilities", *self.COMMANDS]
        if not self.capability_commands:
            names = [n for n in names if n not in ("query-migration-capabilities", "set-migration-capabilities")]
        return [{"name": n} for n in names]

    def cmd_query_migration_capabilities(self, args: dict[str, Any]) -> Any:
        return {"mask": int(self.mask), "names": caps.names(self.mask), "supported": int(self.supported),
                "supported-names": caps.names(self.supported)}

    def cmd_set_migration_capabilities(self, args: dict[str, Any]) -> Any:
        self._not_during_migration("set-migration-capabilities")
        if "mask" in args:
            mask = args["mask"]
            if not isinstance(mask, int) or isinstance(mask, bool) or not 0 <= mask < 1 << 64:
                raise CommandFailed("Parameter 'mask' expects an unsigned 64-bit integer")
        elif "names" in args:
            try:
                mask = caps.from_names(args["names"])
            except (ValueError, TypeError) as e:
                raise CommandFailed(str(e)) from None
        else:
            raise CommandFailed("set-migration-capabilities takes 'mask' or 'names'")
        self.mask = caps.restrict(mask, self.supported)
        return self.cmd_query_migration_capabilities({})

    def cmd_query_migrate_capabilities(self, args: dict[str, Any]) -> Any:
        return caps.to_qemu_list(self.supported, self.mask) + [{"capability": "events", "state": True}]

    def cmd_migrate_set_capabilities(self, args: dict[str, Any]) -> Any:
        self._not_during_migration("migrate-set-capabilities")
        try:
            states = caps.parse_qemu_list(args["capabilities"])
        except ValueError as e:
            raise CommandFailed(str(e)) from None
        for qemu_name in states:
            if qemu_name != "events" and caps.from_qemu_name(qemu_name) is None:
                raise CommandFailed(f"Capability '{qemu_name}' is not supported by a vmferry endpoint")
        on, off = caps.mask_from_qemu(states)
        if on & ~self.supported:
            raise CommandFailed(f"capability {caps.qemu_name(caps.bits(on & ~self.supported)[0])} is not "
                                "supported here")
        self.mask = Cap((self.mask | on) & ~off & self.supported)
        return {}

    def cmd_query_migrate_parameters(self, args: dict[str, Any]) -> Any:
        return dict(self.params)

    def cmd_migrate_set_parameters(self, args: dict[str, Any]) -> Any:
        for k, v in args.items():
            if k in ("max-bandwidth", "downtime-limit"):
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise CommandFailed(f"Parameter '{k}' expects a non-negative integer")
            elif k == "x-vmferry-compress":
                if v not in ("none", "zstd", "lz4"):
                    raise CommandFailed("Parameter 'x-vmferry-compress' expects none, zstd or lz4")
            else:
                raise CommandFailed(f"Parameter '{k}' is not supported by a vmferry endpoint")
        self.params.update(args)
        return {}

    def cmd_query_migrate(self, args: dict[str, Any]) -> Any:
        return self.info.to_qmp()

    def cmd_stop(self, args: dict[str, Any]) -> Any:
        if self.runstate == "running":
            self.machine.pause()
            self._set_runstate("paused")
        return {}

    def cmd_cont(self, args: dict[str, Any]) -> Any:
        if self.runstate == "inmigrate":
            if self.incoming_failed:
                raise CommandFailed(f"cannot start: the incoming migration failed ({self.info.error})")
            self.autostart = True  # as QEMU: run once the incoming migration is done
            return {}
        if self.runstate in ("finish-migrate",) or (self._busy() and self.runstate != "running"):
            raise CommandFailed("cannot start while a migration is finishing")
        if self.runstate != "running":
            self.machine.resume()
            self._set_runstate("running")
        return {}

    def cmd_quit(self, args: dict[str, Any]) -> Any:
        self._cancel.set()
        self.quit_requested.set()
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        return {}

    def cmd_migrate_cancel(self, args: dict[str, Any]) -> Any:
        if self._busy():
            self._cancel.set()
            if self.info.status in ("setup", "active"):
                self._set_status("cancelling")
            stream = self._stream
            if stream is not None and self.info.incoming:
                stream.abort()
            elif stream is not None:  # outgoing: stops at the next batch; a send blocked on a stuck peer is cut

                def cut() -> None:
                    if self._busy() and self._stream is stream:
                        stream.abort()

                timer = threading.Timer(2.0, cut)
                timer.daemon = True
                timer.start()
            if self._listener is not None:
                self._listener.close()
        return {}

    def cmd_x_vmferry_query_machine(self, args: dict[str, Any]) -> Any:
        m = self.machine
        with m.lock:
            return {"count": m.counter.count, "mirrored-count": m.mirrored_count(), "ram-size": m.ram_size,
                    "ticks": m.ticks, "runstate": self.runstate, "machine": MACHINE_TYPE,
                    "devices": dict(m.versions)}

    def cmd_x_vmferry_ram_digest(self, args: dict[str, Any]) -> Any:
        import hashlib

        m = self.machine
        with m.lock:
            return {"sha256": hashlib.sha256(m.view).hexdigest(), "count": m.counter.count}

    def _not_during_migration(self, what: str) -> None:
        if self._busy():
            raise CommandFailed(f"{what}: not while a migration is running")

    def _check_local_uri(self, addr: Any) -> None:
        """Refuse exec:, file: and fd: from a QMP client on another host, unless allowed.

        They run a shell command, write or read a file, or use a descriptor of this process: on this host,
        on behalf of whoever reached the QMP socket (QMP has no authentication).
        """
        peer = current_peer()
        if addr.scheme in ("exec", "file", "fd") and peer is not None and not peer.local \
                and not self.allow_remote_exec:
            raise CommandFailed(f"{addr.scheme}: migration URIs are refused from a remote QMP client ({peer.name}); "
                                "serve --allow-remote-exec allows them")

    # -- outgoing
    def cmd_migrate(self, args: dict[str, Any]) -> Any:
        uri = args.get("uri")
        if not isinstance(uri, str):
            raise CommandFailed("Parameter 'uri' is missing")
        if self.runstate == "inmigrate":
            raise CommandFailed("this endpoint is waiting for an incoming migration")
        if self._busy():
            raise CommandFailed("There's a migration process in progress")
        if self.runstate == "postmigrate" and self.info.status == "completed":
            raise CommandFailed("this endpoint has already migrated away; 'cont' it first to migrate again")
        try:
            addr = parse_uri(uri, self.tls)
        except TransportError as e:
            raise CommandFailed(str(e)) from None
        self._check_local_uri(addr)
        self._cancel.clear()
        self.info = MigrationInfo(status="setup", started=time.monotonic(), uri=uri, total=self.machine.ram_size)
        self.emit("MIGRATION", {"status": "setup"})
        self._thread = threading.Thread(target=self._outgoing, args=(addr,), name="vmferry-migrate-out",
                                        daemon=True)
        self._thread.start()
        return {}

    def _outgoing(self, addr: Any) -> None:
        info = self.info
        was_running = self.runstate == "running"
        stream: ByteStream | None = None
        state = {"stopped": False, "done_sent": False}
        try:
            stream = connect(addr)
            self._stream = stream
            rp = stream.duplex and bool(self.mask & Cap.RETURN_PATH)
            if rp:
                agreement = self._hello(stream)
            else:
                agreement = handshake.Agreement(Cap(self.mask), handshake.codec_for(self.mask))
            info.codec, info.mask, info.return_path = agreement.codec, int(agreement.mask), rp
            info.devices = agreement.to_json()["devices"]
            versions = {k: p.send for k, p in agreement.devices.items()}
            info.setup_done = time.monotonic()
            self._set_status("active")
            codec = encode.codec(agreement.codec)
            opts: dict[str, Any] = {}
            if agreement.codec == "ferry":
                opts["compress"] = handshake.compression_for(agreement.mask, str(self.params["x-vmferry-compress"]))
            send = _writer(stream, rp, info, lambda: int(self.params["max-bandwidth"]), self._cancel.is_set)
            events = self._precopy(versions, was_running, state, send_rate=lambda: info.mbps)
            _pump(codec.encode(events, **opts), send)
            if rp:
                stream.write(handshake.pack_head(handshake.DONE, 0))
                state["done_sent"] = True
                result = self._await_result(stream)
                if not result.get("ok"):
                    raise NegotiationError(f"the destination refused the stream: {result.get('error', '?')}")
            else:
                stream.close_write()
            stream.close()
            info.finished = time.monotonic()
            self._set_status("completed")
            self._set_runstate("postmigrate")
        except BaseException as e:  # noqa: BLE001 - every failure leaves the source running
            cancelled = isinstance(e, Cancelled) or self._cancel.is_set()
            info.error = None if cancelled else _describe(e)
            if isinstance(e, TransportError) and stream is not None:
                info.error = f"lost the destination: {info.error}"
            if stream is not None:
                if stream.duplex and not state["done_sent"] and self.mask & Cap.RETURN_PATH:
                    try:
                        stream.set_timeout(1.0)
                        stream.write(handshake.pack_json(handshake.ABORT, {"reason": info.error or "cancelled"}))
                    except Exception:  # noqa: BLE001
                        pass
                stream.abort()
            info.finished = time.monotonic()
            ambiguous = state["done_sent"] and not cancelled and isinstance(e, TransportError)
            if ambiguous:
                info.error = (f"{info.error}; the whole stream was sent, so the destination may be running: "
                              "not resuming here (check it, then 'cont' this side if it is not)")
                self._set_status("failed")
                self._set_runstate("postmigrate")
            else:
                self._set_status("cancelled" if cancelled else "failed")
                if was_running:
                    self.machine.resume()
                    self._set_runstate("running")
                elif state["stopped"]:
                    self._set_runstate("paused")
            if not isinstance(e, Exception):
                raise
        finally:
            self._stream = None

    def _hello(self, stream: ByteStream) -> handshake.Agreement:
        m = self.machine
        hello = handshake.Hello(int(self.mask), {k: list(v) for k, v in m.device_ranges().items()},
                                {RAM_BLOCK: m.ram_size}, MACHINE_TYPE)
        stream.set_timeout(30.0)
        stream.write(handshake.PREAMBLE + handshake.pack_json(handshake.HELLO, hello.to_json()))
        msg = RpReader(stream).message("the destination's WELCOME")
        stream.set_timeout(None)
        if msg.kind == handshake.RESULT:
            raise NegotiationError(f"the destination refused: {msg.body.get('error', '?')}")
        if msg.kind != handshake.WELCOME:
            raise NegotiationError(f"expected WELCOME from the destination, got {msg.name}")
        welcome = handshake.Welcome.from_json(msg.body)
        return handshake.agree(hello, welcome, m.device_ranges(), _transform_lookup())

    def _await_result(self, stream: ByteStream) -> dict[str, Any]:
        stream.set_timeout(RESULT_TIMEOUT)
        try:
            msg = RpReader(stream).message("the destination's RESULT")
        finally:
            stream.set_timeout(None)
        if msg.kind != handshake.RESULT or not isinstance(msg.body, dict):
            raise NegotiationError(f"expected RESULT from the destination, got {msg.name}")
        return msg.body

    def _precopy(self, versions: dict[str, int], was_running: bool, state: dict[str, bool],
                 send_rate: Callable[[], float]) -> Iterator[Event]:
        """The outgoing stream as events: setup, pre-copy passes, stop-and-copy."""
        m = self.machine
        info = self.info
        m.sync_dirty()  # tracking starts now: every page goes once, then what was dirtied meanwhile
        yield Header()
        yield Configuration(configuration_state(MACHINE_TYPE))
        yield IterBegin(SECTION_START, RAM_SECTION_ID, "ram", 0, legacy.RAM_VERSION)
        yield RamMemSize(m.ram_size, [RamBlock(RAM_BLOCK, m.ram_size)])
        yield RamEos()
        yield IterEnd(RAM_SECTION_ID)
        bitmap: bytearray = bytearray(b"\x01") * m.npages
        downtime = max(1, int(self.params["downtime-limit"])) / 1000
        while True:
            info.passes += 1
            self.emit("MIGRATION_PASS", {"pass": info.passes})
            info.remaining = bitmap.count(1) * PAGE_SIZE
            yield IterBegin(SECTION_PART, RAM_SECTION_ID)
            yield from self._pages(bitmap)
            yield RamEos()
            yield IterEnd(RAM_SECTION_ID)
            bitmap = m.sync_dirty()
            left = bitmap.count(1) * PAGE_SIZE
            info.remaining = left
            rate = max(send_rate() * 1e6 / 8, 1.0)
            if left / rate <= downtime or info.passes >= MAX_PASSES or not m.running:
                break
        # stop and copy
        t_stop = time.monotonic()
        m.pause()
        state["stopped"] = True
        self._set_runstate("finish-migrate")
        bitmap = m.sync_dirty() if not any(bitmap) else _or(bitmap, m.sync_dirty())
        info.remaining = bitmap.count(1) * PAGE_SIZE
        yield IterBegin(SECTION_END, RAM_SECTION_ID)
        yield from self._pages(bitmap)
        yield RamEos()
        yield IterEnd(RAM_SECTION_ID)
        sections = m.sections(versions, "running" if was_running else "paused", RAM_SECTION_ID + 1)
        yield from sections
        yield Eof()
        yield Vmdesc(legacy.vmdesc_text({"page_size": PAGE_SIZE, "devices": [s.desc for s in sections]}))
        info.remaining = 0
        info.downtime_ms = int((time.monotonic() - t_stop) * 1000)

    def _pages(self, bitmap: bytearray) -> Iterator[Event]:
        m = self.machine
        info = self.info
        view = m.view
        named = True
        cancel = self._cancel
        for a, b in dirty_runs(bitmap):
            if cancel.is_set():
                raise Cancelled("migration cancelled")
            data = bytes(view[a * PAGE_SIZE:b * PAGE_SIZE])
            for ev in page_events(data, a, named):
                named = False
                if isinstance(ev, RamZeros):
                    info.duplicate += ev.count
                else:
                    info.normal += ev.count
                yield ev
            info.remaining = max(0, info.remaining - (b - a) * PAGE_SIZE)

    # -- incoming
    def cmd_migrate_incoming(self, args: dict[str, Any]) -> Any:
        uri = args.get("uri")
        if not isinstance(uri, str):
            raise CommandFailed("Parameter 'uri' is missing")
        if not self.incoming_expected or self.runstate != "inmigrate":
            raise CommandFailed("'-incoming' was not specified on the command line (serve --incoming)")
        if self._busy() or self.incoming_failed:
            # A failed load reports that, even while its thread is still winding down.
            raise CommandFailed(f"the incoming migration failed earlier: {self.info.error}" if self.incoming_failed
                                else "The incoming migration has already been started")
        try:
            addr = parse_uri(uri, self.tls)
            self._check_local_uri(addr)
            listener = listen(addr)
        except TransportError as e:
            raise CommandFailed(str(e)) from None
        self._listener = listener
        self._cancel.clear()
        self.info = MigrationInfo(status="setup", started=time.monotonic(), uri=listener.uri, incoming=True,
                                  total=self.machine.ram_size)
        self.emit("MIGRATION", {"status": "setup"})
        self._thread = threading.Thread(target=self._incoming, args=(listener,), name="vmferry-migrate-in",
                                        daemon=True)
        self._thread.start()
        return {}

    def _incoming(self, listener: Listener) -> None:
        info = self.info
        stream: ByteStream | None = None
        rp = False
        try:
            stream = listener.accept(cancelled=self._cancel.is_set)
            listener.close()
            self._stream = stream
            self._set_status("active")
            first = _read_some(stream, len(handshake.PREAMBLE))
            chunks: Iterator[Any]
            if first.startswith(handshake.MAGIC):
                rp = True
                if len(first) < len(handshake.PREAMBLE) or first[4] != handshake.VERSION:
                    raise NegotiationError("unsupported return-path protocol version")
                if not self.mask & Cap.RETURN_PATH:
                    raise NegotiationError("the source opened a return path, but return-path is switched off here")
                self._welcome(stream)
                chunks = RpReader(stream).data()
            else:
                chunks = _prepend(first, stream.chunks())
            info.return_path = rp
            state = self._load(chunks)
            self._commit(stream if rp else None, state)
        except BaseException as e:  # noqa: BLE001 - nothing starts on a failed load
            cancelled = self._cancel.is_set()
            info.error = "incoming migration cancelled" if cancelled else _describe(e)
            self.incoming_failed = True
            if rp and stream is not None:
                try:
                    stream.set_timeout(5.0)
                    stream.write(handshake.pack_json(handshake.RESULT, {"ok": False, "error": info.error}))
                except Exception:  # noqa: BLE001 - the source may be gone
                    pass
            info.finished = time.monotonic()
            self._set_status("cancelled" if cancelled else "failed")
            if not isinstance(e, Exception):
                raise
        finally:
            listener.close()
            if stream is not None:
                stream.abort()
            self._stream = None

    def _welcome(self, stream: ByteStream) -> None:
        reader = RpReader(stream)
        stream.set_timeout(30.0)
        msg = reader.message("the source's HELLO")
        if msg.kind != handshake.HELLO:
            raise NegotiationError(f"expected HELLO, got {msg.name}")
        hello = handshake.Hello.from_json(msg.body)
        m = self.machine
        ram = {RAM_BLOCK: m.ram_size}
        if hello.ram != ram:
            raise NegotiationError(f"RAM differs: the source has {hello.ram}, this endpoint {ram}")
        welcome = handshake.Welcome(int(self.mask), dict(m.versions), ram, MACHINE_TYPE)
        stream.write(handshake.pack_json(handshake.WELCOME, welcome.to_json()))
        stream.set_timeout(None)
        self.info.mask = int(self.mask & hello.mask)

    def _load(self, chunks: Iterator[Any]) -> dict[str, Any]:
        """Decode and apply the stream: RAM as it comes, devices held back; returns what to commit."""
        m = self.machine
        info = self.info
        head, chunks = _peek(chunks, 64)
        if not head:
            raise DecodeError("the stream is empty", 0, "$")
        fmt = encode.sniff(head)
        if fmt != "legacy":
            bit = encode.cap(fmt)
            needed = bit | (Cap.FERRY_FRAMING if fmt == "ferry" else 0)
            if needed & ~self.mask:
                raise NegotiationError(f"the stream is in the {fmt} format, which is switched off here "
                                       f"(capabilities {', '.join(caps.names(needed & ~self.mask))})")
        info.codec = fmt
        mod = encode.codec(fmt)
        if fmt == "legacy":
            events = mod.decode(chunks, legacy.DecodeOptions(fallback_schemas=m.schemas()))
        else:
            events = mod.decode(chunks)
        models: dict[tuple[str, int], DeviceModel] = {}
        seen_eof = seen_mem = False
        wanted = {(i, n): cls for i, n, cls in DEVICES}
        for ev in events:
            if isinstance(ev, RamPages):
                self._check_run(ev.block, ev.offset, ev.count, ev.page_size)
                if ev.data is not None:
                    m.write_pages(ev.offset, ev.data)
                else:
                    for i in range(ev.count):
                        m.write_pages(ev.offset + i * PAGE_SIZE, ev.page(i))
                info.normal += ev.count
                info.transferred += ev.count * PAGE_SIZE
            elif isinstance(ev, RamZeros):
                self._check_run(ev.block, ev.offset, ev.count, ev.page_size)
                if ev.fill is None:
                    m.write_pages(ev.offset, _zeros(ev.count * PAGE_SIZE))
                else:
                    for i, b in enumerate(ev.fill):
                        m.write_pages(ev.offset + i * PAGE_SIZE, bytes([b]) * PAGE_SIZE)
                info.duplicate += ev.count
            elif isinstance(ev, RamMemSize):
                blocks = {b.name: b.length for b in ev.blocks}
                if blocks != {RAM_BLOCK: m.ram_size}:
                    raise DecodeError(f"RAM blocks {blocks} do not match this endpoint's "
                                      f"{{{RAM_BLOCK!r}: {m.ram_size}}}", None, "$.ram")
                seen_mem = True
            elif isinstance(ev, DeviceSection):
                key = (ev.idstr, ev.instance_id)
                cls = wanted.get(key)
                if cls is None or ev.schema.name != cls.VMSD_NAME:
                    raise DecodeError(f"section {ev.idstr!r} instance {ev.instance_id} (vmsd {ev.schema.name!r}) "
                                      "is not a device of this endpoint", None, f"$.{ev.idstr}")
                if key in models:
                    raise DecodeError(f"section {ev.idstr!r} came twice", None, f"$.{ev.idstr}")
                mine = m.versions[cls.VMSD_NAME]
                if ev.version_id > mine:
                    raise DecodeError(f"section {ev.idstr!r} is version {ev.version_id}, newer than the "
                                      f"{mine} this endpoint runs (no receiver transform for it)", None,
                                      f"$.{ev.idstr}")
                reader = TreeReader(ev.state)
                models[key] = load(cls, reader, ev.version_id)
                reader.finish()
            elif isinstance(ev, Eof):
                seen_eof = True
            elif isinstance(ev, (OpaqueSection, RamRecord, Command)):
                what = getattr(ev, "idstr", "") or type(ev).__name__
                raise DecodeError(f"{what}: not something a vmferry endpoint can load", None, "$")
            elif isinstance(ev, Configuration):
                if ev.machine != MACHINE_TYPE:
                    raise DecodeError(f"machine type {ev.machine!r}, this endpoint is {MACHINE_TYPE!r}", None,
                                      "$.configuration")
        missing = sorted(f"{i}" for i, n in wanted if (i, n) not in models)
        if not seen_mem:
            raise DecodeError("the stream carried no RAM setup", None, "$.ram")
        if missing:
            raise DecodeError(f"the stream lacks device sections: {', '.join(missing)}", None, "$")
        if not seen_eof:
            raise DecodeError("the stream ended without its EOF record", None, "$")
        return {"models": models}

    def _check_run(self, block: str, offset: int, count: int, page_size: int) -> None:
        if block != RAM_BLOCK or page_size != PAGE_SIZE or offset % PAGE_SIZE \
                or offset + count * PAGE_SIZE > self.machine.ram_size:
            raise DecodeError(f"RAM run {block!r} offset {offset:#x}, {count} pages of {page_size} does not fit "
                              f"this endpoint's {RAM_BLOCK!r} of {self.machine.ram_size} bytes", None, "$.ram")

    def _commit(self, stream: ByteStream | None, state: dict[str, Any]) -> None:
        if stream is not None:
            stream.set_timeout(30.0)
            stream.write(handshake.pack_json(handshake.RESULT, {"ok": True}))
        m = self.machine
        with m.lock:
            m.models.update(state["models"])
        gs = m.models[("globalstate", 0)]
        assert isinstance(gs, GlobalState)
        info = self.info
        info.finished = time.monotonic()
        self._set_status("completed")
        if gs.runstate == "running" and self.autostart:
            m.resume()
            self._set_runstate("running")
        else:
            self._set_runstate("paused")

    def shutdown(self) -> None:
        self._cancel.set()
        if self._listener is not None:
            self._listener.close()
        if self._stream is not None:
            self._stream.abort()
        if self._thread is not None:
            self._thread.join(5)
        self.machine.shutdown()

    COMMANDS: ClassVar[dict[str, Callable[[Endpoint, dict[str, Any]], Any]]] = {
        "query-status": cmd_query_status,
        "query-version": cmd_query_version,
        "query-commands": cmd_query_commands,
        "query-migration-capabilities": cmd_query_migration_capabilities,
        "set-migration-capabilities": cmd_set_migration_capabilities,
        "query-migrate-capabilities": cmd_query_migrate_capabilities,
        "migrate-set-capabilities": cmd_migrate_set_capabilities,
        "query-migrate-parameters": cmd_query_migrate_parameters,
        "migrate-set-parameters": cmd_migrate_set_parameters,
        "migrate": cmd_migrate,
        "migrate-incoming": cmd_migrate_incoming,
        "migrate_cancel": cmd_migrate_cancel,
        "query-migrate": cmd_query_migrate,
        "stop": cmd_stop,
        "cont": cmd_cont,
        "quit": cmd_quit,
        "x-vmferry-query-machine": cmd_x_vmferry_query_machine,
        "x-vmferry-ram-digest": cmd_x_vmferry_ram_digest,
    }


def _no_event(name: str, data: dict[str, Any] | None) -> None:
    pass


def _transform_lookup() -> Callable[[str, int, int], bool] | None:
    """Where device transforms plug in: vmferry.compat, once it exists and offers a lookup."""
    try:
        from ... import compat  # type: ignore[attr-defined]
    except ImportError:
        return None
    lookup = getattr(compat, "has_path", None)
    return lookup if callable(lookup) else None


def _describe(e: BaseException) -> str:
    if isinstance(e, FerryError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror or e}"
    return f"{type(e).__name__}: {e}"


def _or(a: bytearray, b: bytearray) -> bytearray:
    return bytearray((int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little"))


_ZEROS_CACHE: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZEROS_CACHE.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZEROS_CACHE) < 16:
            _ZEROS_CACHE[n] = z
    return z


def _read_some(stream: ByteStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = stream.read(n - len(buf))
        if not data:
            break
        buf += data
    return buf


def _prepend(first: bytes, rest: Iterator[Any]) -> Iterator[Any]:
    if first:
        yield first
    yield from rest


def _peek(chunks: Iterator[Any], n: int) -> tuple[bytes, Iterator[Any]]:
    held: list[Any] = []
    size = 0
    it = iter(chunks)
    for chunk in it:
        if not len(chunk):
            continue
        held.append(chunk)
        size += len(chunk)
        if size >= n:
            break
    head = b"".join(bytes(c) for c in held)[:n] if held else b""

    def rest() -> Iterator[Any]:
        yield from held
        yield from it

    return head, rest()


