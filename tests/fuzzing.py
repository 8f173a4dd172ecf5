"""A fuzzer for the ten codecs and everything after their decoders, in-process.

Used by tests/test_fuzz.py (a few seconds per codec, in CI) and by benchmarks/fuzz.py (the full run:
hundreds of thousands of inputs per codec over worker processes).

Inputs are seed streams mutated.  The seeds are built here from vmferry's own device models (QEMU's RTC,
PIT, keyboard controller, UART, ...) and encoded in every format; benchmarks/fuzz.py can add real QEMU
streams.  Mutations are both blind (bit flips, interesting integers, cuts, splices, repeats) and aware of
each format's structure, so that most inputs still decode and carry hostile *values* further: the records
of the record formats are edited value by value and re-serialised, ferry frames are edited and their
CRC32Cs recomputed, QEMU's stream gets interesting integers at its record boundaries.

Each input goes through what the CLI and the proxy do with a stream (:func:`exercise`): decode (the codec
contract: only DecodeError, naming an offset inside the input), ``inspect`` (the summary and the
``--json`` document), ``convert`` to QEMU's format and to one other format, and the proxy's
``transcode`` (ferry or QEMU's format in, both wires out, sometimes converting the machine type; a
record-format input goes in as the ferry stream it converts to).  Each step decodes QEMU's format and
ferry afresh, as each command would (their options differ by target); a record format's events are
decoded once and handed to each step (the same events every decode would give).

Outcomes (:class:`Outcome`): ``ok``; ``refused`` (a DecodeError from the decoder); ``refused-later`` (any
other FerryError, which the CLI reports with exit 2); and the failures: ``internal`` (any other
exception: the CLI's exit 1), ``no-offset`` (a DecodeError without an offset inside the input), ``hang``
(over the time limit), ``memory`` (MemoryError).  An encoder that writes more than :data:`OUTPUT_CAP`
bytes for one input is stopped and counted as ``capped`` (RAM runs may expand a small input a lot: a
ZEROS frame of 2^32 pages is 36 GB of QEMU records); that is not a failure, its memory is still
measured.  Peak RSS is measured per input (``/proc/self/clear_refs``, Linux), or per batch where that is
not available.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from vmferry import encode
from vmferry.encode import ferry, legacy
from vmferry.encode.configuration import configuration_state
from vmferry.encode.records import JSON_TEXT, NATIVE, NATIVE_BYTES, RecordEncoder, encode_records
from vmferry.errors import DecodeError, FerryError
from vmferry.events import (
    CMD_PACKAGED,
    RAM_MULTIFD_FLUSH,
    RAM_XBZRLE,
    SECTION_END,
    SECTION_FULL,
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
from vmferry.cli.files import Input, decode_input
from vmferry.cli.summary import StreamSummary

CODECS = tuple(encode.names())
RECORD_CODECS = ("jsonl", "json", "cbor", "msgpack", "asn1-ber", "asn1-der", "asn1-per", "asn1-xer")
OUTPUT_CAP = 64 << 20
MAX_INPUT = 1 << 20  # generated inputs stay under this (the big hostile inputs are benchmarks/fuzz.py's own)
TIME_LIMIT = 10.0
#: Machine types the proxy step converts to, now and then (the compat catalogue's; others are refused).
MACHINES = {b"i440fx": ("pc-i440fx-7.2", "pc-i440fx-2.12", "pc-i440fx-4.0"), b"q35": ("pc-q35-7.2", "pc-q35-2.12")}
PAGE = 4096


# ---------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------


def _devices(first_id: int) -> list[DeviceSection]:
    from vmferry.live.endpoint.machine import Machine

    m = Machine(ram_size=16 * PAGE)
    m.tick()
    return m.sections(first_id=first_id)


def _vmdesc(sections: list[DeviceSection]) -> Vmdesc:
    return Vmdesc(legacy.vmdesc_text({"page_size": PAGE, "devices": [s.desc for s in sections]}))


def _pages(rng: random.Random, block: str, offset: int, count: int, named: bool) -> RamPages:
    return RamPages(block, offset, count, named, PAGE, data=rng.randbytes(count * PAGE))


def seed_events() -> dict[str, list[Event]]:
    """Named seed streams as events: every event type vmferry decodes, small enough to fuzz fast."""
    rng = random.Random(17)
    devices = _devices(3)
    config = Configuration(configuration_state("pc-i440fx-7.2", ["events"], uuid=bytes(range(16))))
    ram = [
        IterBegin(SECTION_START, 2, "ram", 0, 4),
        RamMemSize(24 * PAGE, [RamBlock("pc.ram", 16 * PAGE), RamBlock("/rom@etc/acpi/tables", 8 * PAGE)]),
        RamZeros("pc.ram", 0, 3, True, PAGE),
        _pages(rng, "pc.ram", 3 * PAGE, 2, False),
        RamZeros("pc.ram", 5 * PAGE, 11, False, PAGE),
        _pages(rng, "/rom@etc/acpi/tables", 0, 1, True),
        RamZeros("/rom@etc/acpi/tables", PAGE, 7, False, PAGE, fill=bytes([0, 0, 7, 0, 0, 0, 1])),
        RamEos(),
        IterEnd(2, True),
        IterBegin(SECTION_PART, 2),
        _pages(rng, "pc.ram", 4 * PAGE, 1, True),
        RamEos(),
        IterEnd(2, True),
        IterBegin(SECTION_END, 2),
        RamEos(),
        IterEnd(2, True),
    ]
    tail: list[Event] = [Eof(), _vmdesc(devices)]
    seeds: dict[str, list[Event]] = {
        "machine": [Header(), config, *ram, *devices, *tail],
        "devices": [Header(), config, *devices, *tail],
    }
    xbzrle = bytes([1]) + struct.pack(">H", 6) + bytes([2, 0x41, 0x42, 3, 0, 0])
    seeds["commands"] = [
        Header(),
        Configuration(configuration_state("pc-q35-7.2", ["postcopy-ram", "events"])),
        Command(1),
        Command(3, struct.pack(">QQ", PAGE, PAGE)),
        IterBegin(SECTION_START, 2, "ram", 0, 4),
        RamMemSize(16 * PAGE, [RamBlock("pc.ram", 16 * PAGE)]),
        _pages(rng, "pc.ram", 0, 1, True),
        RamRecord(RAM_XBZRLE | 0x20, PAGE, "pc.ram", False, xbzrle),
        RamRecord(RAM_MULTIFD_FLUSH, 0),
        RamEos(),
        IterEnd(2, True),
        devices[0],
        Command(CMD_PACKAGED, struct.pack(">I", 0), devices[1:4]),
        Command(2, struct.pack(">I", 1)),
        *devices[4:],
        *tail,
    ]
    return seeds


def record_only_events() -> list[Event]:
    """Events only the record formats and ferry carry: an opaque section and a skippable unknown frame."""
    from vmferry.encode.records import UnknownFrame

    devices = _devices(3)
    return [Header(), Configuration(configuration_state("pc-i440fx-7.2")),
            OpaqueSection(SECTION_FULL, 2, "block", 0, 1, bytes(range(40))),
            UnknownFrame(0x42, 0, b"skip me"),  # type: ignore[list-item]
            *devices, Eof(), _vmdesc(devices)]


def qemu_seed_events(path: str, pages: int = 2, devices: int = 16) -> list[Event]:
    """A real QEMU stream made small: its configuration, its RAM section's START with MEM_SIZE and the first
    ``pages`` page runs cut to one page, every command, ``devices`` of its device sections (the largest
    ones, in stream order), EOF and a vmdesc of those (the part of a stream a fuzzer gets most from: QEMU's
    own device trees and schemas)."""
    out: list[Event] = []
    runs = 0
    in_ram = skip = False
    with open(path, "rb") as f:
        data = f.read()
    for ev in legacy.decode([data]):
        if isinstance(ev, IterBegin):
            skip = ev.kind != SECTION_START or in_ram
            in_ram = True
            if skip:
                continue
        elif isinstance(ev, IterEnd):
            if skip:
                skip = False
                continue
        elif skip:
            continue
        elif isinstance(ev, (RamPages, RamZeros)):
            if runs >= pages:
                continue
            runs += 1
            if isinstance(ev, RamPages):
                ev = RamPages(ev.block, ev.offset, 1, ev.named, ev.page_size, data=bytes(ev.page(0)))
            else:
                ev = RamZeros(ev.block, ev.offset, 1, ev.named, ev.page_size,
                              ev.fill[:1] if ev.fill is not None else None)
        elif isinstance(ev, RamRecord):
            continue
        out.append(ev)
    sections = [ev for ev in out if isinstance(ev, DeviceSection)]
    keep = {id(ev) for ev in sorted(sections, key=lambda ev: -ev.size)[:devices]}
    out = [ev for ev in out if not isinstance(ev, DeviceSection) or id(ev) in keep]
    for i, ev in enumerate(out):
        if isinstance(ev, Vmdesc):
            doc = json.loads(ev.text)
            doc["devices"] = [ev.desc for ev in out if isinstance(ev, DeviceSection)]
            out[i] = Vmdesc(legacy.vmdesc_text(doc))
    return out


def encode_all(events: list[Event], codec: str) -> bytes | None:
    out = bytearray()
    try:
        for c in encode.codec(codec).encode(iter(events)):
            out += c
            if len(out) > MAX_INPUT:
                return None
    except Exception:  # noqa: BLE001 - mutated events a format cannot write: not an input
        return None
    return bytes(out)


def seeds(codec: str, extra: Iterable[list[Event]] = ()) -> list[bytes]:
    """The seed streams of ``codec``: every seed this format can carry."""
    lists = list(seed_events().values()) + list(extra)
    if codec != "legacy":
        lists.append(record_only_events())
    out = [b for b in (encode_all(ev, codec) for ev in lists) if b is not None]
    assert out, codec
    return out


# ---------------------------------------------------------------------------
# Hostile values and record mutations
# ---------------------------------------------------------------------------

INTS = (0, 1, 2, 3, 7, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0xFFF, 0x1000, 0xFFFF, 0x10000, 0x7FFF_FFFF,
        0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1_500_000_000, (1 << 46) - 4096, 1 << 46, 1 << 62, (1 << 63) - 1,
        1 << 63, (1 << 64) - 1, -1, -2, -(1 << 31), -(1 << 63))
STRINGS = ("", "a", "pc.ram", "ram", "cpu", "€uro", "x" * 256, "x" * 300, "\x00", "zeros", "pages", "device",
           "start", "end", "full", "part", "@sections", "0a0b", "zz", "AAAA", "AAAA=")


def hostile_value(rng: random.Random, native: bool, depth: int = 0) -> Any:
    k = rng.randrange(14)
    if k < 4:
        v = rng.choice(INTS)
        return v + rng.choice((0, 0, 1, -1)) if k == 0 else v
    if k == 4:
        return rng.choice((True, False, None))
    if k == 5:
        return rng.choice((0.5, -1.0, 1e308, float("inf"), float("nan"), 4096.0))
    if k in (6, 7):
        return rng.choice(STRINGS) if rng.random() < 0.7 else rng.randbytes(rng.randrange(8)).hex()
    if k == 8:
        n = rng.choice((0, 1, 3, 16, 255, 256, 300, 4096))
        return rng.randbytes(n) if native else rng.randbytes(n).hex()
    if k == 9:
        return []
    if k == 10:
        return {}
    if k == 11 and depth < 3:
        return [hostile_value(rng, native, depth + 1) for _ in range(rng.randrange(4))]
    if k == 12 and depth < 3:
        return {rng.choice(("t", "name", "len", "x", "state", "count", "blocks")): hostile_value(rng, native,
                                                                                                depth + 1)}
    return [{} for _ in range(rng.choice((1, 10, 1000)))]


def _containers(value: Any, out: list[Any], depth: int = 0) -> None:
    """Every dict and list inside ``value`` (depth-first), to pick one to edit."""
    if depth > 12:
        return
    if isinstance(value, dict):
        out.append(value)
        for v in value.values():
            _containers(v, out, depth + 1)
    elif isinstance(value, list):
        out.append(value)
        for v in value:
            _containers(v, out, depth + 1)


def _near(rng: random.Random, v: Any) -> Any:
    """A value near ``v``: an int off by one, doubled, at a boundary; a string cut or grown."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice((v + 1, v - 1, v * 2, v * 4096, v + PAGE, -v, v | (1 << 32), v << 20, 0))
    if isinstance(v, str):
        return rng.choice((v[:-1], v + v, v + "x", v.upper(), ""))
    if isinstance(v, (bytes, bytearray)):
        return rng.choice((bytes(v[:-1]), bytes(v) + b"\0", bytes(v) * 2, b""))
    return v


