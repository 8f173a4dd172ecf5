"""``vmferry ram extract|inject``: guest RAM as one raw file per RAM block, and back into a stream.

``vmferry ram extract IN DIR`` writes, for every RAM block of the stream
(its MEM_SIZE list), ``DIR/<block>.ram``: a file of the block's length
holding each page as the stream's last record of that page left it (a
page sent twice counts as sent last; a page never sent is zero, as QEMU's
destination has it; zero pages stay holes of a sparse file), and
``DIR/blocks.json``, which names each block's file.  This is what QEMU's
``scripts/analyze-migration.py -x`` does, for any format vmferry reads.

``vmferry ram inject IN DIR OUT`` is the reverse: the stream ``IN`` with its
RAM replaced by the contents of DIR's files.  ``IN`` gives everything that
is not RAM (configuration, device state, sections, commands, the vmdesc),
so it is normally the stream the files were extracted from; the RAM blocks
(names, lengths) of DIR must be those of IN.  OUT carries every page once,
at the place of IN's first page records: non-zero pages as PAGE records,
zero pages as ZERO records, in block order.

Neither holds a guest's RAM in memory: pages go to and come from the files
(mapped), one run at a time.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import sys
import zlib
from typing import Any, Iterable, Iterator

from ..errors import DecodeError
from ..events import (
    RAM_COMPRESS_PAGE,
    Event,
    RamEos,
    RamMemSize,
    RamPages,
    RamRecord,
    RamZeros,
)
from .common import (
    EXIT_OK,
    UsageError,
    from_option,
    open_stream,
    output_file,
    progress_bar,
    schema_option,
)
from .files import decode_input

__all__ = ["add_subcommands", "block_file_names", "extract", "inject_events"]

MANIFEST = "blocks.json"
#: Pages per run of the injected stream (the ferry frame and record size).
RUN_PAGES = 256


def block_file_names(names: Iterable[str]) -> dict[str, str]:
    """A file name per RAM block name: ``pc.ram`` -> ``pc.ram.ram``, ``/rom@etc/acpi/tables`` ->
    ``_rom_etc_acpi_tables.ram``; never two alike, never a path."""
    out: dict[str, str] = {}
    used: set[str] = {MANIFEST}
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "block"
        candidate, n = f"{base}.ram", 1
        while candidate in used:
            n += 1
            candidate = f"{base}.{n}.ram"
        used.add(candidate)
        out[name] = candidate
    return out


# ---------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------


class _Block:
    def __init__(self, name: str, length: int, path: str) -> None:
        self.name = name
        self.length = length
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, length)
        self.written = bytearray((length + 8 * 4096 - 1) // (8 * 4096) + 1)  # pages holding data, 1 bit each
        self.pages = 0
        self.zero_pages = 0

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.length:
            raise DecodeError(f"RAM block {self.name!r}: page at {offset:#x} lies beyond its length {self.length:#x}",
                              None, "$.ram")

    def data(self, offset: int, data: Any, page_size: int) -> None:
        self._check(offset, len(data))
        os.pwrite(self.fd, data, offset)
        first = offset // page_size
        for i in range(first, first + len(data) // page_size):
            self.written[i >> 3] |= 1 << (i & 7)
        self.pages += len(data) // page_size

    def zeros(self, offset: int, count: int, page_size: int, fill: bytes | None) -> None:
        self._check(offset, count * page_size)
        first = offset // page_size
        for k in range(count):
            i = first + k
            byte = fill[k] if fill is not None else 0
            if byte:
                os.pwrite(self.fd, bytes([byte]) * page_size, offset + k * page_size)
                self.written[i >> 3] |= 1 << (i & 7)
            elif self.written[i >> 3] & (1 << (i & 7)):  # data sent earlier: this record zeroes it again
                os.pwrite(self.fd, bytes(page_size), offset + k * page_size)
                self.written[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        self.zero_pages += count

    def close(self) -> None:
        os.close(self.fd)


def extract(events: Iterable[Event], directory: str) -> list[dict[str, Any]]:
    """Write the RAM of ``events`` into ``directory`` (created, must not exist) and return the manifest rows."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        raise UsageError(f"{directory}: exists (extract makes a new directory)") from None
    except OSError as e:
        raise UsageError(f"{directory}: {e.strerror or e}") from None
    blocks: dict[str, _Block] = {}
    try:
        for ev in events:
            if isinstance(ev, RamMemSize):
                names = block_file_names(rb.name for rb in ev.blocks)
                for rb in ev.blocks:
                    if rb.name not in blocks:
                        blocks[rb.name] = _Block(rb.name, rb.length, os.path.join(directory, names[rb.name]))
            elif isinstance(ev, RamPages):
                block = _known(blocks, ev.block)
                if ev.data is not None:
                    block.data(ev.offset, ev.data, ev.page_size)
                else:
                    for i in range(ev.count):
                        block.data(ev.offset + i * ev.page_size, ev.page(i), ev.page_size)
            elif isinstance(ev, RamZeros):
                _known(blocks, ev.block).zeros(ev.offset, ev.count, ev.page_size, ev.fill)
            elif isinstance(ev, RamRecord) and ev.block:
                block = _known(blocks, ev.block)
                if ev.flags & RAM_COMPRESS_PAGE:
                    block.data(ev.offset, _inflate(ev), 4096)
                else:
                    raise DecodeError(f"an XBZRLE page at {ev.offset:#x} of {ev.block!r}: vmferry cannot extract "
                                      "delta-encoded pages (migrate again without the xbzrle capability)", None, "$.ram")
        rows = [{"block": b.name, "file": os.path.basename(b.path), "length": b.length, "pages": b.pages,
                 "zero_pages": b.zero_pages} for b in blocks.values()]
        with open(os.path.join(directory, MANIFEST), "x") as f:
            json.dump({"format": "vmferry-ram", "version": 1, "blocks": rows}, f, indent=1)
            f.write("\n")
        return rows
    finally:
        for b in blocks.values():
            b.close()


