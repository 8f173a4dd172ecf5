"""A blocking QMP client for the management tool, over the ``qemu.qmp`` library.

:class:`QMPConnection` runs ``qemu.qmp.QMPClient`` on a private asyncio loop
in a daemon thread, so it works from plain synchronous code (and from
threads).  It talks to real QEMU and to vmferry endpoints alike.
Failures surface as :class:`QMPConnectError` (no connection, or it broke;
a :class:`~vmferry.errors.TransportError`) and :class:`QMPCommandError`
(the peer answered with an error; carries QMP's ``class`` and ``desc``).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any, Coroutine, TypeVar

from ...errors import FerryError, TransportError
from ..transport import Address, TlsOptions
from .server import parse_qmp_address

T = TypeVar("T")


class QMPConnectError(TransportError):
    """The QMP connection could not be made, or broke."""


class QMPCommandError(FerryError):
    """A command failed; ``error_class`` and ``desc`` are what the peer said."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPConnection:
    """One QMP connection, blocking API.  Use as a context manager or call :meth:`close`."""

    def __init__(self, address: str | Address, timeout: float = 30.0, name: str = "qmp",
                 tls: TlsOptions | None = None) -> None:
        self.address = parse_qmp_address(address, tls) if isinstance(address, str) else address
        self.timeout = timeout
        self.name = name
        self._loop = asyncio.new_event_loop()
        # qemu.qmp leaves "exception never retrieved" futures behind when the peer hangs up first (QEMU
        # closes the monitor on quit): that is expected here, not worth a log line.
        self._loop.set_exception_handler(lambda loop, context: None)
        self._thread = threading.Thread(target=self._main, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client: Any = None
        self.events: list[dict[str, Any]] = []

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.run_forever()
        try:  # as asyncio.run() ends: finish every task the library left, then close
            for _ in range(5):
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                if not tasks:
                    break
                for t in tasks:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(self.timeout if timeout is None else timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def connect(self) -> QMPConnection:
        if self._client is not None:
            return self
        try:
            from qemu.qmp import QMPClient
        except ImportError:
            raise QMPConnectError("the qmp extra is missing (pip install 'vmferry[qmp]')") from None
        client = QMPClient(self.name)
        target: Any = self.address.path if self.address.scheme == "unix" else (self.address.bind_host,
                                                                               self.address.port)
        ssl_context = None
        if self.address.scheme == "tls":
            # the server's certificate must name the address's host; ``tls`` gives a client certificate
            ssl_context = (self.address.tls or TlsOptions()).client_context()

        async def attempt() -> None:
            try:
                await asyncio.wait_for(client.connect(target, ssl=ssl_context), self.timeout)
            except BaseException:
                try:
                    await client.disconnect()
                except Exception:  # noqa: BLE001 - disconnect() re-raises why the connection failed
                    pass
                raise

        try:
            self._run(attempt(), self.timeout + 5)
        except TimeoutError:
            self._stop_loop()
            raise QMPConnectError(f"QMP {self.address}: no answer within {self.timeout} s") from None
        except Exception as e:  # noqa: BLE001 - qemu.qmp wraps OSError in ConnectError
            self._stop_loop()
            cause = getattr(e, "exc", None) or e
            text = getattr(cause, "strerror", None) or str(cause)
            raise QMPConnectError(f"cannot connect to QMP at {self.address}: {text}") from None
        self._client = client
        return self

    def greeting(self) -> dict[str, Any]:
        g = self._client.greeting if self._client is not None else None
        return dict(g._raw) if g is not None else {}

    def cmd(self, name: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run ``name``; return its ``return`` value."""
        from qemu.qmp import ExecuteError

        if self._client is None:
            raise QMPConnectError(f"QMP {self.address}: not connected")
        try:
            return self._run(self._client.execute(name, args or None), timeout)
        except ExecuteError as e:
            err = e.error.error
            raise QMPCommandError(name, err.class_, err.desc) from None
        except TimeoutError:
            raise QMPConnectError(f"QMP {self.address}: {name} got no answer within "
                                  f"{self.timeout if timeout is None else timeout} s") from None
        except Exception as e:  # noqa: BLE001 - disconnects surface as several types
            raise QMPConnectError(f"QMP {self.address}: connection lost during {name} ({type(e).__name__})") from None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._run(self._client.disconnect(), 5)
            except Exception:  # noqa: BLE001 - the peer may be gone
                pass
            self._client = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._thread.is_alive() and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass
            self._thread.join(10)
        self._client = None
        # Collect the library's task/transport cycles now: their finalizers must not run at a random
        # later moment in another thread's code (CPython 3.11 trips over that inside ast.parse).
        gc.collect()

    def __enter__(self) -> QMPConnection:
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["QMPCommandError", "QMPConnectError", "QMPConnection"]
