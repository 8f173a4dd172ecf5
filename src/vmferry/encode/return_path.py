"""QEMU's return path: the messages a destination sends back to its source on the migration socket (sans-IO).

With the ``return-path`` (or ``postcopy-ram``) capability the source sends
``OPEN_RETURN_PATH`` and the destination answers on the same socket with
``MIG_RP_MSG_*`` messages: ``be16 type, be16 length, length bytes``
(QEMU's ``migrate_send_rp_message``).  The source checks each one as
:class:`ReturnPathReader` does (``source_return_path_thread``): a type it
knows, a fixed length where the type has one, never more than 512 bytes.

One message carries more than its length says: ``RECV_BITMAP`` (postcopy
recovery) is followed by ``be64 size``, ``size`` bitmap bytes and the end
mark ``0x0123456789abcdef``, which the source reads itself.  The reader
frames that trailer too and hands its bitmap bytes on in pieces as they
come, never holding a whole bitmap.

:class:`ReturnPathReader` is fed bytes and hands back :class:`RpMessage`
(each with its exact bytes, to relay unchanged) and :class:`BitmapPiece`
items; :func:`encode_message` writes a message again (after
:func:`rename_block` changed the block it names).  Malformed input raises
:class:`~vmferry.errors.DecodeError` with the offset in the return path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import DecodeError

__all__ = ["BITMAP_END", "MAX_BITMAP", "MAX_BODY", "NAMES", "BitmapPiece", "ReturnPathReader", "RpMessage",
           "encode_message", "rename_block"]

# MIG_RP_MSG_* (QEMU 7.2 and 10.0 migration/migration.c; SWITCHOVER_ACK is 10.0's)
SHUT, PONG, REQ_PAGES_ID, REQ_PAGES, RECV_BITMAP, RESUME_ACK, SWITCHOVER_ACK = range(1, 8)
NAMES = {SHUT: "SHUT", PONG: "PONG", REQ_PAGES_ID: "REQ_PAGES_ID", REQ_PAGES: "REQ_PAGES",
         RECV_BITMAP: "RECV_BITMAP", RESUME_ACK: "RESUME_ACK", SWITCHOVER_ACK: "SWITCHOVER_ACK"}
#: The lengths QEMU's source insists on (rp_cmd_args); the others are checked by their own layout.
FIXED_LENGTH = {SHUT: 4, PONG: 4, REQ_PAGES: 12, RESUME_ACK: 4, SWITCHOVER_ACK: 0}
#: The largest message body a source accepts.
MAX_BODY = 512
#: The end mark after a RECV_BITMAP bitmap (RAMBLOCK_RECV_BITMAP_ENDING).
BITMAP_END = 0x0123456789ABCDEF
#: The largest bitmap accepted: one bit per 4 KiB page of a 64 TiB block.
MAX_BITMAP = (64 << 40) // 4096 // 8

_HEAD = struct.Struct(">HH")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class RpMessage:
    """One return-path message; ``raw`` is its exact bytes (header and body)."""

    type: int
    body: bytes
    raw: bytes
    offset: int

    @property
    def name(self) -> str:
        return NAMES[self.type]

    @property
    def value(self) -> int | None:
        """SHUT's status (non-zero: the destination failed), PONG's ping number, RESUME_ACK's value."""
        return _BE32.unpack(self.body)[0] if self.type in (SHUT, PONG, RESUME_ACK) else None

    @property
    def block(self) -> str | None:
        """The RAM block REQ_PAGES_ID or RECV_BITMAP names."""
        if self.type == REQ_PAGES_ID:
            return self.body[13:].decode("latin-1")
        if self.type == RECV_BITMAP:
            return self.body[1:].decode("latin-1")
        return None

    @property
    def pages(self) -> tuple[int, int] | None:
        """(start, length) in bytes of the pages REQ_PAGES(_ID) asks for."""
        if self.type in (REQ_PAGES_ID, REQ_PAGES):
            start, length = struct.unpack_from(">QI", self.body)
            return start, length
        return None


