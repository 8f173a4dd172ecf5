"""The machine of a vmferry endpoint: guest RAM, Python device models and a workload that keeps them busy.

The machine is guest RAM (one block, ``pc.ram``), vmferry's Python models
of QEMU's RTC, PIT, keyboard controller and UART, a counter device, and
QEMU's ``globalstate`` section.  A built-in workload keeps it busy: at
``rate`` ticks per second it advances the counter, mirrors the count into
RAM at :data:`COUNTER_OFFSET`, writes it into ``dirty_per_tick`` other pages
(all tracked in a dirty bitmap), and puts its low byte in the UART's scratch
register and the CMOS RAM, so device state moves too.

It knows nothing of sockets or QMP: :mod:`.endpoint` migrates it and
:mod:`.serve` puts it behind QMP.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from ...caps import Cap
from ...events import (
    DeviceSection,
    RamPages,
    RamZeros,
)
from ...serialize.devices import ISAKBDState, ISASerialState, PITCommonState, PS2KbdState, RTCState
from ...serialize.devices.base import DeviceModel, save
from ...serialize.qemu_vmdesc import schemas_from_vmdesc
from ...serialize.schema import SchemaSet
from ...serialize.visitor import Describer, TreeBuilder, Visitor

PAGE_SIZE = 4096
RAM_BLOCK = "pc.ram"
MACHINE_TYPE = "vmferry-endpoint-1"
#: Where the workload mirrors the counter in RAM (as the counting boot sector does, vmferry.live.qemu.guest).
COUNTER_OFFSET = 0x600
PAGES_PER_RUN = 256
RAM_SECTION_ID = 0

#: Capabilities a vmferry endpoint offers: its codecs' bits, ferry's features, and the live bits.
ENDPOINT_CAPS = (Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.SELF_DESCRIBING | Cap.CODEC_FERRY | Cap.RETURN_PATH
                 | Cap.DEVICE_VERSIONS)


def supported_caps() -> Cap:
    """What this installation can do (zstd and lz4 only when their packages are there)."""
    mask = ENDPOINT_CAPS
    try:
        from ...encode import ferry

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


