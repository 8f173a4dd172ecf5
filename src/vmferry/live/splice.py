"""Page runs forwarded from a socket to a unix socket without passing through user space (Linux ``splice``).

A proxy that writes QEMU's format sends most of what it reads on unchanged:
the RAM page runs.  :class:`PipedInput` moves its socket's bytes into a pipe
with ``splice(2)`` (which frees the sender at once, as a ``recv`` would),
duplicates them into a second pipe with ``tee(2)`` and reads only that copy
for the decoder.  :meth:`PipedInput.forward` then splices a run that is
still in the first pipe straight to the output socket, where reading and
writing it again would copy it twice.  Everything else (re-encoded records,
and any run no longer in the pipe) is written from the decoded copy, so the
output is the same bytes either way.

The pipe is consumed strictly in order: a run is spliced only when nothing
after its start has been consumed, and the bytes before it are dropped.
Before each new read all but the last 8 KiB read so far leave the pipe, so
a page record cut by the end of one chunk is still there to be spliced.
A read takes what the socket holds, then what else arrived meanwhile, up to
the pipe's size: every chunk costs the decoder about the same, whatever its
size, so a proxy that falls behind catches up in fewer, larger chunks.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import select
import socket
import ssl
from typing import Callable, Iterable, Iterator

from ..encode import legacy
from ..errors import TransportError
from ..events import Event, RamPages
from .transport import CHUNK, SEND_BATCH, ByteStream, SocketStream

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
KEEP = 8 << 10  # bytes already read that stay in the pipe: more than a page record
MIN_MORE = 64 << 10  # the least room in the pipe worth another splice into a chunk


def can_splice(source: ByteStream, dest: ByteStream) -> bool:
    """Whether to splice: from a plain socket (TLS decrypts in user space, so its bytes must pass through it)
    to a unix socket, on a system with ``splice`` and ``tee`` (Linux).  Spliced into a tcp socket, pages
    measured slower than copied (the ferry path, tried so, fell from 42% to 22% of direct; docs/design-notes.md)."""
    return (_libc_tee() is not None and hasattr(os, "splice") and isinstance(source, SocketStream)
            and not isinstance(source.sock, ssl.SSLSocket) and isinstance(dest, SocketStream)
            and dest.sock.family == socket.AF_UNIX)


@functools.cache
def _libc_tee() -> Callable[[int, int, int, int], int] | None:
    """The C library's ``tee`` (Python's os module has ``splice`` but no ``tee``), or None."""
    try:
        tee = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    tee.restype = ctypes.c_ssize_t
    return tee  # type: ignore[no-any-return]


class PipedInput:
    """The rest of ``source`` (whose first ``start`` bytes were already read) as chunks for a decoder, and its
    page runs forwarded to ``dest``."""

    def __init__(self, source: SocketStream, dest: SocketStream, start: int, size: int = CHUNK) -> None:
        self.source = source
        self.dest = dest
        self._start = self._end = 0  # the input bytes accepted by forward() and not yet spliced
        self.consumed = start  # input offset of the first byte still in the pipe
        self.seen = start  # input offset of the end of what was handed to the decoder
        self.spliced = 0
        tee = _libc_tee()
        assert tee is not None, "can_splice() says whether PipedInput can be used"
        self._tee = tee
        self._held = os.pipe()  # the input, until forwarded or dropped
        self._copy = os.pipe()  # its duplicate, read for the decoder
        self._null = os.open(os.devnull, os.O_WRONLY)
        # Equal sizes, so that whatever the first pipe holds, tee finds room for it in the empty second one.
        self.size = _resize(self._held[1], _resize(self._copy[1], _resize(self._held[1], size)))

    def chunks(self, idle_markers: bool = False) -> Iterator[bytes]:
        """The input for the decoder; with ``idle_markers`` an empty chunk before a read that would wait."""
        sock_fd = self.source.sock.fileno()
        held_r, held_w = self._held
        copy_r, copy_w = self._copy
        room = select.poll()
        room.register(held_w, select.POLLOUT)
        readable = select.poll()
        readable.register(sock_fd, select.POLLIN)
        while True:
            self.flush()
            # Keep the last few KiB read: a page record cut by the chunk's end is forwarded with the next chunk.
            self._drop_to(self.seen - KEEP)
            if not room.poll(0):
                # No free slot (a pipe of a page, or kept bytes in many small buffers): a splice would wait for
                # room only this process can make, so keep nothing.
                self._drop_to(self.seen)
            if idle_markers and not readable.poll(0):  # the source's ready(), without a new poll object
                yield b""
            try:
                n = os.splice(sock_fd, held_w, self.size - (self.seen - self.consumed))
                if n:
                    n += self._more(sock_fd, held_w, self.size - (self.seen - self.consumed) - n, readable)
            except OSError as e:
                raise self.source.error("read from", e) from None
            if not n:
                return
            # tee duplicates from the head of the pipe: the kept bytes too, which leave the copy at once
            kept = self.seen - self.consumed
            if self._tee(held_r, copy_w, kept + n, 0) != kept + n:
                raise TransportError(f"{self.source.name}: tee: {os.strerror(ctypes.get_errno() or errno.EIO)}")
            while kept:
                kept -= os.splice(copy_r, self._null, kept)
            parts = []
            left = n
            while left:
                part = os.read(copy_r, left)
                parts.append(part)
                left -= len(part)
            self.seen += n
            self.source.bytes_read += n
            yield parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    def _more(sock_fd: int, held_w: int, room: int, readable: select.poll) -> int:
        """Splice what else the socket holds already, without waiting, while the pipe has room for a useful part
        of it.  The bytes in flight on a unix socket are bounded by the sender's buffer (about 200 KiB), and a
        chunk costs the decoder the same whatever its size, so a chunk that also takes what arrived during the
        previous splice costs less per byte.  (A poll says whether the socket holds data: a tcp socket's splice
        waits for data whatever SPLICE_F_NONBLOCK says.)"""
        got = 0
        while room - got >= MIN_MORE and readable.poll(0):
            try:
                n = os.splice(sock_fd, held_w, room - got, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:  # the pipe is full after all (its slots, not its bytes)
                break
            if not n:  # the end of the input: the next blocking splice sees it too
                break
            got += n
        return got

    def forward(self, at: int, n: int) -> bool:
        """Splice input bytes ``at .. at + n`` to the output, after what was forwarded before; False (nothing
        done) when they are no longer held.  Adjacent runs are spliced together (see :meth:`flush`)."""
        if at < max(self.consumed, self._end) or at + n > self.seen:
            return False
        if at != self._end:
            self.flush()
            self._start = at
        self._end = at + n
        return True

    def flush(self) -> None:
        """Splice what :meth:`forward` accepted: before anything else is written, and before the next read."""
        at, n = self._start, self._end - self._start
        if not n:
            return
        self._start = self._end
        self._drop_to(at)
        splice_out(self._held[0], self.dest, n, "forward to")
        self.consumed += n
        self.spliced += n

    def close(self) -> None:
        for fd in (*self._held, *self._copy, self._null):
            os.close(fd)

    def _drop_to(self, offset: int) -> None:
        """Drop the bytes before input ``offset`` from the pipe (up to it, if they are still there)."""
        try:
            while self.consumed < offset:
                self.consumed += os.splice(self._held[0], self._null, offset - self.consumed)
        except OSError as e:
            raise TransportError(f"{self.source.name}: cannot drop bytes from the pipe: {e.strerror or e}") from None


def splice_out(pipe: int, dest: SocketStream, n: int, verb: str) -> None:
    """Splice the next ``n`` bytes of the pipe read end ``pipe`` into ``dest``'s socket, all of them; an error
    is ``dest``'s TransportError (``verb``: what was being done, e.g. ``write to``)."""
    dst_fd = dest.sock.fileno()
    left = n
    try:
        while left:
            left -= os.splice(pipe, dst_fd, left)
    except OSError as e:
        raise dest.error(verb, e) from None
    dest.bytes_written += n


