"""The ``vmferry`` command line: one module per group of commands, their shared helpers in :mod:`.common`.

:func:`main` is the console script.  The commands are the orchestration layer:
they open files and sockets, start processes and print; everything they call
below :mod:`vmferry.live` and :mod:`vmferry.cli` is pure.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
