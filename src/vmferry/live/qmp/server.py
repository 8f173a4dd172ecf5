"""An asyncio QMP server: the control socket of a vmferry endpoint.

It speaks QEMU's QMP closely enough for the ``qemu.qmp`` client library
(and ``qmp-shell``) to drive it: the greeting, ``qmp_capabilities``,
``execute``/``return``/``error`` with ids, and asynchronous events.  What the
commands do is up to the ``handler`` it is given.

Security: QMP has no authentication of its own; whoever reaches the socket
controls the endpoint.  So a unix socket is created with mode 0600; TCP binds
to loopback unless ``allow_remote`` is set; ``tls:HOST:PORT`` requires a
client certificate signed by the given CA (it may listen beyond loopback);
nothing is ever run through a shell here.  While a command runs,
:func:`current_peer` tells the handler whether its client is on this host.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

from ...errors import TransportError
from ..transport import Address, TlsOptions, bind_unix, is_loopback, parse_uri
from . import protocol
from .protocol import COMMAND_NOT_FOUND, CommandFailed, JsonStream, QMPProtocolError, Session

Handler = Callable[[str, dict[str, Any]], Any]


def parse_qmp_address(text: str, tls: TlsOptions | None = None) -> Address:
    """``unix:PATH``, ``tcp:HOST:PORT`` (the forms QEMU's ``-qmp`` takes) or ``tls:HOST:PORT`` (with ``tls``)."""
    addr = parse_uri(text, tls)
    if addr.scheme not in ("unix", "tcp", "tls"):
        raise TransportError(f"bad QMP address {text!r}: use unix:PATH or tcp:HOST:PORT "
                             "(or tls:HOST:PORT with client certificates)")
    return addr


@dataclass(frozen=True)
class Peer:
    """The client of the command being run: ``local`` when it is on this host (unix socket, loopback)."""

    local: bool
    name: str


_PEER: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("vmferry_qmp_peer", default=None)


def current_peer() -> Peer | None:
    """The client whose command is running (None outside a QMP command, e.g. a direct call)."""
    return _PEER.get()


def _peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return Peer(True, "unix socket")
    peer = writer.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    return Peer(bool(host) and is_loopback(host), f"{host}:{peer[1]}" if host else "unknown")


class QMPServer:
    """Serve QMP on one address; ``handler(name, arguments)`` runs each command.

    ``handler`` returns the command's ``return`` value, or raises
    :class:`~vmferry.live.qmp.protocol.CommandFailed`.  After a command in
    :attr:`closing_commands` has been answered, the server stops.
    """

    closing_commands = ("quit",)

    def __init__(self, handler: Handler, version: tuple[int, int, int] = (7, 2, 0), package: str = "vmferry") -> None:
        self.handler = handler
        self.version = version
        self.package = package
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._done: asyncio.Event | None = None
        self.address: Address | None = None
        self._unix_path: str | None = None

    async def start(self, addr: Address | str, allow_remote: bool = False, tls: TlsOptions | None = None) -> None:
        """Listen on ``addr``.  ``tls:`` needs ``tls`` with a certificate, its key and a CA for the clients'."""
        if isinstance(addr, str):
            addr = parse_qmp_address(addr, tls)
        self.loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        if addr.scheme == "unix":
            sock = bind_unix(addr.path, backlog=8)
            self._unix_path = addr.path
            self._server = await asyncio.start_unix_server(self._client, sock=sock)
        elif addr.scheme == "tcp":
            if not is_loopback(addr.host) and not allow_remote:
                raise TransportError(f"QMP on {addr} would listen beyond this machine: pass --allow-remote "
                                     "to mean it (prefer a unix socket)")
            host = addr.bind_host
            try:
                self._server = await asyncio.start_server(self._client, host, addr.port, reuse_address=True)
            except OSError as e:
                raise TransportError(f"QMP {addr}: cannot listen: {e.strerror or e}") from None
            port = self._server.sockets[0].getsockname()[1]
            addr = Address("tcp", host=host, port=port)
        elif addr.scheme == "tls":
            opts = addr.tls if addr.tls is not None else tls
            if opts is None or not opts.cert or not opts.ca:
                raise TransportError(f"QMP on {addr} needs a certificate, its key and the CA that signs the "
                                     "clients' certificates (--tls-cert, --tls-key, --tls-ca): QMP has no other "
                                     "authentication")
            host = addr.bind_host
            try:
                self._server = await asyncio.start_server(self._client, host, addr.port, reuse_address=True,
                                                          ssl=opts.server_context())
            except OSError as e:
                raise TransportError(f"QMP {addr}: cannot listen: {e.strerror or e}") from None
            port = self._server.sockets[0].getsockname()[1]
            addr = Address("tls", host=host, port=port)
        else:
            raise TransportError(f"bad QMP address {addr}: use unix:PATH or tcp:HOST:PORT "
                                 "(or tls:HOST:PORT with client certificates)")
        self.address = addr

    async def serve(self) -> None:
        """Run until :meth:`close` (or a closing command)."""
        assert self._done is not None
        await self._done.wait()
        await self._shutdown()

    def close(self) -> None:
        """Stop serving (thread-safe)."""
        if self.loop is not None and self._done is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._done.set)
            except RuntimeError:  # closed meanwhile
                pass

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass

    # ------------------------------------------------------------------ events

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client (thread-safe)."""
        if self.loop is None or self.loop.is_closed():
            return
        msg = protocol.dumps(protocol.event(name, data))
        try:
            self.loop.call_soon_threadsafe(self._broadcast, msg)
        except RuntimeError:  # the loop is closing
            pass

    def _broadcast(self, msg: bytes) -> None:
        for w in list(self._writers):
            if not w.is_closing():
                w.write(msg)

    # ----------------------------------------------------------------- clients

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        major, minor, micro = self.version
        _PEER.set(_peer_of(writer))  # this client's task has its own context
        session = Session()
        parser = JsonStream()
        try:
            writer.write(protocol.dumps(protocol.greeting(major, minor, micro, self.package)))
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                try:
                    values = parser.feed(data)
                except QMPProtocolError as e:
                    writer.write(protocol.dumps(protocol.error(str(e))))
                    break
                for value in values:
                    out = session.request(value)
                    if isinstance(out, dict):
                        if "return" in out:
                            self._writers.add(writer)  # negotiated: this client now gets events
                        writer.write(protocol.dumps(out))
                        continue
                    writer.write(protocol.dumps(self._run(out)))
                    await writer.drain()
                    if out.name in self.closing_commands:
                        assert self._done is not None
                        self._done.set()
                        return
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the client left, or the server is shutting down
        finally:
            self._writers.discard(writer)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    def _run(self, req: protocol.Request) -> dict[str, Any]:
        try:
            return protocol.reply(self.handler(req.name, req.arguments), req)
        except CommandFailed as e:
            return protocol.error(e.desc, e.error_class, req)
        except KeyError as e:  # a handler that reads a missing argument
            return protocol.error(f"Parameter {e.args[0]!r} is missing", req=req)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the monitor
            return protocol.error(f"internal error in {req.name}: {type(e).__name__}: {e}", req=req)


def not_found(name: str) -> CommandFailed:
    return CommandFailed(f"The command {name} has not been found", COMMAND_NOT_FOUND)


def unused_tcp_port() -> int:
    """A free loopback TCP port (for tests and demos)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


__all__ = ["Peer", "QMPServer", "current_peer", "not_found", "parse_qmp_address", "unused_tcp_port"]
