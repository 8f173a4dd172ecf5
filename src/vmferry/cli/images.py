"""libvirt save images on disk: read one, copy it, move it to another machine type.

The orchestration around :mod:`vmferry.encode.libvirt_save` (which does no
I/O): files are mapped in windows, the QEMU stream inside is decoded by the
legacy codec as it is decompressed, and an output is written to
``PATH.<random>.vmferry-partial`` and renamed only once complete, so a damaged
input leaves nothing behind.  Decoding errors inside a raw image's stream
name the offset in the image file.

* :func:`read_image` gives the :class:`~vmferry.encode.libvirt_save.SaveImage`
  and the events of the QEMU stream;
* :func:`copy_image` writes an image back, byte for byte, after checking
  that the whole stream decodes;
* :func:`transform_image` converts the stream to another machine type with
  :func:`vmferry.compat.transform_events`, sets ``<os><type machine=...>``
  in the XML to match (``virsh restore`` refuses an XML whose machine
  differs from the image's), and stores the stream compressed as before
  (or as asked).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from typing import BinaryIO, Iterable, Iterator

from ..encode import legacy
from ..encode import libvirt_save as ls
from ..encode.libvirt_save import Compression, SaveImage
from ..errors import DecodeError
from ..events import Event
from .files import mapped_chunks, read_chunks

__all__ = ["copy_image", "read_image", "transform_image"]


def _chunks(path: str | os.PathLike[str]) -> Iterator[bytes | memoryview]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            yield from mapped_chunks(f, size)
        else:
            yield from read_chunks(f)


def _shifted(events: Iterable[Event], image: SaveImage) -> Iterator[Event]:
    """Re-raise the legacy decoder's errors with the offset in the image file (raw) or saying where (compressed)."""
    try:
        yield from events
    except DecodeError as e:
        if image.compression == Compression.RAW and e.offset is not None:
            raise DecodeError(e.message, e.offset + image.payload_offset, e.path) from None
        if e.offset is not None:
            raise DecodeError(f"{e.message} (offset {e.offset:#x} of the decompressed {image.compression.label} "
                              f"stream, which starts at {image.payload_offset:#x})", None, e.path) from None
        raise


def read_image(path: str | os.PathLike[str], *, allow_partial: bool = False,
               options: legacy.DecodeOptions | None = None) -> tuple[SaveImage, Iterator[Event]]:
    """The image at ``path`` and the events of its QEMU stream (decoded as they are iterated)."""
    image, stored = ls.split(_chunks(path), allow_partial=allow_partial)
    return image, _shifted(legacy.decode(ls.qemu_stream(image, stored), options), image)


@contextmanager
def _atomic(path: str | os.PathLike[str], src: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path`` as :func:`vmferry.cli.common.output_file` does (a new file beside it, renamed on success
    after an fsync, removed on failure and on SIGINT/SIGTERM/SIGHUP, with ``src``'s permission bits)."""
    from .common import output_file

    with output_file(os.fspath(path), [os.fspath(src)], sync=True) as f:
        yield f


def _check_paths(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Refuse an output that is the input: the same name, or a symlink or hard link to it."""
    try:
        a, b = os.stat(src), os.stat(dst)
    except OSError:
        return
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        raise ValueError("input and output are the same file")


def copy_image(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> SaveImage:
    """Write ``src`` to ``dst`` byte for byte, once its stream has decoded to the end (else DecodeError, no ``dst``)."""
    _check_paths(src, dst)
    image, events = read_image(src)
    for _ in events:
        pass
    with _atomic(dst, src) as out:
        image2, stored = ls.split(_chunks(src))
        out.writelines(ls.encode(image2, stored))
    return image


def transform_image(src: str | os.PathLike[str], dst: str | os.PathLike[str], machine: str, *,
                    qemu_version: str | None = None, from_machine: str | None = None,
                    from_qemu_version: str | None = None, compression: Compression | None = None) -> SaveImage:
    """Convert the guest saved in ``src`` to machine type ``machine`` (of QEMU ``qemu_version``) into ``dst``.

    The stream is converted as ``vmferry transform`` converts a stream; the
    XML's machine type becomes ``machine``; ``was_running``, the cookie and
    the rest of the XML stay.  ``compression`` (default: the input's) is
    how the new stream is stored.  Returns the new image head.
    """
    from ..compat import qemu_registry, transform_events

    _check_paths(src, dst)
    registry = qemu_registry()
    target = registry.resolve(machine, qemu_version)
    source = registry.resolve(from_machine, from_qemu_version) if from_machine else None
    image, events = read_image(src)
    new = image.with_machine(registry.release(target).machine)
    if compression is not None and compression != new.compression:
        if new.header.version < 2:
            new = ls.parse(replace(new.header, version=2).pack() + new.data)
        new = ls.parse(replace(new.header, compressed=int(compression)).pack() + new.data)
    converted = transform_events(events, registry, target, source, from_qemu_version)
    with _atomic(dst, src) as out:
        out.writelines(ls.encode(new, ls.compress(legacy.encode(converted), new.compression)))
    return new
