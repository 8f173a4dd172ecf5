"""The ``vmferry`` command: its parser, and the one place where errors become exit codes.

Exit status: 0 on success, 2 when the input or the request is bad (one line
on stderr naming the byte offset and field path where it applies), 1 for an
internal error, 141 when stdout closed early, 128 + N on signal N.  No
traceback is printed unless ``VMFERRY_DEBUG=1`` or ``-vv``.  Every command
takes ``--json``, ``-q`` and ``-v``; ``vmferry completion SHELL`` prints the
tab completion (argcomplete).
"""

# PYTHON_ARGCOMPLETE_OK

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import NoReturn

from .. import __version__
from ..errors import FerryError
from . import compat, live, proxy, ram, stream
from .common import EXIT_BAD_INPUT, EXIT_CLOSED_STDOUT, EXIT_INTERNAL, Terminated


class Parser(argparse.ArgumentParser):
    """argparse with vmferry's error form: one line, ``vmferry COMMAND: error: ...``, exit 2 (not the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vmferry",
        description="Migrate virtual machine state across versions, formats and machines. "
                    "Reads and writes QEMU's migration stream byte for byte.",
        epilog="Exit status: 0 success, 2 bad input or request, 1 internal error. "
               "Streams: '-' means stdin/stdout. Set VMFERRY_DEBUG=1 to see tracebacks.",
    )
    p.add_argument("-V", "--version", action="version", version=f"vmferry {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for command in (stream, live, compat, proxy, ram):
        command.add_subcommands(sub)
    comp = sub.add_parser("completion", help="print the shell code for tab completion (bash, zsh, fish, tcsh)",
                          description="Print the code that makes SHELL complete vmferry's commands, options, formats "
                                      "and files (argcomplete). Load it from the shell's rc file, e.g. "
                                      "'eval \"$(vmferry completion bash)\"' in ~/.bashrc.")
    comp.add_argument("shell", choices=("bash", "zsh", "fish", "tcsh"))
    comp.set_defaults(func=_cmd_completion)
    for leaf in _leaves(p):
        if leaf is not comp:
            _shared_options(leaf)
    return p


def _leaves(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command (subcommands of subcommands included)."""
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out.extend(_leaves(child) or [child])
    return out


def _shared_options(p: argparse.ArgumentParser) -> None:
    """``--json``, ``-q`` and ``-v`` on every command, where the command does not define them itself."""
    have = p._option_string_actions
    if "--json" not in have:
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    if "-q" not in have:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no messages on stderr")
    if "-v" not in have:
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="say on stderr how long the command took and its peak memory; twice: a traceback "
                            "on an internal error")


def _cmd_completion(args: argparse.Namespace) -> int:
    import argcomplete

    sys.stdout.write(argcomplete.shellcode(["vmferry"], shell=args.shell))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (argcomplete's protocol)
        import argcomplete

        argcomplete.autocomplete(parser)  # answers and exits
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    if getattr(args, "json", False) and getattr(args, "output", None) == "-" and args.command != "proxy":
        print(f"vmferry {args.command}: error: --json prints on stdout: give a file as the output, not '-'",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    started = time.monotonic()
    try:
        code = args.func(args)
        if getattr(args, "verbose", 0) and not getattr(args, "quiet", False):
            _say_done(args.command, started)
        return code
    except FerryError as e:
        print(f"vmferry: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("vmferry: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"vmferry: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:
        return _closed_stdout()
    except OSError as e:
        print(f"vmferry: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("VMFERRY_DEBUG") or getattr(args, "verbose", 0) >= 2:
            raise
        print(f"vmferry: internal error: {type(e).__name__}: {e} (VMFERRY_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _say_done(command: str, started: float) -> None:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"vmferry {command}: done in {time.monotonic() - started:.2f} s, peak memory {peak:,.0f} MiB",
          file=sys.stderr)


def _closed_stdout() -> int:
    """The reader of stdout went away (``vmferry inspect X | head -1``): no message, exit 141 like ``cat``.

    stdout is pointed at /dev/null so that the interpreter's last flush does not fail again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_CLOSED_STDOUT


if __name__ == "__main__":
    sys.exit(main())