def mutate_records(rng: random.Random, records: list[Any], native: bool) -> list[Any]:
    """``records`` (a fresh deep copy is edited) with one to three value-level edits."""
    records = _copy(records)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(10)
        if op == 0 and len(records) > 2:
            i = rng.randrange(1, len(records))
            records.insert(rng.randrange(1, len(records)), _copy(records[i]))
            continue
        if op == 1 and len(records) > 2:
            del records[rng.randrange(1, len(records))]
            continue
        if op == 2 and len(records) > 3:
            i, j = rng.randrange(1, len(records)), rng.randrange(1, len(records))
            records[i], records[j] = records[j], records[i]
            continue
        holders: list[Any] = []
        _containers(records[rng.randrange(len(records))], holders)
        if not holders:
            continue
        h = rng.choice(holders)
        if isinstance(h, dict):
            if not h or op == 3:
                h[rng.choice(("t", "x", "fill", "packaged", "page_size", "gpa", "schema", "desc", "named",
                              "text", "object"))] = hostile_value(rng, native)
                continue
            key = rng.choice(list(h))
            if op == 4:
                del h[key]
            elif op in (5, 6):
                h[key] = _near(rng, h[key])
            else:
                h[key] = hostile_value(rng, native)
        elif h:
            i = rng.randrange(len(h))
            if op == 4:
                del h[i]
            elif op == 5:
                h.append(_copy(h[i]))
            elif op == 6:
                h[i] = _near(rng, h[i])
            else:
                h[i] = hostile_value(rng, native)
        else:
            h.append(hostile_value(rng, native))
    return records


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


