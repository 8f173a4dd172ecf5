"""QEMU's multifd channels: the init packet and the packet headers, checked as a destination checks them (sans-IO).

With the ``multifd`` capability the source opens ``multifd-channels`` more
connections to the migration address besides the main one.  Each starts
with a 64-byte init packet (``MultiFDInit_t``: magic ``0x11223344``,
version 1, the VM's uuid, the channel number) and then carries packets: a
header (``MultiFDPacket_t``) and ``next_packet_size`` payload bytes, the
pages named by the header's offsets, raw or zlib/zstd compressed.

The layouts (QEMU 7.2 and 10.0 migration/multifd.h; the proxy notes of
docs/proxy.md list the sources):

* the header of a RAM packet is 320 bytes plus a be64 offset per page of a
  512 KiB packet: 1344 bytes for 4 KiB pages, in both releases;
* QEMU 10.0 counts zero pages in the 32-bit word at offset 32 (7.2 leaves
  it 0: it is half of 7.2's first unused word) and lists their offsets
  after the normal pages';
* QEMU 10.0's device-state packets (flag 0x40, VFIO) have a 276-byte header.

Nothing here reads or writes: :func:`parse_init`, :func:`header_size` and
:func:`parse_header` take bytes and raise
:class:`~vmferry.errors.DecodeError` with the offset in the channel.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from ..errors import DecodeError

__all__ = ["INIT_SIZE", "MAGIC", "PREFIX_SIZE", "MultifdInit", "PacketHeader", "header_size", "is_multifd",
           "parse_header", "parse_init", "renamed"]

MAGIC = 0x11223344
VERSION = 1
INIT_SIZE = 64
#: The part of every packet header that says which layout follows (magic, version, flags).
PREFIX_SIZE = 12
FLAG_SYNC = 1
COMPRESSION_MASK = 0x1F << 1
COMPRESSIONS = {0: "none", 2: "zlib", 4: "zstd", 8: "qpl", 16: "uadk", 32: "qatzip"}
FLAG_DEVICE_STATE = 0x40
KNOWN_FLAGS = FLAG_SYNC | COMPRESSION_MASK | FLAG_DEVICE_STATE
PACKET_BYTES = 512 << 10  # the RAM a packet covers (MULTIFD_PACKET_SIZE)
BLOCK_NAME = 256
DEVICE_STATE_HEADER = PREFIX_SIZE + 256 + 4 + 4
#: A compressed packet is never much larger than the pages it holds (zlib/zstd bound, with room).
MAX_COMPRESSED = PACKET_BYTES + PACKET_BYTES // 8 + 4096
#: Device state of one device (VFIO) in one packet: bounded like a PACKAGED command.
MAX_DEVICE_STATE = 256 << 20

_INIT = struct.Struct(">II16sB")
_PREFIX = struct.Struct(">III")
_RAM = struct.Struct(">IIIQI")  # pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages


def is_multifd(first: bytes) -> bool:
    """Whether a channel's first four bytes are a multifd init packet's."""
    return len(first) >= 4 and struct.unpack_from(">I", first)[0] == MAGIC


@dataclass(frozen=True, slots=True)
class MultifdInit:
    uuid: bytes
    channel: int


def parse_init(data: bytes, offset: int = 0, path: str = "$.multifd") -> MultifdInit:
    """The init packet of a channel (``data`` holds its 64 bytes)."""
    if len(data) < INIT_SIZE:
        raise DecodeError(f"multifd init packet of {len(data)} bytes, expected {INIT_SIZE}", offset, path)
    magic, version, uuid, channel = _INIT.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"multifd channel starts with {magic:#010x}, expected the magic {MAGIC:#010x}", offset, path)
    if version != VERSION:
        raise DecodeError(f"multifd init packet version {version}, expected {VERSION}", offset + 4, path)
    return MultifdInit(uuid, channel)


def _ram_header_size(page_size: int) -> int:
    return 320 + 8 * (PACKET_BYTES // page_size)


def header_size(prefix: bytes, offset: int = 0, path: str = "$.multifd", page_size: int = 4096) -> int:
    """The size of the packet header that starts with ``prefix`` (its first 12 bytes), after checking them."""
    magic, version, flags = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise DecodeError(f"multifd packet with magic {magic:#010x}, expected {MAGIC:#010x}", offset, path)
    if version != VERSION:
        raise DecodeError(f"multifd packet version {version}, expected {VERSION}", offset + 4, path)
    if flags & ~KNOWN_FLAGS or (flags & COMPRESSION_MASK) not in COMPRESSIONS:
        raise DecodeError(f"multifd packet with unknown flags {flags:#x}", offset + 8, path)
    return DEVICE_STATE_HEADER if flags & FLAG_DEVICE_STATE else _ram_header_size(page_size)


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """What a packet header says; ``size`` is the number of payload bytes that follow it."""

    flags: int
    size: int
    normal_pages: int = 0
    zero_pages: int = 0
    packet_num: int = 0
    block: str = ""
    device: str = ""

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def compression(self) -> str:
        return COMPRESSIONS[self.flags & COMPRESSION_MASK]


def _cname(raw: bytes, offset: int, path: str, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise DecodeError(f"multifd {what} name is not NUL-terminated", offset, path)
    name = raw[:end]
    if not all(0x20 < b < 0x7F for b in name):
        raise DecodeError(f"multifd {what} name {name!r} is not printable", offset, path)
    return name.decode("ascii")


@functools.lru_cache(maxsize=512)
def _low_bits(page_size: int, n: int) -> int:
    """``page_size - 1`` in each of ``n`` 64-bit words, as one integer (the bits a page offset must not set).
    ``n`` is any count up to a packet's slots (128 for 4 KiB pages), so the cache holds every count of a stream."""
    return int.from_bytes((page_size - 1).to_bytes(8, "big") * n, "big")


