"""The compatibility commands of ``vmferry``: ``transform``, ``diff`` and ``plan``.

``vmferry transform IN OUT --machine TARGET [--qemu-version V]`` converts a
stream saved under one QEMU machine type into the stream of the same guest
under another, also across QEMU versions (5.2, 7.2, 10.0 and 11.1;
:mod:`vmferry.compat`).  ``vmferry diff A B`` lists what differs between two
schema sets (streams, vmdesc JSON, ``-dump-vmstate`` JSON) and whether a
registered transform covers each difference.  ``vmferry plan A B`` shows the
chain of transforms between two machine types and what each mirrors.

:func:`add_subcommands` adds them to the ``vmferry`` parser.  Exit status as
for every command (0 success, 2 bad input or request, 1 internal error),
and for ``diff`` 3 when some difference is not covered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Iterator

from .. import encode
from .common import (EXIT_OK, UsageError, command_output, from_option, open_stream, print_json, progress_bar,
                     schema_option, stderr_console, stdout_console, write_all)

if TYPE_CHECKING:  # the compat package is imported by the commands that use it, not at start-up
    from ..compat.check import Report, Schemas
from ..encode import legacy
from ..encode import libvirt_save as ls
from ..errors import DecodeError, SchemaError
from ..events import Command, Configuration, DeviceSection, Event, IterEnd, OpaqueSection, RamMemSize, Vmdesc
from ..serialize.qemu_vmdesc import is_dump_vmstate, is_vmdesc, load_json
from .files import Input, decode_input, read_stream_vmdesc
from .images import COMPRESS_CHOICES, COMPRESS_HELP, ferry_compression

__all__ = ["EXIT_UNCOVERED", "add_subcommands", "cmd_diff", "cmd_plan", "cmd_transform", "load_schemas"]

#: ``vmferry diff``: some difference is not covered by a registered transform.
EXIT_UNCOVERED = 3


# ---------------------------------------------------------------------------
# transform
# ---------------------------------------------------------------------------


def cmd_transform(args: argparse.Namespace) -> int:
    from ..compat import qemu_registry, transform_events

    schema = schema_option(args)
    registry = qemu_registry()
    # an unknown target fails before any output is written
    machine = registry.resolve(args.machine, args.qemu_version)
    from_machine = registry.resolve(args.from_machine, args.from_qemu_version) if args.from_machine else None
    from_qemu = args.from_qemu_version
    if from_machine is None and from_qemu is None and args.input != "-" and os.path.isfile(args.input):
        from_qemu = source_qemu(args.input)
    size = os.path.getsize(args.input) if args.input != "-" and os.path.isfile(args.input) else None
    with progress_bar(args.input, size, not args.quiet) as advance:
        inp = open_stream(args.input, advance, args.from_format)
        if args.emulator is not None and (inp.image is None or args.to is not None):
            raise UsageError("--emulator sets the QEMU binary of a libvirt save image's XML: the input is no "
                             "image" if inp.image is None else "--emulator sets the QEMU binary of a libvirt save "
                             "image's XML, which --to leaves out")
        if inp.image is not None and args.to is None:
            return _transform_image(args, inp, machine, registry.release(machine).machine,
                                    transform_events(decode_input(inp, schema), registry, machine, from_machine,
                                                     from_qemu))
        fmt = args.to or inp.format
        target = encode.codec(fmt)
        options = ferry_compression(args.compress, fmt)
        plans: list[Any] = []
        events = transform_events(decode_input(inp, schema, target=fmt), registry, machine, from_machine, from_qemu,
                                  on_plan=plans.append)
        balloons: list[str] = []
        with command_output(args.output, [args.input]) as out:
            written = write_all(out, target.encode(_watch_balloon(events, balloons), **options))
    from ..compat.machines.pinned import balloon_note

    note = balloon_note(plans[0].source if plans else None, machine) if balloons else None
    if note is not None and not args.quiet:
        print(f"vmferry: {note}", file=sys.stderr)
    if args.json:
        print_json({"input": args.input, "input_format": inp.file_format, "output": args.output, "format": fmt,
                    "machine": machine, "source": plans[0].source if plans else None,
                    "path": plans[0].path if plans else None, "bytes": written})
    elif plans and args.verbose:
        stderr_console().print(f"path: {plans[0]}")
    return EXIT_OK


def _watch_balloon(events: Iterator[Event], found: list[str]) -> Iterator[Event]:
    """``events`` unchanged; the idstr of a virtio-balloon section lands in ``found``."""
    from ..compat.machines.pinned import is_balloon_section

    for ev in events:
        if isinstance(ev, DeviceSection) and not found and is_balloon_section(ev.idstr):
            found.append(ev.idstr)
        yield ev


def _transform_image(args: argparse.Namespace, inp: Input, release: str, machine: str, events: Iterator[Event]) -> int:
    """A libvirt save image in, one out: the stream converted to ``release``, the XML's machine type set to
    ``machine`` (its machine type)."""
    from .images import image_compression, persistent_note, pinned_note, retarget, write_image

    assert inp.image is not None
    new = retarget(inp.image, machine, image_compression(args.compress), args.emulator)
    written = write_image(new, events, args.output, src=args.input)
    for note in (pinned_note(inp.image, machine), persistent_note(inp.image, new)):
        if note is not None and not args.quiet:
            print(f"vmferry: {note}", file=sys.stderr)
    if args.json:
        print_json({"input": args.input, "input_format": inp.file_format, "output": args.output,
                    "format": inp.file_format, "machine": release, "bytes": written, "libvirt": new.summary()})
    return EXIT_OK


def source_qemu(path: str) -> list[str] | None:
    """The QEMU versions that may have written the QEMU stream file ``path`` (or a raw libvirt save image's
    stream), most likely first, as its vmdesc tells (:func:`vmferry.compat.machines.vmdesc.writer_qemu`); None
    when it cannot tell.

    QJSON spacing means 5.2, arrays without any index 11.1, a configuration
    object (spec §11.8) 10.0; this tells, e.g., a ``pc-i440fx-7.2`` stream of
    QEMU 10.0 from one of QEMU 7.2.
    """
    from ..compat.machines.vmdesc import writer_qemu

    try:
        with open(path, "rb") as f:
            head = f.read(ls.HEADER_SIZE)
        if ls.sniff(head):  # a raw save image ends with its stream, vmdesc included
            if ls.parse_header(head).compression != ls.Compression.RAW:
                return None
        elif not legacy.sniff(head):
            return None
        text = read_stream_vmdesc(path)
    except (OSError, SchemaError, DecodeError):
        return None
    if text is None:
        return None
    return writer_qemu(text) or None


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------


def _stream_head(path: str) -> tuple[Configuration | None, bool | None, list[Any] | None]:
    """Configuration, footers and RAM blocks, from the first events of a stream."""
    config = None
    footers = None
    ram = None
    events = decode_input(open_stream(path))
    try:
        for ev in events:
            if isinstance(ev, Configuration):
                config = ev
            elif isinstance(ev, RamMemSize):
                ram = list(ev.blocks)
            elif isinstance(ev, IterEnd):
                footers = ev.footer
                break
            elif isinstance(ev, (DeviceSection, OpaqueSection)):
                footers = ev.footer
                break
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    return config, footers, ram


def _stream_commands(path: str) -> set[str]:
    """The names of the commands a stream carries (the whole stream is read; RAM is not copied)."""
    names: set[str] = set()
    for ev in decode_input(open_stream(path)):
        if isinstance(ev, Command):
            names.add(ev.name)
    return names


def _stream_schemas(path: str, fmt: str) -> Schemas:
    s = _stream_schemas_only(path, fmt)
    s.commands = _stream_commands(path)
    return s


def _stream_schemas_only(path: str, fmt: str) -> Schemas:
    from ..compat.check import from_vmdesc

    text: bytes | None = None
    if fmt == "legacy":
        config, footers, ram = _stream_head(path)
        text = read_stream_vmdesc(path)
        if text is None:
            raise SchemaError(f"{path}: this stream has no vmdesc to compare")
        obj = load_json(text, f"vmdesc of {path}")
    else:  # other formats: read the whole stream, the descriptions travel with the sections
        config = None
        footers = ram = None
        devices = []
        obj = None
        for ev in decode_input(open_stream(path)):
            if isinstance(ev, Configuration):
                config = ev
            elif isinstance(ev, RamMemSize) and ram is None:
                ram = list(ev.blocks)
            elif isinstance(ev, IterEnd) and footers is None:
                footers = ev.footer
            elif isinstance(ev, DeviceSection):
                devices.append(ev.desc)
                footers = ev.footer if footers is None else footers
            elif isinstance(ev, OpaqueSection) and ev.desc is not None:
                devices.append(ev.desc)
            elif isinstance(ev, Vmdesc):
                obj = load_json(ev.text, f"vmdesc of {path}")
        if obj is None:
            obj = {"page_size": 4096, "devices": devices}
    s = from_vmdesc(obj, path, "stream", config.machine if config is not None else None)
    if text is not None:
        from ..compat.machines.vmdesc import writer_qemu

        s.qemus = writer_qemu(text) or s.qemus  # QEMU 5.2's QJSON spacing shows only in the text
        s.qemu = s.qemus[0] if s.qemus else s.qemu
    s.configuration = config is not None
    s.footers = footers
    s.ram = ram
    return s


def load_schemas(path: str) -> Schemas:
    """A diff side from a stream (any format), a vmdesc JSON or a ``-dump-vmstate`` JSON file."""
    from ..compat.check import from_dump_vmstate, from_vmdesc

    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    if legacy.sniff(head):
        return _stream_schemas(path, "legacy")
    if head.lstrip()[:1] == b"{" and os.path.getsize(path) <= legacy.MAX_VMDESC:
        with open(path, "rb") as f:
            try:
                obj = load_json(f.read(), path)
            except SchemaError:
                obj = None
        if is_vmdesc(obj):
            return from_vmdesc(obj, path)
        if is_dump_vmstate(obj):
            return from_dump_vmstate(obj, path)
    inp = open_stream(path)
    fmt = ls.NAME if inp.image is not None else inp.format  # an image's stream is read whole, not its tail
    close = getattr(inp.chunks, "close", None)
    if close is not None:
        close()
    return _stream_schemas(path, fmt)


def cmd_diff(args: argparse.Namespace) -> int:
    from ..compat import qemu_registry
    from ..compat.check import diff

    registry = qemu_registry()
    for machine, qemu in ((args.from_machine, args.from_qemu_version), (args.to_machine, args.qemu_version)):
        if machine:
            registry.resolve(machine, qemu)  # an unknown machine type is bad input, before anything is read
    a = load_schemas(args.a)
    b = load_schemas(args.b)
    report = diff(a, b, registry, source=args.from_machine, target=args.to_machine,
                  source_qemu=args.from_qemu_version, target_qemu=args.qemu_version)
    values = _value_diff(args.a, args.b) if a.kind == "stream" and b.kind == "stream" and not args.schemas_only \
        else None
    if args.json:
        doc = report.as_dict()
        if values is not None:
            doc["values"] = values.as_dict()
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_report(report)
        if values is not None:
            _print_values(values)
    return EXIT_UNCOVERED if report.uncovered else EXIT_OK


def _value_diff(path_a: str, path_b: str) -> Any:
    """The value diff of two streams (:mod:`vmferry.compat.values`): each read once, digests kept, not RAM."""
    from ..compat.values import StreamValues, compare

    sides = []
    for path in (path_a, path_b):
        values = StreamValues()
        for ev in decode_input(open_stream(path)):
            values.add(ev)
        sides.append(values)
    return compare(*sides)


def _print_values(v: Any, rows: int = 200, spans: int = 8) -> None:
    from rich.table import Table

    con = stdout_console(highlight=False)
    if v.empty:
        con.print("values: the same (every device field both sides have, every RAM page)")
        return
    if v.only_a or v.only_b:
        con.print(f"sections only in A: {', '.join(v.only_a) or 'none'}; only in B: {', '.join(v.only_b) or 'none'}")
    if v.fields:
        t = Table(title=f"{len(v.fields)} device fields differ", title_justify="left")
        for col in ("section", "field", "A", "B"):
            t.add_column(col)
        for section, path, a, b in v.fields[:rows]:
            t.add_row(section, path, _short(a), _short(b))
        con.print(t)
        if len(v.fields) > rows:
            con.print(f"... and {len(v.fields) - rows} more (--json lists them all)")
    for r in v.ram:
        if r.length_a != r.length_b:
            con.print(f"RAM {r.block}: length {r.length_a if r.length_a is not None else 'absent'} in A, "
                      f"{r.length_b if r.length_b is not None else 'absent'} in B")
        elif r.ranges:
            shown = ", ".join(f"{s * r.page_size:#x}-{e * r.page_size - 1:#x}" for s, e in r.ranges[:spans])
            more = f", ... ({len(r.ranges)} ranges)" if len(r.ranges) > spans else ""
            con.print(f"RAM {r.block}: {r.differing:,} of {r.pages:,} pages differ: {shown}{more}")
    same = [r.block for r in v.ram if not r.ranges and r.length_a == r.length_b]
    if same:
        con.print(f"RAM the same in: {', '.join(same)}")
    if v.unknown_pages:
        con.print(f"({v.unknown_pages} pages came as XBZRLE deltas and were not compared)")


def _short(value: Any, width: int = 40) -> str:
    text = bytes(value).hex() if isinstance(value, (bytes, bytearray, memoryview)) else repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def _print_report(r: Report) -> None:
    from rich.table import Table

    con = stdout_console(highlight=False)
    for side, s in (("A", r.a), ("B", r.b)):
        qemu = f", QEMU {s.qemu}" if s.qemu else ""
        con.print(f"{side}: [bold]{s.origin}[/bold] ({s.kind}, machine {s.machine or 'not named'}{qemu})")
    if r.plan:
        con.print("path: " + (" -> ".join(r.plan) if len(r.plan) > 1 else "same machine type"))
    elif r.plan_error:
        con.print(f"[bold]no transform path[/bold]: {r.plan_error}")
    if not r.differences:
        con.print("schemas: no differences")
        return
    t = Table(title=f"{len(r.differences)} differences, {len(r.uncovered)} not covered", title_justify="left")
    for col in ("kind", "section", "item", "detail", "covered by"):
        t.add_column(col)
    for d in r.differences:
        cov = ", ".join(d.covered_by) if d.covered else "[bold red]not covered[/bold red]"
        t.add_row(d.kind, d.section, d.item, d.detail, cov)
    con.print(t)


# ---------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from ..compat import qemu_registry

    registry = qemu_registry()
    if args.list:
        rows = {line: names for line, names in registry.lines().items()}
        if args.json:
            json.dump(rows, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            for line, names in rows.items():
                print(f"{line}: {', '.join(n.split('@', 1)[0].rsplit('-', 1)[1] for n in names)}")
        return EXIT_OK
    if not args.source or not args.target:
        raise UsageError("plan needs SOURCE and TARGET machine types (or --list)")
    plan = registry.plan(registry.resolve(args.source, args.from_qemu_version),
                         registry.resolve(args.target, args.qemu_version))
    steps: list[dict[str, Any]] = [{"from": s.source, "to": s.target, "lossless": s.lossless,
              "transforms": [{"name": t.name, "kind": t.kind, "section": t.section, "lossless": t.lossless,
                              "mirrors": t.mirrors} for t in s.transforms]} for s in plan.steps]
    if args.json:
        json.dump({"source": plan.source, "target": plan.target, "lossless": plan.lossless, "steps": steps},
                  sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    print(f"{plan.source} -> {plan.target}: {len(steps)} steps, {'lossless' if plan.lossless else 'lossy'}")
    for s in steps:
        print(f"  {s['from']} -> {s['to']}")
        for t in s["transforms"]:
            where = f"[{t['section']}]" if t["section"] else f"[{t['kind']}]"
            print(f"    {t['name']} {where} {'lossless' if t['lossless'] else 'lossy'}: {t['mirrors']}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------


def add_subcommands(sub: Any) -> None:
    """Add ``transform``, ``diff`` and ``plan`` to the ``vmferry`` subcommand parsers."""
    tr = sub.add_parser(
        "transform", help="convert a stream from one QEMU machine type to another",
        description="Convert a stream saved by QEMU under one machine type (QEMU 5.2: pc-i440fx-5.2, "
                    "pc-q35-5.2; QEMU 7.2: pc-i440fx-2.3 .. 7.2, pc-q35-2.4 .. 7.2; QEMU 10.0: pc-i440fx-7.2 .. "
                    "10.0, pc-q35-7.2 .. 10.0; QEMU 11.1: pc-i440fx-10.0 .. 11.1, pc-q35-10.0 .. 11.1) into "
                    "the stream of the same guest under another, for that QEMU to load with that machine type, "
                    "also one the source's QEMU does not have (QEMU 7.2's pc-i440fx-2.12 to QEMU 11.1's "
                    "pc-i440fx-11.1). A release is a machine type of one QEMU version: pc-i440fx-7.2@10.0 is "
                    "pc-i440fx-7.2 run by QEMU 10.0. The source machine type is read from the stream's "
                    "configuration section; a stream without one is taken as pc-i440fx-2.3, the one machine type "
                    "of the catalogue that sends none (--from-machine says otherwise). RAM passes through; "
                    "device state is converted step by step (see 'vmferry plan'). A libvirt save image (virsh save, "
                    "managedsave) gives an image: the stream converted and the machine type of its domain XML set "
                    "to TARGET, was_running, the cookie and the rest of the XML kept, so that virsh restore (or "
                    "virsh start after managedsave) runs the guest on under TARGET; the output is written 0600, "
                    "never over the input.")
    tr.add_argument("input", help="input stream (any format vmferry reads, or a libvirt save image); '-' for stdin")
    tr.add_argument("output", help="output file; '-' for stdout")
    tr.add_argument("--machine", required=True, metavar="TARGET", help="target machine type, e.g. pc-i440fx-2.12")
    tr.add_argument("--qemu-version", metavar="V",
                    help="the QEMU version that will load the result (5.2, 7.2, 10.0 or 11.1; default: the one "
                         "the catalogue has the machine type for, so pc-i440fx-10.0 means 10.0, pc-i440fx-7.2 and "
                         "pc-i440fx-5.2 mean 7.2)")
    tr.add_argument("--from-machine", metavar="SOURCE",
                    help="source machine type, for streams without a configuration section (default: the one "
                         "machine type of the catalogue that sends none, pc-i440fx-2.3)")
    tr.add_argument("--from-qemu-version", metavar="V",
                    help="the QEMU version that wrote the input (default: what its vmdesc shows, else the "
                         "oldest QEMU that has its machine type)")
    tr.add_argument("--to", choices=encode.names(),
                    help="output format (default: the input's; for a save image, an image; with --to only the "
                         "QEMU stream inside comes out, without the libvirt header, XML and cookie)")
    from_option(tr)
    tr.add_argument("--compress", choices=COMPRESS_CHOICES, metavar="|".join(COMPRESS_CHOICES), help=COMPRESS_HELP)
    tr.add_argument("--emulator", metavar="PATH",
                    help="for a libvirt save image: the QEMU binary libvirt runs the restored guest with, "
                         "<emulator> in the image's XML (default: the saving host's); needed when TARGET belongs "
                         "to another QEMU, whose machine types the saving host's QEMU lacks")
    tr.add_argument("--schema", metavar="FILE", help="schema for a stream without a vmdesc (as for convert)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_transform)

    df = sub.add_parser(
        "diff", help="compare two streams' values and schemas, and say which transforms cover the differences",
        description="Compare the device descriptions of A and B (each a stream, a libvirt save image, a vmdesc "
                    "JSON or QEMU's -dump-vmstate JSON) and list every incompatibility for loading A's state as B: "
                    "sections, fields and subsections added or removed, fields resized, versions out of range, and "
                    "for streams the configuration section, footers, machine name and RAM blocks. Each is marked "
                    "covered when a registered transform on the path between the machine types handles it. When A "
                    "and B are both streams (a save image counts as the stream inside), their values are compared "
                    "too: every device field both have that differs, sections present on one side only, and per "
                    "RAM block the pages that differ (each stream is read once; a digest per page is kept, never "
                    "the RAM).",
        epilog="Exit status: 0 when every schema difference is covered (or there are none), 3 when some is not, "
               "2 for bad input; value differences are reported, they do not change the status.")
    df.add_argument("a", help="schema set A (the source; a libvirt save image is read as its stream)")
    df.add_argument("b", help="schema set B (the destination)")
    df.add_argument("--from-machine", metavar="MACHINE", help="A's machine type, when A does not name it")
    df.add_argument("--machine", dest="to_machine", metavar="MACHINE", help="B's machine type, when B does not name it")
    df.add_argument("--to-machine", dest="to_machine", help=argparse.SUPPRESS)  # the old spelling
    df.add_argument("--from-qemu-version", metavar="V",
                    help="the QEMU version of A (default: what A's vmdesc shows; -dump-vmstate files do not show it)")
    df.add_argument("--qemu-version", metavar="V", help="the QEMU version of B (as --from-qemu-version)")
    df.add_argument("--json", action="store_true", help="print the report as JSON (with \"values\" for two streams)")
    df.add_argument("--schemas-only", action="store_true",
                    help="for two streams, compare only their schemas, not their values (reads less)")
    df.set_defaults(func=cmd_diff)

    pl = sub.add_parser(
        "plan", help="show the transforms between two machine types",
        description="Show the chain of steps between two machine types, with each transform, whether it is "
                    "lossless, and the QEMU behaviour it mirrors. --list prints the known machine types.")
    pl.add_argument("source", nargs="?", help="source machine type")
    pl.add_argument("target", nargs="?", help="target machine type")
    pl.add_argument("--qemu-version", metavar="V", help="the QEMU version of TARGET (as for transform)")
    pl.add_argument("--from-qemu-version", metavar="V", help="the QEMU version of SOURCE")
    pl.add_argument("--list", action="store_true", help="list the machine types of the catalogue")
    pl.add_argument("--json", action="store_true", help="print as JSON")
    pl.set_defaults(func=cmd_plan)
