"""``vmferry inspect``, ``vmferry convert`` and ``vmferry formats``: streams read, summarised and re-encoded."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .. import encode
from ..events import DeviceSection, OpaqueSection
from .common import EXIT_OK, UsageError, open_stream, output_file, print_summary, progress_bar, schema_option
from .files import decode_input
from .summary import StreamSummary


def cmd_inspect(args: argparse.Namespace) -> int:
    schema = schema_option(args)
    inp = open_stream(args.stream)
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
        doc["devices"] = devices
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    size = f"{inp.size:,} bytes" if inp.size is not None else "size unknown"
    print_summary(summary, f"{inp.name}: {inp.format} stream, version {summary.version}, {size}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    schema = schema_option(args)
    target = encode.codec(args.to)
    if args.compress is not None and args.to != "ferry":
        raise UsageError("--compress applies to --to ferry only")
    if args.per_frame and args.compress in (None, "none"):
        raise UsageError("--per-frame applies to --compress zstd or lz4 only")
    if args.level is not None and args.compress != "zstd":
        raise UsageError("--level applies to --compress zstd only")
    if args.input != "-" and args.output != "-" and os.path.abspath(args.input) == os.path.abspath(args.output):
        raise UsageError("input and output are the same file")
    size = os.path.getsize(args.input) if args.input != "-" and os.path.isfile(args.input) else None
    with progress_bar(f"{args.to}", size, not args.quiet) as advance:
        inp = open_stream(args.input, advance)
        events = decode_input(inp, schema, target=args.to)
        options: dict[str, Any] = {"compress": args.compress} if args.compress is not None else {}
        if args.compress in ("zstd", "lz4"):
            options["groups"] = not args.per_frame  # GROUP frames (docs/format.md §2.4) unless asked otherwise
            if args.level is not None:
                options["level"] = args.level
        try:
            with output_file(args.output) as out:
                if args.to == "legacy":  # page runs leave as they came: copied by the kernel from a file input
                    from ..encode.legacy import encode_pieces
                    from .copyout import write_pieces

                    write_pieces(encode_pieces(events), out, inp.file if inp.format == "legacy" else None)
                else:
                    out.writelines(target.encode(events, **options))
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                return EXIT_OK
            raise UsageError(f"{args.output}: {e.strerror or e}") from None
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
                                     "the RAM blocks with their page and zero-page counts.")
    ins.add_argument("stream", help="stream file (QEMU or vmferry JSON); '-' for stdin")
    ins.add_argument("--json", action="store_true", help="print the summary and the whole decoded device state "
                                                         "as JSON")
    ins.add_argument("--schema", metavar="FILE", help=schema_help)
    ins.set_defaults(func=cmd_inspect)

    conv = sub.add_parser("convert", help="convert a stream between formats, losslessly",
                          description="Convert a stream to another format. The input format is detected from its "
                                      "first bytes. legacy -> json -> legacy gives back the same bytes; edit a "
                                      "value in the JSON and convert back to change the guest.")
    conv.add_argument("input", help="input stream; '-' for stdin")
    conv.add_argument("output", help="output file; '-' for stdout")
    conv.add_argument("--to", required=True, choices=encode.names(), help="output format")
    conv.add_argument("--schema", metavar="FILE", help=schema_help)
    conv.add_argument("--compress", choices=["none", "zstd", "lz4"],
                      help="compress a ferry stream: runs of frames together in GROUP frames (default none)")
    conv.add_argument("--level", type=int, choices=range(1, 23), metavar="1..22",
                      help="with --compress zstd, zstd's own parameters of that level instead of vmferry's (19: "
                           "smaller and much slower on a booted guest's RAM)")
    conv.add_argument("--per-frame", action="store_true",
                      help="with --compress, compress each frame on its own instead (larger; readable by ferry "
                           "readers that predate GROUP frames)")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    fmts = sub.add_parser("formats", help="list the formats vmferry reads and writes, and what each supports")
    fmts.add_argument("--json", action="store_true", help="print the list as JSON")
    fmts.set_defaults(func=cmd_formats)
