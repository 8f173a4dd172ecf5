"""Writing QEMU's stream to a file descriptor, page runs copied by the kernel (orchestration layer: does I/O).

:func:`write_pieces` takes what :func:`vmferry.encode.legacy.encode_pieces`
yields: byte strings, and page runs (``RamPages``) whose records go out as
they are.  A run that is a slice of the input file (``RamPages.at``, set by
the legacy decoder) is copied from that file to the output by the kernel,
``copy_file_range`` towards a regular file, ``sendfile`` towards anything
else (a pipe, a socket), so its pages never pass through this process: on
a mapped input they are never even read.  Adjacent runs go in one call.  A
writer thread does the writing, so the caller's decoder reads the next
record headers meanwhile (the copy runs in the kernel without the GIL).
Where the kernel refuses (another file system, an old kernel, an output
opened for appending), the bytes are read and written instead.

Memory stays bounded: at most :data:`QUEUE` pieces wait for the writer, and
a waiting run holds no view of the input, only its offset and length.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from typing import BinaryIO, Iterable

from ..events import RamPages

QUEUE = 8
COPY_MAX = 1 << 30  # bytes per kernel call (copy_file_range and sendfile take a size_t, but keep calls bounded)

_Op = tuple[bytes | memoryview, int, int]  # bytes to write, or b"" and (offset, length) of the source to copy


class _Writer:
    """Writes ops in order to ``out_fd``; copies ranges of ``src_fd``."""

    def __init__(self, out_fd: int, src_fd: int | None) -> None:
        self.out_fd = out_fd
        self.src_fd = src_fd
        self.regular = stat.S_ISREG(os.fstat(out_fd).st_mode)
        self.kernel = src_fd is not None
        self.copied = 0  # bytes the kernel copied
        self.error: BaseException | None = None
        self.ops: queue.Queue[_Op | None] = queue.Queue(QUEUE)
        self.thread = threading.Thread(target=self._run, name="vmferry-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (op := self.ops.get()) is not None:
                data, offset, length = op
                if length:
                    self._copy(offset, length)
                else:
                    self._write(data)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e
            while self.ops.get() is not None:  # drain, so that the caller never blocks on a full queue
                pass

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            n = os.write(self.out_fd, view)
            view = view[n:]

    def _copy(self, offset: int, length: int) -> None:
        assert self.src_fd is not None
        while length and self.kernel:
            try:
                n = self._kernel_copy(offset, min(length, COPY_MAX))
            except OSError:
                n = 0
            if n <= 0:  # refused (or the source is shorter than announced): copy by hand from here
                self.kernel = False
                break
            self.copied += n
            offset += n
            length -= n
        while length:
            data = os.pread(self.src_fd, min(length, 4 << 20), offset)
            if not data:
                raise OSError(f"input ended at offset {offset} while copying a page run")
            self._write(data)
            offset += len(data)
            length -= len(data)

    def _kernel_copy(self, offset: int, length: int) -> int:
        assert self.src_fd is not None
        if self.regular:
            try:
                return os.copy_file_range(self.src_fd, self.out_fd, length, offset)
            except OSError:
                self.regular = False  # e.g. another file system: sendfile does the same copy
        return os.sendfile(self.out_fd, self.src_fd, offset, length)

    def put(self, op: _Op) -> None:
        if self.error is not None:
            raise self.error
        self.ops.put(op)

    def finish(self) -> None:
        """Wait until everything is written; raise what the writer met."""
        self.ops.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Let the writer end (the caller failed, and its exception is the one that counts)."""
        if self.thread.is_alive():
            self.ops.put(None)
            self.thread.join()


RUN_FLUSH = 64 << 20  # a growing copy is handed to the writer once this long, so copying starts early
SAME_MAX = 1 << 20  # bytes pieces up to this size are compared with the input (see write_pieces)


def write_pieces(pieces: Iterable[bytes | memoryview | RamPages], out: BinaryIO, source: BinaryIO | None = None,
                 flush_at: int = 1 << 16) -> tuple[int, int]:
    """Write ``pieces`` to ``out`` in order; runs with ``at`` are copied from ``source`` by the kernel.

    ``source`` must be the regular file the runs were decoded from (their ``at`` offsets are offsets in it), or
    None (then every run is written from its bytes).  While everything written so far equals the input at the
    same offsets (QEMU's stream converted to itself), a bytes piece that equals the input's next bytes joins
    the copy too (checked with a ``pread`` of its length), so that the copies are few and long: each of
    them costs the writer thread a wait for the interpreter lock.  Returns the bytes written, and how many of
    them the kernel copied.
    """
    out.flush()
    src_fd = os.dup(source.fileno()) if source is not None else None
    writer = _Writer(out.fileno(), src_fd)
    pending = bytearray()
    run_at = run_len = 0  # a copy not yet handed to the writer, grown by adjacent runs
    aligned = src_fd is not None  # everything so far is the input's bytes at the same offsets
    written = 0  # bytes handed to the writer or held in the copy and ``pending``

    def flush_run() -> None:
        nonlocal run_len
        if run_len:
            writer.put((b"", run_at, run_len))
            run_len = 0

    def flush_bytes() -> None:
        if pending:
            writer.put((bytes(pending), 0, 0))
            pending.clear()

    def extend(at: int, n: int) -> None:
        nonlocal run_at, run_len
        if run_len and run_at + run_len == at:
            run_len += n
        else:
            flush_run()
            flush_bytes()
            run_at, run_len = at, n
        if run_len >= RUN_FLUSH:
            flush_run()

    try:
        for piece in pieces:
            if isinstance(piece, RamPages):
                if piece.legacy is None:
                    raise ValueError("a page run without its QEMU records")
                n = len(piece.legacy)
                if src_fd is not None and piece.at is not None:
                    aligned = aligned and piece.at == written
                    extend(piece.at, n)
                    written += n
                    continue
                aligned = False
                flush_run()
                flush_bytes()
                writer.put((piece.legacy, 0, 0))
                written += n
                continue
            n = len(piece)
            if aligned and n <= SAME_MAX and src_fd is not None and os.pread(src_fd, n, written) == piece:
                extend(written, n)
                written += n
                continue
            aligned = False
            flush_run()
            pending += piece
            written += n
            if len(pending) >= flush_at:
                flush_bytes()
        flush_run()
        flush_bytes()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if src_fd is not None:
            os.close(src_fd)
    return written, writer.copied
