"""The ``vmferry`` command: its parser, and the one place where errors become exit codes.

Exit status: 0 on success, 2 when the input or the request is bad (one line
on stderr naming the byte offset and field path where it applies), 1 for an
internal error.  No traceback is printed unless ``VMFERRY_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import FerryError
from . import compat, live, proxy, stream
from .common import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK


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

    for command in (stream, live, compat, proxy):
        command.add_subcommands(sub)
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
