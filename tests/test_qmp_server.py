"""The QMP server of vmferry endpoints, checked on the wire and through the qemu.qmp client library."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from live_helpers import short_dir

from vmferry.errors import TransportError
from vmferry.live.qmp import CommandFailed, QMPCommandError, QMPConnection, QMPServer
from vmferry.live.qmp.protocol import JsonStream, Session
from vmferry.live.qmp.server import not_found


def handler(name: str, args: dict[str, Any]) -> Any:
    if name == "echo":
        return args
    if name == "boom":
        raise CommandFailed("it broke", "DeviceNotActive")
    if name == "crash":
        raise RuntimeError("bug")
    if name == "quit":
        return {}
    raise not_found(name)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[QMPServer, str]]:
    path = short_dir(tmp_path) / "q.sock"
    srv = QMPServer(handler, version=(7, 2, 0), package="test")
    ready = threading.Event()

    async def main() -> None:
        await srv.start(f"unix:{path}")
        ready.set()
        await srv.serve()

    t = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    t.start()
    assert ready.wait(10)
    yield srv, str(path)
    srv.close()
    t.join(5)


def _raw(path: str) -> tuple[socket.socket, Any]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")
    return s, f


def test_wire_protocol(server: tuple[QMPServer, str]) -> None:
    _, path = server
    s, f = _raw(path)
    greeting = json.loads(f.readline())
    assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert greeting["QMP"]["capabilities"] == []
    s.sendall(b'{"execute": "echo", "id": 1}')
    assert json.loads(f.readline())["error"]["class"] == "CommandNotFound"  # not negotiated yet
    # two requests in one packet, no newline between them, ids of any JSON type
    s.sendall(b'{"execute": "qmp_capabilities", "id": "a"}{"execute": "echo", "arguments": {"x": [1]}, "id": [2]}')
    assert json.loads(f.readline()) == {"return": {}, "id": "a"}
    assert json.loads(f.readline()) == {"return": {"x": [1]}, "id": [2]}
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline())["error"]["class"] == "CommandNotFound"
    s.sendall(b'{"execute": "boom", "id": 3}\n{"execute": "crash"}\n{"execute": "nosuch"}\n')
    assert json.loads(f.readline()) == {"error": {"class": "DeviceNotActive", "desc": "it broke"}, "id": 3}
    assert "internal error" in json.loads(f.readline())["error"]["desc"]
    assert json.loads(f.readline())["error"]["desc"] == "The command nosuch has not been found"
    s.sendall(b'{"execute": \n  "echo", "arguments": 5}\n[1]\n{bad json}\n{"execute": "echo", "x": 1}\n')
    assert "must be an object" in json.loads(f.readline())["error"]["desc"]
    assert "JSON object" in json.loads(f.readline())["error"]["desc"]
    assert "JSON parse error" in json.loads(f.readline())["error"]["desc"]
    assert "unexpected" in json.loads(f.readline())["error"]["desc"]
    s.close()


def test_socket_is_private(server: tuple[QMPServer, str]) -> None:
    _, path = server
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_qemu_qmp_library_drives_it(server: tuple[QMPServer, str]) -> None:
    srv, path = server
    from qemu.qmp import QMPClient

    async def scenario() -> dict[str, Any]:
        client = QMPClient("t")
        await client.connect(path)
        out: dict[str, Any] = {"echo": await client.execute("echo", {"a": 1})}
        with client.listener() as listener:
            srv.emit("MIGRATION", {"status": "active"})
            ev = await asyncio.wait_for(listener.get(), 5)
            out["event"] = (ev["event"], ev["data"], sorted(ev["timestamp"]))
        try:
            await client.execute("boom")
        except Exception as e:  # noqa: BLE001
            out["error"] = type(e).__name__
        await client.disconnect()
        return out

    out = asyncio.run(scenario())
    assert out == {"echo": {"a": 1}, "event": ("MIGRATION", {"status": "active"}, ["microseconds", "seconds"]),
                   "error": "ExecuteError"}
    with QMPConnection(f"unix:{path}") as c:  # and vmferry's blocking wrapper of it
        assert c.cmd("echo", {"b": 2}) == {"b": 2}
        with pytest.raises(QMPCommandError) as err:
            c.cmd("nosuch")
        assert err.value.error_class == "CommandNotFound"
        c.cmd("quit")


def test_tcp_stays_on_loopback() -> None:
    async def start(addr: str, allow: bool) -> Any:
        srv = QMPServer(handler)
        await srv.start(addr, allow_remote=allow)
        where = srv.address
        await srv._shutdown()
        return where

    where = asyncio.run(start("tcp::0", False))
    assert where.host == "127.0.0.1" and where.port > 0
    with pytest.raises(TransportError, match="allow-remote"):
        asyncio.run(start("tcp:0.0.0.0:0", False))
    with pytest.raises(TransportError, match="unix:PATH or tcp"):
        asyncio.run(start("exec:true", False))


def test_json_stream_and_session_units() -> None:
    js = JsonStream(limit=64)
    assert js.feed(b'{"a": "\xc3') == []  # a split UTF-8 character waits for its second byte
    assert js.feed(b'\xa9"} {"b"') == [{"a": "\u00e9"}]
    assert js.feed(b": 1}") == [{"b": 1}]
    from vmferry.live.qmp.protocol import QMPProtocolError

    with pytest.raises(QMPProtocolError):
        js.feed(b'{"x": "' + b"y" * 100)
    sess = Session()
    assert sess.request({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})["error"]
    assert sess.request({"exec-oob": "x"})["error"]["desc"].startswith("QMP input member 'exec-oob'")
