"""The ferry format: sized, checksummed, skippable frames (docs/format.md).

:func:`encode` turns events into a ferry stream, one frame at a time;
:class:`FerryDecoder` is a sans-IO state machine (h11-style) that is fed
bytes and hands back events, and :func:`decode` drives it over an iterable
of chunks.  Both hold at most one frame, so memory stays constant however
large the guest.  Page data is handed on as views of the input, uncopied.

``legacy -> ferry -> legacy`` is byte-exact.  A flipped bit anywhere is
caught by a CRC32C and reported with the offset of its frame; a stream cut
short is reported as truncated.  Whatever the bytes, decoding raises only
:class:`~vmferry.errors.DecodeError`.
"""

from __future__ import annotations

import collections
import enum
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..caps import Cap
from ..caps import name as caps_name
from ..errors import DecodeError, EncodeError, FerryError, TruncatedError
from ..events import (
    RAM_CONTINUE,
    RAM_PAGE,
    DeviceSection,
    Event,
    Flush,
    IterBegin,
    OpaqueSection,
    RamPages,
    RamMemSize,
    RamRecord,
    RamZeros,
)
from . import bcj, copies, planes
from .msgpack import check_cost
from .records import NATIVE, RecordDecoder, RecordEncoder, UnknownFrame
from .runs import PageGroup, regroup

NAME = "ferry"
CAP = Cap.CODEC_FERRY
FEATURES = (Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.ZSTD | Cap.LZ4 | Cap.SELF_DESCRIBING | Cap.FRAME_GROUPS
            | Cap.X86_FILTER | Cap.PAGE_COPIES | Cap.PAGE_PLANES)
REQUIRES = ("msgpack", "crc32c")  # zstandard and lz4 only for --compress
MAGIC = b"\x89FRY\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER_LEN = 32
PAYLOAD_MSGPACK = 1
PAYLOAD_CODECS = {PAYLOAD_MSGPACK: "msgpack"}

MUST_UNDERSTAND = 0x80
T_RECORD = 0x01
T_SCHEMA = 0x02
T_DEVICE = 0x03
T_PAGES = 0x10
T_ZEROS = 0x11
T_GROUP = 0x20
T_END = 0x7F
FRAME_NAMES = {T_RECORD: "RECORD", T_SCHEMA: "SCHEMA", T_DEVICE: "DEVICE", T_PAGES: "PAGES", T_ZEROS: "ZEROS",
               T_GROUP: "GROUP",
               T_END: "END"}

COMP_NONE = 0
COMP_ZSTD = 1
COMP_LZ4 = 2
COMP_MASK = 0x03
COMPRESSIONS = {"none": COMP_NONE, "zstd": COMP_ZSTD, "lz4": COMP_LZ4}
COMPRESSION_CAPS = {COMP_ZSTD: Cap.ZSTD, COMP_LZ4: Cap.LZ4}
# Bits a version-1 stream may set in its header.
STREAM_CAPS = (Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.ZSTD | Cap.LZ4 | Cap.SELF_DESCRIBING | Cap.FRAME_GROUPS
               | Cap.X86_FILTER | Cap.PAGE_COPIES | Cap.PAGE_PLANES)

MAX_BODY = 64 << 20
PAGES_PER_FRAME = 256
COMPRESS_MIN = 64  # smaller bodies are never worth compressing
ZSTD_LEVEL = 3

_HEAD = struct.Struct(">8sHHQB7x")  # magic, version, header length, caps, payload codec (28 bytes)
_FRAME = struct.Struct(">BBHII")  # type, flags, reserved, length, body crc (12 bytes) + header crc
_RUN = struct.Struct(">QIIBB")  # offset, count, page size, flags, name length
_END = struct.Struct(">7Q")
_BE32 = struct.Struct(">I")
RUN_NAMED = 0x01
RUN_FILL = 0x02
RUN_QEMU_LAYOUT = 0x04  # PAGES: the pages as QEMU's own PAGE records (docs/format.md §2.2)
RUN_X86 = 0x08  # PAGES, packed: the data went through xz's x86 branch filter, from the run's offset (§2.2)
RUN_COPIES = 0x10  # PAGES, packed, in a GROUP: some pages are copies of earlier pages of the group (§2.5)
RUN_PLANES = 0x20  # PAGES, packed, in a GROUP: a code per carried page, some stored as byte planes (§2.6)
RUN_PACKED_ONLY = RUN_X86 | RUN_COPIES | RUN_PLANES  # flags of the packed layout: never in ZEROS or QEMU layout

# GROUP frames (docs/format.md §2.4): frames compressed together, written once their frames reach GROUP_BYTES.
GROUP_BYTES = 2 << 20
PROBE_BYTES = 16 << 10  # page data whose first bytes do not shrink by PROBE_GAIN goes in a frame of its own
PROBE_GAIN = 0.95
# zstd's level for choosing byte planes: twice as fast as level 1 on 4 KiB pages, and it chose as well (§2.6).
PLANE_PROBE_LEVEL = -1
# A first group that carries this much of the main RAM block's pages is a booted guest's: the faster parameters.
BOOTED_BYTES = 64 << 10


def sniff(head: bytes) -> bool:
    return head[:8] == MAGIC


# ---------------------------------------------------------------------------
# CRC32C and compression (imported lazily)
# ---------------------------------------------------------------------------

_crc: Callable[..., int] | None = None
CRC_IMPLEMENTATION = "unknown"