def parse_header(header: bytes, offset: int = 0, path: str = "$.multifd", page_size: int = 4096) -> PacketHeader:
    """The packet header in ``header`` (all :func:`header_size` bytes of it), checked."""
    size = header_size(header, offset, path, page_size)
    if len(header) < size:
        raise DecodeError(f"multifd packet header of {len(header)} bytes, expected {size}", offset, path)
    (flags,) = struct.unpack_from(">I", header, 8)
    if flags & FLAG_DEVICE_STATE:
        device = _cname(header[PREFIX_SIZE:PREFIX_SIZE + 256], offset + PREFIX_SIZE, path, "device")
        (nbytes,) = struct.unpack_from(">I", header, PREFIX_SIZE + 256 + 4)
        if nbytes > MAX_DEVICE_STATE:
            raise DecodeError(f"multifd device state of {nbytes} bytes exceeds {MAX_DEVICE_STATE}", offset + 272, path)
        return PacketHeader(flags, nbytes, device=device)
    slots = PACKET_BYTES // page_size
    pages_alloc, normal, nbytes, packet_num, zero = _RAM.unpack_from(header, PREFIX_SIZE)
    if pages_alloc > slots or normal + zero > slots:
        raise DecodeError(f"multifd packet with {normal} normal and {zero} zero pages ({pages_alloc} allocated), "
                          f"more than the {slots} a packet holds", offset + 12, path)
    # Only the normal pages have a payload (zero pages are just listed); a packet without any has none, whatever
    # next_packet_size says (QEMU 7.2 leaves the previous packet's there in a sync packet).
    compressed = flags & COMPRESSION_MASK
    if not normal:
        nbytes = 0
    elif not compressed and nbytes != normal * page_size:
        raise DecodeError(f"uncompressed multifd packet of {nbytes} bytes for {normal} pages", offset + 20, path)
    elif compressed and nbytes > MAX_COMPRESSED:
        raise DecodeError(f"compressed multifd packet of {nbytes} bytes for {normal} pages", offset + 20, path)
    block = ""
    if normal or zero:
        block = _cname(header[64:64 + BLOCK_NAME], offset + 64, path, "RAM block")
        n = normal + zero
        # All offsets page-aligned, checked at once: their big-endian words as one integer, masked (a packet
        # carries up to 128 of them, once for every 512 KiB of RAM); the word at fault is looked for only then,
        # or one by one for a page size that is not a power of two.
        if page_size & (page_size - 1) or int.from_bytes(header[320:320 + 8 * n], "big") & _low_bits(page_size, n):
            for k, at in enumerate(struct.unpack_from(f">{n}Q", header, 320)):
                if at % page_size:
                    raise DecodeError(f"multifd page offset {at:#x} is not page-aligned", offset + 320 + 8 * k,
                                      path)
    return PacketHeader(flags, nbytes, normal, zero, packet_num, block)


def renamed(header: bytes, block: str) -> bytes:
    """A RAM packet header naming ``block`` instead (its length unchanged)."""
    name = block.encode("ascii")
    if len(name) >= BLOCK_NAME:
        raise ValueError(f"RAM block name of {len(name)} bytes")
    return header[:64] + name.ljust(BLOCK_NAME, b"\0") + header[64 + BLOCK_NAME:]
