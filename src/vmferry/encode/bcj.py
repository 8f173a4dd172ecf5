"""The x86 branch filter (BCJ) of the .xz format, for page data that holds x86 code (no I/O).

x86 calls and jumps (``E8``/``E9`` followed by a 32-bit displacement) name
their target relative to where they are, so the same target is spelled
differently at every call site.  The filter rewrites each displacement as
an absolute address (site + displacement), which makes repeated targets
repeat as bytes and compress better; decoding subtracts again.  This is the
filter xz applies with ``--x86`` (``lzma.FILTER_X86``, liblzma's
``simple/x86.c``), byte for byte, so it is specified by the xz format and
testable against liblzma: ``encode(data, start)`` equals what liblzma's
encoder produces with ``start_offset=start``.  The last four bytes are
never changed (liblzma leaves an unfinished tail as it is at the end of its
input), and the output always has the input's length.

The encoder visits only the ``E8``/``E9`` bytes (found by ``re``, in C); the
state machine runs in Python once per such byte, which makes it a few MB/s on
code and faster on other data.  The decoder is liblzma's own (the ``lzma``
module: the filtered bytes wrapped as stored LZMA2 chunks, which liblzma
copies through its x86 decoder), about 15x faster.  :func:`looks_like_x86`
tells, in one C-level pass, whether a buffer holds enough call-like patterns
to be worth it.
"""

from __future__ import annotations

import lzma
import re
import struct

_CANDIDATE = re.compile(rb"[\xe8\xe9]")
_CALL_LIKE = re.compile(rb"[\xe8\xe9][\x00-\xff]{3}[\x00\xff]")
_ALLOWED = (True, True, True, False, True, False, False, False)  # liblzma's MASK_TO_ALLOWED_STATUS
_BIT_NUMBER = (0, 1, 2, 2, 3, 3, 3, 3)  # liblzma's MASK_TO_BIT_NUMBER
_M32 = 0xFFFFFFFF


def _shifted(mask: int, offset: int) -> int:
    for _ in range(offset):
        mask = (mask & 0x77) << 1
    return mask


# prev_mask after ``offset`` (1..5) steps without a candidate, for every mask (liblzma's inner loop, tabulated)
_SHIFT = [[_shifted(mask, offset) for mask in range(256)] for offset in range(6)]
# the candidate converts when its fifth byte is 00/FF and prev_mask allows it
_CONVERTS = [_ALLOWED[(mask >> 1) & 7] and (mask >> 1) < 0x10 for mask in range(256)]


def _convert(data: bytes | bytearray | memoryview, start: int, encoding: bool) -> bytes:
    buf = bytearray(data)
    size = len(buf)
    if size < 5:
        return bytes(buf)
    found = [m.start() for m in _CANDIDATE.finditer(buf, 0, size - 4)]
    if not found:
        return bytes(buf)
    # A candidate more than 5 bytes after the candidate before it (looked at or not), and more than 5 before the
    # next, starts with prev_mask 0, lies in no converted instruction and touches no other: alone, it converts
    # when its fifth byte is 00 or FF.  Nearly all candidates are such; the others (clusters) go through
    # liblzma's state machine, each cluster from its first candidate, where prev_mask is 0 again.
    close = [False, *[b - a <= 5 for a, b in zip(found, found[1:])], False]
    plain = [p for p, before, after in zip(found, close, close[1:])
             if not before and not after and buf[p + 4] in (0, 0xFF)]
    clustered = [p for p, before, after in zip(found, close, close[1:]) if before or after]
    if clustered:
        plain = sorted(plain + _cluster_plain(buf, clustered, start, encoding))
    if plain:
        _convert_plain(buf, plain, start, encoding)
    return bytes(buf)


def _cluster_plain(buf: bytearray, candidates: list[int], start: int, encoding: bool) -> list[int]:
    """liblzma's state machine over ``candidates`` (clusters of candidates at most 5 bytes apart, in order):
    converts those whose prev_mask is not 0 and returns those that convert with prev_mask 0."""
    shift, converts = _SHIFT, _CONVERTS
    prev_mask = 0
    prev = -5  # the last candidate looked at, relative to ``start`` (liblzma: prev_pos = start - 5)
    pos = 0  # the next position the filter looks at: candidates before it lie inside a converted instruction
    plain: list[int] = []
    for p in candidates:
        if p < pos:
            continue
        d = p - prev
        prev = p
        prev_mask = 0 if d > 5 else shift[d][prev_mask]
        b = buf[p + 4]
        if (b == 0 or b == 0xFF) and converts[prev_mask]:
            if prev_mask:
                _convert_one(buf, p, start, encoding, prev_mask)
            else:
                plain.append(p)
            pos = p + 5
            prev_mask = 0
        else:
            pos = p + 1
            prev_mask |= 0x11 if b == 0 or b == 0xFF else 1
    return plain


