"""What every ``vmferry`` command shares: exit codes, opening inputs and outputs, progress, printing a summary.

The command modules (:mod:`.stream`, :mod:`.compat`, :mod:`.live`,
:mod:`.proxy`) import from here and never from each other.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

from ..errors import FerryError
from .files import Input, load_schema_file, open_input, widen_pipe
from .summary import StreamSummary, summary_lines

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2


class UsageError(FerryError):
    """A request the CLI cannot carry out (bad arguments, missing files)."""


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------


@contextmanager
def progress_bar(label: str, total: int | None, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr, or a no-op callback when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True, console=stderr_console()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def open_stream(path: str, progress=None) -> Input:
    try:
        return open_input(path, progress)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None


def schema_option(args: argparse.Namespace):
    if not getattr(args, "schema", None):
        return None
    try:
        return load_schema_file(args.schema)
    except FileNotFoundError:
        raise UsageError(f"{args.schema}: no such file") from None


@contextmanager
def output_file(path: str) -> Iterator[BinaryIO]:
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


def tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="certificate (PEM) for tls: migration URIs")
    p.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="FILE", help="CA to check the peer against (a listener then requires "
                                                    "client certificates)")
    p.add_argument("--tls-hostname", metavar="NAME", help="name the peer's certificate must carry")


def print_summary(s: StreamSummary, heading: str) -> None:
    """Print what ``vmferry inspect`` shows: ``heading``, then the summary's lines and tables (plain text: no
    terminal library to import, which would cost more than reading the RAM headers of a 1 GiB stream)."""
    sys.stdout.write("\n".join(summary_lines(s, heading)) + "\n")
