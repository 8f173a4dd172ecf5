"""The ``vmferry`` command.

Exit status: 0 on success, 2 when the input or the request is bad (one line
on stderr naming the byte offset and field path where it applies), 1 for an
internal error.  No traceback is printed unless ``VMFERRY_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

from . import __version__, encode
from .errors import FerryError
from .events import DeviceSection, OpaqueSection
from .files import Input, decode_input, load_schema_file, open_input, widen_pipe
from .summary import StreamSummary

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2


class UsageError(FerryError):
    """A request the CLI cannot carry out (bad arguments, missing files)."""


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------


@contextmanager
def _progress(label: str, total: int | None, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr, or a no-op callback when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def _open(path: str, progress=None) -> Input:
    try:
        return open_input(path, progress)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None


def _schema(args: argparse.Namespace):
    if not getattr(args, "schema", None):
        return None
    try:
        return load_schema_file(args.schema)
    except FileNotFoundError:
        raise UsageError(f"{args.schema}: no such file") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    schema = _schema(args)
    inp = _open(args.stream)
    summary = StreamSummary()
    devices: list[dict[str, Any]] = []
    if args.json:
        from .encode.json import tree_to_json
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


def print_summary(s: StreamSummary, heading: str) -> None:
    """Print what ``vmferry inspect`` shows: ``heading``, then the summary's lines and tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console(highlight=False)
    con.print(f"[bold]{escape(heading)}[/bold]")
    con.print(f"machine type: [bold]{s.machine or '(no configuration section)'}[/bold]")
    con.print(f"capabilities: {', '.join(s.capabilities) or 'none announced'}")
    if s.uuid:
        con.print(f"uuid: {s.uuid}")
    footers = {True: "yes", False: "no", None: "n/a"}[s.footers]
    vmdesc = f"{s.vmdesc_size:,} bytes" if s.vmdesc_size is not None else "absent"
    con.print(f"section footers: {footers}   vmdesc: {vmdesc}   EOF: {'yes' if s.has_eof else 'no'}")
    if s.commands:
        con.print(f"commands: {', '.join(s.commands)}")
    con.print(f"written by: {escape(s.writer.text)}")

    t = Table(title=f"{len(s.sections)} sections", title_justify="left")
    for col, just in (("id", "right"), ("kind", "left"), ("idstr", "left"), ("inst", "right"), ("ver", "right"),
                      ("size", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in s.sections:
        version = str(row.version_id) if row.kind in ("start", "full") else ""
        inst = str(row.instance_id) if row.kind in ("start", "full") else ""
        t.add_row(str(row.section_id), row.kind, row.idstr, inst, version, f"{row.size:,}" if row.size else "")
    con.print(t)

    if s.blocks:
        b = Table(title=f"RAM: {s.total_pages:,} pages, {s.total_zero_pages:,} zero pages", title_justify="left")
        for col in ("block", "length", "pages", "zero pages", "other records"):
            b.add_column(col, justify="left" if col == "block" else "right")
        for block in s.blocks.values():
            b.add_row(block.name, f"{block.length:#x}", f"{block.pages:,}", f"{block.zero_pages:,}",
                      f"{block.other_records:,}")
        con.print(b)


@contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    """``path`` for writing (``-`` is stdout); a partial file is removed on failure."""
    if path == "-":
        widen_pipe(sys.stdout.buffer)
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    if os.path.exists(path) and not os.path.isfile(path):
        # a device or a FIFO (/dev/null, a named pipe): write to it, never replace it
        with open(path, "wb") as f:
            yield f
        return
    tmp = f"{path}.vmferry-partial"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cmd_convert(args: argparse.Namespace) -> int:
    schema = _schema(args)
    target = encode.codec(args.to)
    if args.compress is not None and args.to != "ferry":
        raise UsageError("--compress applies to --to ferry only")
    if args.input != "-" and args.output != "-" and os.path.abspath(args.input) == os.path.abspath(args.output):
        raise UsageError("input and output are the same file")
    size = os.path.getsize(args.input) if args.input != "-" and os.path.isfile(args.input) else None
    with _progress(f"{args.to}", size, not args.quiet) as advance:
        inp = _open(args.input, advance)
        events = decode_input(inp, schema, target=args.to)
        options = {"compress": args.compress} if args.compress is not None else {}
        try:
            with _output(args.output) as out:
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


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmferry",
        description="Migrate virtual machine state across versions, formats and machines. "
                    "Reads and writes QEMU's migration stream byte for byte.",
        epilog="Exit status: 0 success, 2 bad input or request, 1 internal error. "
               "Streams: '-' means stdin/stdout. Set VMFERRY_DEBUG=1 to see tracebacks.",
    )
    p.add_argument("--version", action="version", version=f"vmferry {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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
                      help="compress each frame of a ferry stream (default none)")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    fmts = sub.add_parser("formats", help="list the formats vmferry reads and writes, and what each supports")
    fmts.add_argument("--json", action="store_true", help="print the list as JSON")
    fmts.set_defaults(func=cmd_formats)

    from . import cli_compat, cli_live, cli_proxy  # they import this module's helpers

    cli_live.add_subcommands(sub)
    cli_compat.add_subcommands(sub)
    cli_proxy.add_subcommands(sub)
    # --- libvirt save images (issue 14): a delimited prototype, see cli_libvirt ---
    from . import cli_libvirt

    cli_libvirt.add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except FerryError as e:
        print(f"vmferry: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("vmferry: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except OSError as e:
        print(f"vmferry: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("VMFERRY_DEBUG"):
            raise
        print(f"vmferry: internal error: {type(e).__name__}: {e} (VMFERRY_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
