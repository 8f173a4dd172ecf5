"""``vmferry inspect``, ``vmferry convert`` and ``vmferry formats``: streams read, summarised and re-encoded.

libvirt save images are inputs like any stream (:mod:`vmferry.cli.images`):
``inspect`` shows the image's domain, machine type, ``was_running`` and
compression too, and ``convert`` writes an image again unless ``--to``
extracts the QEMU stream inside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .. import encode
from ..events import DeviceSection, OpaqueSection
from ..serialize.schema import SchemaSet
from .common import (EXIT_OK, UsageError, command_output, from_option, open_stream, print_json, print_summary,
                     progress_bar, schema_option, write_all)
from .files import Input, decode_input
from .images import COMPRESS_CHOICES, COMPRESS_HELP, ferry_compression
from .summary import StreamSummary


def cmd_inspect(args: argparse.Namespace) -> int:
    schema = schema_option(args)
    inp = open_stream(args.stream, fmt=args.from_format)
    summary = StreamSummary()
    devices: list[dict[str, Any]] = []
    if args.json:
        from ..encode.json import tree_to_json
    for ev in decode_input(inp, schema):
        summary.add(ev)
        if args.json and isinstance(ev, DeviceSection):
            devices.append({"idstr": ev.idstr, "instance_id": ev.instance_id, "version_id": ev.version_id,
                            "section_id": ev.section_id, "state": tree_to_json(ev.state)})
        elif args.json and isinstance(ev, OpaqueSection):
            devices.append({"idstr": ev.idstr, "instance_id": ev.instance_id, "version_id": ev.version_id,
                            "section_id": ev.section_id, "opaque": ev.body.hex()})
    if args.json:
        doc = summary.as_dict()
        doc["format"] = inp.format
        if inp.image is not None:
            doc["libvirt"] = {**inp.image.summary(), "xml": inp.image.xml, "cookie": inp.image.cookie}
        doc["devices"] = devices
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    if inp.image is not None:
        _print_image(inp, summary)
        return EXIT_OK
    size = f"{inp.size:,} bytes" if inp.size is not None else "size unknown"
    print_summary(summary, f"{inp.name}: {inp.format} stream, version {summary.version}, {size}")
    return EXIT_OK


def _print_image(inp: Input, summary: StreamSummary) -> None:
    """``vmferry inspect`` of a libvirt save image: the container, then the stream inside."""
    from .images import describe

    image = inp.image
    assert image is not None
    for line in describe(image, inp.name, inp.size):
        print(line)
    if summary.machine and image.machine and summary.machine != image.machine:
        print(f"warning: the XML names {image.machine} but the stream was saved under {summary.machine}: "
              "QEMU refuses to load it so")
    sys.stdout.flush()
    stored = "raw" if image.compression.label == "raw" else f"{image.compression.label}-compressed"
    print_summary(summary, f"QEMU stream inside: {inp.format} stream, version {summary.version}, {stored}")


def cmd_convert(args: argparse.Namespace) -> int:
    schema = schema_option(args)
    if args.per_frame and args.compress not in ("zstd", "lz4"):
        raise UsageError("--per-frame applies to --compress zstd or lz4 only")
    if args.level is not None and args.compress != "zstd":
        raise UsageError("--level applies to --compress zstd only")
    size = os.path.getsize(args.input) if args.input != "-" and os.path.isfile(args.input) else None
    with progress_bar(args.input, size, not args.quiet) as advance:
        inp = open_stream(args.input, advance, args.from_format)
        if inp.image is not None and args.to is None:
            return _convert_image(args, inp, schema)
        fmt = args.to or inp.format
        target = encode.codec(fmt)
        options = ferry_compression(args.compress, fmt)
        events = decode_input(inp, schema, target=fmt)
        if args.compress in ("zstd", "lz4"):
            options["groups"] = not args.per_frame  # GROUP frames (docs/format.md §2.4) unless asked otherwise
            if args.level is not None:
                options["level"] = args.level
        with command_output(args.output, [args.input]) as out:
            if fmt == "legacy":  # page runs leave as they came: copied by the kernel from a plain file input
                from ..encode.legacy import encode_pieces
                from .copyout import write_pieces

                source = inp.file if inp.format == "legacy" and inp.image is None else None
                written, _ = write_pieces(encode_pieces(events), out, source)
            else:
                written = write_all(out, target.encode(events, **options))
    if args.json:
        print_json({"input": args.input, "input_format": inp.file_format, "output": args.output, "format": fmt,
                    "bytes": written})
    return EXIT_OK


def _convert_image(args: argparse.Namespace, inp: Input, schema: SchemaSet | None) -> int:
    """A libvirt save image in, an image out: every byte kept, or the stream stored with another compression."""
    from .images import copy_stored, image_compression, retarget, write_image

    assert inp.image is not None
    compression = image_compression(args.compress)
    events = decode_input(inp, schema)
    head = inp.image
    if compression is None or compression == inp.image.compression:
        written = copy_stored(inp, args.output, events)
    else:
        head = retarget(inp.image, compression=compression)
        written = write_image(head, events, args.output, src=args.input)
    if args.json:
        print_json({"input": args.input, "input_format": inp.file_format, "output": args.output,
                    "format": inp.file_format, "bytes": written, "libvirt": head.summary()})
    return EXIT_OK


def cmd_formats(args: argparse.Namespace) -> int:
    rows = [encode.info(name) for name in encode.names()]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    for r in rows:
        ready = "ready" if not r["missing"] else "needs " + ", ".join(r["missing"])
        print(f"{r['name']:9} {r['capability']:15} {ready:8} {r['summary']}")
        if r["features"]:
            print(f"{'':9} supports: {', '.join(r['features'])}")
    return EXIT_OK


def add_subcommands(sub: Any) -> None:
    """Add ``inspect``, ``convert`` and ``formats`` to the ``vmferry`` parser's subcommands."""
    schema_help = ("schema for a stream without a vmdesc: a stream that has one, a vmdesc JSON, "
                   "or QEMU's -dump-vmstate JSON (used only when the stream has no vmdesc of its own)")

    ins = sub.add_parser("inspect", help="summarise a stream: machine, capabilities, sections, RAM",
                         description="Print a readable summary of a migration stream: machine type and "
                                     "capabilities, each section with its id, instance, version and size, and "
                                     "the RAM blocks with their page and zero-page counts. For a libvirt save "
                                     "image (virsh save, managedsave) also the domain, the machine type of its "
                                     "XML, whether it was running and how the stream is compressed (--json: "
                                     "under 'libvirt', with the XML and the cookie).")
    ins.add_argument("stream", help="stream file (any format vmferry reads, or a libvirt save image); '-' for stdin")
    ins.add_argument("--json", action="store_true", help="print the summary and the whole decoded device state "
                                                         "as JSON")
    ins.add_argument("--schema", metavar="FILE", help=schema_help)
    from_option(ins)
    ins.set_defaults(func=cmd_inspect)

    conv = sub.add_parser("convert", help="convert a stream between formats, losslessly",
                          description="Convert a stream to another format. The input format is detected from its "
                                      "first bytes (--from names it instead). legacy -> json -> legacy gives back "
                                      "the same bytes; edit a value in the JSON and convert back to change the "
                                      "guest. A libvirt save "
                                      "image (virsh save, managedsave) in gives an image out: header, domain XML "
                                      "and cookie byte for byte, and without --compress every byte, once the "
                                      "whole stream has decoded. With --to FORMAT only the QEMU stream inside "
                                      "comes out, in that format: the libvirt header, XML and cookie are left "
                                      "behind (virsh save-image-dumpxml prints the XML).")
    conv.add_argument("input", help="input stream or libvirt save image; '-' for stdin")
    conv.add_argument("output", help="output file; '-' for stdout")
    conv.add_argument("--to", choices=encode.names(),
                      help="output format (default: the input's; for a save image, an image)")
    from_option(conv)
    conv.add_argument("--schema", metavar="FILE", help=schema_help)
    conv.add_argument("--compress", choices=COMPRESS_CHOICES, metavar="|".join(COMPRESS_CHOICES), help=COMPRESS_HELP)
    conv.add_argument("--level", type=int, choices=range(1, 23), metavar="1..22",
                      help="with --compress zstd, zstd's own parameters of that level instead of vmferry's (19: "
                           "smaller and much slower on a booted guest's RAM)")
    conv.add_argument("--per-frame", action="store_true",
                      help="with --compress zstd|lz4 to ferry, compress each frame on its own instead of GROUP "
                           "frames (larger; readable by ferry readers that predate GROUP frames)")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    fmts = sub.add_parser("formats", help="list the formats vmferry reads and writes, and what each supports")
    fmts.add_argument("--json", action="store_true", help="print the list as JSON")
    fmts.set_defaults(func=cmd_formats)
