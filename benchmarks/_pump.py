"""A byte pump for benchmarks/proxy.py: the cheapest thing that can sit where a proxy sits.

It accepts connections on ``--listen`` as ``vmferry proxy`` does: the first
(QEMU's main channel), then every further one (multifd channels, the
postcopy-preempt channel) until the first is done.  For each it connects to
``--forward`` at once, in the order they arrive (a destination QEMU takes
the first connection for its main channel), and moves the bytes unchanged,
without looking at them, both ways: source to destination until the source
closes, and destination back to source (QEMU's return path) until the
destination closes.  Three ways to move them:

* ``copy``: ``recv_into`` one reused 1 MiB buffer, then ``sendall`` (the two
  copies every user-space proxy makes);
* ``splice``: ``splice(2)`` from the socket into a pipe and from the pipe into
  the other socket, so the bytes never reach user space (zero copy);
* ``tee``: the splice pump that also reads every byte, as ``vmferry proxy``
  must (it reads each page record's header): ``tee(2)`` into a second pipe
  and ``read`` that copy into a reused buffer, then splice the first pipe
  out.  Nothing is parsed, so it is the floor of the proxy's own I/O: what
  a proxy of QEMU's format would reach with no interpreter at all.

Each does far less than ``vmferry proxy`` (no decoding), so its
throughput is what any proxy at that place could hope for on this machine.
It uses vmferry's transport to listen and connect, so its sockets are set up
as the proxy's are (a unix socket to the destination may hold 4 MiB,
SO_SNDBUF); ``--sndbuf`` sets that buffer instead, and ``--pipe`` the size
of splice's pipes (default 1 MiB), to see what buffering in the path costs
(a postcopy page request waits behind whatever is queued).  It exits once
every channel's source has closed and the destination has closed the first
channel (after loading the whole state).

    python benchmarks/_pump.py copy|splice|tee --listen URI --forward URI [--sndbuf BYTES] [--pipe BYTES]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
import threading
from typing import Callable

from vmferry.errors import TransportError
from vmferry.live.splice import _libc_tee, sized_pipe
from vmferry.live.transport import SocketStream, connect, listen

CHUNK = 1 << 20


def copy(src: socket.socket, dst: socket.socket, size: int = CHUNK) -> None:
    view = memoryview(bytearray(size))
    while n := src.recv_into(view):
        dst.sendall(view[:n])


def splice(src: socket.socket, dst: socket.socket, size: int = CHUNK) -> None:
    read_end, write_end = sized_pipe(size)  # as large as allowed (fs.pipe-max-size), as the proxy's
    try:
        while n := os.splice(src.fileno(), write_end, size):
            while n:
                n -= os.splice(read_end, dst.fileno(), n)
    finally:
        os.close(read_end)
        os.close(write_end)


def tee(src: socket.socket, dst: socket.socket, size: int = CHUNK) -> None:
    libc_tee = _libc_tee()  # the proxy's own binding of tee(2)
    if libc_tee is None:
        raise SystemExit("the tee pump needs tee(2) from the C library")
    held_r, held_w = sized_pipe(size)
    copy_r, copy_w = sized_pipe(size)
    buffer = [bytearray(size)]
    try:
        while n := os.splice(src.fileno(), held_w, size):
            if libc_tee(held_r, copy_w, n, 0) != n:  # the copy pipe is empty and as large: all of it fits
                raise OSError(ctypes.get_errno(), "tee")
            left = n
            while left:
                left -= os.readv(copy_r, buffer)  # the bytes a decoder would look at
            while n:
                n -= os.splice(held_r, dst.fileno(), n)
    finally:
        for fd in (held_r, held_w, copy_r, copy_w):
            os.close(fd)


def _direction(move: Callable[[socket.socket, socket.socket, int], None], size: int, src: socket.socket,
               dst: socket.socket, name: str) -> threading.Thread:
    """A thread moving ``src`` to ``dst`` until ``src`` closes, then half-closing ``dst`` (the end passes on)."""

    def run() -> None:
        try:
            move(src, dst, size)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # the other side went away: the migration itself says what failed
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("copy", "splice", "tee"))
    ap.add_argument("--listen", required=True)
    ap.add_argument("--forward", required=True)
    ap.add_argument("--sndbuf", type=int, default=0, metavar="BYTES",
                    help="SO_SNDBUF of each destination connection (default: as vmferry's transport sets it)")
    ap.add_argument("--pipe", type=int, default=CHUNK, metavar="BYTES",
                    help="splice's pipe size, copy's buffer (default 1 MiB)")
    args = ap.parse_args()
    move = {"copy": copy, "splice": splice, "tee": tee}[args.mode]
    listener = listen(args.listen)
    print(f"listening on {listener.uri}", file=sys.stderr, flush=True)
    forwards: list[threading.Thread] = []
    first_back: threading.Thread | None = None
    while not forwards or forwards[0].is_alive():
        try:
            stream = listener.accept(None if not forwards else 0.2, cancelled=lambda: bool(forwards)
                                     and not forwards[0].is_alive())
        except TransportError:
            continue  # nobody yet: look again, until the first channel is done
        source = stream.sock  # type: ignore[attr-defined]
        dest = connect(args.forward)
        assert isinstance(dest, SocketStream)
        if args.sndbuf:
            dest.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
        n = len(forwards)
        forwards.append(_direction(move, args.pipe, source, dest.sock, f"channel {n} forward"))
        back = _direction(move, args.pipe, dest.sock, source, f"channel {n} back")
        if n == 0:
            first_back = back
    listener.close()
    for t in forwards:
        t.join()
    assert first_back is not None
    first_back.join()  # the destination closes its main channel once it has loaded everything
    return 0


if __name__ == "__main__":
    sys.exit(main())
