"""Transports: URI parsing and byte streams over file, exec, fd, unix, tcp and tls."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from live_helpers import short_dir

from vmferry.errors import TransportError
from vmferry.live.transport import Address, TlsOptions, connect, listen, parse_uri


@pytest.mark.parametrize("uri, want", [
    ("file:/x/y.mig", Address("file", path="/x/y.mig")),
    ("exec:cat > f", Address("exec", command="cat > f")),
    ("fd:7", Address("fd", fd=7)),
    ("unix:/run/s.sock", Address("unix", path="/run/s.sock")),
    ("tcp:localhost:4444", Address("tcp", host="localhost", port=4444)),
    ("tcp::4444", Address("tcp", host="", port=4444)),
    ("tcp:[::1]:4444", Address("tcp", host="::1", port=4444)),
])
def test_parse_uri(uri: str, want: Address) -> None:
    got = parse_uri(uri)
    assert got == want
    assert str(got) == uri


def test_parse_tls_options() -> None:
    a = parse_uri("tls:h:1?ca=/c.pem&hostname=srv&verify=no", TlsOptions(cert="/a.pem", key="/k.pem"))
    assert a.tls == TlsOptions(cert="/a.pem", key="/k.pem", ca="/c.pem", hostname="srv", verify=False)
    assert str(a) == "tls:h:1"


@pytest.mark.parametrize("uri, match", [
    ("nope", "expected SCHEME"), ("rdma:x:1", "unknown scheme"), ("exec:", "no command"), ("file:", "no path"),
    ("fd:name", "descriptor number"), ("tcp:host", "HOST:PORT"), ("tcp:h:99999", "port"), ("tcp:::1:4", "brackets"),
    ("tcp:[::1]4", "IPV6"), ("tls:h:1?bogus=1", "unknown tls option"), ("tls:h:1?verify=maybe", "verify"),
])
def test_parse_uri_refuses(uri: str, match: str) -> None:
    with pytest.raises(TransportError, match=match):
        parse_uri(uri)


def _pump(uri_out: str, uri_in: str, payload: bytes) -> bytes:
    lst = listen(uri_in)
    got: list[bytes] = []

    def receive() -> None:
        with lst.accept(timeout=10) as s:
            got.append(b"".join(s.chunks(4096)))

    t = threading.Thread(target=receive)
    t.start()
    with connect(uri_out) as out:
        out.write_chunks([payload[:10], memoryview(payload)[10:], b""])
        out.close_write()
    t.join(10)
    lst.close()
    return got[0]


PAYLOAD = os.urandom(300_000)


def test_unix_stream_and_socket_mode(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    path = d / "m.sock"
    lst = listen(f"unix:{path}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lst.close()
    assert not path.exists()
    assert _pump(f"unix:{path}", f"unix:{path}", PAYLOAD) == PAYLOAD


def test_unix_refuses_to_replace_a_file(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    f = d / "precious"
    f.write_text("keep")
    with pytest.raises(TransportError, match="not a socket"):
        listen(f"unix:{f}")
    assert f.read_text() == "keep"


def test_tcp_listens_on_loopback_by_default() -> None:
    lst = listen("tcp::0")
    host, port = lst.sock.getsockname()[:2]  # type: ignore[union-attr]
    assert host == "127.0.0.1" and lst.uri == f"tcp:127.0.0.1:{port}"
    lst.close()
    lst = listen("tcp::0")
    port = lst.sock.getsockname()[1]  # type: ignore[union-attr]
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(b"".join(lst.accept(timeout=10).chunks())))
    t.start()
    with connect(f"tcp::{port}") as out:
        assert out.duplex
        out.write(PAYLOAD)
        out.close_write()
    t.join(10)
    lst.close()
    assert got[0] == PAYLOAD


def test_file_and_fd(tmp_path: Path) -> None:
    f = tmp_path / "s.bin"
    with connect(f"file:{f}") as out:
        out.write(PAYLOAD)
    assert f.read_bytes() == PAYLOAD
    with listen(f"file:{f}").accept() as inp:
        assert b"".join(inp.chunks()) == PAYLOAD and not inp.duplex
    r, w = os.pipe()
    with connect(f"fd:{w}") as out:
        out.write(b"hello")
    with listen(f"fd:{r}").accept() as inp:
        assert inp.read(100) == b"hello"
    with pytest.raises(TransportError, match="no such file"):
        listen(f"file:{tmp_path / 'missing'}")


def test_fd_socket_is_duplex() -> None:
    a, b = socket.socketpair()
    with connect(f"fd:{a.detach()}") as s:
        assert s.duplex
        s.write(b"ping")
        assert b.recv(4) == b"ping"
    b.close()


def test_exec_runs_the_command_only_for_exec_uris(tmp_path: Path) -> None:
    f = tmp_path / "out file; $(touch pwned)"
    with connect(f"file:{f}") as out:  # shell metacharacters in a file path are just a name
        out.write(b"x")
    assert f.read_bytes() == b"x" and not (Path.cwd() / "pwned").exists()
    target = tmp_path / "via-exec"
    with connect(f"exec:cat > '{target}'") as out:
        out.write(PAYLOAD)
    assert target.read_bytes() == PAYLOAD
    with listen(f"exec:cat '{target}'").accept() as inp:
        assert b"".join(inp.chunks()) == PAYLOAD
    out = connect("exec:exit 3")
    with pytest.raises(TransportError, match="status 3"):
        out.close()


def test_connect_failures_name_the_uri(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        connect(f"unix:{tmp_path / 'nobody'}")
    with pytest.raises(TransportError, match="cannot create"):
        connect(f"file:{tmp_path / 'no' / 'dir'}")


def test_peer_gone_is_a_transport_error(tmp_path: Path) -> None:
    d = short_dir(tmp_path)
    lst = listen(f"unix:{d / 'g.sock'}")
    out = connect(f"unix:{d / 'g.sock'}")
    inp = lst.accept(timeout=5)
    inp.abort()
    with pytest.raises(TransportError, match="closed the connection|cannot write"):
        for _ in range(100):
            out.write(bytes(1 << 16))
    out.abort()
    lst.close()


def test_accept_can_be_cancelled() -> None:
    lst = listen("tcp::0")
    with pytest.raises(TransportError, match="stopped waiting"):
        lst.accept(cancelled=lambda: True)
    with pytest.raises(TransportError, match="no sender"):
        lst.accept(timeout=0.2)
    lst.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return {"cert": str(cert), "key": str(key)}


def test_tls_stream_with_certificates(certs: dict[str, str]) -> None:
    server = TlsOptions(cert=certs["cert"], key=certs["key"])
    lst = listen(parse_uri("tls::0", server))
    port = lst.sock.getsockname()[1]  # type: ignore[union-attr]
    got: list[bytes] = []

    def receive() -> None:
        s = lst.accept(timeout=10)
        got.append(s.read_exact(len(PAYLOAD)))
        s.write(b"ack")
        s.close()

    t = threading.Thread(target=receive)
    t.start()
    out = connect(f"tls:127.0.0.1:{port}?ca={certs['cert']}")
    out.write_chunks([PAYLOAD])
    assert out.read_exact(3) == b"ack"  # duplex: the return path works over TLS
    out.close()
    t.join(10)
    lst.close()
    assert got[0] == PAYLOAD


def test_tls_refuses_an_unknown_server(certs: dict[str, str]) -> None:
    lst = listen(parse_uri("tls::0", TlsOptions(cert=certs["cert"], key=certs["key"])))
    port = lst.sock.getsockname()[1]  # type: ignore[union-attr]
    t = threading.Thread(target=lambda: pytest.raises(TransportError, lst.accept, timeout=5))
    t.start()
    with pytest.raises(TransportError, match="TLS handshake failed"):
        connect(f"tls:127.0.0.1:{port}")  # the system store does not know our self-signed certificate
    t.join(10)
    lst.close()
    with pytest.raises(TransportError, match="needs a certificate"):
        listen("tls::0")
