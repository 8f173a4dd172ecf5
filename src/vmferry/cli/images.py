"""libvirt save images on disk: what ``inspect``, ``convert`` and ``transform`` do with them.

The orchestration around :mod:`vmferry.encode.libvirt_save` (which does no
I/O).  An image is opened like any stream (:func:`vmferry.cli.files.open_input`
gives its head in ``Input.image`` and the QEMU stream inside, decompressed);
this module writes images:

* :func:`copy_stored` writes an image back byte for byte (head and stored,
  compressed stream) while its stream is decoded to the end;
* :func:`retarget` gives the head for another machine type and/or
  compression: ``<os><type machine=...>`` set in the XML (``virsh restore``
  refuses an XML whose machine differs from the image's), every other byte
  of the XML as it was, the cookie and ``was_running`` kept; where the two
  machine types give a device defaults that no stream edit can stand in for
  (:mod:`vmferry.compat.machines.pinned`: virtio-balloon's ``page-poison``),
  a ``<qemu:override>`` keeps the source's value;
* :func:`write_image` writes a head and the events of a QEMU stream,
  compressed as the head says.

An image file is written through :func:`vmferry.cli.common.output_file`, as
every output of vmferry, with libvirt's mode 0600 (it holds the guest's
memory) and synced: ``PATH.<random>.vmferry-partial`` renamed only once
complete, so a damaged input (or SIGINT, SIGTERM, SIGHUP) leaves nothing
behind; ``-`` is stdout; the input is never written over (nor through a
symlink or hard link to it).

:func:`read_image`, :func:`copy_image` and :func:`transform_image` do the
same from Python, path to path.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

from ..encode import legacy
from ..encode import libvirt_save as ls
from ..encode.libvirt_save import Compression, SaveImage
from ..errors import DecodeError, FerryError
from ..events import Event
from .common import UsageError, output_file, write_all
from .files import Input, decode_input, image_offsets, open_input

__all__ = ["COMPRESS_CHOICES", "COMPRESS_HELP", "FERRY_COMPRESS", "IMAGE_COMPRESSIONS", "IMAGE_MODE", "ImageError",
           "copy_image", "copy_stored", "describe", "ferry_compression", "image_compression", "persistent_note",
           "pinned_note", "read_image", "retarget", "transform_image", "write_image"]

#: The permissions of an image vmferry writes: libvirt's own (the file holds the guest's RAM).
IMAGE_MODE = 0o600


class ImageError(FerryError):
    """A request about an image that cannot be carried out (an incomplete image, a compression it cannot hold...)."""


_INCOMPLETE = ("the save image is incomplete (libvirt had not finished writing it) and virsh restore refuses it; "
               "--to legacy extracts its stream")


def _require_image(inp: Input) -> SaveImage:
    if inp.image is None:
        raise ImageError(f"{inp.name}: not a libvirt save image ({inp.format} stream)")
    return inp.image


#: ``--compress`` names for an image's stream ("none" as for ferry frames).
IMAGE_COMPRESSIONS = {"none": Compression.RAW, **{c.label: c for c in Compression if c != Compression.SPARSE}}
#: ``--compress`` of ``convert`` and ``transform``: these for ferry frames, the others for an image's stream.
FERRY_COMPRESS = ("none", "zstd", "lz4")
COMPRESS_CHOICES = [*FERRY_COMPRESS, *(name for name in IMAGE_COMPRESSIONS if name not in FERRY_COMPRESS)]
COMPRESS_HELP = ("--to ferry: compress the frames (none, zstd, lz4; default none; convert compresses runs of "
                 "frames together in GROUP frames unless --per-frame). A libvirt save image out: how its "
                 "QEMU stream is stored (raw, gzip, bzip2, xz, lzop, zstd; default: as the input's; libvirt 9.0 "
                 "restores all but zstd)")


def ferry_compression(name: str | None, fmt: str) -> dict[str, Any]:
    """The encoder options ``--compress NAME`` gives a stream written as ``fmt`` (none without it); a usage
    error unless ``fmt`` is ferry and NAME one of :data:`FERRY_COMPRESS` (the others are an image's)."""
    if name is None:
        return {}
    if fmt != "ferry" or name not in FERRY_COMPRESS:
        raise UsageError(f"--compress {'|'.join(FERRY_COMPRESS)} applies to --to ferry, the others to libvirt "
                         "save images")
    return {"compress": name}


def image_compression(name: str | None) -> Compression | None:
    """The compression ``--compress NAME`` asks of an image (None: keep the input's)."""
    if name is None:
        return None
    if name not in IMAGE_COMPRESSIONS:
        raise ImageError(f"a libvirt save image's stream cannot be compressed as {name} "
                         f"({', '.join(IMAGE_COMPRESSIONS)})")
    return IMAGE_COMPRESSIONS[name]


def retarget(image: SaveImage, machine: str | None = None, compression: Compression | None = None,
             emulator: str | None = None) -> SaveImage:
    """The head of ``image`` for machine type ``machine``, stored with ``compression`` and run by the QEMU
    binary ``emulator`` (None: unchanged).

    A version 1 header (no compression field) becomes version 2 when the
    stream is to be compressed.
    """
    new = image.with_machine(machine) if machine is not None and machine != image.machine else image
    pins = _balloon_pins(image, machine)
    if pins:
        assert image.balloon is not None
        new = new.with_device_properties(image.balloon, {p.name: p.value for p in pins})
    if emulator is not None:
        new = new.with_emulator(emulator)
    if compression is not None and compression != new.compression:
        header = new.header if new.header.version >= 2 else replace(new.header, version=2)
        new = ls.parse(replace(header, compressed=int(compression)).pack() + new.data, allow_partial=True)
    return new


def copy_stored(inp: Input, dst: str | os.PathLike[str], events: Iterable[Event] | None = None) -> int:
    """Write the image ``inp`` to ``dst`` byte for byte, while its QEMU stream is decoded to the end.

    The stored stream is copied as read (compressed or not), so the output
    is the input's bytes; a stream that does not decode leaves no ``dst``.
    ``events`` are the decoded events (default: :func:`decode_input` of ``inp``).
    Returns the number of bytes written.
    """
    image = _require_image(inp)
    if not image.complete:
        raise ImageError(_INCOMPLETE)
    written = [0]

    with output_file(os.fspath(dst), [inp.name], sync=True, mode=IMAGE_MODE) as out:
        def tap(chunk: ls.Chunk) -> None:
            written[0] += len(chunk)
            out.write(chunk)

        out.write(image.head)
        inp.taps.append(tap)
        for _ in decode_input(inp) if events is None else events:
            pass
        if inp.size is not None and len(image.head) + written[0] != inp.size:  # the decoder read it all
            raise ImageError(f"copied {len(image.head) + written[0]} of the image's {inp.size} bytes")
    return len(image.head) + written[0]


def write_image(head: SaveImage, events: Iterable[Event], dst: str | os.PathLike[str], *,
                src: str | os.PathLike[str] | None = None, tap: Callable[[ls.Chunk], Any] | None = None) -> int:
    """Write ``head`` then the QEMU stream of ``events``, compressed as ``head`` says, to ``dst``.

    ``src`` is the input's path: never written over.  Nothing is left at
    ``dst`` when the events end in an error.  ``tap`` is called with every
    chunk written.  Returns the number of bytes written.
    """
    if not head.complete:
        raise ImageError(_INCOMPLETE)
    inputs = [os.fspath(src)] if src is not None else []
    chunks = ls.encode(head, ls.compress(legacy.encode(events), head.compression))
    if tap is not None:
        chunks = _tapped(chunks, tap)
    with output_file(os.fspath(dst), inputs, sync=True, mode=IMAGE_MODE) as out:
        return write_all(out, chunks)


def _tapped(chunks: Iterable[ls.Chunk], tap: Callable[[ls.Chunk], Any]) -> Iterator[ls.Chunk]:
    for chunk in chunks:
        tap(chunk)
        yield chunk


def describe(image: SaveImage, name: str, size: int | None) -> list[str]:
    """The lines ``vmferry inspect`` prints about an image before the summary of its stream."""
    s = image.summary()
    where = f", {size:,} bytes" if size is not None else ""
    lines = [f"{name}: libvirt save image, version {s['version']}{where}"
             + ("" if s["complete"] else " (INCOMPLETE: libvirt did not finish writing it; virsh restore refuses it)"),
             f"domain: {s['domain']} (type {s['domain_type']}, arch {s['arch']})",
             f"machine type in the XML: {s['machine']}",
             f"was running: {'yes (virsh restore resumes it)' if s['was_running'] else 'no (restored paused)'}",
             f"compression: {s['compression']}",
             f"XML {s['xml_bytes']:,} bytes, cookie {s['cookie_bytes'] or 0:,} bytes, data_len {s['data_len']:,}, "
             f"{s['byte_order']}-endian; the QEMU stream starts at {s['stream_offset']:#x}"]
    return lines


def _balloon_pins(image: SaveImage, machine: str | None) -> list[Any]:
    from ..compat.machines.pinned import balloon_pins

    return balloon_pins(image.machine, machine) if image.balloon is not None else []


def pinned_note(before: SaveImage, machine: str | None) -> str | None:
    """What to tell an operator whose image got a ``<qemu:override>`` from :func:`retarget`."""
    pins = _balloon_pins(before, machine)
    if not pins:
        return None
    props = ", ".join(f"{p.name}={'on' if p.value else 'off'}" for p in pins)
    sets = ", ".join(sorted({p.why.split(":")[0] for p in pins}))
    return (f"note: the memory balloon ({before.balloon}) keeps {props} as under {before.machine}, through a "
            f"<qemu:override> in the image's XML ({sets}: they size the BAR the guest's driver holds); libvirt "
            f"logs the domain as tainted: custom-device")


def persistent_note(before: SaveImage, after: SaveImage) -> str | None:
    """What to tell an operator whose image now names another machine type than the domain's definition."""
    if before.machine == after.machine:
        return None
    return (f"note: virsh restore/start runs the image's XML ({after.machine}); the persistent definition of "
            f"{after.name} still names {before.machine} for later boots: virsh dumpxml --inactive --security-info "
            f"{after.name}, set machine='{after.machine}', virsh define it (docs/libvirt.md)")


# ---------------------------------------------------------------------------
# from Python, path to path
# ---------------------------------------------------------------------------


def read_image(path: str | os.PathLike[str], *, allow_partial: bool = False,
               options: legacy.DecodeOptions | None = None) -> tuple[SaveImage, Iterator[Event]]:
    """The image at ``path`` and the events of its QEMU stream (decoded as they are iterated)."""
    inp = open_input(os.fspath(path))
    image = _require_image(inp)
    if not image.complete and not allow_partial:
        getattr(inp.chunks, "close", lambda: None)()
        raise DecodeError("the save image is incomplete (libvirt had not finished writing it)", 0,
                          "$.libvirt.header.magic")
    return image, image_offsets(legacy.decode(inp.chunks, options), image)


def copy_image(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> SaveImage:
    """Write ``src`` to ``dst`` byte for byte, once its stream has decoded to the end (else DecodeError, no ``dst``)."""
    inp = open_input(os.fspath(src))
    image = _require_image(inp)
    copy_stored(inp, dst)
    return image


def transform_image(src: str | os.PathLike[str], dst: str | os.PathLike[str], machine: str, *,
                    qemu_version: str | None = None, from_machine: str | None = None,
                    from_qemu_version: str | None = None, compression: Compression | None = None,
                    emulator: str | None = None) -> SaveImage:
    """Convert the guest saved in ``src`` to machine type ``machine`` (of QEMU ``qemu_version``) into ``dst``.

    What ``vmferry transform SRC DST --machine MACHINE`` does: the stream is
    converted along the registered transforms, the XML's machine type
    becomes ``machine``; ``was_running``, the cookie and the rest of the XML
    stay.  ``compression`` (default: the input's) is how the new stream is
    stored; ``emulator`` (default: the input's) is the QEMU binary libvirt
    runs it with.  Returns the new image head.
    """
    from ..compat import qemu_registry, transform_events

    registry = qemu_registry()
    target = registry.resolve(machine, qemu_version)
    source = registry.resolve(from_machine, from_qemu_version) if from_machine else None
    inp = open_input(os.fspath(src))
    image = _require_image(inp)
    new = retarget(image, registry.release(target).machine, compression, emulator)
    events = transform_events(decode_input(inp), registry, target, source, from_qemu_version)
    write_image(new, events, dst, src=src)
    return new