def _table_crc32c() -> Callable[..., int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)

    def crc32c(data: Any, value: int = 0) -> int:
        c = value ^ 0xFFFFFFFF
        for b in bytes(data):
            c = table[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF

    return crc32c


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, continuing from ``value``."""
    global _crc, CRC_IMPLEMENTATION
    if _crc is None:
        try:
            import crc32c as _mod

            _crc = _mod.crc32c
            CRC_IMPLEMENTATION = "crc32c package"
        except ImportError:
            warnings.warn("the crc32c package is missing: ferry falls back to a pure-Python CRC32C, which is "
                          "about 1000x slower (pip install crc32c)", RuntimeWarning, stacklevel=2)
            _crc = _table_crc32c()
            CRC_IMPLEMENTATION = "pure Python (slow)"
    return _crc(data, value)


def _compressor(kind: int, level: int | None) -> Callable[[Any], bytes]:
    try:
        if kind == COMP_ZSTD:
            import zstandard

            return zstandard.ZstdCompressor(level=ZSTD_LEVEL if level is None else level).compress
        import lz4.block

        return lambda data: lz4.block.compress(data, store_size=False)
    except ImportError:
        extra = "zstd" if kind == COMP_ZSTD else "lz4"
        raise EncodeError(f"--compress {extra} needs the {extra} extra (pip install 'vmferry[{extra}]')") from None


def _decompressor(kind: int) -> Callable[[bytes, int], bytes]:
    if kind == COMP_ZSTD:
        import zstandard

        d = zstandard.ZstdDecompressor()
        return lambda data, n: d.decompress(data, max_output_size=n)
    import lz4.block

    return lambda data, n: lz4.block.decompress(data, uncompressed_size=n)


GROUP_WINDOW_LOG = 25  # zstd groups share one context: matches reach back 32 MiB, across groups (§2.4)


def _zstd_params(bulk: bool, level: int | None) -> Any:
    import zstandard

    if level is not None:
        window = zstandard.ZstdCompressionParameters.from_level(level).window_log
        return zstandard.ZstdCompressionParameters.from_level(level, window_log=min(window, GROUP_WINDOW_LOG))
    # Chosen on QEMU streams.  A stream whose first group does not fill (an idle guest: firmware, device state,
    # schemas; under 4 MiB, all within reach of the window): optimal parsing with a short search and matches from
    # 3 bytes, which x86 code rewards (5% over zstd's level 19 there).  Bulk RAM (a booted guest's): lazy
    # matching, 4x faster on a Linux guest's RAM and no larger, and long-distance matching, for pages repeated
    # far apart.
    if bulk:
        return zstandard.ZstdCompressionParameters(
            window_log=GROUP_WINDOW_LOG, chain_log=18, hash_log=17, search_log=4, min_match=3, target_length=16,
            strategy=zstandard.STRATEGY_LAZY2, enable_ldm=True, ldm_hash_log=18)
    return zstandard.ZstdCompressionParameters(
        window_log=GROUP_WINDOW_LOG, chain_log=18, hash_log=17, search_log=3, min_match=3, target_length=16,
        strategy=zstandard.STRATEGY_BTOPT)


def _group_compressor(kind: int, level: int | None, bulk: bool = False) -> Callable[[Any], bytes]:
    """The compressor of a stream's GROUP frames.

    zstd: one compression context for the whole stream, flushed at the end of every group, so that a group's
    bytes decompress (after the groups before it) to exactly its frames and matches reach back 32 MiB whatever
    the group boundaries; ``bulk`` picks the parameters for a stream of much RAM, ``level`` zstd's own
    parameters for that level.  lz4: each group on its own.
    """
    if kind != COMP_ZSTD:
        return _compressor(kind, level)
    try:
        import zstandard
    except ImportError:
        raise EncodeError("--compress zstd needs the zstd extra (pip install 'vmferry[zstd]')") from None
    context = zstandard.ZstdCompressor(compression_params=_zstd_params(bulk, level)).compressobj()
    block = zstandard.COMPRESSOBJ_FLUSH_BLOCK

    def compress_group(raw: Any) -> bytes:
        return context.compress(raw) + context.flush(block)

    return compress_group


def _probe(level: int = 1) -> Callable[[Any], bytes] | None:
    """A fast compressor that tells incompressible page data (random, encrypted, already compressed), or, at
    :data:`PLANE_PROBE_LEVEL`, which pages to store as byte planes (§2.6)."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard.ZstdCompressor(level=level).compress


def available_caps() -> Cap:
    """The stream features this installation can read and write."""
    mask = (Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.SELF_DESCRIBING | Cap.FRAME_GROUPS | Cap.X86_FILTER
            | Cap.PAGE_COPIES | Cap.PAGE_PLANES)
    for cap, mod in ((Cap.ZSTD, "zstandard"), (Cap.LZ4, "lz4.block")):
        try:
            __import__(mod)
            mask |= cap
        except ImportError:
            pass
    return mask


def _msgpack() -> Any:
    try:
        import msgpack

        return msgpack
    except ImportError:
        raise FerryError("the ferry format needs the msgpack package (pip install msgpack)") from None


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


@dataclass
class Totals:
    """The END frame's counters (docs/format.md §2.3)."""

    frames: int = 0
    sections: int = 0
    pages: int = 0
    zero_pages: int = 0
    other_records: int = 0
    page_bytes: int = 0
    stream_bytes: int = 0

    def count(self, ev: Any) -> None:
        if isinstance(ev, RamPages):
            self.pages += ev.count
            self.page_bytes += ev.count * ev.page_size
        elif isinstance(ev, RamZeros):
            self.zero_pages += ev.count
        elif isinstance(ev, RamRecord):
            self.other_records += 1
        elif isinstance(ev, (DeviceSection, OpaqueSection, IterBegin)):
            self.sections += 1

    def pack(self) -> bytes:
        return _END.pack(self.frames, self.sections, self.pages, self.zero_pages, self.other_records,
                         self.page_bytes, self.stream_bytes)

    NAMES = ("frames", "sections", "pages", "zero pages", "other RAM records", "page bytes", "stream bytes")

    def values(self) -> tuple[int, ...]:
        return (self.frames, self.sections, self.pages, self.zero_pages, self.other_records, self.page_bytes,
                self.stream_bytes)


def header(caps: int, payload: int = PAYLOAD_MSGPACK) -> bytes:
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, HEADER_LEN, caps, payload)
    return head + _BE32.pack(crc32c(head))


FRAME_HEADER_LEN = 16


def frame_extent(head: bytes | memoryview, max_body: int = MAX_BODY) -> tuple[int, bool] | None:
    """The body length of the frame whose 16-byte header is ``head``, and whether it is the END frame;
    None when the header is corrupted or its body over ``max_body`` (the decoder then says what is wrong)."""
    (hcrc,) = _BE32.unpack_from(head, 12)
    if crc32c(head[:12]) != hcrc:
        return None
    ftype, _, _, n, _ = _FRAME.unpack_from(head, 0)
    return (n, ftype & 0x7F == T_END) if n <= max_body else None


