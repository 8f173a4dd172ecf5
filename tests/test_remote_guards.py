"""What a peer on another host can and cannot do (issue 17): the proxy's listener, QMP over tcp and tls,
exec:/file:/fd: migration URIs from remote QMP clients, and JSON nested too deep for the parser."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from live_helpers import short_dir

from vmferry.errors import TransportError
from vmferry.live.endpoint.serve import ServeOptions, serve
from vmferry.live.qmp import QMPCommandError, QMPConnectError, QMPConnection, QMPServer
from vmferry.live.qmp.protocol import MAX_NESTING, JsonStream
from vmferry.live.qmp.server import current_peer, unused_tcp_port
from vmferry.live.transport import TlsOptions

CLI = [sys.executable, "-m", "vmferry.cli"]


def non_loopback_address() -> str:
    """An address of this host that is not loopback (the source address of a route out), or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent by a UDP connect
            host = s.getsockname()[0]
        except OSError:
            host = ""
    if not host or host.startswith("127."):
        pytest.skip("this host has no address beyond loopback to connect from")
    return host


# ---------------------------------------------------------------------------
# JSON nested 1,000 deep and more
# ---------------------------------------------------------------------------


def test_json_stream_answers_deep_nesting_with_an_error() -> None:
    for depth in (MAX_NESTING + 1, 999, 1000, 5000, 100_000):
        stream = JsonStream()
        deep = "[" * depth + "]" * depth
        out = stream.feed(f'{{"execute": "x", "arguments": {{"a": {deep}}}}}{{"execute": "after"}}'.encode())
        assert isinstance(out[0], ValueError) and "nesting" in str(out[0]), depth
        assert out[1] == {"execute": "after"}, depth  # the stream goes on after the bad value
    ok = JsonStream().feed(("[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)).encode())
    assert isinstance(ok[0], list)


def test_json_stream_waits_for_the_rest_of_a_deep_value() -> None:
    stream = JsonStream()
    deep = ('{"execute": "x", "id": ' + "[" * 3000 + "]" * 3000 + "}").encode()
    assert stream.feed(deep[:2000]) == []
    out = stream.feed(deep[2000:] + b'{"execute": "after"}')
    assert isinstance(out[0], ValueError) and out[1] == {"execute": "after"}


@pytest.fixture
def qmp_server(tmp_path: Path) -> Iterator[str]:
    path = short_dir(tmp_path) / "q.sock"
    srv = QMPServer(lambda name, args: {"peer-local": current_peer().local} if name == "echo" else {},
                    package="test")
    ready = threading.Event()

    async def main() -> None:
        await srv.start(f"unix:{path}")
        ready.set()
        await srv.serve()

    t = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    t.start()
    assert ready.wait(10)
    yield str(path)
    srv.close()
    t.join(5)


@pytest.mark.parametrize("depth", [1000, 20000])
def test_qmp_server_answers_deep_json_and_stays_up(qmp_server: str, depth: int) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(qmp_server)
    f = s.makefile("rb")
    json.loads(f.readline())
    s.sendall(b'{"execute": "qmp_capabilities"}')
    assert json.loads(f.readline()) == {"return": {}}
    for request in ('{"execute": "echo", "id": ' + "[" * depth + "]" * depth + "}",
                    '{"execute": "echo", "arguments": {"a": ' + "{\"b\": " * depth + "1" + "}" * depth + "}}"):
        s.sendall(request.encode())
        reply = json.loads(f.readline())
        assert reply["error"]["desc"] == "JSON nesting depth limit exceeded", reply
    s.sendall(b'{"execute": "echo", "id": 7}')
    assert json.loads(f.readline()) == {"return": {"peer-local": True}, "id": 7}
    s.close()


# ---------------------------------------------------------------------------
# vmferry proxy --listen
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["tcp:0.0.0.0:0", "tcp:[::]:0", "tls:0.0.0.0:0"])
def test_proxy_refuses_to_listen_beyond_loopback(tmp_path: Path, listen: str) -> None:
    out = subprocess.run([*CLI, "proxy", "--listen", listen, "--forward", f"unix:{tmp_path}/d.sock",
                          "--timeout", "1"], capture_output=True, timeout=60)
    err = out.stderr.decode()
    assert out.returncode == 2 and err.count("\n") == 1 and "--allow-remote" in err, err


def test_proxy_listens_beyond_loopback_when_asked(tmp_path: Path) -> None:
    port = unused_tcp_port()
    out = subprocess.run([*CLI, "proxy", "--listen", f"tcp:0.0.0.0:{port}", "--forward", f"unix:{tmp_path}/d.sock",
                          "--timeout", "0.5", "--allow-remote"], capture_output=True, timeout=60)
    err = out.stderr.decode()
    assert f"listening on tcp:0.0.0.0:{port}" in err  # then no source came: a one-line error
    assert out.returncode == 2 and "Traceback" not in err


# ---------------------------------------------------------------------------
# serve: QMP over tcp and tls, exec: from remote peers
# ---------------------------------------------------------------------------


class Serve:
    """``vmferry serve`` in a thread of this process."""

    def __init__(self, **opts: Any) -> None:
        self.opts = ServeOptions(quiet=True, ram_size=4 << 20, **opts)
        self.ready = threading.Event()
        self.where = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            serve(self.opts, ready=self._ready)
        except BaseException as e:  # noqa: BLE001
            self.error = e
            self.ready.set()

    def _ready(self, where: str) -> None:
        self.where = where
        self.ready.set()

    def __enter__(self) -> Serve:
        self.thread.start()
        assert self.ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.error is None:
            try:
                with QMPConnection(self.local_address, tls=self.client_tls) as c:
                    c.cmd("quit")
            except Exception:  # noqa: BLE001
                pass
        self.thread.join(10)

    #: the certificate the test's own quit uses on a tls: QMP address
    client_tls: TlsOptions | None = None

    @property
    def local_address(self) -> str:
        scheme, _, rest = self.opts.qmp.partition(":")
        return f"{scheme}:127.0.0.1:{rest.rsplit(':', 1)[1]}"


def _migrate_and_wait(conn: QMPConnection, uri: str) -> dict[str, Any]:
    conn.cmd("migrate", {"uri": uri})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = conn.cmd("query-migrate")
        if info.get("status") in ("completed", "failed"):
            return dict(info)
        time.sleep(0.05)
    raise AssertionError("the migration did not end")


@pytest.mark.parametrize("scheme", ["exec", "file"])
def test_exec_and_file_uris_are_refused_from_a_remote_qmp_client(tmp_path: Path, scheme: str) -> None:
    host = non_loopback_address()
    port = unused_tcp_port()
    target = tmp_path / "out.mig"
    uri = f"exec:cat > {target}" if scheme == "exec" else f"file:{target}"
    with Serve(qmp=f"tcp:0.0.0.0:{port}", allow_remote=True) as srv:
        with QMPConnection(f"tcp:{host}:{port}") as remote:
            with pytest.raises(QMPCommandError, match="refused from a remote QMP client"):
                remote.cmd("migrate", {"uri": uri})
        assert not target.exists()
        with QMPConnection(srv.local_address) as local:  # the same server, from this host: allowed
            info = _migrate_and_wait(local, uri)
        assert info["status"] == "completed", info
        assert target.read_bytes()[:4] in (b"QEVM", b"\x89FRY")  # the endpoint's stream, in a format it chose


def test_allow_remote_exec_lets_remote_clients_use_exec(tmp_path: Path) -> None:
    host = non_loopback_address()
    port = unused_tcp_port()
    target = tmp_path / "out.mig"
    with Serve(qmp=f"tcp:0.0.0.0:{port}", allow_remote=True, allow_remote_exec=True):
        with QMPConnection(f"tcp:{host}:{port}") as remote:
            info = _migrate_and_wait(remote, f"exec:cat > {target}")
        assert info["status"] == "completed" and target.read_bytes()[:4] in (b"QEVM", b"\x89FRY")


def test_serve_refuses_tcp_beyond_loopback_without_allow_remote() -> None:
    out = subprocess.run([*CLI, "serve", "--qmp", "tcp:0.0.0.0:0", "--ram", "4M"], capture_output=True, timeout=60)
    err = out.stderr.decode()
    assert out.returncode == 2 and err.count("\n") == 1 and "--allow-remote" in err, err


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate signed by it; a stranger's self-signed one."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA", "-keyout", "ca.key",
        "-out", "ca.pem")
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out",
            f"{name}.csr")
        (d / f"{name}.ext").write_text(san + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stranger", "-keyout",
        "stranger.key", "-out", "stranger.pem")
    return {k: str(d / k) for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "stranger.pem",
                                     "stranger.key")}