def _convert_one(buf: bytearray, p: int, start: int, encoding: bool, prev_mask: int) -> None:
    """liblzma's conversion of one instruction when prev_mask is not 0 (its loop over the mask's bits)."""
    src = int.from_bytes(buf[p + 1:p + 5], "little")
    site = (start + p + 5) & _M32
    while True:
        dest = (src + site if encoding else src - site) & _M32
        if prev_mask == 0:
            break
        i = _BIT_NUMBER[prev_mask >> 1]
        b = (dest >> (24 - i * 8)) & 0xFF
        if not (b == 0 or b == 0xFF):
            break
        src = dest ^ ((1 << (32 - i * 8)) - 1)
    buf[p + 1:p + 5] = ((dest & 0xFFFFFF) | (0xFF000000 if dest & 0x1000000 else 0)).to_bytes(4, "little")


def _convert_plain(buf: bytearray, at: list[int], start: int, encoding: bool) -> None:
    """Convert the instructions at ``at`` (ascending, 5 bytes apart at least; prev_mask 0: target = displacement
    +- site), all in a few C calls: one layout of the bytes before each displacement and the displacement,
    unpacked, the displacements replaced, packed back (the bytes between them as they were)."""
    layout = struct.Struct("<" + "".join([f"{p + 1 - last}sI" for p, last in zip(at, [0, *[q + 5 for q in at]])]))
    values = list(layout.unpack_from(buf, 0))
    sign = 1 if encoding else -1
    base = start + 5
    dests = [(s + sign * (base + p)) & _M32 for s, p in zip(values[1::2], at)]
    values[1::2] = [(v & 0xFFFFFF) | (0xFF000000 if v & 0x1000000 else 0) for v in dests]
    layout.pack_into(buf, 0, *values)


def encode(data: bytes | bytearray | memoryview, start: int = 0) -> bytes:
    """``data`` filtered for compression; ``start`` is the address of its first byte (modulo 2**32)."""
    return _convert(data, start, True)


def decode(data: bytes | bytearray | memoryview, start: int = 0) -> bytes:
    """The inverse of :func:`encode` with the same ``start``: liblzma's x86 decoder (``_convert(data, start,
    False)`` gives the same bytes, in Python)."""
    if not len(data):
        return b""
    filters = [{"id": lzma.FILTER_X86, "start_offset": start & _M32}, _LZMA2]
    return lzma.decompress(_stored(data), format=lzma.FORMAT_RAW, filters=filters)


_LZMA2 = {"id": lzma.FILTER_LZMA2, "dict_size": 4096}  # stored chunks only: the smallest dictionary does
_CHUNK = 1 << 16  # the largest stored LZMA2 chunk


def _stored(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as a raw LZMA2 stream of stored (uncompressed) chunks: a control byte (1: the first, with a
    dictionary reset; 2: the others), the chunk's length - 1 (16 bits), its bytes; a 0 byte ends the stream."""
    view = memoryview(data).cast("B")
    parts: list[bytes | memoryview] = []
    for pos in range(0, len(view), _CHUNK):
        piece = view[pos:pos + _CHUNK]
        parts.append(bytes((1 if pos == 0 else 2, (len(piece) - 1) >> 8, (len(piece) - 1) & 0xFF)))
        parts.append(piece)
    parts.append(b"\x00")
    return b"".join(parts)


SEGMENT = 1 << 18  # page data is filtered in 256 KiB-aligned pieces, each as if it started at address 0


def _pieces(data: bytes | bytearray | memoryview, offset: int, encoding: bool) -> bytes:
    view = memoryview(data)
    out = []
    pos = 0
    while pos < len(view):
        within = (offset + pos) % SEGMENT
        take = min(len(view) - pos, SEGMENT - within)
        out.append(_convert(view[pos:pos + take], within, True) if encoding else decode(view[pos:pos + take], within))
        pos += take
    return b"".join(out)


def encode_pages(data: bytes | bytearray | memoryview, offset: int) -> bytes:
    """Page data of a RAM block from ``offset`` on, filtered in 256 KiB-aligned pieces: each piece as if it began
    at address ``offset mod 256 KiB``.  Firmware appears twice in a PC guest, in its ROM block and shadowed in low
    RAM at the same offset modulo 256 KiB (0xE0000 holds the last 128 KiB of the 256 KiB BIOS): identical pages
    then filter to identical bytes and still compress as repeats, which absolute offsets would prevent."""
    return _pieces(data, offset, True)


def decode_pages(data: bytes | bytearray | memoryview, offset: int) -> bytes:
    """The inverse of :func:`encode_pages`."""
    return _pieces(data, offset, False)


def looks_like_x86(data: bytes | bytearray | memoryview, per_mib: int = 1024) -> bool:
    """Whether ``data`` has at least ``per_mib`` call-like patterns per MiB (x86 code has several thousand;
    random bytes about 64, zeros none)."""
    return len(_CALL_LIKE.findall(data)) * (1 << 20) >= per_mib * max(len(data), 1)
