"""An asyncio QMP server: the control socket of a vmferry endpoint.

It speaks QEMU's QMP closely enough for the ``qemu.qmp`` client library
(and ``qmp-shell``) to drive it: the greeting, ``qmp_capabilities``,
``execute``/``return``/``error`` with ids, and asynchronous events.  What the
commands do is up to the ``handler`` it is given.

Security: a unix socket is created with mode 0600; TCP binds to loopback
unless ``allow_remote`` is set; nothing is ever run through a shell here.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Callable

from ...errors import TransportError
from ..transport import Address, bind_unix, is_loopback, parse_uri
from . import protocol
from .protocol import COMMAND_NOT_FOUND, CommandFailed, JsonStream, QMPProtocolError, Session

Handler = Callable[[str, dict[str, Any]], Any]


def parse_qmp_address(text: str) -> Address:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (the forms QEMU's ``-qmp`` takes)."""
    addr = parse_uri(text)
    if addr.scheme not in ("unix", "tcp"):
        raise TransportError(f"bad QMP address {text!r}: use unix:PATH or tcp:HOST:PORT")
    return addr


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

    async def start(self, addr: Address | str, allow_remote: bool = False) -> None:
        if isinstance(addr, str):
            addr = parse_qmp_address(addr)
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
        else:
            raise TransportError(f"bad QMP address {addr}: use unix:PATH or tcp:HOST:PORT")
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


__all__ = ["QMPServer", "not_found", "parse_qmp_address", "unused_tcp_port"]
