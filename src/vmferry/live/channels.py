"""The side channels of a proxied migration: the return path, multifd channels and the postcopy-preempt channel.

A migration to one address may open several connections (QEMU 7.2 and
10.0): the main channel first, then ``multifd-channels`` multifd channels
or, in postcopy with ``postcopy-preempt``, one preempt channel.  The proxy
opens its own connection towards the destination for each, in the order
the source's arrive (a QEMU 7.2 destination takes the first for the main
channel), and this module carries everything but the main channel's
forward stream, which :mod:`vmferry.live.proxy` transcodes:

* :func:`relay_return_path`: destination -> source on a main channel,
  message by message (:mod:`vmferry.encode.return_path`), RAM block names
  renamed back to the source's where the transforms renamed a block;
* :func:`relay_multifd`: a multifd channel, its init packet and every
  packet header checked (:mod:`vmferry.encode.multifd`), the page payloads
  spliced through untouched where both ends are plain sockets;
* :func:`relay_ram_records`: a postcopy-preempt channel, or a main channel
  resumed after a postcopy recovery: QEMU's RAM records (and, resumed,
  commands and RAM sections) read one by one, block names renamed.

Each raises :class:`~vmferry.errors.DecodeError` (offset in that channel)
or :class:`~vmferry.errors.TransportError`; the proxy then closes every
channel, so the source's migration fails (or pauses, in postcopy).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..encode import multifd
from ..encode import return_path as rp
from ..errors import DecodeError
from ..events import (
    COMMAND,
    EOF_TYPE,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_PAGE,
    RAM_ZERO,
    SECTION_END,
    SECTION_FOOTER,
    SECTION_PART,
)
from .splice import sized_pipe, splice_out
from .transport import CHUNK, ByteStream, SocketStream

__all__ = ["ChannelStats", "Renames", "relay_multifd", "relay_ram_records", "relay_return_path"]

PAGE_SIZE = 4096
CMD_RECV_BITMAP = 10


@dataclass
class ChannelStats:
    """What one channel carried; ``kind`` is main, main (resumed), multifd or preempt."""

    number: int
    kind: str = "unclassified"
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_back: int = 0  # the return path, destination -> source
    spliced: int = 0
    packets: int = 0
    pages: int = 0
    messages: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    done: bool = False
    source: ByteStream | None = field(default=None, repr=False)  # for live byte counts while it runs

    @property
    def carried(self) -> int:
        """The bytes read from the source so far."""
        return self.source.bytes_read if self.source is not None else self.bytes_in

    def as_dict(self) -> dict[str, object]:
        return {"number": self.number, "kind": self.kind, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "bytes_back": self.bytes_back, "bytes_spliced": self.spliced, "packets": self.packets,
                "pages": self.pages, "return_path": dict(self.messages), "error": self.error, "done": self.done}


class Renames:
    """RAM block names as the transforms renamed them, shared by the channels of one migration.

    The main channel learns them from its first RAM section (:meth:`learn`); multifd and preempt channels
    wait for that before they forward a page (:meth:`forward`), and the return path maps names back."""

    def __init__(self, known: dict[str, str] | None = None) -> None:
        self.to_target: dict[str, str] = dict(known or {})
        self._known = threading.Event()
        if known is not None:
            self._known.set()

    def learn(self, renames: dict[str, str]) -> None:
        self.to_target = {a: b for a, b in renames.items() if a != b}
        self._known.set()

    @property
    def known(self) -> bool:
        return self._known.is_set()

    def release(self) -> None:
        """No renames will come (the stream went without RAM, or the main channel failed)."""
        self._known.set()

    def forward(self, block: str, wait: Callable[[], bool] | None = None) -> str:
        """The destination's name of the source's ``block``, once the main channel knows it."""
        while not self._known.wait(0.2):
            if wait is not None and not wait():
                break
        return self.to_target.get(block, block)

    @property
    def to_source(self) -> dict[str, str]:
        return {b: a for a, b in self.to_target.items()}


# --------------------------------------------------------------------------- the return path


def relay_return_path(dest: ByteStream, source: ByteStream, stats: ChannelStats, renames: Renames,
                      on_message: Callable[[rp.RpMessage], None] | None = None) -> None:
    """Carry the return path from ``dest`` back to ``source`` until ``dest`` closes it.

    Every message is checked as QEMU's source checks it and relayed as it is (a renamed block named back);
    ``on_message`` sees each one (the proxy notes SHUT's status and the postcopy phase)."""
    reader = rp.ReturnPathReader()
    while True:
        data = dest.read(CHUNK)
        if not data:
            break
        out: list[bytes] = []
        for item in reader.feed(data):
            if isinstance(item, rp.BitmapPiece):
                out.append(item.data)
                continue
            stats.messages[item.name] = stats.messages.get(item.name, 0) + 1
            if on_message is not None:
                on_message(item)
            out.append(rp.rename_block(item, renames.to_source) if renames.to_target else item.raw)
        if out:
            source.writev(out)
            stats.bytes_back += sum(len(x) for x in out)
    if not reader.at_boundary():
        raise DecodeError("the return path ended inside a message", reader.offset, "$.return_path")


# --------------------------------------------------------------------------- multifd


def _can_splice(source: ByteStream, dest: ByteStream) -> bool:
    return (hasattr(os, "splice") and isinstance(source, SocketStream) and isinstance(dest, SocketStream)
            and not isinstance(source.sock, ssl.SSLSocket) and not isinstance(dest.sock, ssl.SSLSocket))


class _Splicer:
    """Moves ``n`` bytes from one plain socket to another through a pipe, never into user space."""

    def __init__(self, source: SocketStream, dest: SocketStream) -> None:
        self.source, self.dest = source, dest
        self.pipe = sized_pipe()  # a multifd packet's pages (512 KiB in 7.2 and 10.0) in one splice

    def move(self, n: int) -> None:
        src_fd = self.source.sock.fileno()
        r, w = self.pipe
        while n:
            try:
                got = os.splice(src_fd, w, min(n, 1 << 20))
            except OSError as e:
                raise self.source.error("read from", e) from None
            if not got:
                raise self.source.error("read from", ConnectionResetError("the stream ended inside a packet"))
            self.source.bytes_read += got
            splice_out(r, self.dest, got, "write to")
            n -= got

    def close(self) -> None:
        for fd in self.pipe:
            os.close(fd)


def _copy(source: ByteStream, dest: ByteStream, n: int) -> None:
    while n:
        data = source.read(min(n, CHUNK))
        if not data:
            raise source.error("read from", ConnectionResetError("the stream ended inside a packet"))
        dest.write(data)
        n -= len(data)


def relay_multifd(first: bytes, source: ByteStream, dest: ByteStream, stats: ChannelStats, renames: Renames,
                  alive: Callable[[], bool]) -> None:
    """Carry a multifd channel whose first bytes ``first`` were read already: init packet, then packets."""
    path = f"$.multifd[{stats.number}]"
    init = first + source.read_exact(multifd.INIT_SIZE - len(first), "the multifd init packet")
    multifd.parse_init(init, 0, path)
    dest.write(init)
    at = multifd.INIT_SIZE
    splicer = _Splicer(source, dest) if _can_splice(source, dest) else None  # type: ignore[arg-type]
    try:
        while True:
            prefix = b""
            while len(prefix) < multifd.PREFIX_SIZE:
                data = source.read(multifd.PREFIX_SIZE - len(prefix))
                if not data:
                    if prefix:
                        raise DecodeError("the channel ended inside a packet header", at, path)
                    return
                prefix += data
            size = multifd.header_size(prefix, at, f"{path}.packet[{stats.packets}]")
            header = prefix + source.read_exact(size - multifd.PREFIX_SIZE, "a multifd packet header")
            packet = multifd.parse_header(header, at, f"{path}.packet[{stats.packets}]")
            if packet.block and renames.forward(packet.block, alive) != packet.block:
                header = multifd.renamed(header, renames.forward(packet.block))
            dest.write(header)
            if splicer is not None:
                splicer.move(packet.size)
                stats.spliced += packet.size
            else:
                _copy(source, dest, packet.size)
            stats.packets += 1
            stats.pages += packet.normal_pages + packet.zero_pages
            at += size + packet.size
    finally:
        stats.bytes_in = source.bytes_read
        stats.bytes_out = dest.bytes_written
        if splicer is not None:
            splicer.close()


# --------------------------------------------------------------------------- preempt and resumed channels


class _Reader:
    """Exact reads from a byte stream with the offset kept, for record-by-record relays."""

    def __init__(self, source: ByteStream, first: bytes, path: str) -> None:
        self.source, self.buf, self.offset, self.path = source, bytearray(first), 0, path

    def fill(self, n: int) -> bool:
        while len(self.buf) < n:
            data = self.source.read(max(n - len(self.buf), 4096))
            if not data:
                return False
            self.buf += data
        return True

    def take(self, n: int, what: str) -> bytes:
        if not self.fill(n):
            raise DecodeError(f"the channel ended inside {what}", self.offset + len(self.buf), self.path)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.offset += n
        return data


def relay_ram_records(first: bytes, source: ByteStream, dest: ByteStream, stats: ChannelStats, renames: Renames,
                      alive: Callable[[], bool], resumed: bool) -> None:
    """Carry QEMU's RAM records one by one, block names renamed.

    A postcopy-preempt channel (``resumed`` False) is nothing but page records, perhaps ended by EOS.
    A main channel resumed after a postcopy recovery starts with RECV_BITMAP commands, then
    POSTCOPY_RESUME, then RAM sections (PART/END, each ended by EOS and a footer) and EOF."""
    r = _Reader(source, first, f"$.{'resumed' if resumed else 'preempt'}[{stats.number}]")
    out: list[bytes] = []
    pending = 0

    def emit(data: bytes) -> None:
        nonlocal pending
        out.append(data)
        pending += len(data)
        if pending >= CHUNK or (not r.buf and not source.ready()):
            flush()

    def flush() -> None:
        nonlocal pending
        if out:
            dest.writev(out)
            out.clear()
            pending = 0

    def ram_records() -> None:
        while True:
            if not r.fill(8):
                if resumed:
                    raise DecodeError("the channel ended inside a RAM section", r.offset, r.path)
                return
            head = r.take(8, "a RAM record")
            (addr,) = struct.unpack(">Q", head)
            flags = addr & (PAGE_SIZE - 1)
            kind = flags & ~RAM_CONTINUE
            if kind == RAM_EOS:
                emit(head)
                if resumed:
                    return
                continue
            if kind not in (RAM_PAGE, RAM_ZERO):
                raise DecodeError(f"RAM record with flags {flags:#x} where pages were expected", r.offset - 8, r.path)
            if not flags & RAM_CONTINUE:
                n = r.take(1, "a RAM block name")[0]
                name = r.take(n, "a RAM block name").decode("latin-1")
                new = renames.forward(name, alive).encode("latin-1")
                head += bytes([len(new)]) + new
            emit(head + r.take(PAGE_SIZE if kind == RAM_PAGE else 1, "a page"))
            stats.pages += 1

    try:
        if not resumed:
            ram_records()
            return
        while True:
            t = r.take(1, "a record type")
            if t[0] == COMMAND:
                cmd, n = struct.unpack(">HH", r.take(4, "a command"))
                payload = r.take(n, "a command payload")
                if cmd == CMD_RECV_BITMAP and n >= 1 and n == 1 + payload[0]:
                    name = renames.forward(payload[1:].decode("latin-1"), alive).encode("latin-1")
                    payload, n = bytes([len(name)]) + name, 1 + len(name)
                emit(t + struct.pack(">HH", cmd, n) + payload)
            elif t[0] in (SECTION_PART, SECTION_END):
                emit(t + r.take(4, "a section id"))
                ram_records()
                if r.fill(1) and r.buf[0] == SECTION_FOOTER:
                    emit(r.take(5, "a section footer"))
            elif t[0] == EOF_TYPE:
                emit(t)
                flush()
                return
            else:
                raise DecodeError(f"record type {t[0]:#04x} in a resumed postcopy stream", r.offset - 1, r.path)
    finally:
        flush()
        stats.bytes_in = source.bytes_read
        stats.bytes_out = dest.bytes_written


def classify(first: bytes, number: int) -> str:
    """What a channel is, from its first bytes (4, or 8 for a postcopy-preempt channel's first page record),
    as QEMU 7.2 and 10.0 destinations tell them apart; ``unknown`` for anything else."""
    if first.startswith(b"QEVM"):
        return "main"
    if first.startswith(b"\x89FRY"):
        return "main (ferry)"
    if first[:3] == bytes([COMMAND, 0, CMD_RECV_BITMAP]):
        return "main (resumed)"
    if multifd.is_multifd(first):
        return "multifd"
    if number and len(first) >= 8:
        (addr,) = struct.unpack_from(">Q", first)
        kind = addr & (PAGE_SIZE - 1) & ~RAM_CONTINUE
        if kind in (RAM_PAGE, RAM_ZERO, RAM_EOS) and addr < 1 << 52:
            return "preempt"
    return "unknown"


def shutdown(*streams: ByteStream) -> None:
    for s in streams:
        try:
            if isinstance(s, SocketStream):
                s.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
