"""A byte pump for benchmarks/proxy.py: the cheapest thing that can sit where a proxy sits.

It accepts one connection on ``--listen``, connects to ``--forward`` and moves
the bytes unchanged, without looking at them, until the source closes:

* ``copy``: ``recv_into`` one reused 1 MiB buffer, then ``sendall`` (the two
  copies every user-space proxy makes);
* ``splice``: ``splice(2)`` from the socket into a pipe and from the pipe into
  the other socket, so the bytes never reach user space (zero copy).

Either way it does far less than ``vmferry proxy`` (no decoding), so its
throughput is what any proxy at that place could hope for on this machine.
It uses vmferry's transport to listen and connect, so its sockets are set up
as the proxy's are.

    python benchmarks/_pump.py copy|splice --listen URI --forward URI
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import sys

from vmferry.live.transport import connect, listen

F_SETPIPE_SZ = 1031
CHUNK = 1 << 20


def copy(src: socket.socket, dst: socket.socket) -> None:
    view = memoryview(bytearray(CHUNK))
    while n := src.recv_into(view):
        dst.sendall(view[:n])


def splice(src: socket.socket, dst: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, CHUNK)
    except OSError:  # above /proc/sys/fs/pipe-max-size without privileges: keep the default
        pass
    while n := os.splice(src.fileno(), write_end, CHUNK):
        while n:
            n -= os.splice(read_end, dst.fileno(), n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("copy", "splice"))
    ap.add_argument("--listen", required=True)
    ap.add_argument("--forward", required=True)
    args = ap.parse_args()
    listener = listen(args.listen)
    print(f"listening on {listener.uri}", file=sys.stderr, flush=True)
    source = listener.accept()
    listener.close()
    dest = connect(args.forward)
    (copy if args.mode == "copy" else splice)(source.sock, dest.sock)
    dest.close_write()
    while dest.sock.recv(4096):  # the destination closes once it has loaded everything
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