@dataclass(frozen=True, slots=True)
class BitmapPiece:
    """Bytes of a RECV_BITMAP trailer (size, bitmap, end mark), to relay as they are; ``last`` ends it."""

    data: bytes
    last: bool


class ReturnPathReader:
    """Frames the return path: :meth:`feed` bytes, get back the messages and bitmap pieces they complete."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.offset = 0  # return-path offset of the first byte of _buf
        self._bitmap_left: int | None = None  # bitmap bytes still to come (None: not in a trailer)
        self._trailer_head = False  # the trailer's be64 size is still to come

    def feed(self, data: bytes | bytearray | memoryview) -> list[RpMessage | BitmapPiece]:
        self._buf += data
        out: list[RpMessage | BitmapPiece] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def at_boundary(self) -> bool:
        """Whether the input so far ended between messages (the end of the return path may come here)."""
        return not self._buf and self._bitmap_left is None and not self._trailer_head

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self.offset += n
        return data

    def _next(self) -> RpMessage | BitmapPiece | None:
        if self._trailer_head:
            if len(self._buf) < 8:
                return None
            (size,) = _BE64.unpack_from(self._buf)
            if size > MAX_BITMAP:
                raise DecodeError(f"RECV_BITMAP bitmap of {size} bytes exceeds {MAX_BITMAP}", self.offset,
                                  "$.return_path.bitmap")
            self._trailer_head = False
            self._bitmap_left = size
            return BitmapPiece(self._take(8), False)
        if self._bitmap_left is not None:
            if self._bitmap_left:
                if not self._buf:
                    return None
                n = min(self._bitmap_left, len(self._buf))
                self._bitmap_left -= n
                return BitmapPiece(self._take(n), False)
            if len(self._buf) < 8:
                return None
            (mark,) = _BE64.unpack_from(self._buf)
            if mark != BITMAP_END:
                raise DecodeError(f"RECV_BITMAP trailer ends with {mark:#018x}, expected {BITMAP_END:#018x}",
                                  self.offset, "$.return_path.bitmap")
            self._bitmap_left = None
            return BitmapPiece(self._take(8), True)
        if len(self._buf) < 4:
            return None
        kind, length = _HEAD.unpack_from(self._buf)
        start = self.offset
        path = f"$.return_path.{NAMES.get(kind, 'message')}"
        if kind not in NAMES:
            raise DecodeError(f"unknown return-path message type {kind} (length {length})", start, "$.return_path")
        if length > MAX_BODY:
            raise DecodeError(f"{NAMES[kind]} of {length} bytes exceeds the {MAX_BODY}-byte limit", start + 2, path)
        fixed = FIXED_LENGTH.get(kind)
        if fixed is not None and length != fixed:
            raise DecodeError(f"{NAMES[kind]} with length {length}, expected {fixed}", start + 2, path)
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[4:4 + length])
        if kind == REQ_PAGES_ID and (length < 13 or length != 13 + body[12]):
            raise DecodeError(f"REQ_PAGES_ID of {length} bytes does not fit its block name", start + 2, path)
        if kind == RECV_BITMAP and (length < 1 or length != 1 + body[0]):
            raise DecodeError(f"RECV_BITMAP of {length} bytes does not fit its block name", start + 2, path)
        raw = self._take(4 + length)
        if kind == RECV_BITMAP:
            self._trailer_head = True
        return RpMessage(kind, body, raw, start)


def encode_message(kind: int, body: bytes) -> bytes:
    """The bytes of a return-path message."""
    if len(body) > MAX_BODY:
        raise ValueError(f"return-path message of {len(body)} bytes")
    return _HEAD.pack(kind, len(body)) + body


def rename_block(msg: RpMessage, renames: dict[str, str]) -> bytes:
    """``msg``'s bytes with the RAM block it names renamed per ``renames`` (unchanged when not named there)."""
    block = msg.block
    new = renames.get(block) if block is not None else None
    if new is None or new == block:
        return msg.raw
    name = new.encode("latin-1")
    if msg.type == REQ_PAGES_ID:
        return encode_message(msg.type, msg.body[:12] + bytes([len(name)]) + name)
    return encode_message(msg.type, bytes([len(name)]) + name)
