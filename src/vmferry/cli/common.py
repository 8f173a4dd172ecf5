"""What every ``vmferry`` command shares: exit codes, opening inputs and outputs, progress, printing a summary.

The command modules (:mod:`.stream`, :mod:`.compat`, :mod:`.live`,
:mod:`.proxy`) import from here and never from each other.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Sequence

from ..errors import FerryError
from .files import Input, load_schema_file, open_input, widen_pipe
from .summary import StreamSummary, summary_lines

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
#: stdout was closed before everything was written (``vmferry inspect X | head -1``): 128 + SIGPIPE, the status
#: a shell reports for ``cat`` in the same place.
EXIT_CLOSED_STDOUT = 141


class UsageError(FerryError):
    """A request the CLI cannot carry out (bad arguments, missing files)."""


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------


#: Progress bars fit in this many columns, whatever the terminal: name, bar, MiB done/total, MiB/s, time.
BAR_COLUMNS = 80
_NAME_WIDTH = 22
MiB = float(1 << 20)


def bar_label(name: str) -> str:
    """A file name for a progress bar: its last part, shortened from the left to fit (``-``: stdin)."""
    base = "stdin" if name == "-" else os.path.basename(name.rstrip("/")) or name
    return base if len(base) <= _NAME_WIDTH else "…" + base[-(_NAME_WIDTH - 1):]


def make_progress(console: Any, transient: bool = True) -> Any:
    """A rich Progress in one unit (MiB) that fits :data:`BAR_COLUMNS`: ``name  ━━━━━  12.0/64.0 MiB  3.1 MiB/s  0:00:04``."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Amount(ProgressColumn):
        def render(self, task: Any) -> Text:
            done = task.completed / MiB
            if task.total is None:
                return Text(f"{done:.1f} MiB".rjust(17))
            return Text(f"{done:.1f}/{task.total / MiB:.1f} MiB".rjust(17))

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(("-" if speed is None else f"{speed / MiB:.1f}").rjust(6) + " MiB/s")

    return Progress(TextColumn(f"{{task.description:<{_NAME_WIDTH}.{_NAME_WIDTH}}}"), BarColumn(bar_width=10),
                    Amount(), Rate(), TimeElapsedColumn(), console=console, transient=transient, expand=False)


def bar_console() -> Any:
    """The console progress bars draw on: stderr, at most :data:`BAR_COLUMNS` wide."""
    from rich.console import Console

    con = Console(stderr=True)
    return Console(stderr=True, width=min(BAR_COLUMNS, con.width))