# --- records of a seed, and records back to bytes, per format


def seed_records(events: list[Event], codec: str) -> list[Any]:
    """The records a format writes for ``events`` (the JSON document: its records, without the wrapper)."""
    if codec == "json":
        enc = RecordEncoder(JSON_TEXT)
        return [r for ev in events for r in enc.records(ev)]
    spelling = JSON_TEXT if codec == "jsonl" else NATIVE if codec == "msgpack" else NATIVE_BYTES
    return [_plain(r) for r in encode_records(iter(events), codec, spelling)]


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, memoryview):
        return bytes(v)
    return v


def _json_safe(v: Any) -> Any:
    return json.dumps(v, allow_nan=True)


#: The most ASN.1 encodings a generator's memo keeps (about 1 KB each); it is emptied when full.
ASN1_MEMO_SIZE = 4096


def records_to_bytes(records: list[Any], codec: str, rng: random.Random,
                     memo: dict[str, bytes] | None = None) -> bytes | None:
    """The stream of ``codec`` holding ``records``; None when the format cannot spell one of the values.
    ``memo``: ASN.1 encodings of records seen before, by their repr (asn1tools is slow), filled here; it is
    the caller's (a :class:`Generator`'s), so that it lives no longer than the inputs it serves: a memo
    kept by the module grew for as long as a fuzz worker lived, and every input after counted it."""
    try:
        if codec == "jsonl":
            return b"".join(_json_safe(r).encode() + b"\n" for r in records)
        if codec == "json":
            if rng.random() < 0.1:  # a reformatted document: the whole-document path
                return json.dumps({"records": records, "format": "vmferry-json", "version": 1}).encode()
            from vmferry.encode.json import FIRST_LINE

            body = b",\n".join(_json_safe(r).encode() for r in records)
            return FIRST_LINE + b"\n" + body + b'\n], "has_vmdesc": true}\n'
        if codec == "msgpack":
            import msgpack

            return b"".join(msgpack.packb(r, use_bin_type=True) for r in records)
        if codec == "cbor":
            import cbor2

            from vmferry.encode.cbor import SELF_DESCRIBED

            return SELF_DESCRIBED + b"".join(cbor2.dumps(r) for r in records)
        if codec.startswith("asn1-"):
            from vmferry.encode import asn1

            rules = codec[5:]
            c = asn1.compiled(rules)
            out = [b"\x30\x80" if rules == "ber" else b"<Stream>\n" if rules == "xer" else b""]
            if memo is not None and len(memo) > ASN1_MEMO_SIZE:
                memo.clear()
            for r in records:
                key = repr(r) if memo is not None and len(r.get("state", ())) < 64 else ""
                data = memo.get(key) if memo is not None and key else None
                if data is None:
                    data = c.encode("Record", asn1.record_to_asn1(r))
                    if memo is not None and key:
                        memo[key] = data
                if rules == "per":
                    pos = 0
                    for det, n in asn1.per_length(len(data)):
                        out.append(det + data[pos:pos + n])
                        pos += n
                elif rules == "xer":
                    out.append(data[len(b"<Record>"):-len(b"</Record>")] + b"\n")
                else:
                    out.append(data)
            out.append(b"\x00\x00" if rules == "ber" else b"</Stream>\n" if rules == "xer" else b"")
            return b"".join(out)
    except Exception:  # noqa: BLE001 - the format's library cannot write this value: not an input
        return None
    raise AssertionError(codec)


# --- ferry frames


@dataclass
class Frame:
    type: int
    flags: int
    body: bytes


def ferry_frames(data: bytes) -> tuple[bytes, list[Frame]]:
    """The 32-byte header and the frames of a ferry stream (trusted: our own seeds)."""
    pos = ferry.HEADER_LEN
    frames = []
    while pos < len(data):
        ftype, flags, _, n, _ = struct.unpack_from(">BBHII", data, pos)
        frames.append(Frame(ftype, flags, data[pos + 16:pos + 16 + n]))
        pos += 16 + n
    return data[:ferry.HEADER_LEN], frames


