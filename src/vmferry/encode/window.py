"""A read window over an iterable of byte chunks (no I/O of its own).

Decoders pull bytes through a :class:`Window`: ``need(n)`` makes sure ``n``
bytes are available at ``pos``, taking more chunks from the iterable when
necessary.  Buffers are immutable ``bytes``, never reused, so the
``memoryview`` slices handed out in events stay valid for as long as someone
holds them, and memory is bounded by the chunk size plus one record.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..errors import DecodeError, TruncatedError


class Window:
    """``buf[pos:]`` is the unread part of the input; ``base`` is the absolute offset of ``buf[0]``."""

    def __init__(self, chunks: Iterable[bytes | bytearray | memoryview], path: str = "$") -> None:
        self._chunks: Iterator[bytes | bytearray | memoryview] = iter(chunks)
        self.buf: bytes = b""
        self.view = memoryview(self.buf)
        self.pos = 0
        self.base = 0
        self.eof = False
        self.path = path

    @property
    def offset(self) -> int:
        """Absolute offset of the next unread byte."""
        return self.base + self.pos

    @property
    def available(self) -> int:
        return len(self.buf) - self.pos

    def fill(self, n: int) -> bool:
        """Try to make ``n`` bytes available; False if the input ends first."""
        while len(self.buf) - self.pos < n and not self.eof:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                break
            if not chunk:
                continue
            rest = self.view[self.pos:]
            self.base += self.pos
            self.buf = bytes(chunk) if not rest else bytes(rest) + bytes(chunk)
            self.view = memoryview(self.buf)
            self.pos = 0
        return len(self.buf) - self.pos >= n

    def need(self, n: int, what: str = "") -> None:
        if not self.fill(n):
            got = len(self.buf) - self.pos
            label = f"{what}: " if what else ""
            raise TruncatedError(f"{label}stream truncated: expected {n} bytes, got {got}", self.offset, self.path)

    def at_end(self) -> bool:
        return not self.fill(1)

    def take(self, n: int, what: str = "") -> memoryview:
        """The next ``n`` bytes as a view, consumed."""
        self.need(n, what)
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def read_all(self, limit: int, what: str) -> None:
        """Pull the rest of the input into the window (at most ``limit`` bytes more)."""
        while not self.eof:
            if len(self.buf) - self.pos > limit:
                raise DecodeError(f"{what}: more than {limit} bytes would have to be buffered", self.offset, self.path)
            self.fill(len(self.buf) - self.pos + 1)
