"""Pages stored as byte planes inside a ferry GROUP (docs/format.md §2.6; no I/O).

A page of little-endian words (a kernel's tables: pointers, counters, arrays
of ``struct page``) compresses poorly as it is: bytes that vary and bytes
that repeat alternate, so no match is longer than a word.  Stored as its
byte planes for words of ``w`` bytes (bytes 0, w, 2w, ..., then bytes 1,
w + 1, ..., up to plane ``w - 1``), the high bytes that repeat form long
runs that zstd finds.  A PAGES frame with the *planes* flag carries one code
per page it carries: 0 for a page as it is, 1, 2 or 3 for the planes of
2-, 4- or 8-byte words.

:func:`store` is the writer's side (a code for each page, chosen by a fast
probe compressor); :func:`read_codes` and :func:`restore` are the reader's.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import DecodeError

__all__ = ["CODES", "GAIN", "TRIED", "join", "read_codes", "restore", "split", "store"]

CODES = (1, 2, 3)  # the codes a frame may carry besides 0: planes of 1 << code bytes
#: The codes the writer tries: 4- and 8-byte words (2-byte planes won on 1.5% of a Linux guest's pages, and
#: trying them cost a third more time for no smaller a stream).
TRIED = (2, 3)
#: A page goes as planes when the probe compresses them to at most this share of the page as it is.
GAIN = 0.9


def split(page: bytes, code: int) -> bytes:
    """The byte planes of ``page`` (bytes) for words of ``1 << code`` bytes, one after the other."""
    w = 1 << code
    return b"".join([page[j::w] for j in range(w)])


def join(planes: Any, code: int) -> bytearray:
    """The page whose byte planes (words of ``1 << code`` bytes) are ``planes``: the inverse of :func:`split`."""
    w = 1 << code
    n = len(planes) // w
    page = bytearray(len(planes))
    for j in range(w):
        page[j::w] = planes[j * n:(j + 1) * n]
    return page


def store(pieces: list[tuple[int, Any]], ps: int, probe: Callable[[Any], bytes]) -> tuple[bytes, list[Any]]:
    """The codes of the pages of ``pieces`` (stretches of carried pages: their first index and their data) and the
    data to carry, or ``b""`` and the pieces unchanged when every page goes as it is.

    Each page gets the code of :data:`TRIED` whose planes ``probe`` compresses smallest, if that is at most
    :data:`GAIN` of the page as it is."""
    codes = bytearray()
    out: list[Any] = []
    for _, piece in pieces:
        for at in range(0, len(piece), ps):
            page = bytes(piece[at:at + ps])
            best, kept = len(probe(page)) * GAIN, None
            for code in TRIED:
                planes = split(page, code)
                size = len(probe(planes))
                if size < best:
                    best, kept = size, (code, planes)
            if kept is None:
                codes.append(0)
                out.append(page)
            else:
                codes.append(kept[0])
                out.append(kept[1])
    if not any(codes):
        return b"", [piece for _, piece in pieces]
    return bytes(codes), out


def read_codes(table: Any, at: int, path: str) -> bytes:
    """A frame's plane codes, checked (each 0..3)."""
    codes = bytes(table)
    if codes and max(codes) > CODES[-1]:
        bad = next(i for i, c in enumerate(codes) if c > CODES[-1])
        raise DecodeError(f"carried page {bad} of a PAGES frame has plane code {codes[bad]} (at most "
                          f"{CODES[-1]})", at, path)
    return codes


def restore(data: Any, codes: bytes, ps: int) -> memoryview:
    """The carried pages (``len(codes)`` pages of ``ps`` bytes, some as planes) as they were."""
    out = bytearray(data)
    for i, code in enumerate(codes):
        if code:
            out[i * ps:(i + 1) * ps] = join(out[i * ps:(i + 1) * ps], code)
    return memoryview(out).toreadonly()
