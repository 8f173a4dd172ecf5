"""Files for the orchestration layer: reading streams in chunks, sniffing, schema files.

This is where bytes come off the disk (or stdin) for the CLI, the demo and
the benchmarks; the codecs below only ever see iterables of chunks.

A libvirt save image (``virsh save``, ``virsh managedsave``) is opened like
any stream: :func:`open_input` reads its header, XML and cookie
(:attr:`Input.image`) and hands on the QEMU stream inside, decompressed as
it is read; :func:`decode_input` names file offsets in its errors.
"""

from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Generator, Iterable, Iterator

from .. import encode
from ..encode import legacy
from ..encode import libvirt_save as ls
from ..encode.libvirt_save import Compression, SaveImage
from ..errors import DecodeError, SchemaError
from ..events import Event
from ..serialize.qemu_vmdesc import (
    is_dump_vmstate,
    is_vmdesc,
    load_json,
    schemas_from_dump_vmstate,
    schemas_from_vmdesc,
)
from ..serialize.schema import SchemaSet

CHUNK = 4 << 20
MAP_WINDOW = 8 << 20  # a multiple of 2 MiB: a file cached in huge folios is then mapped by PMDs
SNIFF_BYTES = 64


@dataclass
class Input:
    """An opened input stream: its chunks (sniffed bytes included), format and size if known.

    For a libvirt save image, ``image`` is its head (header, domain XML,
    cookie) and ``chunks`` the QEMU stream inside, decompressed; ``size`` is
    the image file's.
    """

    chunks: Iterator[bytes | memoryview]
    format: str
    size: int | None
    name: str
    image: SaveImage | None = None
    #: called with every chunk of the image's stored (possibly compressed) stream as it is read
    taps: list[Callable[[ls.Chunk], Any]] = field(default_factory=list)
    #: the opened input when it is a regular file holding just the stream: byte offsets in the stream are
    #: offsets in it (RamPages.at), so page runs can be copied from it by the kernel (vmferry.cli.copyout)
    file: BinaryIO | None = None

    @property
    def file_format(self) -> str:
        """What ``--from`` calls this input: ``libvirt-save`` for a save image, else :attr:`format`."""
        return ls.NAME if self.image is not None else self.format


def read_chunks(f: BinaryIO, first: bytes = b"", chunk: int = CHUNK,
                progress: Callable[[int], None] | None = None) -> Iterator[bytes | memoryview]:
    """Yield ``first`` then fresh ``chunk``-sized blocks of ``f`` until its end (read-only views of new buffers)."""
    if first:
        if progress:
            progress(len(first))
        yield first
    while True:
        data = _read_block(f, chunk)
        if not data:
            return
        if progress:
            progress(len(data))
        yield data


def _read_block(f: BinaryIO, n: int) -> bytes | memoryview:
    """``f.read(n)``, one system call at a time.

    ``f.read(n)`` on a pipe loops over ``read(2)`` in C until it has ``n``
    bytes, and a signal that arrives while one of those calls is copying data
    is only handled by Python once the loop returns: with a writer that has
    stalled, never (a SIGTERM or SIGHUP then left the process blocked, its
    partial output in place: 4 runs in 120, docs/design-notes.md).  Between
    two calls made from here, Python runs the handler.
    """
    readinto1 = getattr(f, "readinto1", None)
    if readinto1 is None:
        return f.read(n)
    view = memoryview(bytearray(n))
    got = 0
    while got < n:
        k = readinto1(view[got:])
        if not k:
            break
        got += k
    return (view if got == n else view[:got]).toreadonly()


def mapped_chunks(f: BinaryIO, size: int, window: int = MAP_WINDOW,
                  progress: Callable[[int], None] | None = None) -> Iterator[memoryview]:
    """A regular file as read-only mapped windows: no copy, and bytes never looked at are never read.

    Each window is its own mapping, unmapped once nothing holds a view of it,
    so resident memory stays bounded by a few windows however large the file.
    """
    pos = 0
    while pos < size:
        n = min(window, size - pos)
        m = mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=pos)
        m.madvise(mmap.MADV_SEQUENTIAL)
        if progress:
            progress(n)
        yield memoryview(m)
        pos += n


PIPE_SIZE = 1 << 20


def widen_pipe(f: BinaryIO, size: int = PIPE_SIZE) -> None:
    """Give a pipe a 1 MiB kernel buffer (Linux' default is 64 KiB): a 1 GiB stream then crosses it
    with 16x fewer context switches, which nearly halves the time of ``vmferry ... | vmferry ...``.
    Anything that is not a pipe, or a system that refuses, is left as it is."""
    try:
        import fcntl
        import stat

        fd = f.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and hasattr(fcntl, "F_SETPIPE_SZ"):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, ValueError, AttributeError):
        pass


