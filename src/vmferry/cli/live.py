"""``vmferry serve``, ``vmferry caps`` and ``vmferry migrate``: live migration from the command line.

``serve`` runs a vmferry endpoint (:mod:`vmferry.live.endpoint`) behind QMP;
``caps`` prints what one side (an endpoint or a real QEMU) supports;
``migrate`` is the management tool (:mod:`vmferry.live.migrate`).  Errors are one
line on stderr and a non-zero exit, as everywhere in the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import caps
from .common import MigrationBar, UsageError, open_stream, output_file, schema_option, tls_from_args, tls_options

EXIT_OK = 0
EXIT_FAILED = 2


def add_subcommands(sub: Any) -> None:
    """Add ``serve``, ``caps`` and ``migrate`` to the ``vmferry`` parser's subparsers."""
    srv = sub.add_parser("serve", help="run a vmferry endpoint (RAM, device models, a counter) behind QMP",
                         description="Run a vmferry endpoint: guest RAM, vmferry's Python device models and a "
                                     "counter, kept busy by a workload that dirties RAM, behind a QMP server "
                                     "that qemu.qmp clients (and vmferry migrate) can drive. With --incoming it "
                                     "waits for migrate-incoming, like QEMU's -incoming defer.")
    srv.add_argument("--qmp", required=True, metavar="ADDR",
                     help="QMP address: unix:PATH (created mode 0600), tcp:HOST:PORT (loopback unless "
                          "--allow-remote; no authentication: anyone who connects controls the endpoint) or "
                          "tls:HOST:PORT (needs --tls-cert, --tls-key and --tls-ca: clients must show a "
                          "certificate signed by that CA)")
    srv.add_argument("--incoming", action="store_true", help="wait for an incoming migration (migrate-incoming)")
    srv.add_argument("--ram", default="64M", metavar="SIZE", help="guest RAM, e.g. 64M or 1G (default 64M)")
    srv.add_argument("--paused", action="store_true", help="start stopped (run with 'cont'), like QEMU's -S")
    srv.add_argument("--rate", type=int, default=100, metavar="HZ", help="workload ticks per second (default 100)")
    srv.add_argument("--dirty", type=int, default=16, metavar="PAGES",
                     help="pages the workload dirties per tick (default 16)")
    srv.add_argument("--fill", choices=["zero", "random"], default="zero",
                     help="initial RAM contents of a source (default zero)")
    srv.add_argument("--caps", metavar="NAMES",
                     help="the capabilities to offer, comma-separated, 'none' for mask 0 (default: all it can)")
    srv.add_argument("--no-capability-commands", action="store_true",
                     help="hide query-/set-migration-capabilities, like a peer that predates them")
    srv.add_argument("--device-version", action="append", default=[], metavar="VMSD=N",
                     help="run an older version of a device (e.g. mc146818rtc=2); repeatable")
    srv.add_argument("--compress", choices=["none", "zstd", "lz4"], default="none",
                     help="compress ferry frames when both sides agree on it (default none)")
    srv.add_argument("--allow-remote", action="store_true",
                     help="allow a tcp: QMP address beyond loopback (unauthenticated: prefer unix: or tls:)")
    srv.add_argument("--allow-remote-exec", action="store_true",
                     help="let QMP clients on other hosts name exec:, file: and fd: migration URIs (run a "
                          "command, write a file here); refused by default")
    tls_options(srv, "tls: migration URIs and a tls: QMP address")
    srv.add_argument("-q", "--quiet", action="store_true", help="no start-up line on stderr")
    srv.set_defaults(func=cmd_serve)

    cp = sub.add_parser("caps", help="show what one side (vmferry endpoint or QEMU) supports",
                        description="Query one side over QMP. A vmferry endpoint shows its capability mask; a "
                                    "real QEMU has mask 0 and shows its own capability list.")
    cp.add_argument("address", metavar="ADDR", help="QMP address: unix:PATH or tcp:HOST:PORT")
    cp.add_argument("--json", action="store_true", help='print {"mask": N, "names": [...], ...}')
    tls_options(cp, "a tls: QMP address (the client certificate it asks for)")
    cp.set_defaults(func=cmd_caps)

    mg = sub.add_parser("migrate", help="live-migrate between two endpoints (QEMU or vmferry)",
                        description="Query both sides, set the intersection of their capabilities on both, start "
                                    "the incoming side and then the migration, and follow it until the "
                                    "destination runs. On failure the migration is cancelled and the source "
                                    "keeps running. With --via-proxy the stream passes through vmferry, which "
                                    "converts it to the destination's machine type: a guest moves between machine "
                                    "types that QEMU alone refuses to mix.")
    mg.add_argument("--source", metavar="ADDR", help="QMP address of the source")
    mg.add_argument("--dest", metavar="ADDR", help="QMP address of the destination")
    mg.add_argument("--to-file", metavar="FILE",
                    help="save the guest of --source to FILE instead ('-': stdout), as virsh save and QEMU's file: "
                         "URI do: QEMU's own stream, every capability off; the source is stopped once saved")
    mg.add_argument("--from-file", metavar="FILE",
                    help="load FILE ('-': stdin; any format vmferry reads) into --dest, which waits for it (QEMU's "
                         "-incoming defer, serve --incoming), as virsh restore does, and run the guest")
    mg.add_argument("--uri", help="migration URI (default: a private unix socket)")
    mg.add_argument("--set-caps", metavar="NAMES",
                    help="use only these capabilities (comma-separated vmferry or QEMU names; 'none' for mask 0)")
    mg.add_argument("--max-bandwidth", type=int, metavar="BYTES_PER_S", help="bandwidth cap on the source")
    mg.add_argument("--downtime-limit", type=int, metavar="MS", help="downtime the source aims for")
    mg.add_argument("--via-proxy", action="store_true",
                    help="route the stream through vmferry proxies run by this command, which decode it in flight "
                         "and convert the device state to the destination's machine type (read over QMP)")
    mg.add_argument("--machine", default="auto", metavar="auto|TARGET",
                    help="with --via-proxy: the machine type to convert to (default auto: the destination's)")
    mg.add_argument("--to", dest="wire", choices=("legacy", "ferry"), default="legacy",
                    help="with --via-proxy, the format on the wire: legacy is one proxy; ferry is two proxies with "
                         "vmferry's ferry format between them over tcp, as on two hosts (their capabilities are "
                         "negotiated; --set-caps zstd compresses the wire)")
    mg.add_argument("--wire", dest="wire", choices=("legacy", "ferry"), default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS)  # the old spelling
    mg.add_argument("--qemu-caps", metavar="NAMES",
                    help="QEMU migration capabilities to switch on at both QEMUs (comma-separated, e.g. "
                         "multifd,return-path); refused before anything moves if a QEMU lacks one, or, with "
                         "--via-proxy, if the proxy cannot carry it (docs/proxy.md lists them)")
    mg.add_argument("--multifd-channels", type=int, metavar="N",
                    help="use multifd with N channels (switches multifd on at both QEMUs)")
    mg.add_argument("--multifd-compression", choices=("none", "zlib", "zstd"),
                    help="compress the multifd channels (switches multifd on)")
    mg.add_argument("--postcopy", action="store_true",
                    help="switch postcopy-ram on, and the migration to postcopy once the first pass over RAM is "
                         "done: the destination runs at once and asks for the pages it has not got yet (a busy "
                         "guest then converges whatever it dirties)")
    mg.add_argument("--schema", metavar="FILE",
                    help="with --via-proxy and --postcopy to another machine type: a stream (or vmdesc) the "
                         "source's QEMU wrote under the same machine type and devices; postcopy carries the "
                         "device state without the description needed to convert it")
    mg.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default 600)")
    mg.add_argument("--json", action="store_true", help="print the result as JSON")
    tls_options(mg, "tls: QMP addresses (the client certificate they ask for)")
    mg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    mg.set_defaults(func=cmd_migrate)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_serve(args: argparse.Namespace) -> int:
    from ..live.allocator import keep_stream_buffers
    from ..live.endpoint.machine import parse_size
    from ..live.endpoint.serve import ServeOptions, serve
    from ..live.transport import TlsOptions

    keep_stream_buffers()
    try:
        ram = parse_size(args.ram)
    except ValueError as e:
        raise UsageError(str(e)) from None
    supported = None
    names = _split(args.caps)
    if names is not None and names != ["all"]:
        try:
            supported = int(caps.from_names(names))
        except ValueError as e:
            raise UsageError(str(e)) from None
    versions: dict[str, int] = {}
    for item in args.device_version:
        name, sep, v = item.partition("=")
        if not sep or not v.isdigit():
            raise UsageError(f"--device-version {item!r}: expected VMSD=N")
        versions[name] = int(v)
    tls = None
    if args.tls_cert or args.tls_ca or args.tls_key:
        tls = TlsOptions(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, hostname=args.tls_hostname)
    try:
        opts = ServeOptions(qmp=args.qmp, incoming=args.incoming, ram_size=ram, paused=args.paused, rate=args.rate,
                            dirty_per_tick=args.dirty, fill=args.fill, supported=supported,
                            capability_commands=not args.no_capability_commands, device_versions=versions,
                            allow_remote=args.allow_remote, tls=tls, compress=args.compress,
                            quiet=args.quiet or args.json, allow_remote_exec=args.allow_remote_exec)

        def ready(where: str) -> None:  # --json: one line on stdout once QMP listens
            if args.json:
                print(json.dumps({"qmp": where, "ram": ram, "incoming": args.incoming, "paused": args.paused}),
                      flush=True)

        return serve(opts, ready=ready)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_caps(args: argparse.Namespace) -> int:
    from ..live.migrate import capabilities

    info = capabilities(args.address, qmp_tls=tls_from_args(args))
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    print(f"{args.address}: {info['kind']} endpoint ({info['version'] or 'version unknown'}), {info['status']}")
    print(f"mask: {info['mask']:#x} ({', '.join(info['names']) or 'none: the protocol QEMU speaks today'})")
    if info["kind"] == "vmferry" and info["supported"] != info["mask"]:
        print(f"supported: {info['supported']:#x} ({', '.join(info['supported-names'])})")
    qemu_caps = info["qemu-capabilities"]
    if qemu_caps:
        on = [n for n, s in qemu_caps.items() if s]
        print(f"QEMU capabilities ({len(qemu_caps)}): {', '.join(qemu_caps)}")
        print(f"  on: {', '.join(on) or 'none'}")
    return EXIT_OK