def ferry_bytes(head: bytes, frames: list[Frame]) -> bytes:
    """Frames with their CRC32Cs recomputed (the END frame's frame and byte counts too)."""
    out = [head]
    size = len(head)
    for i, f in enumerate(frames):
        body = f.body
        if f.type & 0x7F == ferry.T_END and len(body) == 56:
            counts = list(struct.unpack(">7Q", body))
            counts[0] = i
            counts[6] = size
            body = struct.pack(">7Q", *counts)
        out.append(ferry.frame_header(f.type, f.flags, len(body), ferry.crc32c(body)))
        out.append(body)
        size += 16 + len(body)
    return b"".join(out)


_RUN = struct.Struct(">QIIBB")


def mutate_ferry(rng: random.Random, data: bytes) -> bytes:
    import msgpack

    head, frames = ferry_frames(data)
    for _ in range(rng.choice((1, 1, 2))):
        i = rng.randrange(len(frames))
        f = frames[i]
        kind = f.type & 0x7F
        op = rng.randrange(6)
        if kind in (ferry.T_RECORD, ferry.T_SCHEMA, ferry.T_DEVICE) and op < 4 and not f.flags:
            try:
                rec = msgpack.unpackb(f.body, raw=False, strict_map_key=False)
            except Exception:  # noqa: BLE001 - an earlier edit broke it
                continue
            rec = mutate_records(rng, [rec], True)[0]
            try:
                f.body = msgpack.packb(rec, use_bin_type=True)
            except Exception:  # noqa: BLE001 - msgpack cannot write it (an int over 64 bits)
                continue
        elif kind in (ferry.T_PAGES, ferry.T_ZEROS) and op < 4 and len(f.body) >= _RUN.size:
            fields = list(_RUN.unpack_from(f.body, 0))
            j = rng.randrange(5)
            limits = (1 << 64, 1 << 32, 1 << 32, 256, 256)
            fields[j] = (_near(rng, fields[j]) if rng.random() < 0.5 else rng.choice(INTS)) % limits[j]
            f.body = _RUN.pack(*fields) + f.body[_RUN.size:]
        elif op == 4:
            frames.insert(rng.randrange(len(frames)), Frame(f.type, f.flags, f.body))
        elif op == 5 and f.body:
            b = bytearray(f.body)
            b[rng.randrange(len(b))] = rng.randrange(256)
            f.body = bytes(b)
        else:
            f.type = rng.choice((f.type, f.type ^ 0x80, rng.randrange(256)))
            f.flags = rng.choice((f.flags, rng.randrange(4), rng.randrange(256)))
    return ferry_bytes(head, frames)


# --- blind mutations


def _interesting(rng: random.Random) -> bytes:
    v = rng.choice(INTS) % (1 << 64)
    width = rng.choice((1, 2, 4, 8))
    return (v % (1 << (8 * width))).to_bytes(width, rng.choice(("big", "big", "little")))


