"""``vmferry inspect``, ``vmferry convert`` and ``vmferry formats``: streams read, summarised and re-encoded."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .. import encode
from ..events import DeviceSection, OpaqueSection
from .common import (EXIT_OK, UsageError, from_option, open_stream, output_file, print_json, print_summary,
                     progress_bar, schema_option, write_all)
from .files import decode_input
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
    size = os.path.getsize(args.input) if args.input != "-" and os.path.isfile(args.input) else None
    with progress_bar(args.input, size, not args.quiet) as advance:
        inp = open_stream(args.input, advance, args.from_format)
        events = decode_input(inp, schema, target=args.to)
        options = {"compress": args.compress} if args.compress is not None else {}
        try:
            with output_file(args.output, [args.input]) as out:
                written = write_all(out, target.encode(events, **options))
        except BrokenPipeError:
            raise
        except OSError as e:
            raise UsageError(f"{args.output}: {e.strerror or e}") from None
    if args.json:
        print_json({"input": args.input, "input_format": inp.format, "output": args.output, "format": args.to,
                    "bytes": written})
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
    from_option(ins)
    ins.set_defaults(func=cmd_inspect)

    conv = sub.add_parser("convert", help="convert a stream between formats, losslessly",
                          description="Convert a stream to another format. The input format is detected from its "
                                      "first bytes. legacy -> json -> legacy gives back the same bytes; edit a "
                                      "value in the JSON and convert back to change the guest.")
    conv.add_argument("input", help="input stream; '-' for stdin")
    conv.add_argument("output", help="output file; '-' for stdout")
    conv.add_argument("--to", required=True, choices=encode.names(), help="output format")
    from_option(conv)
    conv.add_argument("--schema", metavar="FILE", help=schema_help)
    conv.add_argument("--compress", choices=["none", "zstd", "lz4"],
                      help="compress each frame of a ferry stream (default none)")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    fmts = sub.add_parser("formats", help="list the formats vmferry reads and writes, and what each supports")
    fmts.add_argument("--json", action="store_true", help="print the list as JSON")
    fmts.set_defaults(func=cmd_formats)