def _file_mode(args: argparse.Namespace) -> str:
    """Which migration the options ask for: live (--source --dest), save (--to-file), restore (--from-file)."""
    if args.to_file is not None and args.from_file is not None:
        raise UsageError("--to-file and --from-file exclude each other (convert a file with vmferry convert)")
    if args.to_file is not None:
        if args.source is None or args.dest is not None:
            raise UsageError("--to-file FILE saves the guest of --source, without --dest")
        mode = "save"
    elif args.from_file is not None:
        if args.dest is None or args.source is not None:
            raise UsageError("--from-file FILE loads into --dest, without --source")
        mode = "restore"
    else:
        if args.source is None or args.dest is None:
            raise UsageError("migrate needs --source and --dest (or --source with --to-file, or --from-file with "
                             "--dest)")
        return "live"
    if args.via_proxy or args.uri is not None or args.set_caps is not None:
        raise UsageError("--via-proxy, --uri and --set-caps apply to a live migration, not to a file")
    return mode


def _save(args: argparse.Namespace, params: dict[str, Any]) -> Any:
    from ..live.migrate import save

    with output_file(args.to_file) as out, MigrationBar(_show_bar(args), args.to_file) as bar:
        return save(args.source, out.write, progress=bar.update, timeout=args.timeout, params=params or None,
                    qmp_tls=tls_from_args(args))