def mutate_bytes(rng: random.Random, data: bytes, others: list[bytes], boundaries: list[int] | None = None,
                 max_size: int = MAX_INPUT) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        if not b:
            b += rng.randbytes(rng.randrange(1, 64))
            continue
        op = rng.randrange(11)
        pos = rng.randrange(len(b))
        if boundaries and rng.random() < 0.5:
            pos = min(len(b) - 1, rng.choice(boundaries) + rng.randrange(-1, 12))
        if op == 0:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos] = rng.randrange(256)
        elif op in (2, 3):
            v = _interesting(rng)
            b[pos:pos + len(v)] = v
        elif op == 4:
            del b[pos:pos + rng.randrange(1, 64)]
        elif op == 5:
            piece = b[pos:pos + rng.randrange(1, 256)]
            b[pos:pos] = piece * rng.choice((1, 2, 16, 256))
        elif op == 6:
            b[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif op == 7:
            del b[pos:]
        elif op == 8 and others:
            other = rng.choice(others)
            at = rng.randrange(len(other))
            b[pos:] = other[at:]
        elif op == 9:
            b[pos:pos + 8] = bytes(8) if rng.random() < 0.5 else b"\xff" * 8
        else:
            j = rng.randrange(len(b))
            b[pos], b[j] = b[j], b[pos]
    return bytes(b[:max_size])


# ---------------------------------------------------------------------------
# Input generation
# ---------------------------------------------------------------------------


class Generator:
    """Mutated inputs of one codec, from its seeds, reproducible from ``seed``."""

    #: The share of inputs made from the ``heavy`` seeds (real QEMU streams: ~100 KB, ten times slower to run).
    HEAVY_SHARE = 0.03

    def __init__(self, codec: str, seed: int | str, extra: Iterable[list[Event]] = (),
                 heavy: Iterable[list[Event]] = ()) -> None:
        self.codec = codec
        self.rng = random.Random(f"{codec}/{seed}")
        lists = list(seed_events().values()) + list(extra)
        if codec != "legacy":
            lists.append(record_only_events())
        heavy = list(heavy)
        self.light = len(lists)
        lists += heavy
        self.seeds: list[bytes] = []
        self.records: list[list[Any]] = []
        self.boundaries: list[list[int]] = []
        self.events: list[list[Event]] = []
        self.asn1_memo: dict[str, bytes] = {}  # records_to_bytes: this generator's ASN.1 encodings
        light = self.light
        self.light = 0  # light seeds this format can carry
        for i, events in enumerate(lists):
            data = encode_all(events, codec)
            if data is None:
                continue
            self.light += i < light
            self.seeds.append(data)
            self.events.append(events)
            self.records.append(seed_records(events, codec) if codec in RECORD_CODECS else [])
            self.boundaries.append(_boundaries(events) if codec == "legacy" else [])

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        rng = self.rng
        light = self.light
        if light < len(self.seeds) and rng.random() < self.HEAVY_SHARE:
            k = rng.randrange(light, len(self.seeds))
        else:
            k = rng.randrange(light)
        data = self.seeds[k]
        r = rng.random()
        if self.codec in RECORD_CODECS and r < 0.7:
            out = records_to_bytes(mutate_records(rng, self.records[k], self.codec not in ("json", "jsonl")),
                                   self.codec, rng, self.asn1_memo)
            if out is not None:
                return out if rng.random() < 0.9 else mutate_bytes(rng, out, self.seeds)
        elif self.codec == "ferry" and r < 0.65:
            out = mutate_ferry(rng, data)
            return out if rng.random() < 0.9 else mutate_bytes(rng, out, self.seeds)
        elif r < (0.4 if self.codec == "legacy" else 0.82):
            out = encode_all(mutate_events(rng, self.events[k]), self.codec)
            if out is not None:
                return out
        return mutate_bytes(rng, data, self.seeds, self.boundaries[k])


def mutate_events(rng: random.Random, events: list[Event]) -> list[Event]:
    """``events`` with one or two values changed to what the event's own fields can hold (QEMU's field widths),
    for streams that encode, even as QEMU's format, and still say something odd."""
    import dataclasses

    events = list(events)
    for _ in range(rng.choice((1, 1, 2))):
        i = rng.randrange(len(events))
        ev = events[i]
        if isinstance(ev, (DeviceSection, Configuration)) and rng.random() < 0.6:
            state = mutate_records(rng, [ev.state], True)[0]
            events[i] = dataclasses.replace(ev, state=state) if isinstance(state, dict) else ev
            continue
        if isinstance(ev, RamMemSize) and ev.blocks:
            j = rng.randrange(len(ev.blocks))
            b = ev.blocks[j]
            blocks = list(ev.blocks)
            blocks[j] = dataclasses.replace(b, length=rng.choice((_near(rng, b.length), rng.choice(INTS) % (1 << 64))))
            total = ev.total if rng.random() < 0.3 else sum(x.length for x in blocks)
            events[i] = RamMemSize(total % (1 << 64), blocks)
            continue
        if not dataclasses.is_dataclass(ev):
            continue
        names = [f.name for f in dataclasses.fields(ev) if isinstance(getattr(ev, f.name), int)
                 and not isinstance(getattr(ev, f.name), bool)
                 and not (isinstance(ev, RamPages) and f.name == "count")]  # the data says how many
        if not names:
            if rng.random() < 0.5 and i > 0:
                del events[i]
            else:
                events.insert(rng.randrange(len(events)), ev)
            continue
        name = rng.choice(names)
        value = getattr(ev, name)
        new = _near(rng, value) if rng.random() < 0.5 else rng.choice(INTS)
        width = {"cmd": 16, "section_id": 32, "instance_id": 32, "version_id": 32, "kind": 8, "type": 8,
                 "flags": 8}.get(name, 64)
        try:
            events[i] = dataclasses.replace(ev, **{name: new % (1 << width)})  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    return events


def _boundaries(events: list[Event]) -> list[int]:
    out, pos = [], 0
    for ev in events:
        buf = bytearray()
        legacy.encode_event(buf, ev)
        pos += len(buf)
        out.append(pos)
    return out


# ---------------------------------------------------------------------------
# Large hostile inputs: the shapes that cost the most memory per byte, each just under 10 MB
# ---------------------------------------------------------------------------

LARGE = 9_900_000


def _array_desc(name: str, n: int, field: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "instance_id": 0, "vmsd_name": name, "version": 1,
            "fields": [dict(field, array_len=n) if n != 1 else field]}


def _fit(build: Callable[[int], bytes | None], size: int = LARGE) -> bytes | None:
    """``build(n)`` with the largest ``n`` (found from a small sample: sizes grow linearly) under ``size``."""
    small = build(1000)
    if small is None:
        return None
    one = build(2000)
    if one is None:
        return None
    per = max(1, (len(one) - len(small)) // 1000)
    n = max(1, 1000 + (size - len(small)) // per)
    for _ in range(4):
        out = build(n)
        if out is None or len(out) <= size:
            return out
        n = int(n * size / len(out) * 0.99)
    return None


def _with_records(codec: str, base: list[Any], extra: Callable[[int], list[Any]],
                  config_state: Callable[[int], dict[str, Any]] | None = None) -> Callable[[int], bytes | None]:
    """A builder: the records of ``base`` with ``extra(n)`` before its EOF (and the configuration's state
    replaced), as a stream of ``codec``."""
    memo: dict[str, bytes] = {}  # the ASN.1 encodings of this shape's records (its devices repeat)

    def build(n: int) -> bytes | None:
        recs = [dict(r) for r in base]
        if config_state is not None:
            for r in recs:
                if r["t"] == "configuration":
                    r["state"] = config_state(n)
        at = next(i for i, r in enumerate(recs) if r["t"] == "eof")
        recs[at:at] = extra(n)
        if recs[-1]["t"] == "fin":
            recs[-1] = {"t": "fin", "records": len(recs) - 2}
        if codec == "ferry":
            try:
                return _ferry_from_records(recs)
            except Exception:  # noqa: BLE001 - msgpack cannot write it
                return None
        return records_to_bytes(recs, codec, _NoReformat(0), memo)
    return build


class _NoReformat(random.Random):
    def random(self) -> float:  # records_to_bytes: never the reformatted JSON document
        return 1.0


def _ferry_from_records(records: list[Any]) -> bytes:
    import msgpack

    frames = []
    for r in records:
        t = r["t"]
        if t in ("stream", "fin"):
            continue
        if t == "zeros":
            name = r["block"].encode("latin-1")
            body = _RUN.pack(r["offset"], r["count"], r.get("page_size", PAGE), 1 if r["named"] else 0,
                             len(name)) + name
            frames.append(Frame(0x80 | ferry.T_ZEROS, 0, body))
            continue
        kind = ferry.T_SCHEMA if t == "schema" else ferry.T_DEVICE if t == "device" else ferry.T_RECORD
        frames.append(Frame(0x80 | kind, 0, msgpack.packb(r, use_bin_type=True)))
    totals = [0] * 7  # frames, sections, pages, zero pages, other records, page bytes, stream bytes
    for r in records:
        t = r["t"]
        totals[1] += t in ("device", "opaque", "begin")
        totals[2] += r["count"] if t == "pages" else 0
        totals[3] += r["count"] if t == "zeros" else 0
        totals[5] += r["count"] * r.get("page_size", PAGE) if t == "pages" else 0
        totals[4] += t == "record"
    frames.append(Frame(0x80 | ferry.T_END, 0, struct.pack(">7Q", *totals)))
    return ferry_bytes(ferry.header(int(ferry.FEATURES & ferry.available_caps())), frames)


def large_inputs(codec: str, size: int | None = None, only: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Inputs just under ``size`` (10 MB), and the small ones of issue 17, in the shapes that cost the most
    memory per byte, for the RSS check of benchmarks/fuzz.py; a shape a format cannot spell is left out.
    For ASN.1 the shapes of one big record are 2.5 MB: asn1tools takes minutes to write 10 MB of them, and the
    decoder refuses any record but pages over 1 MiB before decoding it, whatever its size."""
    if size is None:
        size = LARGE
    if codec == "legacy":
        return {k: v for k, v in _large_legacy(size).items() if not only or k in only}
    events = seed_events()["devices"]
    spelled = codec if codec != "ferry" else "msgpack"
    base = seed_records(events, spelled)
    native = spelled not in ("json", "jsonl")
    name = b"pc-i440fx-7.2" if native else b"pc-i440fx-7.2".hex()

    def config(extra: Callable[[int], Any]) -> Callable[[int], dict[str, Any]]:
        return lambda n: {"len": 13, "name": name, "x": extra(n)}

    ram = [{"t": "begin", "kind": "start", "id": 2, "idstr": "ram", "instance": 0, "version": 4}]

    def zeros(length: int, count: int) -> Callable[[int], list[Any]]:
        return lambda n: ram + [{"t": "mem_size", "total": length, "blocks": [{"name": "pc.ram", "length": length}]},
                                {"t": "zeros", "block": "pc.ram", "offset": 0, "count": count, "named": True},
                                {"t": "eos"}, {"t": "end", "id": 2, "footer": True}]

    def big_device(n: int) -> list[Any]:
        desc = _array_desc("big", n, {"name": "a", "type": "uint32", "size": 4})
        return [{"t": "schema", "id": 99, "desc": desc},
                {"t": "device", "id": 60, "idstr": "big", "instance": 0, "version": 1, "footer": True,
                 "state": {"a": [100_000] * n}, "schema": 99}]

    def many_devices(n: int) -> list[Any]:
        devices = [r for r in base if r["t"] == "device"]
        return [dict(devices[i % len(devices)], id=100 + i % 1000) for i in range(n // 20)]

    def shared_schema(n: int) -> list[Any]:
        device = next(r for r in base if r["t"] == "device" and r.get("idstr") == "mc146818rtc")
        return [dict(device, id=100 + i % 1000) for i in range(n // 20)]

    def deep(n: int) -> Any:
        v: Any = []
        for _ in range(300):  # deeper than any decoder allows, shallow enough to write
            v = [v]
        return [v] * n

    shapes: dict[str, Callable[[int], bytes | None]] = {
        "empty maps": _with_records(codec, base, lambda n: [], config(lambda n: [{}] * n)),
        "empty lists": _with_records(codec, base, lambda n: [], config(lambda n: [[]] * n)),
        "short strings": _with_records(codec, base, lambda n: [], config(lambda n: ["ab"] * n)),
        "nested lists": _with_records(codec, base, lambda n: [], config(deep)),
        "a big device (uint32 array)": _with_records(codec, base, big_device),
        "many devices": _with_records(codec, base, many_devices),
        "one schema, many devices (vmdesc rebuilt)": _with_records(codec, base, shared_schema),
    }
    one_record = ("empty maps", "empty lists", "short strings", "nested lists", "a big device (uint32 array)")
    shapes = {k: b for k, b in shapes.items() if not only or k in only}
    out = {k: v for k, v in ((k, _fit(b, size // 4 if codec.startswith("asn1-") and k in one_record else size))
                             for k, b in shapes.items()) if v is not None}
    if only:
        return out
    small = {
        "machine name 1500000000": _with_records(codec, base, lambda n: [],
                                                 lambda n: {"len": 13, "name": 1_500_000_000})(0),
        "zeros in a 2^62-byte block": _with_records(codec, base, zeros(1 << 62, (1 << 32) - 1))(0),
        "zeros of 2^32-1 pages in a 64 TiB block": _with_records(codec, base, zeros(1 << 46, (1 << 32) - 1))(0),
    }
    out.update({k: v for k, v in small.items() if v is not None})
    return out


def _legacy_stream(desc: dict[str, Any], body: bytes, prefix: list[Event] | None = None,
                   vmdesc: bytes | None = None) -> bytes:
    """QEMU's stream: a header, a configuration, ``prefix``, one FULL section of ``desc`` holding ``body``,
    EOF and a vmdesc describing it."""
    head = b"".join(bytes(c) for c in legacy.encode(
        [Header(), Configuration(configuration_state("pc-i440fx-7.2")), *(prefix or [])]))
    name = desc["name"].encode()
    section = (bytes([SECTION_FULL]) + struct.pack(">I", 9) + bytes([len(name)]) + name + struct.pack(">II", 0, 1)
               + body + b"\x7e" + struct.pack(">I", 9))
    text = vmdesc if vmdesc is not None else json.dumps({"page_size": PAGE, "devices": [desc]}).encode()
    return head + section + b"\x00\x06" + struct.pack(">I", len(text)) + text


def _large_legacy(size: int) -> dict[str, bytes]:
    n = size - 1000
    one_byte_struct = {"name": "s", "type": "struct", "size": 1,
                       "struct": {"vmsd_name": "e", "version": 1, "fields": [{"name": "x", "type": "uint8", "size": 1}]}}
    out = {
        "one-byte structs": _legacy_stream(_array_desc("big", n, one_byte_struct), b"\x01" * n),
        "uint8 array": _legacy_stream(_array_desc("big", n, {"name": "a", "type": "uint8", "size": 1}), b"\x01" * n),
        "uint16 array": _legacy_stream(_array_desc("big", n // 2, {"name": "a", "type": "uint16", "size": 2}),
                                       b"\x10\x01" * (n // 2)),
        "buffer": _legacy_stream({"name": "big", "instance_id": 0, "vmsd_name": "big", "version": 1,
                                  "fields": [{"name": "b", "type": "buffer", "size": n}]}, bytes(n)),
        "vmdesc of empty objects": _legacy_stream(
            _array_desc("big", 1, {"name": "a", "type": "uint8", "size": 1}), b"\x01",
            vmdesc=b'{"page_size": 4096, "devices": [' + b"{}, " * (n // 4) + b"{}]}"),
    }
    mem = [IterBegin(SECTION_START, 2, "ram", 0, 4)]
    huge = b"".join(bytes(c) for c in legacy.encode(
        [Header(), Configuration(configuration_state("pc-i440fx-7.2")), *mem,
         RamMemSize(1 << 46, [RamBlock("pc.ram", 1 << 46)])]))
    out["MEM_SIZE of 2^62 bytes"] = huge.replace(struct.pack(">Q", (1 << 46) | 4), struct.pack(">Q", (1 << 62) | 4)) \
        .replace(struct.pack(">Q", 1 << 46), struct.pack(">Q", 1 << 62))
    zeros = [RamMemSize(1 << 40, [RamBlock("pc.ram", 1 << 40)]), RamZeros("pc.ram", 0, n // 9, True, PAGE), RamEos(),
             IterEnd(2, True)]
    out["a million zero-page records"] = b"".join(bytes(c) for c in legacy.encode(
        [Header(), Configuration(configuration_state("pc-i440fx-7.2")), *mem, *zeros, Eof()]))
    config = b"".join(bytes(c) for c in legacy.encode([Header()]))
    out["machine name of 9.9 MB"] = config + b"\x07" + struct.pack(">I", n) + b"x" * n + b"\x00"
    return out


# ---------------------------------------------------------------------------
# Running one input through what the CLI and the proxy do with it
# ---------------------------------------------------------------------------


class Capped(Exception):
    """An encoder wrote more than OUTPUT_CAP bytes for one input."""


class Hang(BaseException):
    """The input took longer than TIME_LIMIT (raised from a timer signal)."""


def _drain(chunks: Iterable[Any], cap: int = OUTPUT_CAP) -> int:
    n = 0
    for c in chunks:
        n += len(c) if not isinstance(c, memoryview) else c.nbytes
        if n > cap:
            raise Capped(n)
    return n


def _input(data: bytes, codec: str) -> Input:
    return Input(iter([data]), codec, len(data), "<fuzz>")


def _events(data: bytes, codec: str, target: str | None, decoded: list[Event] | None) -> Iterable[Event]:
    """What the CLI's ``decode_input`` gives for ``target``; from ``decoded`` (a record format's events, decoded
    once: decoding is deterministic, and asn1tools is slow) the same way, without decoding again."""
    if decoded is None:
        return decode_input(_input(data, codec), None, target=target)
    if target == "legacy":
        from vmferry.encode.records import UnknownFrame

        return (ev for ev in decoded if not isinstance(ev, UnknownFrame))
    return iter(decoded)


def _inspect(data: bytes, codec: str, decoded: list[Event] | None = None) -> None:
    """``vmferry inspect --json``: the summary and every device tree as JSON, written out as json.dump does."""
    from vmferry.encode.json import tree_to_json

    summary = StreamSummary()
    devices: list[dict[str, Any]] = []
    for ev in _events(data, codec, None, decoded):
        summary.add(ev)
        if isinstance(ev, DeviceSection):
            devices.append({"idstr": ev.idstr, "state": tree_to_json(ev.state)})
        elif isinstance(ev, OpaqueSection):
            devices.append({"idstr": ev.idstr, "opaque": ev.body.hex()})
    doc = summary.as_dict()
    doc["devices"] = devices
    doc["writer"] = summary.writer.text
    _drain(c.encode() for c in json.JSONEncoder(indent=1).iterencode(doc))


def _convert(data: bytes, codec: str, target: str, keep: bool = False,
             decoded: list[Event] | None = None) -> bytes | None:
    """``vmferry convert --to target``; returns the output when ``keep`` and it is at most a few times the
    input (the proxy step reads it), else None."""
    out: io.BytesIO | None = io.BytesIO() if keep else None
    n = 0
    for c in encode.codec(target).encode(_events(data, codec, target, decoded)):
        n += len(c)
        if n > OUTPUT_CAP:
            raise Capped(n)
        if out is not None:
            out.write(c)
            if n > 4 * len(data) + (1 << 20):
                out = None
    return out.getvalue() if out is not None else None


def _proxy(data: bytes, codec: str, wire: str, machine: str | None) -> None:
    from vmferry.live.proxy import transcode

    _drain(transcode(iter([data]), codec, wire=wire, machine=machine))


@dataclass
class Outcome:
    kind: str  # ok, refused, refused-later, capped, internal, no-offset, hang, memory
    step: str = ""
    detail: str = ""


FAILURES = ("internal", "no-offset", "hang", "memory")


def exercise(data: bytes, codec: str, k: int) -> Outcome:
    """Run one input through decode, inspect, convert (to QEMU's format and to ``CODECS[k % 10]``) and the
    proxy.  ``k`` picks the second target, the proxy's wire and whether it converts the machine type."""
    step = "decode"
    decoded: list[Event] | None = None
    try:
        try:
            events = encode.codec(codec).decode(iter([data]))
            if codec in RECORD_CODECS:
                decoded = list(events)
            else:
                for _ in events:
                    pass
        except DecodeError as e:
            if e.offset is None or not 0 <= e.offset <= len(data) or not e.path.startswith("$"):
                return Outcome("no-offset", step, f"{type(e).__name__}: {e}")
            return Outcome("refused", step, str(e)[:200])
        step = "inspect"
        _inspect(data, codec, decoded)
        step = "convert legacy"
        _convert(data, codec, "legacy", decoded=decoded)
        other = CODECS[k % len(CODECS)]
        step = f"convert {other}"
        converted = _convert(data, codec, other, keep=other == "ferry", decoded=decoded)
        step = "proxy"
        into: bytes | None
        if codec in ("legacy", "ferry"):
            into, fmt = data, codec
        elif other == "ferry":
            into, fmt = converted, "ferry"
        else:
            step = "convert ferry"
            into, fmt = _convert(data, codec, "ferry", keep=True, decoded=decoded), "ferry"
            step = "proxy"
        if into is not None:
            family = MACHINES[b"q35" if b"q35" in data else b"i440fx"]
            machine = family[k % len(family)] if k % 4 == 3 else None
            _proxy(into, fmt, "legacy" if k % 2 else "ferry", machine)
            _proxy(into, fmt, "ferry" if k % 2 else "legacy", None)
        return Outcome("ok")
    except Capped as e:
        return Outcome("capped", step, f"over {e.args[0]} bytes")
    except DecodeError as e:
        if e.offset is None or not e.path.startswith("$"):
            return Outcome("no-offset", step, f"{type(e).__name__}: {e}")
        return Outcome("refused-later", step, f"{type(e).__name__}: {str(e)[:200]}")
    except FerryError as e:
        return Outcome("refused-later", step, f"{type(e).__name__}: {str(e)[:200]}")
    except MemoryError:
        return Outcome("memory", step, "MemoryError")
    except Hang:
        return Outcome("hang", step, f"over {TIME_LIMIT} s")
    except Exception as e:  # noqa: BLE001 - what the fuzzer is for
        tb = traceback.extract_tb(e.__traceback__)[-3:]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(tb))
        return Outcome("internal", step, f"{type(e).__name__}: {str(e)[:160]} [{where}]")


# ---------------------------------------------------------------------------
# Batches: counts, peak RSS, failures kept with their input
# ---------------------------------------------------------------------------


def _hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Stats:
    codec: str
    inputs: int = 0
    bytes_in: int = 0
    largest_input: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # refused-later / capped, by step
    max_rss_kib: int = 0
    max_rss_input: int = 0  # the size of the input that set max_rss_kib
    #: The most one input raised the worker's RSS above where it stood before it (what the input itself cost,
    #: without what earlier inputs left in the worker's heap), and which input: seed, number, size.
    max_growth_kib: int = 0
    max_growth_at: tuple[Any, int, int] | None = None
    #: The most RSS the worker held before an input (what earlier inputs and the generator left): flat over a
    #: worker's life unless something keeps memory from one input to the next.
    max_base_kib: int = 0
    per_input_rss: bool = True
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: "Stats") -> None:
        self.inputs += other.inputs
        self.bytes_in += other.bytes_in
        self.largest_input = max(self.largest_input, other.largest_input)
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for k, v in other.steps.items():
            self.steps[k] = self.steps.get(k, 0) + v
        if other.max_rss_kib > self.max_rss_kib:
            self.max_rss_kib, self.max_rss_input = other.max_rss_kib, other.max_rss_input
        if other.max_growth_kib > self.max_growth_kib:
            self.max_growth_kib, self.max_growth_at = other.max_growth_kib, other.max_growth_at
        self.max_base_kib = max(self.max_base_kib, other.max_base_kib)
        self.per_input_rss &= other.per_input_rss
        self.seconds += other.seconds
        self.failures += other.failures

    @property
    def failed(self) -> int:
        return sum(self.counts.get(k, 0) for k in FAILURES)


def run_batch(codec: str, seed: int | str, count: int, *, seconds: float | None = None, keep_failures: int = 20,
              extra: Iterable[list[Event]] = (), time_limit: float = TIME_LIMIT,
              qemu_streams: Iterable[str] = ()) -> Stats:
    """``count`` inputs of ``codec`` (or as many as fit in ``seconds``), run through :func:`exercise`;
    ``qemu_streams``: paths of real QEMU streams to add as seeds (:func:`qemu_seed_events`)."""
    stats = Stats(codec)
    gen = Generator(codec, seed, extra, [qemu_seed_events(p) for p in qemu_streams])
    per_input = _reset_hwm() and _hwm_kib() is not None
    stats.per_input_rss = per_input

    def alarm(signum: int, frame: Any) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    start = time.monotonic()
    try:
        for i in range(count):
            if seconds is not None and time.monotonic() - start > seconds:
                break
            data = next(gen)
            before = None
            if per_input:
                _reset_hwm()
                before = _hwm_kib()
            signal.setitimer(signal.ITIMER_REAL, time_limit)
            try:
                out = exercise(data, codec, i)
            except Hang:
                out = Outcome("hang", "", f"over {time_limit} s")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            rss = _hwm_kib() if per_input else None
            stats.inputs += 1
            stats.bytes_in += len(data)
            stats.largest_input = max(stats.largest_input, len(data))
            stats.counts[out.kind] = stats.counts.get(out.kind, 0) + 1
            if out.kind in ("refused-later", "capped"):
                key = f"{out.kind} at {out.step}: {out.detail.split(':')[0]}"
                stats.steps[key] = stats.steps.get(key, 0) + 1
            if rss is not None and rss > stats.max_rss_kib:
                stats.max_rss_kib, stats.max_rss_input = rss, len(data)
            if rss is not None and before is not None and rss - before > stats.max_growth_kib:
                stats.max_growth_kib, stats.max_growth_at = rss - before, (seed, i, len(data))
            if before is not None and before > stats.max_base_kib:
                stats.max_base_kib = before
            if out.kind in FAILURES and len(stats.failures) < keep_failures:
                stats.failures.append({"codec": codec, "seed": seed, "index": i, "kind": out.kind, "step": out.step,
                                       "detail": out.detail, "input": data.hex() if len(data) < 1 << 20 else None})
    finally:
        signal.signal(signal.SIGALRM, old)
    if not per_input:
        stats.max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats.seconds = time.monotonic() - start
    return stats


def limit_memory(max_bytes: int) -> None:
    """Cap this process's address space, so that a blow-up raises MemoryError instead of eating the host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > max_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, hard))


def describe(stats: Stats) -> str:
    c = stats.counts
    rss = f"{stats.max_rss_kib / 1024:.0f} MB" + ("" if stats.per_input_rss else " (per batch)")
    return (f"{stats.codec:9} {stats.inputs:8} inputs  ok {c.get('ok', 0):7}  refused {c.get('refused', 0):7}  "
            f"refused-later {c.get('refused-later', 0):6}  capped {c.get('capped', 0):4}  "
            f"internal {c.get('internal', 0)}  no-offset {c.get('no-offset', 0)}  hang {c.get('hang', 0)}  "
            f"memory {c.get('memory', 0)}  max RSS {rss}  {stats.seconds:.0f} s")


if __name__ == "__main__":  # a quick look: python tests/fuzzing.py CODEC N
    limit_memory(2 << 30)
    s = run_batch(sys.argv[1], 0, int(sys.argv[2]))
    print(describe(s))
    for k, v in sorted(s.steps.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {v:6}  {k}")
    for f in s.failures:
        print(f["kind"], f["step"], f["detail"])
