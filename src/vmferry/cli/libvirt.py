"""``vmferry libvirt inspect|copy|transform``: libvirt save images from the command line (a prototype).

A delimited prototype until ``inspect``/``convert``/``transform`` take save
images themselves: it only calls :mod:`vmferry.cli.images`.  Exit status
as for every command: 0 success, 2 bad input (one line naming the offset),
nothing written on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..encode.libvirt_save import Compression
from ..events import Configuration, DeviceSection, RamMemSize

__all__ = ["add_subcommands"]


def _usage(e: Exception) -> Exception:
    from .common import UsageError

    return UsageError(str(e))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .images import read_image

    try:
        image, events = read_image(args.image, allow_partial=True)
    except FileNotFoundError:
        raise _usage(FileNotFoundError(f"{args.image}: no such file")) from None
    doc: dict[str, Any] = image.summary()
    sections = 0
    ram = 0
    qemu_machine = None
    for ev in events:
        if isinstance(ev, DeviceSection):
            sections += 1
        elif isinstance(ev, RamMemSize):
            ram = sum(b.length for b in ev.blocks)
        elif isinstance(ev, Configuration):
            qemu_machine = ev.machine
    doc.update({"stream_machine": qemu_machine, "device_sections": sections, "ram_bytes": ram})
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"{args.image}: libvirt save image, version {doc['version']}"
          f"{'' if doc['complete'] else ' (INCOMPLETE: libvirt did not finish writing it)'}")
    print(f"domain: {doc['domain']} (type {doc['domain_type']})")
    print(f"machine type: {doc['machine']} (QEMU stream: {qemu_machine or 'no configuration section'})")
    print(f"was running: {'yes' if doc['was_running'] else 'no'}")
    print(f"compression: {doc['compression']}")
    print(f"XML {doc['xml_bytes']:,} bytes, cookie {doc['cookie_bytes'] or 0:,} bytes, data_len {doc['data_len']:,}; "
          f"stream at {doc['stream_offset']:#x}: {sections} device sections, {ram:,} bytes of RAM")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from .images import copy_image

    try:
        image = copy_image(args.input, args.output)
    except (ValueError, FileNotFoundError) as e:
        raise _usage(e) from None
    if args.json:
        json.dump({"output": args.output, **image.summary()}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    from .images import transform_image

    compression = Compression[args.compress.upper()] if args.compress else None
    try:
        image = transform_image(args.input, args.output, args.machine, qemu_version=args.qemu_version,
                                from_machine=args.from_machine, from_qemu_version=args.from_qemu_version,
                                compression=compression)
    except (ValueError, FileNotFoundError) as e:
        raise _usage(e) from None
    if args.json:
        json.dump({"output": args.output, **image.summary()}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


def add_subcommands(sub: Any) -> None:
    """Add ``libvirt`` with its three commands to the ``vmferry`` subcommand parsers."""
    lv = sub.add_parser("libvirt", help="libvirt save images (virsh save / managedsave): inspect, copy, transform")
    lsub = lv.add_subparsers(dest="libvirt_command", metavar="COMMAND", required=True)
    ins = lsub.add_parser("inspect", help="domain, machine type, was_running, compression, and the stream inside")
    ins.add_argument("image")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)
    cp = lsub.add_parser("copy", help="check that the whole image decodes and write it back byte for byte")
    cp.add_argument("input")
    cp.add_argument("output")
    cp.set_defaults(func=cmd_copy)
    tr = lsub.add_parser("transform", help="convert the guest to another machine type, stream and XML, for "
                                          "virsh restore")
    tr.add_argument("input")
    tr.add_argument("output")
    tr.add_argument("--machine", required=True, metavar="TARGET")
    tr.add_argument("--qemu-version", metavar="V")
    tr.add_argument("--from-machine", metavar="SOURCE")
    tr.add_argument("--from-qemu-version", metavar="V")
    tr.add_argument("--compress", choices=[c.label for c in Compression if c != Compression.SPARSE],
                    help="how to store the new stream (default: as the input)")
    tr.set_defaults(func=cmd_transform)