def _known(blocks: dict[str, _Block], name: str) -> _Block:
    try:
        return blocks[name]
    except KeyError:
        raise DecodeError(f"RAM record of block {name!r}, which no MEM_SIZE record sized", None, "$.ram") from None


def _inflate(ev: RamRecord) -> bytes:
    """A COMPRESS_PAGE record's page (QEMU's zlib stream after a 4-byte length)."""
    try:
        page = zlib.decompressobj().decompress(ev.payload[4:], 4097)
    except zlib.error as e:
        raise DecodeError(f"compressed page at {ev.offset:#x}: {e}", None, "$.ram") from None
    if len(page) != 4096:
        raise DecodeError(f"compressed page at {ev.offset:#x} inflates to {len(page)} bytes, not 4096", None, "$.ram")
    return page


# ---------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------


def _read_manifest(directory: str) -> dict[str, str]:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file (a directory made by vmferry ram extract has one)") from None
    except ValueError as e:
        raise UsageError(f"{path}: not JSON: {e}") from None
    rows = doc.get("blocks") if isinstance(doc, dict) else None
    if doc.get("format") != "vmferry-ram" or not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("block"), str) and isinstance(r.get("file"), str) for r in rows):
        raise UsageError(f"{path}: not a vmferry ram manifest")
    files = {}
    for r in rows:
        if os.path.basename(r["file"]) != r["file"] or r["file"] in (".", ".."):
            raise UsageError(f"{path}: block {r['block']!r} names a file outside the directory")
        files[r["block"]] = r["file"]
    return files


def _block_runs(view: memoryview, name: str, length: int, page_size: int) -> Iterator[Event]:
    """The pages of one block as runs: non-zero pages as RamPages (views of ``view``), zero pages as RamZeros."""
    zero = bytes(page_size)
    npages = length // page_size
    named = True
    i = 0
    while i < npages:
        is_zero = view[i * page_size:(i + 1) * page_size] == zero
        j = i + 1
        limit = npages if is_zero else min(npages, i + RUN_PAGES)
        while j < limit and (view[j * page_size:(j + 1) * page_size] == zero) == is_zero:
            j += 1
        if is_zero:
            yield RamZeros(name, i * page_size, j - i, named, page_size)
        else:
            yield RamPages(name, i * page_size, j - i, named, page_size, data=view[i * page_size:j * page_size])
        named = False
        i = j


