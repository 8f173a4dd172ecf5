"""A vmferry endpoint: a small machine that runs, and migrates live.

The machine is guest RAM (one block, ``pc.ram``), vmferry's Python models
of QEMU's RTC, PIT, keyboard controller and UART, a counter device, and
QEMU's ``globalstate`` section.  A built-in workload keeps it busy: at
``rate`` ticks per second it advances the counter, mirrors the count into
RAM at :data:`COUNTER_OFFSET`, writes it into ``dirty_per_tick`` other pages
(all tracked in a dirty bitmap), and puts its low byte in the UART's scratch
register and the CMOS RAM, so device state moves too.

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

:class:`Endpoint` puts this behind QMP (:mod:`vmferry.qmp`): QEMU's
migration commands plus ``query-migration-capabilities`` and
``set-migration-capabilities``.  I/O lives here and in the transports; the
codecs, device models and the handshake logic stay pure.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from . import __version__, caps, encode, handshake
from .caps import Cap
from .encode import legacy
from .encode.configuration import configuration_state
from .errors import DecodeError, FerryError, NegotiationError, SchemaError, TransportError
from .events import (
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
from .qmp.protocol import CommandFailed
from .qmp.server import QMPServer, not_found
from .serialize.devices import ISAKBDState, ISASerialState, PITCommonState, PS2KbdState, RTCState
from .serialize.devices.base import DeviceModel, load, save, visited_version
from .serialize.qemu_vmdesc import schemas_from_vmdesc
from .serialize.schema import SchemaSet
from .serialize.visitor import Describer, TreeBuilder, TreeReader, Visitor
from .transport import ByteStream, Listener, TlsOptions, connect, listen, parse_uri

PAGE_SIZE = 4096
RAM_BLOCK = "pc.ram"
MACHINE_TYPE = "vmferry-endpoint-1"
#: Where the workload mirrors the counter in RAM (as the counting boot sector does, vmferry.guest).
COUNTER_OFFSET = 0x600
PAGES_PER_RUN = 256
RAM_SECTION_ID = 0
MAX_PASSES = 30
DEFAULT_DOWNTIME_MS = 300
RESULT_TIMEOUT = 120.0

#: Capabilities a vmferry endpoint offers: its codecs' bits, ferry's features, and the live bits.
ENDPOINT_CAPS = (Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.SELF_DESCRIBING | Cap.CODEC_FERRY | Cap.RETURN_PATH
                 | Cap.DEVICE_VERSIONS)


def supported_caps() -> Cap:
    """What this installation can do (zstd and lz4 only when their packages are there)."""
    mask = ENDPOINT_CAPS
    try:
        from .encode import ferry

        mask |= ferry.available_caps() & (Cap.ZSTD | Cap.LZ4)
    except Exception:  # noqa: BLE001 - ferry not importable: QEMU's stream only
        mask &= ~(Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.SELF_DESCRIBING | Cap.CODEC_FERRY)
    return Cap(mask)


# ---------------------------------------------------------------------------
# Devices of the endpoint that QEMU does not have
# ---------------------------------------------------------------------------


@dataclass
class CounterState(DeviceModel):
    """The counter device: what the workload has counted, and where it mirrors it in RAM."""

    VMSD_NAME: ClassVar[str] = "vmferry-counter"
    VERSION: ClassVar[int] = 1
    MINIMUM_VERSION: ClassVar[int] = 1

    count: int = 0
    rate_hz: int = 100
    mirror: int = COUNTER_OFFSET

    @staticmethod
    def visit(v: Visitor, s: CounterState) -> CounterState:
        s.count = v.u64("count", s.count)
        s.rate_hz = v.u32("rate_hz", s.rate_hz)
        s.mirror = v.u64("mirror", s.mirror)
        v.end_subsections("vmferry-counter")
        return s


RUNSTATE_BYTES = 100


@dataclass
class GlobalState(DeviceModel):
    """QEMU's ``globalstate`` (spec §3.6): the run state the destination should end in."""

    VMSD_NAME: ClassVar[str] = "globalstate"
    VERSION: ClassVar[int] = 1
    MINIMUM_VERSION: ClassVar[int] = 1

    runstate: str = "running"

    @staticmethod
    def visit(v: Visitor, s: GlobalState) -> GlobalState:
        text = s.runstate.encode("ascii")[:RUNSTATE_BYTES - 1]
        v.u32("size", len(text) + 1)
        raw = v.buffer("runstate", text.ljust(RUNSTATE_BYTES, b"\0"), RUNSTATE_BYTES)
        s.runstate = bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")
        v.end_subsections("globalstate")
        return s


