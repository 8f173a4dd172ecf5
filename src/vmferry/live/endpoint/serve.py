"""``vmferry serve``: a vmferry endpoint behind a QMP server, until ``quit`` or a signal."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable

from ... import __version__, caps
from ..qmp.server import QMPServer
from ..transport import TlsOptions
from .endpoint import Endpoint
from .machine import Machine

# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


@dataclass
class ServeOptions:
    qmp: str
    incoming: bool = False
    ram_size: int = 64 << 20
    paused: bool = False
    rate: int = 100
    dirty_per_tick: int = 16
    fill: str = "zero"
    supported: int | None = None
    capability_commands: bool = True
    device_versions: dict[str, int] = field(default_factory=dict)
    allow_remote: bool = False
    tls: TlsOptions | None = None
    compress: str = "none"
    quiet: bool = False
    #: let QMP clients on other hosts use exec:, file: and fd: migration URIs
    allow_remote_exec: bool = False


def serve(opts: ServeOptions, ready: Callable[[str], None] | None = None) -> int:
    """Run an endpoint until ``quit`` or SIGTERM/SIGINT; returns the exit status."""
    machine = Machine(opts.ram_size, rate=opts.rate, dirty_per_tick=opts.dirty_per_tick,
                      device_versions=opts.device_versions, fill="zero" if opts.incoming else opts.fill)
    server: QMPServer | None = None
    endpoint = Endpoint(machine, incoming=opts.incoming, paused=opts.paused, supported=opts.supported,
                        capability_commands=opts.capability_commands, tls=opts.tls,
                        emit=lambda name, data: server.emit(name, data) if server else None,
                        compress=opts.compress, allow_remote_exec=opts.allow_remote_exec)
    server = QMPServer(endpoint.handle, version=(7, 2, 0), package=f"vmferry {__version__}")

    async def main() -> None:
        assert server is not None
        await server.start(opts.qmp, allow_remote=opts.allow_remote, tls=opts.tls)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, server.close)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        where = str(server.address)
        if not opts.quiet:
            print(f"vmferry endpoint: QMP on {where}, RAM {machine.ram_size >> 20} MiB, "
                  f"{'waiting for an incoming migration' if opts.incoming else endpoint.runstate}, "
                  f"capabilities {', '.join(caps.names(endpoint.supported)) or 'none (mask 0)'}",
                  file=sys.stderr, flush=True)
        if ready is not None:
            ready(where)
        await server.serve()

    try:
        asyncio.run(main())
    finally:
        endpoint.shutdown()
    return 0


__all__ = ["Endpoint", "Machine", "ServeOptions", "serve"]
