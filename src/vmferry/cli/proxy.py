"""The ``vmferry proxy`` subcommand: a live migration decoded, transformed and re-encoded in flight.

:func:`add_subcommands` adds it to the ``vmferry`` parser (see :mod:`vmferry.live.proxy`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..events import Configuration, DeviceSection
from .common import UsageError, schema_option, tls_options

__all__ = ["BalloonNote", "add_subcommands", "cmd_proxy"]


def cmd_proxy(args: argparse.Namespace) -> int:
    from ..live.allocator import keep_stream_buffers
    from ..live.proxy import Proxy
    from ..live.transport import TlsOptions

    keep_stream_buffers()

    tls = None
    if args.tls_cert or args.tls_ca or args.tls_key or args.tls_hostname:
        tls = TlsOptions(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, hostname=args.tls_hostname)
    _check_listen(args.listen, tls, args.allow_remote)
    note = BalloonNote(args.machine, args.from_machine) if args.machine and not args.quiet else None
    proxy = Proxy(args.listen, args.forward, machine=args.machine, wire=args.wire, from_machine=args.from_machine,
                  compress=args.compress, tls=tls, accept_timeout=args.timeout, schema=schema_option(args),
                  observe=note)
    proxy.bind()
    if not args.quiet:
        print(f"vmferry proxy: listening on {proxy.uri}, forwarding {args.wire} to {args.forward}"
              + (f" as {args.machine}" if args.machine else ""), file=sys.stderr, flush=True)
    try:
        stats = proxy.run()
    finally:
        proxy.abort()
    if args.json:
        json.dump(stats.as_dict(), sys.stdout)
        sys.stdout.write("\n")
    elif not args.quiet:
        spliced = f" ({stats.bytes_spliced} of them spliced)" if stats.bytes_spliced else ""
        print(f"vmferry proxy: {stats.input_format} in, {stats.bytes_in} bytes -> {args.wire} out, "
              f"{stats.bytes_out} bytes{spliced}", file=sys.stderr)
    return 0


class BalloonNote:
    """An observer of the proxied stream that says once, on stderr, what the destination QEMU must keep for the
    stream's memory balloon when the machine type changes (compat/machines/pinned.py): a proxy cannot see the
    destination's command line, so where `migrate --via-proxy` checks it, the proxy can only name it, before
    the destination refuses the balloon's BAR."""

    def __init__(self, target: str, source: str | None = None) -> None:
        self.target, self.source, self.said = target, source, False

    def __call__(self, ev: Any) -> None:
        if isinstance(ev, Configuration):
            name = ev.state.get("name")
            if isinstance(name, (bytes, str)):
                self.source = name.decode("latin-1") if isinstance(name, bytes) else name
        elif isinstance(ev, DeviceSection) and not self.said:
            from ..compat.machines.pinned import balloon_note, is_balloon_section

            if is_balloon_section(ev.idstr):
                self.said = True
                note = balloon_note(self.source, self.target)
                if note is not None:
                    print(f"vmferry proxy: {note}", file=sys.stderr, flush=True)


def _check_listen(uri: str, tls: Any, allow_remote: bool) -> None:
    """Refuse a listener beyond this host that anyone could connect to, unless ``--allow-remote``.

    Whoever connects first feeds the destination QEMU a guest of their making.  A ``tls:`` listener with
    ``--tls-ca`` requires a client certificate signed by that CA, so it may listen anywhere.
    """
    from ..errors import TransportError
    from ..live.transport import is_loopback, parse_uri

    try:
        addr = parse_uri(uri, tls)
    except TransportError as e:
        raise UsageError(f"--listen: {e}") from None
    if addr.scheme not in ("tcp", "tls") or is_loopback(addr.bind_host) or allow_remote:
        return
    if addr.scheme == "tls" and addr.tls is not None and addr.tls.ca:
        return
    raise UsageError(f"--listen {uri} would accept a stream from any host: pass --allow-remote to mean it, or use "
                     "tls: with --tls-ca (client certificates) or a unix socket")


def add_subcommands(sub: Any) -> None:
    """Add ``proxy`` to the ``vmferry`` subcommand parsers."""
    p = sub.add_parser(
        "proxy", help="carry a live migration between QEMUs, transcoding it in flight",
        description="Listen where a QEMU migrates to (QEMU's 'migrate' to the --listen URI), decode the stream "
                    "as it arrives (QEMU's format or ferry from another proxy), optionally convert the device state "
                    "to another machine type, and forward it: in QEMU's format to a destination QEMU "
                    "('migrate-incoming' on the --forward URI) or in ferry to a proxy on the destination host. RAM "
                    "streams through; device sections are held until the vmdesc at the end of the stream. Every "
                    "channel of the migration comes through the one --listen address: the return path goes back "
                    "beside the main channel, multifd channels are checked and spliced, postcopy's page requests "
                    "and preempt channel pass (docs/proxy.md). If any channel fails all are closed, so the source "
                    "QEMU's migration fails (or pauses, in postcopy) and its guest keeps running. One migration "
                    "per run.")
    p.add_argument("--listen", required=True, metavar="URI", help="where the source connects: unix:PATH, "
                                                                   "tcp:HOST:PORT or tls:HOST:PORT")
    p.add_argument("--forward", required=True, metavar="URI", help="where the stream goes (unix:, tcp:, tls:)")
    p.add_argument("--machine", metavar="TARGET", help="convert the device state to this machine type, "
                                                         "e.g. pc-i440fx-7.2")
    p.add_argument("--from-machine", metavar="SOURCE", help="source machine type, for streams without a "
                                                              "configuration section")
    p.add_argument("--schema", metavar="FILE",
                   help="a stream (or vmdesc) the source's QEMU wrote under the same machine type and devices: "
                        "needed to convert a postcopy migration, whose device state comes without description")
    p.add_argument("--to", dest="wire", choices=("legacy", "ferry"), default="legacy",
                   help="output format: legacy for a QEMU, ferry for another proxy (default: legacy)")
    p.add_argument("--wire", dest="wire", choices=("legacy", "ferry"), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--compress", choices=("none", "zstd", "lz4"), default="none",
                   help="compress the frames of a ferry wire (the receiving proxy needs the same extra installed; "
                        "worth it on slow links only, default none)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a tcp: (or tls: without --tls-ca) --listen address beyond loopback: anyone who "
                        "connects first feeds the destination")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up when no source connects in time")
    p.add_argument("--json", action="store_true", help="print what was carried as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no messages on stderr")
    tls_options(p)
    p.set_defaults(func=cmd_proxy)