def test_qmp_over_tls_requires_a_client_certificate(pki: dict[str, str]) -> None:
    port = unused_tcp_port()
    server_tls = TlsOptions(cert=pki["server.pem"], key=pki["server.key"], ca=pki["ca.pem"])
    client = TlsOptions(cert=pki["client.pem"], key=pki["client.key"], ca=pki["ca.pem"])
    serving = Serve(qmp=f"tls:0.0.0.0:{port}", tls=server_tls)  # no --allow-remote: clients are authenticated
    serving.client_tls = client
    with serving:
        with QMPConnection(f"tls:127.0.0.1:{port}", tls=client) as c:
            assert c.cmd("query-status")["status"] == "running"
        for who in (TlsOptions(ca=pki["ca.pem"]),  # no client certificate
                    TlsOptions(cert=pki["stranger.pem"], key=pki["stranger.key"], ca=pki["ca.pem"])):
            with pytest.raises((QMPConnectError, QMPCommandError)):
                with QMPConnection(f"tls:127.0.0.1:{port}", tls=who, timeout=3) as c:
                    c.cmd("query-status")
        # the CLI: caps over tls with the client certificate
        out = subprocess.run([*CLI, "caps", f"tls:127.0.0.1:{port}", "--json", "--tls-cert", pki["client.pem"],
                              "--tls-key", pki["client.key"], "--tls-ca", pki["ca.pem"]], capture_output=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["kind"] == "vmferry"


def test_qmp_over_tls_without_a_ca_is_refused(pki: dict[str, str]) -> None:
    with pytest.raises(TransportError, match="--tls-ca"):
        with Serve(qmp="tls:127.0.0.1:0", tls=TlsOptions(cert=pki["server.pem"], key=pki["server.key"])):
            pass