def sized_pipe(size: int = CHUNK) -> tuple[int, int]:
    """A pipe (read end, write end) of ``size`` bytes as far as allowed: a splice then moves that much in one
    call, where Linux' default pipe of 64 KiB takes one call in and one out per 64 KiB."""
    r, w = os.pipe()
    _resize(w, size)
    return r, w


def _resize(fd: int, size: int) -> int:
    """Set a pipe's size to ``size`` bytes as far as allowed (``fs.pipe-max-size``); its size then."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


def write_legacy(events: Iterable[Event], source: PipedInput) -> None:
    """Write ``events`` to ``source.dest`` in QEMU's format, splicing the page runs ``source`` still holds."""
    dest = source.dest
    parts: list[bytes | memoryview] = []
    size = 0
    for piece in legacy.encode_pieces(events):
        if not isinstance(piece, RamPages) and not piece:  # the input paused: write out what is held
            source.flush()
            if parts:
                dest.writev(parts)
                parts, size = [], 0
            continue
        if isinstance(piece, RamPages):
            assert piece.legacy is not None
            if piece.at is not None:
                if parts:  # what came before the run goes first
                    dest.writev(parts)
                    parts, size = [], 0
                if source.forward(piece.at, len(piece.legacy)):
                    continue
            data: bytes | memoryview = piece.legacy
        else:
            data = piece
        if not parts:
            source.flush()  # the runs forwarded so far go before these bytes
        parts.append(data)
        size += len(data)
        if size >= SEND_BATCH or len(parts) >= 256:
            dest.writev(parts)
            parts, size = [], 0
    source.flush()
    if parts:
        dest.writev(parts)


__all__ = ["PipedInput", "can_splice", "sized_pipe", "splice_out", "write_legacy"]
