"""A read window over an iterable of byte chunks (no I/O of its own).

Decoders pull bytes through a :class:`Window`: ``need(n)`` makes sure ``n``
bytes are available at ``pos``, taking more chunks from the iterable when
necessary.  An empty chunk means "nothing ready now" (see :meth:`Window.idle`).  Chunks are used in place, never copied, whether they are
``bytes`` or ``memoryview`` slices of a mapped file; only a record that
straddles two chunks is copied, into a small bridge buffer holding just
that record.  Chunks are never written to, so the ``memoryview`` slices
handed out in events stay valid for as long as someone holds them, and
memory is bounded by the chunk size plus one record.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ..errors import DecodeError, TruncatedError

Chunk = bytes | bytearray | memoryview


class Window:
    """``buf[pos:]`` is the unread part of the current buffer; ``base`` is the absolute offset of ``buf[0]``."""

    def __init__(self, chunks: Iterable[Chunk], path: str = "$") -> None:
        self._chunks: Iterator[Chunk] = iter(chunks)
        self._pending: memoryview | None = None  # the unread tail of a chunk a bridge took from
        self.buf: bytes | memoryview = b""
        self.view = memoryview(self.buf)
        self.pos = 0
        self.base = 0
        self.eof = False
        self._paused = False  # the last chunk taken said "nothing ready now", and none came since
        self.path = path

    @property
    def offset(self) -> int:
        """Absolute offset of the next unread byte."""
        return self.base + self.pos

    @property
    def available(self) -> int:
        return len(self.buf) - self.pos

    def _next_chunk(self) -> memoryview | None:
        if self._pending is not None:
            chunk, self._pending = self._pending, None
            return chunk
        while True:
            data = next(self._chunks, None)
            if data is None:
                self.eof = True
                return None
            if len(data):
                self._paused = False
                return data if isinstance(data, memoryview) else memoryview(data)

    def _set(self, buf: bytes | memoryview, consumed: int) -> None:
        self.base += consumed
        self.buf = buf
        self.view = buf if isinstance(buf, memoryview) else memoryview(buf)
        self.pos = 0

    def fill(self, n: int) -> bool:
        """Try to make ``n`` bytes available; False if the input ends first."""
        while len(self.buf) - self.pos < n:
            chunk = self._next_chunk()
            if chunk is None:
                break
            rest = self.view[self.pos:]
            if not len(rest):
                self._set(chunk, self.pos)
                continue
            # Bridge: the unread rest plus just enough of the next chunk.
            take = n - len(rest)
            if take < len(chunk):
                self._pending = chunk[take:]
                chunk = chunk[:take]
            self._set(bytes(rest) + bytes(chunk), self.pos)
        return len(self.buf) - self.pos >= n

    def grow(self, at_least: int = 4096) -> bool:
        """Make more bytes available without waiting for more than one chunk: the unread rest bridged with up to
        ``max(at_least, its size)`` bytes of the next chunk (so a retrying decoder's window doubles); False at
        the end of the input.  For a decoder that cannot tell how much more it needs."""
        chunk = self._next_chunk()
        if chunk is None:
            return False
        rest = self.view[self.pos:]
        if not len(rest):
            self._set(chunk, self.pos)
            return True
        take = max(at_least, len(rest))
        if take < len(chunk):
            self._pending = chunk[take:]
            chunk = chunk[:take]
        self._set(bytes(rest) + bytes(chunk), self.pos)
        return True

    def need(self, n: int, what: str = "") -> None:
        if not self.fill(n):
            got = len(self.buf) - self.pos
            label = f"{what}: " if what else ""
            raise TruncatedError(f"{label}stream truncated: expected {n} bytes, got {got}", self.offset, self.path)

    def idle(self) -> bool:
        """True when nothing unread is buffered and the input's next chunk is empty: the input has
        nothing ready now (a live reader's signal before it blocks).  Any data it brings stays for the next read."""
        if self.pos < len(self.buf) or self._pending is not None or self.eof:
            return False
        if self._paused:  # the input said so, and nothing was read since
            return True
        data = next(self._chunks, None)
        if data is None:
            self.eof = True
            return False
        if not len(data):
            self._paused = True
            return True
        self._pending = data if isinstance(data, memoryview) else memoryview(data)
        return False

    def at_end(self) -> bool:
        return not self.fill(1)

    def take(self, n: int, what: str = "") -> memoryview:
        """The next ``n`` bytes as a view, consumed."""
        self.need(n, what)
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def read_all(self, limit: int, what: str, complete: Callable[[bytes], bool] | None = None) -> None:
        """Pull the rest of the input into one buffer (at most ``limit`` bytes).

        A live input may pause without ending (a source that waits for its return path): when it pauses
        (an empty chunk) and ``complete(what was read)`` says the rest is there, stop reading."""
        parts = [bytes(self.view[self.pos:])]
        size = len(parts[0])
        while True:
            if self._pending is not None:
                chunk: memoryview | None = self._pending
                self._pending = None
            else:
                data = next(self._chunks, None)
                if data is None:
                    self.eof = True
                    break
                if not len(data):
                    self._paused = True
                    if complete is not None:
                        parts = [b"".join(parts)]
                        if complete(parts[0]):
                            break
                    continue
                self._paused = False
                chunk = data if isinstance(data, memoryview) else memoryview(data)
            assert chunk is not None
            size += len(chunk)
            if size > limit:
                raise DecodeError(f"{what}: more than {limit} bytes would have to be buffered", self.offset, self.path)
            parts.append(bytes(chunk))
        self._set(b"".join(parts), self.pos)