def _restore(args: argparse.Namespace) -> Any:
    from ..encode import legacy
    from ..live.migrate import restore
    from .files import decode_input

    inp = open_stream(args.from_file)
    # QEMU loads its own stream: any other format vmferry reads is converted on the way (a libvirt save image
    # gives the stream inside, decompressed: its size is not the file's)
    chunks = inp.chunks if inp.format == "legacy" else legacy.encode(decode_input(inp, target="legacy"))
    size = inp.size if inp.format == "legacy" and inp.image is None else None
    with MigrationBar(_show_bar(args), args.from_file) as bar:
        return restore(chunks, args.dest, size=size, progress=bar.update, timeout=args.timeout,
                       qmp_tls=tls_from_args(args))


def _show_bar(args: argparse.Namespace) -> bool:
    return not args.quiet and not args.json and sys.stderr.isatty()


def cmd_migrate(args: argparse.Namespace) -> int:
    from ..live.migrate import migrate

    mode = _file_mode(args)
    if args.via_proxy:
        from ..live.allocator import keep_stream_buffers

        keep_stream_buffers()
    params: dict[str, Any] = {}
    if args.max_bandwidth is not None:
        params["max-bandwidth"] = args.max_bandwidth
    if args.downtime_limit is not None:
        params["downtime-limit"] = args.downtime_limit
    if mode == "save" and args.to_file == "-" and args.json:
        raise UsageError("--json prints on stdout: give --to-file a file, not '-'")
    if mode == "save":
        result = _save(args, params)
    elif mode == "restore":
        result = _restore(args)
    else:
        with MigrationBar(_show_bar(args), args.dest) as bar:
            result = migrate(args.source, args.dest, args.uri, _split(args.set_caps), progress=bar.update,
                             timeout=args.timeout, params=params or None, via_proxy=args.via_proxy,
                             machine=args.machine, wire=args.wire, qmp_tls=tls_from_args(args),
                             qemu_caps=_split(args.qemu_caps), multifd_channels=args.multifd_channels,
                             multifd_compression=args.multifd_compression, postcopy=args.postcopy,
                             schema=schema_option(args))
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif mode == "save":
        print(f"saved to {args.to_file}: {result.transferred:,} bytes in {result.seconds:.2f} s; the source is "
              f"{result.source['status']} ('cont' resumes it)", file=sys.stderr if args.to_file == "-" else sys.stdout)
    elif mode == "restore":
        print(f"restored from {args.from_file}: {result.transferred:,} bytes in {result.seconds:.2f} s; the "
              f"destination is {result.destination['status']}")
    else:
        print(result.line())
    return EXIT_OK


__all__ = ["add_subcommands"]