def open_input(path: str, progress: Callable[[int], None] | None = None, fmt: str | None = None) -> Input:
    """Open ``path`` (``-`` is stdin) and sniff its format from the first bytes, unless ``fmt`` names it.

    A libvirt save image is recognised by its magic; ``fmt`` ``libvirt-save``
    reads the input as one whatever its first bytes, and a stream format
    given for what is a save image is refused (its stream is inside, after
    the header, XML and cookie).  Regular files are mapped (see
    :func:`mapped_chunks`); pipes are read in chunks.
    """
    if path == "-":
        f: BinaryIO = sys.stdin.buffer
        size = None
        widen_pipe(f)
    else:
        f = open(path, "rb")  # noqa: SIM115 - closed when the generator finishes
        size = os.fstat(f.fileno()).st_size if os.path.isfile(path) else None
    head = b""
    while len(head) < SNIFF_BYTES:
        more = f.read(SNIFF_BYTES - len(head))
        if not more:
            break
        head += more
    if fmt is None:
        image = ls.sniff(head)
        fmt = "legacy" if image else encode.sniff(head)
    elif fmt == ls.NAME:  # a save image whatever its first bytes say (else an error naming its magic)
        image, fmt = True, "legacy"
    else:
        image = False
        if ls.sniff(head):
            if f is not sys.stdin.buffer:
                f.close()
            raise DecodeError(f"a libvirt save image, not a {fmt} stream (give --from {ls.NAME}, or no --from)",
                              0, "$.libvirt.header.magic")

    def chunks() -> Generator[bytes | memoryview, None, None]:
        try:
            if size:
                yield from mapped_chunks(f, size, progress=progress)
            else:
                yield from read_chunks(f, head, progress=progress)
        finally:
            if f is not sys.stdin.buffer:
                f.close()

    if not image:
        return Input(chunks(), fmt, size, path, file=f if size else None)
    raw = chunks()
    try:
        head_of, stored = ls.split(raw, allow_partial=True)
    except BaseException:
        raw.close()
        raise
    inp = Input(iter(()), fmt, size, path, head_of)

    def tapped() -> Iterator[ls.Chunk]:
        for chunk in stored:
            for tap in inp.taps:
                tap(chunk)
            yield chunk

    def stream() -> Iterator[bytes | memoryview]:
        for chunk in ls.qemu_stream(head_of, tapped()):
            yield chunk if isinstance(chunk, (bytes, memoryview)) else bytes(chunk)

    inp.chunks = stream()
    return inp


def image_offsets(events: Iterable[Event], image: SaveImage) -> Iterator[Event]:
    """``events`` of the stream inside ``image``, their DecodeErrors naming where in the image file.

    A raw image's stream lies in the file as it is: the offset becomes the
    file's.  A compressed one's offsets are in the decompressed stream: the
    message says so and where the compressed stream starts.
    """
    try:
        yield from events
    except DecodeError as e:
        if e.offset is None or e.path.startswith("$.libvirt"):
            raise
        if image.compression == Compression.RAW:
            hint = f" where data_len {image.header.data_len} puts the stream" if e.offset == 0 else ""
            raise type(e)(e.message + hint, e.offset + image.payload_offset, e.path) from None
        raise type(e)(f"{e.message} (offset {e.offset:#x} of the decompressed {image.compression.label} "
                      f"stream, which starts at {image.payload_offset:#x} in the image)", None, e.path) from None


def read_stream_vmdesc(path: str) -> bytes | None:
    """The vmdesc JSON at the end of a stream file, found by reading only its tail."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for tail in (256 << 10, 4 << 20, legacy.MAX_VMDESC + 5):
            n = min(size, tail)
            f.seek(size - n)
            found = legacy.find_vmdesc(f.read(n), size - n)
            if found is not None:
                return found[1]
            if n == size:
                break
    return None


def load_schema_file(path: str) -> SchemaSet:
    """Schemas from a stream with a vmdesc, a vmdesc JSON, or a ``-dump-vmstate`` JSON."""
    with open(path, "rb") as f:
        head = f.read(4)
    if legacy.sniff(head):
        text = read_stream_vmdesc(path)
        if text is None:
            raise SchemaError(f"{path}: this stream has no vmdesc to take schemas from")
        try:
            return schemas_from_vmdesc(load_json(text, path), f"vmdesc of {path}")
        except SchemaError as e:
            raise SchemaError(f"{path}: {e}") from None
    size = os.path.getsize(path)
    if size > legacy.MAX_VMDESC:
        raise SchemaError(f"{path}: {size} bytes is too large for a schema file")
    with open(path, "rb") as f:
        obj = load_json(f.read(), path)
    if is_vmdesc(obj):
        return schemas_from_vmdesc(obj, f"vmdesc {path}")
    if is_dump_vmstate(obj):
        return schemas_from_dump_vmstate(obj, f"-dump-vmstate {path}")
    raise SchemaError(f"{path}: neither a stream, a vmdesc JSON nor a -dump-vmstate JSON")


def decode_input(inp: Input, schema: SchemaSet | None = None, target: str | None = None):
    """Events of an opened input, with ``schema`` as the fallback for streams without a vmdesc.

    ``target`` names the format the events are for: unknown ferry frames are
    kept for every target that can carry them (all but QEMU's own stream).
    """
    mod = encode.codec(inp.format)
    if inp.image is not None:
        return image_offsets(mod.decode(inp.chunks, legacy.DecodeOptions(fallback_schemas=schema)), inp.image)
    if inp.format == "legacy":
        return mod.decode(inp.chunks, legacy.DecodeOptions(fallback_schemas=schema))
    if inp.format == "ferry":
        return mod.decode(inp.chunks, mod.DecodeOptions(keep_unknown=target not in (None, "legacy"),
                                                        legacy_records=target == "legacy"))
    events = mod.decode(inp.chunks)
    if target == "legacy":  # skippable ferry frames carried by a record format: QEMU's stream has no room
        from ..encode.records import UnknownFrame

        return (ev for ev in events if not isinstance(ev, UnknownFrame))
    return events


__all__ = ["DecodeError", "Input", "decode_input", "image_offsets", "widen_pipe", "load_schema_file", "open_input",
           "read_chunks", "read_stream_vmdesc"]