@contextmanager
def progress_bar(label: str, total: int | None, enabled: bool) -> Iterator[Any]:
    """A progress bar named ``label`` (a file name) on stderr, or a no-op callback when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    with make_progress(bar_console()) as bar:
        task = bar.add_task(bar_label(label), total=total)
        yield lambda n: bar.advance(task, n)


class MigrationBar:
    """A progress bar fed with ``query-migrate`` answers (``ram.transferred``, ``ram.total``, ``status``)."""

    def __init__(self, enabled: bool, label: str = "migrate") -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> MigrationBar:
        if self.enabled:
            self._progress = make_progress(bar_console())
            self._progress.start()
            self._task = self._progress.add_task(bar_label(self.label), total=None)
        return self

    def update(self, info: dict[str, Any]) -> None:
        if self._progress is None:
            return
        ram = info.get("ram", {})
        total = ram.get("total") or None
        done = int(ram.get("transferred", 0))
        status = info.get("status", "?")
        name = f"{bar_label(self.label)} ({status})" if status not in ("active", "?") else bar_label(self.label)
        channels = channel_summary(info.get("x-vmferry-channels") or [])
        if channels:
            name = f"{name} [{channels}]"
        self._progress.update(self._task, total=total, completed=min(done, total or done), description=name)


    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


def channel_summary(channels: list[dict[str, Any]]) -> str:
    """``main 12M, multifd 4x30M``: what each kind of channel has carried (the proxies' channel stats)."""
    kinds: dict[str, list[int]] = {}
    for c in channels:
        kind = str(c.get("kind", "?")).split(" ")[0]
        kinds.setdefault(kind, []).append(int(c.get("bytes_in") or 0))
    parts = []
    for kind, sizes in kinds.items():
        mib = f"{sum(sizes) / 2**20:.0f}M" if len(sizes) == 1 else f"{len(sizes)}x{sum(sizes) / len(sizes) / 2**20:.0f}M"
        parts.append(f"{kind} {mib}")
    return ", ".join(parts)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def stdout_console(**options: Any) -> Any:
    """A rich Console on stdout whose closed pipe raises BrokenPipeError (rich itself exits 1 silently)."""
    import errno

    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(errno.EPIPE, "stdout closed")

    return _Console(**options)


def open_stream(path: str, progress=None, fmt: str | None = None) -> Input:
    """:func:`~vmferry.cli.files.open_input`, its OS errors as one-line usage errors; ``fmt`` skips sniffing."""
    try:
        return open_input(path, progress, fmt)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None


def from_option(p: argparse.ArgumentParser) -> None:
    """``--from FORMAT``: the input's format, instead of sniffing it from its first bytes (as ``qemu-img -f``);
    ``libvirt-save`` for a libvirt save image."""
    from .. import encode
    from ..encode import libvirt_save

    names = [*encode.names(), libvirt_save.NAME]
    p.add_argument("--from", dest="from_format", metavar="FORMAT", choices=names,
                   help="the input's format (" + ", ".join(names) + "), instead of detecting it from its "
                        "first bytes")


def schema_option(args: argparse.Namespace):
    if not getattr(args, "schema", None):
        return None
    try:
        return load_schema_file(args.schema)
    except FileNotFoundError:
        raise UsageError(f"{args.schema}: no such file") from None


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while an output was being written (raised so that it is cleaned up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: What a partial output is called: ``OUT.<random>.vmferry-partial``, beside OUT.
PARTIAL_SUFFIX = ".vmferry-partial"


#: After SIGTERM/SIGHUP/SIGINT, how long the orderly way out (an exception unwinding to main) may take before the
#: signal is delivered again with its default action, which ends the process.
TERMINATE_GRACE = 10.0


@contextmanager
def _terminate_raises(partial: list[str]) -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated`, and SIGINT KeyboardInterrupt (unless it is
    ignored).

    The handler first removes the partial files named in ``partial`` itself: an exception raised while
    Python runs a finaliser is printed and dropped, and a signal may come between the file's creation and
    the ``try`` that would remove it; the file must go all the same.  It also restores
    the default actions and, should the exception be lost that way, delivers the signal again after
    :data:`TERMINATE_GRACE` seconds, so a SIGTERM always ends the process.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        for path in partial:
            try:
                os.unlink(path)
            except OSError:
                pass
        for sig in saved:
            signal.signal(sig, signal.SIG_DFL)
        timer = threading.Timer(TERMINATE_GRACE, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    caught = [signal.SIGTERM, signal.SIGHUP]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        caught.append(signal.SIGINT)
    saved = {sig: signal.signal(sig, handler) for sig in caught}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _input_stats(inputs: Sequence[str]) -> list[os.stat_result]:
    """The inputs as the kernel sees them (symlinks followed): what an output must not be."""
    stats = []
    for name in inputs:
        try:
            stats.append(os.fstat(sys.stdin.fileno()) if name == "-" else os.stat(name))
        except (OSError, ValueError):
            continue
    return stats


def _output_mode(stats: list[os.stat_result], mode: int | None = None) -> int:
    """The permission bits of a new output: ``mode`` if given, else the first regular input's, else 0600, less
    the umask.

    A stream holds guest RAM: it must not come out readable by more people than its input was.
    """
    import stat

    if mode is None:
        mode = next((st.st_mode & 0o777 for st in stats if stat.S_ISREG(st.st_mode)), 0o600)
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _create_partial(folder: str, name: str, partial: list[str]) -> tuple[int, str]:
    """A new file ``NAME.<random>.vmferry-partial`` in ``folder``, opened ``O_EXCL | O_NOFOLLOW`` (as
    :func:`tempfile.mkstemp` does, mode 0600), its name put in ``partial`` before the file exists, so that a signal
    arriving meanwhile still finds it."""
    import secrets

    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        candidate = os.path.join(folder, f"{name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
        partial[:] = [candidate]
        try:
            return os.open(candidate, flags, 0o600), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for a partial file beside {name}")


@contextmanager
def output_file(path: str, inputs: Sequence[str] = (), sync: bool = False,
                mode: int | None = None) -> Iterator[BinaryIO]:
    """``path`` for writing (``-`` is stdout); a partial file is removed on failure.

    * An output that is one of ``inputs`` (the same device and inode: a
      symlink or a hard link to it, or the same name) is refused.
    * A regular output is written to a new file beside it, created with
      ``O_EXCL | O_NOFOLLOW`` under a random name (as :func:`tempfile.mkstemp`), so
      a planted file or symlink is never written through; it is renamed over
      ``path`` once complete (``sync``: after an fsync), and removed when
      anything fails, on SIGINT, SIGTERM and SIGHUP too.
    * Its permission bits are ``mode`` if given (a libvirt save image:
      0600, as libvirt writes it), else the input's, 0600 for an input that
      is not a regular file; less the umask.
    * A device or FIFO (``/dev/null``, a named pipe) is written to, never replaced.
    """
    import stat

    stats = _input_stats(inputs)
    if path == "-":
        out = os.fstat(sys.stdout.fileno())
        if stat.S_ISREG(out.st_mode) and any(_same_file(out, st) for st in stats):
            raise UsageError("stdout is the input file")
        widen_pipe(sys.stdout.buffer)
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    try:
        existing: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    if existing is not None and any(_same_file(existing, st) for st in stats):
        raise UsageError(f"{path}: output and input are the same file")
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise UsageError(f"{path}: is a directory")
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        # a device or a FIFO (/dev/null, a named pipe): write to it, never replace it
        with open(path, "wb") as f:
            yield f
        return
    folder, name = os.path.split(os.path.abspath(path))
    partial: list[str] = []
    with _terminate_raises(partial):
        try:
            fd, tmp = _create_partial(folder, name, partial)
        except OSError as e:
            raise UsageError(f"{path}: cannot create a file beside it: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), _output_mode(stats, mode))
                yield f
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            partial.clear()
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


@contextmanager
def command_output(path: str, inputs: Sequence[str] = ()) -> Iterator[BinaryIO]:
    """:func:`output_file` for a command's OUTPUT: an OS error while writing it is one usage error naming
    ``path`` (a closed stdout stays a BrokenPipeError: exit 141)."""
    try:
        with output_file(path, inputs) as out:
            yield out
    except BrokenPipeError:
        raise
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None


def write_all(out: BinaryIO, chunks: Any) -> int:
    """Write every chunk to ``out``; the number of bytes written."""
    n = 0
    for chunk in chunks:
        out.write(chunk)
        n += len(chunk)
    return n


def print_json(doc: Any) -> None:
    """``doc`` as indented JSON on stdout (what ``--json`` prints)."""
    import json

    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


def tls_options(p: argparse.ArgumentParser, what: str = "tls: migration URIs") -> None:
    p.add_argument("--tls-cert", metavar="FILE", help=f"certificate (PEM) for {what}")
    p.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="FILE", help="CA to check the peer against (a listener then requires "
                                                    "client certificates)")
    p.add_argument("--tls-hostname", metavar="NAME", help="name the peer's certificate must carry")


def tls_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~vmferry.live.transport.TlsOptions` the ``--tls-*`` options give, or None."""
    if not (args.tls_cert or args.tls_key or args.tls_ca or args.tls_hostname):
        return None
    from ..live.transport import TlsOptions

    return TlsOptions(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, hostname=args.tls_hostname)


def print_summary(s: StreamSummary, heading: str) -> None:
    """Print what ``vmferry inspect`` shows: ``heading``, then the summary's lines and tables (plain text: no
    terminal library to import, which would cost more than reading the RAM headers of a 1 GiB stream)."""
    sys.stdout.write("\n".join(summary_lines(s, heading)) + "\n")