def inject_events(events: Iterable[Event], directory: str) -> Iterator[Event]:
    """``events`` with their RAM pages replaced by the files of ``directory`` (see the module doc)."""
    files = _read_manifest(directory)
    sizes: list[Any] | None = None
    injected = False

    def all_pages() -> Iterator[Event]:
        assert sizes is not None
        for b in sizes:
            path = os.path.join(directory, files[b.name])
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size != b.length:
                    raise UsageError(f"{path}: {size:#x} bytes, but block {b.name!r} is {b.length:#x} long")
                if size == 0:
                    continue
                m = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            # the views handed out keep the mapping alive as long as they are used
            yield from _block_runs(memoryview(m), b.name, b.length, b.page_size or 4096)

    for ev in events:
        if isinstance(ev, RamMemSize):
            if sizes is None:
                sizes = list(ev.blocks)
                missing = [b.name for b in sizes if b.name not in files]
                extra = sorted(set(files) - {b.name for b in sizes})
                if missing or extra:
                    raise UsageError(f"{directory}: its RAM blocks are not the stream's (missing: "
                                     f"{', '.join(missing) or 'none'}; not in the stream: {', '.join(extra) or 'none'})")
            yield ev
        elif isinstance(ev, (RamPages, RamZeros)) or (isinstance(ev, RamRecord) and ev.block):
            if not injected:
                injected = True
                yield from all_pages()
        elif isinstance(ev, RamEos) and sizes is not None and not injected:
            # a stream whose RAM sections carry no page at all: the pages go before the first EOS after MEM_SIZE
            injected = True
            yield from all_pages()
            yield ev
        else:
            yield ev
    if sizes is None:
        raise UsageError("the stream has no MEM_SIZE record: it carries no RAM to replace")


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def cmd_extract(args: argparse.Namespace) -> int:
    schema = schema_option(args)
    size = os.path.getsize(args.input) if args.input != "-" and os.path.isfile(args.input) else None
    with progress_bar(args.input, size, not args.quiet) as advance:
        inp = open_stream(args.input, advance, args.from_format)
        rows = extract(decode_input(inp, schema), args.directory)
    if args.json:
        json.dump({"directory": args.directory, "blocks": rows}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif not args.quiet:
        for r in rows:
            print(f"{r['block']}: {args.directory}/{r['file']}, {r['length']:#x} bytes, {r['pages']:,} pages with data, "
                  f"{r['zero_pages']:,} zero pages")
    return EXIT_OK


def cmd_inject(args: argparse.Namespace) -> int:
    import hashlib

    from .. import encode

    schema = schema_option(args)
    size = os.path.getsize(args.input) if args.input != "-" and os.path.isfile(args.input) else None
    with progress_bar(args.input, size, not args.quiet) as advance:
        inp = open_stream(args.input, advance, args.from_format)
        fmt = args.to or inp.format
        events = inject_events(decode_input(inp, schema, target=fmt), args.directory)
        written = 0
        digest = hashlib.sha256()
        if inp.image is not None and args.to is None:  # a libvirt save image in: an image out, its head kept
            from .images import write_image

            fmt = inp.file_format
            written = write_image(inp.image, events, args.output, src=args.input,
                                  tap=digest.update if args.json else None)
        else:
            with output_file(args.output, [args.input]) as out:
                for chunk in encode.codec(fmt).encode(events):
                    out.write(chunk)
                    written += len(chunk)
                    if args.json:
                        digest.update(chunk)
    if args.json:
        json.dump({"output": args.output, "format": fmt, "bytes": written, "sha256": digest.hexdigest()}, sys.stdout,
                  indent=1)
        sys.stdout.write("\n")
    return EXIT_OK


def add_subcommands(sub: Any) -> None:
    """Add ``ram`` with ``extract`` and ``inject`` to the ``vmferry`` subcommand parsers."""
    from .. import encode

    ram = sub.add_parser("ram", help="guest RAM as raw files, one per RAM block, and back into a stream",
                         description="Extract a stream's guest RAM into one raw file per RAM block (as QEMU's "
                                     "analyze-migration.py -x), or put raw files back into a stream.")
    rsub = ram.add_subparsers(dest="ram_command", metavar="COMMAND", required=True)
    ex = rsub.add_parser("extract", help="write each RAM block to DIR/<block>.ram, with DIR/blocks.json",
                         description="Write every RAM block of the stream IN to a raw file DIR/<block>.ram of the "
                                     "block's length: each page as the stream's last record of it left it, pages "
                                     "never sent zero (holes of a sparse file). DIR/blocks.json names each block's "
                                     "file. DIR must not exist. XBZRLE pages are refused.")
    ex.add_argument("input", help="stream (any format vmferry reads); '-' for stdin")
    ex.add_argument("directory", help="directory to create")
    ex.add_argument("--schema", metavar="FILE", help="schema for a stream without a vmdesc (as for convert)")
    from_option(ex)
    ex.set_defaults(func=cmd_extract)
    inj = rsub.add_parser("inject", help="the stream IN with its RAM taken from DIR's raw files",
                          description="Write OUT: the stream IN (its configuration, device state, sections and "
                                      "vmdesc) with its RAM replaced by DIR's raw files (as vmferry ram extract "
                                      "wrote them, edited or not). Every page is sent once, where IN's first page "
                                      "record was: non-zero pages as PAGE records, zero pages as ZERO records.")
    inj.add_argument("input", help="the stream that gives everything but RAM (a libvirt save image gives an "
                                   "image); '-' for stdin")
    inj.add_argument("directory", help="directory made by vmferry ram extract")
    inj.add_argument("output", help="output file; '-' for stdout")
    inj.add_argument("--to", choices=encode.names(),
                     help="output format (default: the input's; for a libvirt save image, an image)")
    inj.add_argument("--schema", metavar="FILE", help="schema for a stream without a vmdesc (as for convert)")
    from_option(inj)
    inj.set_defaults(func=cmd_inject)