def pages_per_frame(page_size: int) -> int:
    """How many pages a PAGES frame holds: 256, fewer only for pages so large that 256 exceed a body."""
    return max(1, min(PAGES_PER_FRAME, MAX_BODY // (page_size + 8) - 1))


def frame_header(ftype: int, flags: int, body_len: int, body_crc: int) -> bytes:
    h = _FRAME.pack(ftype, flags, 0, body_len, body_crc)
    return h + _BE32.pack(crc32c(h))


class _Writer:
    def __init__(self, compress: str, level: int | None, groups: bool = False) -> None:
        if compress not in COMPRESSIONS:
            raise EncodeError(f"unknown compression {compress!r}; choose one of {', '.join(COMPRESSIONS)}")
        self.comp = COMPRESSIONS[compress]
        self.groups = groups and self.comp != COMP_NONE
        self.compressor = None
        if self.groups:
            self.level = level
            self.group_compressor: Callable[[Any], bytes] | None = None  # chosen when the first group is written
            self.probe = _probe()
            self.plane_probe = _probe(PLANE_PROBE_LEVEL)
        elif self.comp:
            self.compressor = _compressor(self.comp, level)
        self.group = bytearray()  # the frames of the open group, CRCs zero (docs/format.md §2.4)
        # CRC32C of the pages that went into groups lately (as far back as zstd's window reaches): a page that
        # repeats one of them compresses to nearly nothing, however random its bytes look to the probe.
        self.seen: collections.deque[int] = collections.deque()
        self.seen_count: collections.Counter[int] = collections.Counter()
        self.group_pages = copies.GroupPages()  # the pages of the open group, for copies (§2.5)
        self.main_block: str | None = None  # the largest RAM block (MEM_SIZE): the guest's RAM
        self.main_bytes = 0  # bytes of its pages in the first group
        self.packb = _msgpack().packb
        self.totals = Totals()
        self.records = RecordEncoder(NATIVE, schema_table=True)

    @property
    def caps(self) -> Cap:
        caps = Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.SELF_DESCRIBING | COMPRESSION_CAPS.get(self.comp, Cap(0))
        if not self.groups:
            return caps
        return caps | Cap.FRAME_GROUPS | Cap.X86_FILTER | Cap.PAGE_COPIES | Cap.PAGE_PLANES

    def frame(self, ftype: int, parts: list[Any], size: int, compressible: bool = True) -> Iterator[Any]:
        """Yield one frame whose body is the concatenation of ``parts`` (``size`` bytes).

        With groups, a compressible frame joins the open group instead (written by :meth:`flush_group`); any
        other frame is written after the open group, to keep the order.
        """
        if self.groups:
            if compressible:
                yield from self._grouped(ftype, parts, size)
                return
            yield from self.flush_group()
        flags = 0
        if self.compressor is not None and compressible and size >= COMPRESS_MIN:
            raw = parts[0] if len(parts) == 1 else b"".join(parts)
            packed = self.compressor(raw)
            if len(packed) + 4 < size:
                parts = [_BE32.pack(size), packed]
                size = len(packed) + 4
                flags = self.comp
        if size > MAX_BODY:
            raise EncodeError(f"a {FRAME_NAMES.get(ftype & 0x7F, 'frame')} frame of {size} bytes exceeds "
                              f"{MAX_BODY}")
        c = 0
        for p in parts:
            c = crc32c(p, c)
        yield frame_header(ftype, flags, size, c)
        yield from parts
        self.totals.frames += 1
        self.totals.stream_bytes += 16 + size

    def _grouped(self, ftype: int, parts: list[Any], size: int) -> Iterator[Any]:
        if size > MAX_BODY:
            raise EncodeError(f"a {FRAME_NAMES.get(ftype & 0x7F, 'frame')} frame of {size} bytes exceeds {MAX_BODY}")
        self.group += _FRAME.pack(ftype, 0, 0, size, 0)
        self.group += bytes(4)
        for p in parts:
            self.group += p
        self.totals.frames += 1
        if len(self.group) >= GROUP_BYTES:
            yield from self.flush_group()

    def flush_group(self) -> Iterator[Any]:
        """Write the open group as one GROUP frame: with zstd always compressed (its context goes on from group
        to group), with lz4 unless that would not make it smaller."""
        if not self.group:
            return
        raw = self.group
        if self.group_compressor is None:
            # The first group holds every frame up to here (no probe yet): if it filled, or holds pages of the
            # guest's RAM (a guest that ran), the faster parameters suit the stream (docs/format.md §2.4).
            bulk = len(raw) >= GROUP_BYTES or self.main_bytes >= BOOTED_BYTES
            self.group_compressor = _group_compressor(self.comp, self.level, bulk=bulk)
        packed = self.group_compressor(raw)
        flags, parts = 0, [bytes(raw)]
        if self.comp == COMP_ZSTD or len(packed) + 4 < len(raw):
            flags, parts = self.comp, [_BE32.pack(len(raw)), packed]
        self.group = bytearray()
        self.group_pages.reset()
        size = sum(len(p) for p in parts)
        c = 0
        for p in parts:
            c = crc32c(p, c)
        yield frame_header(MUST_UNDERSTAND | T_GROUP, flags, size, c)
        yield from parts
        self.totals.frames += 1
        self.totals.stream_bytes += 16 + size

    def _incompressible(self, ev: RamPages, crcs: list[int]) -> bool:
        if self.group_compressor is None:  # the first group takes every page: it decides the parameters
            return False
        return self._probed_incompressible(ev, crcs)

    def _remember(self, crcs: list[int], page_size: int) -> None:
        """Note pages (their CRC32C) as gone into a group."""
        keep = (1 << GROUP_WINDOW_LOG) // page_size
        self.seen.extend(crcs)
        self.seen_count.update(crcs)
        while len(self.seen) > keep:
            old = self.seen.popleft()
            self.seen_count[old] -= 1
            if not self.seen_count[old]:
                del self.seen_count[old]

    def _probed_incompressible(self, ev: RamPages, crcs: list[int]) -> bool:
        """Whether pages of ``ev`` taken across the run do not compress (then no group takes them): random or
        encrypted RAM would only slow the group's compressor down.  A firmware image may begin with compressed
        code and go on with tables that compress well, hence pages from all over the run."""
        if self.probe is None:
            return False
        n = ev.count
        k = min(n, max(1, PROBE_BYTES // ev.page_size))
        picks = sorted({(n - 1) * j // max(1, k - 1) for j in range(k)})
        sample = b"".join([ev.page(i) for i in picks])
        if len(self.probe(sample)) <= PROBE_GAIN * len(sample):
            return False
        return not any(crcs[i] in self.seen_count for i in picks)

    def record_frames(self, ev: Any) -> Iterator[Any]:
        if isinstance(ev, RamMemSize) and ev.blocks and self.main_block is None:
            self.main_block = max(ev.blocks, key=lambda b: b.length).name
        for rec in self.records.records(ev):
            t = rec["t"]
            ftype = T_SCHEMA if t == "schema" else T_DEVICE if t == "device" else T_RECORD
            body = self.packb(rec, use_bin_type=True)
            yield from self.frame(MUST_UNDERSTAND | ftype, [body], len(body))

    def pages(self, group: PageGroup) -> Iterator[Any]:
        """One PAGES frame of a group (at most :func:`pages_per_frame` pages), its data as views."""
        ps = group.page_size
        name = group.block.encode("latin-1")
        if len(name) > 255:
            raise EncodeError(f"block name {group.block[:40]!r}... is longer than 255 bytes", "$.ram")
        flags = RUN_NAMED if group.named else 0
        if self.groups:
            ev = group.as_event()
            crcs = [crc32c(page) for page in ev.pages()]
            if not self._incompressible(ev, crcs):
                self._remember(crcs, ps)
                yield from self._grouped_pages(ev, crcs, flags, name)
                return
        parts = group.qemu_records()
        if parts is not None:
            # QEMU's records as they came: slices of the input, nothing copied.
            flags |= RUN_QEMU_LAYOUT
        else:
            parts = group.data()
        head = _RUN.pack(group.offset, group.count, ps, flags, len(name)) + name
        yield from self.frame(MUST_UNDERSTAND | T_PAGES, [head, *parts], len(head) + sum(len(p) for p in parts),
                              compressible=not self.groups)

    def _grouped_pages(self, ev: RamPages, crcs: list[int], flags: int, name: bytes) -> Iterator[Any]:
        """A PAGES frame in the open group: packed (QEMU's record headers would only cost bytes; the reader
        rebuilds them), pages that repeat a page of the group as copies of it (§2.5), code through the x86
        filter, which makes its call targets repeat (each stretch of carried pages on its own), and pages of
        words as their byte planes where the probe finds them smaller so (§2.6)."""
        ps = ev.page_size
        if self.group_compressor is None and ev.block == self.main_block:
            self.main_bytes += ev.count * ps
        found = self.group_pages.split(list(ev.pages()))
        if not found:
            carried: list[tuple[int, Any]] = [(0, ev.contiguous())]
            table = b""
        else:
            flags |= RUN_COPIES
            table = copies.pack_copies(found)
            data = memoryview(ev.contiguous())
            carried = [(first, data[first * ps:end * ps])
                       for first, end in copies.stretches(ev.count, {i for i, _ in found})]
        if carried and bcj.looks_like_x86(carried[0][1] if len(carried) == 1 else b"".join(p for _, p in carried)):
            carried = [(first, bcj.encode_pages(p, ev.offset + first * ps)) for first, p in carried]
            flags |= RUN_X86
        payload: list[Any] = [p for _, p in carried]
        if self.plane_probe is not None and carried:
            codes, stored = planes.store(carried, ps, self.plane_probe)
            if codes:
                flags |= RUN_PLANES
                table += codes
                payload = stored
        head = _RUN.pack(ev.offset, ev.count, ps, flags, len(name)) + name + table
        parts = [head, *payload]
        yield from self._grouped(MUST_UNDERSTAND | T_PAGES, parts, sum(len(p) for p in parts))

    def zeros(self, ev: RamZeros) -> Iterator[Any]:
        name = ev.block.encode("latin-1")
        if len(name) > 255:
            raise EncodeError(f"block name {ev.block[:40]!r}... is longer than 255 bytes", "$.ram")
        flags = (RUN_NAMED if ev.named else 0) | (RUN_FILL if ev.fill is not None else 0)
        body = _RUN.pack(ev.offset, ev.count, ev.page_size, flags, len(name)) + name + (ev.fill or b"")
        yield from self.frame(MUST_UNDERSTAND | T_ZEROS, [body], len(body))


def encode(events: Iterable[Event], compress: str = "none", level: int | None = None,
           groups: bool = False) -> Iterator[bytes | memoryview]:
    """Encode events as a ferry stream; ``compress`` is ``none``, ``zstd`` or ``lz4``.

    ``groups`` (with a compression) compresses runs of frames together in GROUP frames, page data packed and
    x86 code filtered (docs/format.md §2.4): much smaller, readable by readers that know the ``frame-groups`` and
    ``x86-filter`` capabilities (older ones refuse the stream, naming them).  Without it every frame is
    compressed on its own.  Yields chunks: frame headers, and page data as views of the events' buffers.
    """
    w = _Writer(compress, level, groups)
    head = header(w.caps)
    w.totals.stream_bytes = len(head)
    yield head
    def counted(events: Iterable[Event]) -> Iterator[Event]:
        for ev in events:
            w.totals.count(ev)
            yield ev

    # Frames cut the same way however the decoder cut the runs (a file and a pipe give the same bytes).
    for ev in regroup(counted(events), pages_per_frame):
        if isinstance(ev, PageGroup):
            yield from w.pages(ev)
        elif isinstance(ev, RamZeros):
            yield from w.zeros(ev)
        elif isinstance(ev, Flush):
            if w.groups:
                yield from w.flush_group()
            yield b""  # nothing on the wire; tells the writer to write what it holds
        elif isinstance(ev, UnknownFrame):
            if w.groups:
                yield from w.flush_group()
            c = crc32c(ev.body)
            yield frame_header(ev.type, ev.flags, len(ev.body), c)
            yield ev.body
            w.totals.frames += 1
            w.totals.stream_bytes += 16 + len(ev.body)
        else:
            yield from w.record_frames(ev)
    if w.groups:
        yield from w.flush_group()
    body = w.totals.pack()
    yield frame_header(MUST_UNDERSTAND | T_END, 0, len(body), crc32c(body))
    yield body


# ---------------------------------------------------------------------------
# Decoding: a sans-IO state machine
# ---------------------------------------------------------------------------


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
DONE = _Sentinel("DONE")


class State(enum.Enum):
    HEADER = "header"
    FRAMES = "frames"
    DONE = "done"
    ERROR = "error"


@dataclass
class DecodeOptions:
    """What a ferry reader may be asked for."""

    keep_unknown: bool = False  # hand skippable unknown frames on as UnknownFrame events
    max_body: int = MAX_BODY
    # Also give each page run its exact QEMU record bytes (RamPages.legacy), built in one pass:
    # the legacy encoder then writes them as they are.  For output to QEMU's format.
    legacy_records: bool = False


class FerryDecoder:
    """Bytes in, events out; no I/O (docs/format.md §5).

    ``feed(data)`` appends input; ``next_event()`` returns the next event,
    :data:`NEED_DATA` when it needs more input, or :data:`DONE` after the END
    frame; ``feed_eof()`` says the input ended (a stream that ends early
    then raises :class:`TruncatedError`).  After an error the decoder stays
    in state ``ERROR`` and raises again.
    """

    def __init__(self, options: DecodeOptions | None = None) -> None:
        self.opts = options or DecodeOptions()
        self.state = State.HEADER
        self.caps = Cap(0)
        self.version = 0
        self._chunks: list[memoryview] = []
        self._have = 0
        self._offset = 0  # absolute offset of the first buffered byte
        self._eof = False
        self._pending: list[Any] = []
        self._records = RecordDecoder(NATIVE)
        self._totals = Totals()
        self._unpackb: Any = None
        self._decompress: dict[int, Callable[[bytes, int], bytes]] = {}
        self.frames_skipped = 0
        self._inner = 0  # bytes left of the GROUP being read (its frames are at the head of the buffer)
        self._group_at = 0  # offset of that GROUP frame in the stream
        self._groups: _GroupStream | None = None  # the zstd context that runs through the stream's groups
        self._group_pages: list[memoryview] = []  # the pages of the GROUP being read, by number (§2.5)
        self._copy_budget = 0  # bytes of pages its copies may still repeat

    # --- input
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        if data:
            view = memoryview(data)
            if not view.readonly:  # a caller's mutable buffer: keep our own copy (bytes and mmaps are not copied)
                view = memoryview(bytes(view))
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            self._chunks.append(view)
            self._have += len(view)

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def offset(self) -> int:
        return self._offset

    def _peek(self, n: int) -> memoryview | None:
        """The next ``n`` bytes as one view (joining chunks only when they span), or None."""
        if self._have < n:
            return None
        first = self._chunks[0]
        if len(first) >= n:
            return first[:n]
        parts = []
        need = n
        while need:
            c = self._chunks[0]
            if len(c) <= need:
                parts.append(c)
                need -= len(c)
                self._chunks.pop(0)
            else:
                parts.append(c[:need])
                self._chunks[0] = c[need:]
                need = 0
        joined = memoryview(b"".join(parts))
        self._chunks.insert(0, joined)
        return joined

    def _span(self, skip: int, n: int) -> list[memoryview]:
        """Views of the ``n`` buffered bytes after the first ``skip`` (which must all be buffered)."""
        out = []
        for c in self._chunks:
            if skip >= len(c):
                skip -= len(c)
                continue
            piece = c[skip:skip + n]
            skip = 0
            out.append(piece)
            n -= len(piece)
            if not n:
                break
        return out

    def _consume(self, n: int) -> None:
        self._have -= n
        if self._inner:  # bytes of a GROUP's frames are not stream bytes: the GROUP frame was consumed as a whole
            self._inner -= n
        else:
            self._offset += n
        while n:
            c = self._chunks[0]
            if len(c) <= n:
                n -= len(c)
                self._chunks.pop(0)
            else:
                self._chunks[0] = c[n:]
                n = 0

    # --- output
    def next_event(self) -> Any:
        if self.state is State.ERROR:
            raise DecodeError("the decoder failed earlier", self._offset, "$")
        try:
            while not self._pending:
                if self.state is State.DONE:
                    if self._have:
                        raise DecodeError("bytes after the END frame", self._offset, "$")
                    return DONE
                progressed = self._header() if self.state is State.HEADER else self._frame()
                if not progressed:
                    if self._eof:
                        self._truncated()
                    return NEED_DATA
            ev = self._pending.pop(0)
            self._totals.count(ev)
            return ev
        except DecodeError:
            self.state = State.ERROR
            raise
        except FerryError as e:
            self.state = State.ERROR
            raise DecodeError(str(e), self._offset, "$") from None
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, struct.error,
                UnicodeError) as e:
            self.state = State.ERROR
            raise DecodeError(f"malformed ferry stream ({type(e).__name__}: {e})", self._offset, "$") from None

    def _truncated(self) -> None:
        if self.state is State.HEADER:
            if self._have == 0 and self._offset == 0:
                raise TruncatedError("empty input", 0, "$")
            raise TruncatedError(f"the stream ends inside its header ({self._have} bytes)", self._offset, "$.header")
        if self._have == 0:
            raise TruncatedError("the stream ends without its END frame (truncated)", self._offset, "$")
        raise TruncatedError(f"the stream ends inside the frame at offset {self._offset:#x} ({self._have} of its "
                             "bytes arrived; truncated)", self._offset, "$")

    def _header(self) -> bool:
        data = self._peek(HEADER_LEN)
        if data is None:
            n = min(8, len(self._chunks[0])) if self._chunks else 0
            if n and bytes(self._chunks[0][:n]) != MAGIC[:n]:
                raise DecodeError("not a ferry stream (bad magic)", 0, "$.header")
            return False
        if bytes(data[:8]) != MAGIC:
            raise DecodeError(f"not a ferry stream (magic {bytes(data[:8]).hex(' ')})", 0, "$.header")
        # The first 32 bytes are checked before any of their fields is believed (docs/format.md §1).
        (want,) = _BE32.unpack_from(data, HEADER_LEN - 4)
        if crc32c(data[:HEADER_LEN - 4]) != want:
            raise DecodeError("ferry header CRC mismatch: the header is corrupted", 0, "$.header")
        version, hlen = struct.unpack_from(">HH", data, 8)
        if version != FORMAT_VERSION:
            raise DecodeError(f"ferry format version {version}; this reader knows version {FORMAT_VERSION}", 8,
                              "$.header")
        if hlen != HEADER_LEN:
            raise DecodeError(f"ferry version 1 header of {hlen} bytes (expected {HEADER_LEN})", 10, "$.header")
        _, _, _, caps, payload = _HEAD.unpack_from(data, 0)
        self.version, self.caps = version, Cap(caps)
        unknown = Cap(caps & ~int(STREAM_CAPS))
        if unknown:
            from ..caps import names

            raise DecodeError(f"the stream needs capabilities this reader lacks: {', '.join(names(unknown))}", 12,
                              "$.header")
        lacking = Cap(caps & ~int(available_caps()))
        if lacking:
            from ..caps import names

            raise DecodeError(f"the stream uses {', '.join(names(lacking))}, which is not installed here "
                              "(pip install 'vmferry[zstd,lz4]')", 12, "$.header")
        if payload not in PAYLOAD_CODECS:
            raise DecodeError(f"unknown payload codec {payload}", 20, "$.header")
        self._unpackb = _msgpack().unpackb
        self._totals.stream_bytes = hlen
        self._consume(hlen)
        self.state = State.FRAMES
        return True

    def _frame(self) -> bool:
        if self._inner:
            return self._grouped_frame()
        start = self._offset
        fh = self._peek(16)
        if fh is None:
            return False
        (hcrc,) = _BE32.unpack_from(fh, 12)
        if crc32c(fh[:12]) != hcrc:
            raise DecodeError("corrupted frame header (CRC32C mismatch)", start, "$")
        ftype, flags, reserved, n, bcrc = _FRAME.unpack_from(fh, 0)
        kind = ftype & 0x7F
        name = FRAME_NAMES.get(kind, f"type {kind:#04x}")
        if n > self.opts.max_body:
            raise DecodeError(f"{name} frame of {n} bytes exceeds the {self.opts.max_body}-byte limit", start, "$")
        if self._have < 16 + n:
            return False
        parts = self._span(16, n)  # the body as views of the input, however the chunks fell: nothing joined yet
        c = 0
        for part in parts:
            c = crc32c(part, c)
        if c != bcrc:
            raise DecodeError(f"{name} frame body is corrupted (CRC32C mismatch)", start, "$")
        if len(parts) == 1:
            body = parts[0]
        elif kind == T_PAGES and not flags & COMP_MASK and n > _RUN.size:
            # page data stays a view when it lies in one chunk: join only the run header
            fixed = _join_after(parts, _RUN.size).head
            body = _join_after(parts, _RUN.size + fixed[-1])
        else:
            body = memoryview(b"".join(parts))
        return self._handle(ftype, flags, reserved, n, body, start)

    def _grouped_frame(self) -> bool:
        """The next frame inside a GROUP (docs/format.md §2.4): no CRCs of its own, within the group's bytes."""
        start = self._group_at
        if self._inner < 16:
            raise DecodeError("a GROUP frame ends inside the header of a frame it holds", start, "$")
        fh = self._peek(16)
        assert fh is not None  # the group's bytes are all buffered
        ftype, flags, reserved, n, bcrc = _FRAME.unpack_from(fh, 0)
        (hcrc,) = _BE32.unpack_from(fh, 12)
        name = FRAME_NAMES.get(ftype & 0x7F, f"type {ftype & 0x7F:#04x}")
        if bcrc or hcrc:
            raise DecodeError(f"{name} frame inside a GROUP carries CRCs (they must be zero)", start, "$")
        if 16 + n > self._inner:
            raise DecodeError(f"{name} frame of {n} bytes runs past the end of its GROUP", start, "$")
        if ftype & 0x7F in (T_GROUP, T_END) or flags & COMP_MASK:
            raise DecodeError(f"a GROUP frame holds a {name} frame (flags {flags:#04x})", start, "$")
        parts = self._span(16, n)
        body = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
        return self._handle(ftype, flags, reserved, n, body, start)

    def _enter_group(self, body: memoryview, start: int) -> None:
        """Put a GROUP's frames (decompressed) at the head of the buffer, to be read as frames."""
        if len(body):
            self._chunks.insert(0, body)
            self._have += len(body)
            self._inner = len(body)
            self._group_at = start
            self._copy_budget = copies.MAX_REPEATED

    def _handle(self, ftype: int, flags: int, reserved: int, n: int, body: Any, start: int) -> bool:
        """Act on one whole frame (its CRCs checked) and consume it."""
        kind = ftype & 0x7F
        name = FRAME_NAMES.get(kind, f"type {kind:#04x}")
        known = kind in FRAME_NAMES and not flags & ~COMP_MASK and flags & COMP_MASK != 3 and not reserved
        if not known:
            if ftype & MUST_UNDERSTAND:
                raise DecodeError(f"frame {name} (flags {flags:#04x}) must be understood, and this reader "
                                  f"(format version {FORMAT_VERSION}) does not know it", start, "$")
            self.frames_skipped += 1
            self._totals.frames += 1
            if self.opts.keep_unknown:
                self._pending.append(UnknownFrame(ftype, flags, bytes(body)))
            self._consume(16 + n)
            return True
        if kind == T_GROUP and not self.caps & Cap.FRAME_GROUPS:
            raise DecodeError("GROUP frame in a stream whose header does not announce frame-groups", start, "$")
        if kind == T_GROUP:
            self._group_pages = []  # the last group's pages go before this one is inflated
        if flags & COMP_MASK == COMP_ZSTD and kind == T_GROUP:
            body = self._inflate_group(body, start)
        elif flags & COMP_MASK:
            body = self._inflate(flags & COMP_MASK, body, start, name)
        if kind == T_END:
            self._end(body, start)
        elif kind == T_GROUP:
            self._totals.frames += 1
            self._consume(16 + n)
            self._enter_group(body, start)
            return True
        else:
            self._totals.frames += 1
            if kind == T_PAGES or kind == T_ZEROS:
                run = self._run(kind, body, start)
                self._records.sequence(run, "$.ram", start)  # RAM frames only inside a RAM section
                self._pending.append(run)
            else:
                self._record(kind, body, start)
        self._consume(16 + n)
        return True

    def _inflate(self, comp: int, body: memoryview, start: int, name: str) -> memoryview:
        if comp not in self._decompress:
            cap = COMPRESSION_CAPS[comp]
            if not self.caps & cap:
                raise DecodeError(f"{name} frame is compressed with {caps_name(cap)}, which the header does not "
                                  "announce", start, "$")
            self._decompress[comp] = _decompressor(comp)
        if len(body) < 4:
            raise DecodeError(f"compressed {name} frame too short", start, "$")
        (size,) = _BE32.unpack_from(body, 0)
        if size > self.opts.max_body:
            raise DecodeError(f"{name} frame inflates to {size} bytes, over the limit", start, "$")
        try:
            out = self._decompress[comp](bytes(body[4:]), size)
        except Exception as e:  # noqa: BLE001 - zstandard/lz4 raise their own error types
            raise DecodeError(f"{name} frame does not decompress ({e})", start, "$") from None
        if len(out) != size:
            raise DecodeError(f"{name} frame inflates to {len(out)} bytes, its header says {size}", start, "$")
        return memoryview(out)

    def _inflate_group(self, body: memoryview, start: int) -> memoryview:
        """A zstd GROUP's frames: its bytes go on with the context of the groups before it (§2.4)."""
        if not self.caps & Cap.ZSTD:
            raise DecodeError("GROUP frame is compressed with zstd, which the header does not announce", start, "$")
        if len(body) < 4:
            raise DecodeError("compressed GROUP frame too short", start, "$")
        (size,) = _BE32.unpack_from(body, 0)
        if size > self.opts.max_body:
            raise DecodeError(f"GROUP frame inflates to {size} bytes, over the limit", start, "$")
        if self._groups is None:
            self._groups = _GroupStream()
        try:
            out = self._groups.read(body[4:], size)
        except Exception as e:  # noqa: BLE001 - zstandard raises its own error types
            raise DecodeError(f"GROUP frame does not decompress ({e})", start, "$") from None
        if len(out) != size:
            raise DecodeError(f"GROUP frame inflates to {len(out)} bytes, its header says {size}", start, "$")
        return out

    def _run(self, kind: int, body: Any, start: int) -> RamPages | RamZeros:
        path = "$.ram"
        head = body.head if isinstance(body, _Pieces) else body  # _Pieces: a PAGES body that spanned chunks
        if len(head) < _RUN.size:
            raise DecodeError("RAM frame too short", start, path)
        offset, count, ps, flags, nlen = _RUN.unpack_from(head, 0)
        pos = _RUN.size + nlen
        if len(head) < pos:
            raise DecodeError("RAM frame too short for its block name", start, path)
        block = bytes(head[_RUN.size:pos]).decode("latin-1")
        tail = body.rest if isinstance(body, _Pieces) else body[pos:]
        if ps < 512 or ps > (1 << 21) or ps & (ps - 1):
            raise DecodeError(f"implausible page size {ps}", start, path)
        if count == 0:
            raise DecodeError("RAM frame of no pages", start, path)
        if flags & ~(RUN_NAMED | RUN_FILL | RUN_QEMU_LAYOUT | RUN_PACKED_ONLY) or (
                kind == T_PAGES and flags & RUN_FILL) or (
                kind == T_ZEROS and flags & (RUN_QEMU_LAYOUT | RUN_PACKED_ONLY)) or (
                flags & RUN_PACKED_ONLY and flags & RUN_QEMU_LAYOUT):
            raise DecodeError(f"unknown RAM frame flags {flags:#04x}", start, path)
        if flags & RUN_X86 and not self.caps & Cap.X86_FILTER:
            raise DecodeError("x86-filtered PAGES frame in a stream whose header does not announce x86-filter",
                              start, path)
        if flags & RUN_COPIES and not self.caps & Cap.PAGE_COPIES:
            raise DecodeError("PAGES frame with copies in a stream whose header does not announce page-copies",
                              start, path)
        if flags & RUN_COPIES and not self._inner:
            raise DecodeError("PAGES frame with copies outside a GROUP", start, path)
        if flags & RUN_PLANES and not self.caps & Cap.PAGE_PLANES:
            raise DecodeError("PAGES frame with byte planes in a stream whose header does not announce page-planes",
                              start, path)
        if flags & RUN_PLANES and not self._inner:
            raise DecodeError("PAGES frame with byte planes outside a GROUP", start, path)
        self._records.check_run(block, offset, count, ps, path, start)
        named = bool(flags & RUN_NAMED)
        if kind == T_PAGES and flags & RUN_QEMU_LAYOUT:
            records = tail
            _check_qemu_records(records, block, offset, count, named, ps, start)
            run = RamPages(block, offset, count, named, ps, legacy=records)
            if self._inner and self.caps & Cap.PAGE_COPIES:
                self._group_pages.extend(run.pages())
            return run
        if kind == T_PAGES:
            data = self._packed(tail, offset, count, ps, flags, start, path)
            run = RamPages(block, offset, count, named, ps, data=data)
            if self.opts.legacy_records:
                run.legacy = legacy_page_records(block, offset, count, named, ps, data)
            return run
        fill = None
        if flags & RUN_FILL:
            if len(tail) != count:
                raise DecodeError(f"ZEROS frame holds {len(tail)} fill bytes for {count} pages", start, path)
            fill = bytes(tail)
        elif len(tail):
            raise DecodeError("ZEROS frame has trailing bytes", start, path)
        return RamZeros(block, offset, count, named, ps, fill)

    def _packed(self, tail: Any, offset: int, count: int, ps: int, flags: int, start: int, path: str) -> Any:
        """The page data of a packed PAGES frame (``tail``: its body after the run header): its copy table and
        plane codes read and checked, then the carried pages' planes joined, the x86 filter undone and the
        copies placed (§2.5, §2.6)."""
        k = 0
        data_at = 0
        if flags & RUN_COPIES:
            if count * ps > self.opts.max_body:
                raise DecodeError(f"PAGES frame of {count} pages of {ps} bytes, over the limit", start, path)
            k, data_at = copies.table_length(tail, count, start, path)
        codes_at = data_at
        if flags & RUN_PLANES:
            data_at += count - k
        if len(tail) != data_at + (count - k) * ps:
            raise DecodeError(f"PAGES frame holds {len(tail)} bytes for {count} pages of {ps}"
                              + (f", {k} of them copies" if k else ""), start, path)
        data = tail[data_at:]
        if flags & RUN_PLANES:
            codes = planes.read_codes(tail[codes_at:data_at], start, path)
            if any(codes):
                data = planes.restore(data, codes, ps)
        x86 = bool(flags & RUN_X86)
        if k:
            refs = copies.read_table(tail, k, count, ps, len(self._group_pages), self._copy_budget, start, path)
            self._copy_budget -= k * ps

            def unfilter(piece: Any, first: int) -> bytes:
                return bcj.decode_pages(piece, offset + first * ps)

            return copies.rebuild(data, count, ps, refs, self._group_pages, unfilter if x86 else None, start, path)
        if x86:
            data = memoryview(bcj.decode_pages(data, offset))
        if self._inner and self.caps & Cap.PAGE_COPIES:
            self._group_pages.extend(data[i * ps:(i + 1) * ps] for i in range(count))
        return data

    def _record(self, kind: int, body: memoryview, start: int) -> None:
        path = f"$.frames[{self._totals.frames - 1}]"
        check_cost(body, start, path)  # bound the objects before msgpack builds them
        try:
            rec = self._unpackb(body, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types
            raise DecodeError(f"{FRAME_NAMES[kind]} frame body is not MessagePack ({type(e).__name__})", start,
                              path) from None
        t = rec.get("t") if isinstance(rec, dict) else None
        expect = {T_SCHEMA: ("schema",), T_DEVICE: ("device",)}.get(kind)
        if (expect is not None and t not in expect) or (kind == T_RECORD and t in ("schema", "device", "stream",
                                                                                   "fin", "frame")):
            raise DecodeError(f"{FRAME_NAMES[kind]} frame holds a {t!r} record", start, path)
        self._pending.extend(self._records.record(rec, start, path, 16 + len(body)))

    def _end(self, body: memoryview, start: int) -> None:
        if len(body) < _END.size:
            raise DecodeError("END frame too short", start, "$.end")
        if self._groups is not None and self._groups.leftover():
            raise DecodeError("the GROUP frames inflate to more bytes than they announce", start, "$.end")
        theirs = _END.unpack_from(body, 0)
        self._totals.stream_bytes = start
        ours = self._totals.values()  # every event before the END frame has been handed out and counted
        diff = [f"{n}: {t} announced, {o} received" for n, t, o in zip(Totals.NAMES, theirs, ours) if t != o]
        if diff:
            raise DecodeError("the END frame's totals do not match the stream (data was lost or added): "
                              + "; ".join(diff), start, "$.end")
        self._records.finish(start)
        self.state = State.DONE


_BE64 = struct.Struct(">Q")


class _Feed:
    """Compressed bytes handed to zstd's stream reader as it asks for them (b"" once used up)."""

    def __init__(self) -> None:
        self.pending = bytearray()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = len(self.pending)
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out


class _GroupStream:
    """The zstd context of a stream's GROUP frames: each group's bytes are fed, and exactly the group's announced
    size is read back (zstd's stream reader never produces more than asked, so no group, however crafted,
    inflates beyond its announced size); the window is bounded to 32 MiB."""

    def __init__(self) -> None:
        import zstandard

        self._feed = _Feed()
        self._reader = zstandard.ZstdDecompressor(max_window_size=1 << GROUP_WINDOW_LOG).stream_reader(
            self._feed, read_size=1 << 16, read_across_frames=True, closefd=False)  # type: ignore[arg-type]

    def read(self, data: Any, size: int) -> memoryview:
        """Feed ``data`` (a group's compressed bytes) and return the group's ``size`` bytes (fewer if they end), as
        a read-only view (not copied again)."""
        self._feed.pending += data
        out = bytearray()
        while len(out) < size:
            piece = self._reader.read(size - len(out))
            if not piece:
                break
            out += piece
        return memoryview(out).toreadonly()

    def leftover(self) -> bool:
        """Whether the groups inflate to more than they announced (asked once, after the last group: the bytes
        a group inflates to beyond its size would otherwise fall into the next group, whose frames then fail)."""
        try:
            return bool(self._reader.read(1))
        except Exception:  # noqa: BLE001 - zstandard's own error types: damaged bytes after the last group
            return True


class _Pieces:
    """A PAGES body in two parts: a small head (joined) and the rest (a view when it lies in one chunk)."""

    __slots__ = ("head", "rest")

    def __init__(self, head: bytes, rest: memoryview) -> None:
        self.head, self.rest = head, rest


def _join_after(parts: list[memoryview], k: int) -> Any:
    """``parts`` as one body, joining the first ``k`` bytes and the rest separately (see _Pieces)."""
    head: list[memoryview] = []
    need = min(k, sum(len(p) for p in parts))
    rest = list(parts)
    while need:
        p = rest.pop(0)
        if len(p) <= need:
            head.append(p)
            need -= len(p)
        else:
            head.append(p[:need])
            rest.insert(0, p[need:])
            need = 0
    tail = rest[0] if len(rest) == 1 else memoryview(b"".join(rest))
    return _Pieces(b"".join(head), tail)


def _check_qemu_records(rec: memoryview, block: str, offset: int, count: int, named: bool, ps: int,
                        start: int) -> None:
    """Check that QEMU-layout page records say exactly what the run header says (no call per page)."""
    name = block.encode("latin-1")
    head = 8 + (1 + len(name) if named else 0)
    stride = 8 + ps
    if len(rec) != head + ps + (count - 1) * stride:
        raise DecodeError(f"PAGES frame holds {len(rec)} bytes of QEMU records for {count} pages of {ps}", start,
                          "$.ram")
    flag = RAM_PAGE | RAM_CONTINUE
    first = offset | (RAM_PAGE if named else flag)
    if _BE64.unpack_from(rec, 0)[0] != first or (named and bytes(rec[8:head]) != bytes([len(name)]) + name):
        raise DecodeError("PAGES frame: the first QEMU record does not match the run", start, "$.ram")
    n = count - 1
    if n:
        want = struct.pack(f">{n}Q", *range((offset + ps) | flag, offset + count * ps, ps))
        rest = rec[head + ps:]
        for j in range(8):  # byte j of every address word, in one strided comparison
            if rest[j::stride] != want[j::8]:
                raise DecodeError("PAGES frame: a QEMU record header does not match the run", start, "$.ram")


def legacy_page_records(block: str, offset: int, count: int, named: bool, ps: int, data: memoryview) -> bytes:
    """The QEMU PAGE records of a run (spec §5.1), in one join: what the legacy encoder would write."""
    pack = _BE64.pack
    flag = RAM_PAGE | RAM_CONTINUE
    parts: list[Any] = []
    append = parts.append
    if named:
        name = block.encode("latin-1")
        append(pack(offset | RAM_PAGE) + bytes([len(name)]) + name)
    else:
        append(pack(offset | flag))
    append(data[:ps])
    pos = ps
    for addr in range(offset + ps, offset + count * ps, ps):
        append(pack(addr | flag))
        append(data[pos:pos + ps])
        pos += ps
    return b"".join(parts)


def decode(chunks: Iterable[bytes | bytearray | memoryview], options: DecodeOptions | None = None) -> Iterator[Event]:
    """Decode a ferry stream from an iterable of chunks.  Raises only :class:`DecodeError`."""
    dec = FerryDecoder(options)
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while True:
                ev = dec.next_event()
                if ev is NEED_DATA or ev is DONE:
                    break
                yield ev
        dec.feed_eof()
        while (ev := dec.next_event()) is not DONE:
            yield ev
    except DecodeError:
        raise
    except FerryError as e:
        raise DecodeError(str(e), dec.offset, "$") from None