#: (idstr, instance id, model class) of every device, in the order they travel.
DEVICES: tuple[tuple[str, int, type[DeviceModel]], ...] = (
    ("mc146818rtc", 0, RTCState),
    ("i8254", 0, PITCommonState),
    ("ps2kbd", 0, PS2KbdState),
    ("pckbd", 0, ISAKBDState),
    ("serial", 0, ISASerialState),
    (CounterState.VMSD_NAME, 0, CounterState),
    ("globalstate", 0, GlobalState),
)


def device_section(section_id: int, idstr: str, instance_id: int, model: DeviceModel, version: int) -> DeviceSection:
    """A device model as a section event at ``version``: its tree, description and schema."""
    cls = type(model)
    builder = TreeBuilder()
    save(model, builder, version)
    describer = Describer()
    describer._path = [f"$.{idstr}"]
    save(model, describer, version)
    desc = describer.device(idstr, instance_id, cls.VMSD_NAME, version)
    found = schemas_from_vmdesc({"page_size": PAGE_SIZE, "devices": [desc]}, cls.VMSD_NAME).lookup(idstr, instance_id)
    assert found is not None
    return DeviceSection(section_id, idstr, instance_id, version, builder.tree, found[0], desc, True, describer.size)


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096``... (QEMU's -m suffixes; a bare number is MiB, as for -m)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            n = int(float(t[:-1]) * mult[t[-1]])
        else:
            n = int(t) << 20
    except ValueError:
        raise ValueError(f"bad size {text!r}: use e.g. 64M or 1G") from None
    if n <= 0 or n % PAGE_SIZE:
        raise ValueError(f"bad size {text!r}: a positive multiple of {PAGE_SIZE} bytes")
    return n


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------


class Machine:
    """RAM, devices, dirty tracking and the workload; thread-safe through one lock."""

    def __init__(self, ram_size: int = 64 << 20, *, rate: int = 100, dirty_per_tick: int = 16,
                 device_versions: dict[str, int] | None = None, fill: str = "zero", seed: int = 1) -> None:
        if ram_size % PAGE_SIZE or ram_size < 2 * PAGE_SIZE:
            raise ValueError("RAM must be a multiple of 4 KiB, at least 8 KiB")
        self.ram_size = ram_size
        self.npages = ram_size // PAGE_SIZE
        self.ram = bytearray(ram_size)
        self.view = memoryview(self.ram)
        self.dirty = bytearray(self.npages)
        self.lock = threading.RLock()
        self.rate = max(1, rate)
        self.dirty_per_tick = max(0, dirty_per_tick)
        self.models: dict[tuple[str, int], DeviceModel] = {(i, n): cls() for i, n, cls in DEVICES}
        self.counter.rate_hz = self.rate
        self.versions: dict[str, int] = {cls.VMSD_NAME: cls.VERSION for _, _, cls in DEVICES}
        for name, v in (device_versions or {}).items():
            cls = next((c for _, _, c in DEVICES if c.VMSD_NAME == name), None)
            if cls is None:
                raise ValueError(f"no device {name!r} (devices: {', '.join(self.versions)})")
            if not cls.MINIMUM_VERSION <= v <= cls.VERSION:
                raise ValueError(f"{name}: version {v} outside {cls.MINIMUM_VERSION}..{cls.VERSION}")
            self.versions[name] = v
        if fill == "random":
            # 64 MiB of random bytes, then rotated copies of them (by an odd offset, so no page repeats):
            # every page differs and none compresses, at a fraction of the cost of a GiB of randomness.
            step = 64 << 20
            block = random.Random(seed).randbytes(min(step, ram_size))
            for k, off in enumerate(range(0, ram_size, step)):
                n = min(step, ram_size - off)
                r = (k * 1_000_003) % len(block)
                self.ram[off:off + n] = (block[r:] + block[:r])[:n]
        elif fill != "zero":
            raise ValueError("fill is zero or random")
        self._running = False
        self._quit = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    @property
    def counter(self) -> CounterState:
        model = self.models[(CounterState.VMSD_NAME, 0)]
        assert isinstance(model, CounterState)
        return model

    def mirrored_count(self) -> int:
        off = self.counter.mirror
        return int.from_bytes(self.ram[off:off + 8], "little")

    def device_ranges(self) -> dict[str, tuple[int, int]]:
        """vmsd -> (minimum, version run here): what this machine can save."""
        return {cls.VMSD_NAME: (cls.MINIMUM_VERSION, self.versions[cls.VMSD_NAME]) for _, _, cls in DEVICES}

    # -- the workload
    def start_workload(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._workload, name="vmferry-workload", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._running

    def resume(self) -> None:
        with self.lock:
            self._running = True
        self._wake.set()
        self.start_workload()

    def pause(self) -> None:
        """Stop the workload; when this returns no tick is in progress."""
        with self.lock:
            self._running = False
            self._wake.clear()

    def shutdown(self) -> None:
        self.pause()
        self._quit = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2)

    def _workload(self) -> None:
        period = 1.0 / self.rate
        due = time.monotonic()
        while not self._quit:
            if not self._running:
                self._wake.wait(0.2)
                due = time.monotonic()
                continue
            self.tick()
            due += period
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                due = time.monotonic()

    def tick(self) -> None:
        """One step of the workload (only while running)."""
        with self.lock:
            if not self._running:
                return
            c = self.counter
            c.count += 1
            n = c.count
            word = n.to_bytes(8, "little")
            dirty = self.dirty
            off = c.mirror
            self.ram[off:off + 8] = word
            dirty[off // PAGE_SIZE] = 1
            npages = self.npages
            for j in range(self.dirty_per_tick):
                page = (n * 2654435761 + j * 40503) % npages
                at = page * PAGE_SIZE + 8 * ((n + j) % (PAGE_SIZE // 8))
                if page == 0 and at < off + 8:
                    continue
                self.ram[at:at + 8] = word
                dirty[page] = 1
            serial = self.models[("serial", 0)]
            assert isinstance(serial, ISASerialState)
            serial.state.scr = n & 0xFF
            rtc = self.models[("mc146818rtc", 0)]
            assert isinstance(rtc, RTCState)
            cmos = bytearray(rtc.cmos_data)
            cmos[0x50] = n & 0xFF
            rtc.cmos_data = bytes(cmos)
            self.ticks += 1

    # -- dirty tracking
    def sync_dirty(self) -> bytearray:
        """The pages dirtied since the last sync; tracking starts afresh."""
        with self.lock:
            d, self.dirty = self.dirty, bytearray(self.npages)
        return d

    def write_pages(self, offset: int, data: Any) -> None:
        self.ram[offset:offset + len(data)] = data

    # -- state as sections
    def sections(self, versions: dict[str, int] | None = None, runstate: str = "running",
                 first_id: int = 1) -> list[DeviceSection]:
        with self.lock:
            gs = self.models[("globalstate", 0)]
            assert isinstance(gs, GlobalState)
            gs.runstate = runstate
            out = []
            for k, (idstr, inst, cls) in enumerate(DEVICES):
                v = (versions or self.versions).get(cls.VMSD_NAME, self.versions[cls.VMSD_NAME])
                out.append(device_section(first_id + k, idstr, inst, self.models[(idstr, inst)], v))
            return out

    def schemas(self) -> SchemaSet:
        """Schemas of this machine's sections at the versions it runs (for streams without a vmdesc)."""
        descs = [s.desc for s in self.sections()]
        return schemas_from_vmdesc({"page_size": PAGE_SIZE, "devices": descs}, "this endpoint's devices")


def dirty_runs(bitmap: bytearray | bytes, limit: int = PAGES_PER_RUN) -> Iterator[tuple[int, int]]:
    """(first page, end page) of every run of set bytes, cut at ``limit`` pages."""
    find = bitmap.find
    pos = 0
    n = len(bitmap)
    while pos < n:
        a = find(1, pos)
        if a < 0:
            return
        b = find(0, a)
        if b < 0:
            b = n
        for s in range(a, b, limit):
            yield s, min(b, s + limit)
        pos = b


_ZERO_RUN = bytes(PAGE_SIZE * PAGES_PER_RUN)
_ZERO_PAGE = bytes(PAGE_SIZE)


def page_events(data: bytes, first_page: int, named: bool) -> list[RamPages | RamZeros]:
    """A copied run of pages as events: zero pages collapse to RamZeros, the others stay data."""
    count = len(data) // PAGE_SIZE
    if data == _ZERO_RUN[:len(data)]:
        return [RamZeros(RAM_BLOCK, first_page * PAGE_SIZE, count, named, PAGE_SIZE)]
    out: list[RamPages | RamZeros] = []
    start = 0
    kind = None
    for i in range(count + 1):
        is_zero = None if i == count else (data[i * PAGE_SIZE] == 0 and data.startswith(_ZERO_PAGE, i * PAGE_SIZE))
        if kind is None:
            kind = is_zero
            continue
        if is_zero != kind:
            off = (first_page + start) * PAGE_SIZE
            first_named = named and not out
            if kind:
                out.append(RamZeros(RAM_BLOCK, off, i - start, first_named, PAGE_SIZE))
            else:
                chunk = data if start == 0 and i == count else data[start * PAGE_SIZE:i * PAGE_SIZE]
                out.append(RamPages(RAM_BLOCK, off, i - start, first_named, PAGE_SIZE, data=chunk))
            start, kind = i, is_zero
    return out


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
                 compress: str = "none") -> None:
        self.machine = machine
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
            listener = listen(parse_uri(uri, self.tls))
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
        from . import compat  # type: ignore[attr-defined]
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


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


@dataclass
class ServeOptions:
    qmp: str
    incoming: bool = False
    ram_size: int = 64 << 20
    paused: bool = False
    rate: int = 100
    dirty_per_tick: int = 16
    fill: str = "zero"
    supported: int | None = None
    capability_commands: bool = True
    device_versions: dict[str, int] = field(default_factory=dict)
    allow_remote: bool = False
    tls: TlsOptions | None = None
    compress: str = "none"
    quiet: bool = False


def serve(opts: ServeOptions, ready: Callable[[str], None] | None = None) -> int:
    """Run an endpoint until ``quit`` or SIGTERM/SIGINT; returns the exit status."""
    machine = Machine(opts.ram_size, rate=opts.rate, dirty_per_tick=opts.dirty_per_tick,
                      device_versions=opts.device_versions, fill="zero" if opts.incoming else opts.fill)
    server: QMPServer | None = None
    endpoint = Endpoint(machine, incoming=opts.incoming, paused=opts.paused, supported=opts.supported,
                        capability_commands=opts.capability_commands, tls=opts.tls,
                        emit=lambda name, data: server.emit(name, data) if server else None,
                        compress=opts.compress)
    server = QMPServer(endpoint.handle, version=(7, 2, 0), package=f"vmferry {__version__}")

    async def main() -> None:
        assert server is not None
        await server.start(opts.qmp, allow_remote=opts.allow_remote)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, server.close)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        where = str(server.address)
        if not opts.quiet:
            print(f"vmferry endpoint: QMP on {where}, RAM {machine.ram_size >> 20} MiB, "
                  f"{'waiting for an incoming migration' if opts.incoming else endpoint.runstate}, "
                  f"capabilities {', '.join(caps.names(endpoint.supported)) or 'none (mask 0)'}",
                  file=sys.stderr, flush=True)
        if ready is not None:
            ready(where)
        await server.serve()

    try:
        asyncio.run(main())
    finally:
        endpoint.shutdown()
    return 0


__all__ = ["COUNTER_OFFSET", "DEVICES", "ENDPOINT_CAPS", "MACHINE_TYPE", "PAGE_SIZE", "RAM_BLOCK", "CounterState",
           "Endpoint", "GlobalState", "Machine", "MigrationInfo", "ServeOptions", "device_section", "dirty_runs",
           "page_events", "parse_size", "serve", "supported_caps"]
