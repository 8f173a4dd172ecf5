"""Byte streams named by QEMU-style URIs: file, exec, fd, unix, tcp and tls.

:func:`parse_uri` turns a URI into an :class:`Address`; :func:`connect`
opens the sending end of a stream and :func:`listen` the receiving end
(:meth:`Listener.accept` waits for the peer).  What comes out is a
:class:`ByteStream`: ``write``/``read``/``chunks`` and a half-close, the same
whatever carries the bytes, so a codec never knows its transport.

URIs (QEMU's forms, spec §7.1, plus ``file:`` and ``tls:``):

* ``file:PATH``: the sender writes the file, the receiver reads it;
* ``exec:COMMAND``: run ``/bin/sh -c COMMAND``; the sender writes its
  standard input, the receiver reads its standard output.  This is the only
  place vmferry runs shell text, and only when the URI says ``exec:``;
* ``fd:N``: an already open file descriptor (a socket gets a return path);
* ``unix:PATH``: a unix stream socket; the receiver creates it with mode 0600;
* ``tcp:HOST:PORT`` (``tcp:[::1]:PORT``; an empty host means 127.0.0.1, so a
  listener binds to loopback unless the URI names another address);
* ``tls:HOST:PORT``: TCP wrapped in TLS by Python's :mod:`ssl`; certificates
  come from :class:`TlsOptions` or the URI's query
  (``tls:HOST:PORT?cert=FILE&key=FILE&ca=FILE&hostname=NAME``).

Socket streams are *duplex*: the receiver can answer on them (the return
path of :mod:`vmferry.live.handshake`).  Every failure raises
:class:`~vmferry.errors.TransportError` naming the URI.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import stat
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs

from ..errors import TransportError

SCHEMES = ("file", "exec", "fd", "unix", "tcp", "tls")
SOCKET_SCHEMES = ("unix", "tcp", "tls")
LOOPBACK = "127.0.0.1"
CHUNK = 1 << 20
SEND_BATCH = 1 << 20
#: Connections a listener queues: a migration opens one per multifd channel at once.
BACKLOG = 16


@dataclass(frozen=True)
class TlsOptions:
    """Certificates for ``tls:``.

    A listener needs ``cert`` and ``key``; with ``ca`` it also requires and
    checks a client certificate.  A connecting side checks the server against
    ``ca`` (the system's store when None) and ``hostname`` (default: the URI's
    host); ``verify=False`` turns checking off and must be asked for.
    """

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    hostname: str | None = None
    verify: bool = True

    def server_context(self) -> ssl.SSLContext:
        if not self.cert:
            raise TransportError("a tls: listener needs a certificate and its key (--tls-cert, --tls-key)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca:
                ctx.load_verify_locations(self.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"tls: cannot load certificates: {e}") from None
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if not self.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif self.ca:
                ctx.load_verify_locations(self.ca)
            else:
                ctx.load_default_certs()
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"tls: cannot load certificates: {e}") from None
        return ctx


@dataclass(frozen=True)
class Address:
    """A parsed transport URI."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0
    command: str = ""
    fd: int = -1
    tls: TlsOptions | None = None

    @property
    def is_socket(self) -> bool:
        return self.scheme in SOCKET_SCHEMES

    @property
    def bind_host(self) -> str:
        return self.host or LOOPBACK

    def __str__(self) -> str:
        if self.scheme in ("file", "unix"):
            return f"{self.scheme}:{self.path}"
        if self.scheme == "exec":
            return f"exec:{self.command}"
        if self.scheme == "fd":
            return f"fd:{self.fd}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}:{host}:{self.port}"


def parse_uri(uri: str, tls: TlsOptions | None = None) -> Address:
    """Parse a transport URI; :class:`TransportError` says what is wrong with it."""
    if not isinstance(uri, str) or ":" not in uri:
        raise TransportError(f"bad URI {uri!r}: expected SCHEME:..., one of {', '.join(SCHEMES)}")
    scheme, _, rest = uri.partition(":")
    if scheme not in SCHEMES:
        raise TransportError(f"bad URI {uri!r}: unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if scheme == "exec":
        if not rest.strip():
            raise TransportError("bad URI 'exec:': no command")
        return Address("exec", command=rest)
    if scheme in ("file", "unix"):
        if not rest:
            raise TransportError(f"bad URI {uri!r}: no path")
        if "\0" in rest:
            raise TransportError(f"bad URI {uri!r}: NUL in path")
        return Address(scheme, path=rest)
    if scheme == "fd":
        if not rest.isdigit():
            raise TransportError(f"bad URI {uri!r}: fd: takes a file descriptor number")
        return Address("fd", fd=int(rest))
    query = ""
    if scheme == "tls" and "?" in rest:
        rest, _, query = rest.partition("?")
    host, port = _host_port(uri, rest)
    if scheme != "tls":
        return Address(scheme, host=host, port=port)
    opts = tls or TlsOptions()
    if query:
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = set(q) - {"cert", "key", "ca", "hostname", "verify"}
        if unknown:
            raise TransportError(f"bad URI {uri!r}: unknown tls option(s) {', '.join(sorted(unknown))}")
        verify = opts.verify
        if "verify" in q:
            if q["verify"] not in ("yes", "no", "on", "off", "1", "0"):
                raise TransportError(f"bad URI {uri!r}: verify= takes yes or no")
            verify = q["verify"] in ("yes", "on", "1")
        opts = replace(opts, cert=q.get("cert", opts.cert), key=q.get("key", opts.key), ca=q.get("ca", opts.ca),
                       hostname=q.get("hostname", opts.hostname), verify=verify)
    return Address("tls", host=host, port=port, tls=opts)


def _host_port(uri: str, rest: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise TransportError(f"bad URI {uri!r}: expected [IPV6]:PORT")
        port_text = tail[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise TransportError(f"bad URI {uri!r}: expected HOST:PORT")
        if ":" in host:
            raise TransportError(f"bad URI {uri!r}: write an IPv6 address in brackets, [::1]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise TransportError(f"bad URI {uri!r}: port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host in ("", "localhost"):
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------


class ByteStream:
    """One end of a byte stream.  Subclasses implement the ``_`` methods."""

    duplex = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.bytes_written = 0
        self.bytes_read = 0

    # -- writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._write(data)
        except OSError as e:
            raise self.error("write to", e) from None
        self.bytes_written += len(data)

    def writev(self, parts: list[Any]) -> None:
        """Write several buffers at once (one system call where the transport allows)."""
        try:
            self._writev(parts)
        except OSError as e:
            raise self.error("write to", e) from None
        self.bytes_written += sum(len(p) for p in parts)

    def write_chunks(self, chunks: Iterable[bytes | bytearray | memoryview], batch: int = SEND_BATCH) -> None:
        """Write an iterable of chunks, gathering small ones into batches of about ``batch`` bytes.

        An empty chunk writes what is gathered at once (the encoders' sign that their input paused).
        """
        parts: list[Any] = []
        size = 0
        for chunk in chunks:
            if not chunk:
                if parts:
                    self.writev(parts)
                    parts, size = [], 0
                continue
            parts.append(chunk)
            size += len(chunk)
            if size >= batch or len(parts) >= 256:
                self.writev(parts)
                parts, size = [], 0
        if parts:
            self.writev(parts)

    # -- reading
    def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end of the stream."""
        try:
            data = self._read(n)
        except OSError as e:
            raise self.error("read from", e) from None
        self.bytes_read += len(data)
        return data

    def read_exact(self, n: int, what: str = "data") -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data = self.read(n - len(buf))
            if not data:
                raise TransportError(f"{self.name}: the stream ended while reading {what} "
                                     f"({len(buf)} of {n} bytes)")
            buf += data
        return bytes(buf)

    def read_into_exact(self, view: memoryview, what: str = "data") -> None:
        got = 0
        while got < len(view):
            try:
                n = self._read_into(view[got:])
            except OSError as e:
                raise self.error("read from", e) from None
            if not n:
                raise TransportError(f"{self.name}: the stream ended while reading {what} "
                                     f"({got} of {len(view)} bytes)")
            got += n
        self.bytes_read += got

    def chunks(self, size: int = CHUNK, idle_markers: bool = False) -> Iterator[bytes]:
        """The rest of the stream in chunks of at most ``size`` bytes.

        With ``idle_markers``, an empty chunk comes before each read that would wait for the peer: the sign
        for a decoder (and the writers after it) that nothing more is ready now (see vmferry.events.Flush).
        """
        while True:
            if idle_markers and not self.ready():
                yield b""
            data = self.read(size)
            if not data:
                return
            yield data

    def ready(self) -> bool:
        """Whether a read would return at once (data or the end); True where that cannot be told."""
        return True

    # -- closing
    def close_write(self) -> None:
        """Say that nothing more will be written (the peer reads an end of stream)."""

    def close(self) -> None:
        """Close; raises TransportError when the far end reports a failure (an exec: command's status)."""
        self.closed = True

    def abort(self) -> None:
        """Close at once, ignoring errors (cancellation, failure)."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - aborting must not fail
            pass

    def set_timeout(self, seconds: float | None) -> None:
        """Bound each blocking read and write (sockets only)."""

    # -- for subclasses
    def _write(self, data: Any) -> None:
        raise NotImplementedError

    def _writev(self, parts: list[Any]) -> None:
        for p in parts:
            self._write(p)

    def _read(self, n: int) -> bytes:
        raise NotImplementedError

    def _read_into(self, view: memoryview) -> int:
        data = self._read(len(view))
        view[:len(data)] = data
        return len(data)

    def error(self, doing: str, e: OSError) -> TransportError:
        """The TransportError to raise for ``e``, met while ``doing`` this stream (e.g. "read from")."""
        if isinstance(e, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)) or \
                e.errno in (errno.EPIPE, errno.ECONNRESET):
            return TransportError(f"{self.name}: the peer closed the connection ({e.strerror or e})")
        if isinstance(e, TimeoutError) or isinstance(e, socket.timeout):
            return TransportError(f"{self.name}: timed out while trying to {doing.split()[0]}")
        return TransportError(f"{self.name}: cannot {doing} it: {e.strerror or e}")

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort() if exc[0] is not None else self.close()


class SocketStream(ByteStream):
    duplex = True

    def __init__(self, sock: socket.socket, name: str) -> None:
        super().__init__(name)
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)

    def _write(self, data: Any) -> None:
        self.sock.sendall(data)

    def _writev(self, parts: list[Any]) -> None:
        if self._tls:
            self.sock.sendall(b"".join(parts))
            return
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            sent = self.sock.sendmsg(views[:512])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def _read(self, n: int) -> bytes:
        return self.sock.recv(n)

    def _read_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def ready(self) -> bool:
        if self._tls and self.sock.pending():  # type: ignore[attr-defined]
            return True
        poll = select.poll()
        try:
            poll.register(self.sock, select.POLLIN)
            return bool(poll.poll(0))
        except (OSError, ValueError):
            return True

    def close_write(self) -> None:
        try:
            if self._tls:
                return  # TLS has no half-close; the return-path protocol says where the stream ends
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return  # the peer has gone already: there is nobody left to tell
            raise self.error("close", e) from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def abort(self) -> None:
        if not self.closed:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close()


class FileStream(ByteStream):
    """A file, a pipe or a non-socket file descriptor, in one direction."""

    def __init__(self, f: Any, name: str) -> None:
        super().__init__(name)
        self.f = f

    def _write(self, data: Any) -> None:
        self.f.write(data)

    def _read(self, n: int) -> bytes:
        return self.f.read(n) or b""

    def _read_into(self, view: memoryview) -> int:
        return self.f.readinto(view) or 0

    def close_write(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            raise self.error("write to", e) from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.f.close()
            except OSError as e:
                raise self.error("close", e) from None


class ExecStream(FileStream):
    """``exec:``: the command's stdin (sending) or stdout (receiving)."""

    def __init__(self, proc: subprocess.Popen[bytes], f: Any, name: str) -> None:
        super().__init__(f, name)
        self.proc = proc

    def close_write(self) -> None:
        super().close_write()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError as e:
                raise self.error("close", e) from None

    def close(self, timeout: float = 60.0) -> None:
        if self.closed:
            return
        try:
            super().close()
        finally:
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise TransportError(f"{self.name}: the command did not exit within {timeout} s") from None
        if rc != 0:
            raise TransportError(f"{self.name}: the command exited with status {rc}")

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            super().close()
        except Exception:  # noqa: BLE001
            pass
        self.proc.wait()


def _spawn(cmd: str, sending: bool) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(["/bin/sh", "-c", cmd], stdin=subprocess.PIPE if sending else subprocess.DEVNULL,
                                stdout=None if sending else subprocess.PIPE, bufsize=0, start_new_session=True)
    except OSError as e:
        raise TransportError(f"exec:{cmd}: cannot start: {e.strerror or e}") from None


SEND_BUFFER = 4 << 20


def _widen_send_buffer(sock: socket.socket) -> None:
    """A unix socket's sender alone bounds what is in flight: let a stream run ahead by a few MiB, as far as the
    system allows (``net.core.wmem_max``), so that the two ends need fewer switches between them."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


def _tcp_connect(addr: Address, timeout: float) -> socket.socket:
    host = addr.bind_host
    try:
        sock = socket.create_connection((host, addr.port), timeout=timeout)
    except OSError as e:
        raise TransportError(f"{addr}: cannot connect: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(addr: Address | str, timeout: float = 30.0) -> ByteStream:
    """Open the sending end of ``addr``: connect, create the file, or start the command."""
    if isinstance(addr, str):
        addr = parse_uri(addr)
    name = str(addr)
    if addr.scheme == "file":
        try:
            return FileStream(open(addr.path, "wb"), name)  # noqa: SIM115 - owned by the stream
        except OSError as e:
            raise TransportError(f"{name}: cannot create: {e.strerror or e}") from None
    if addr.scheme == "exec":
        proc = _spawn(addr.command, sending=True)
        return ExecStream(proc, proc.stdin, name)
    if addr.scheme == "fd":
        return _fd_stream(addr, "wb")
    if addr.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _widen_send_buffer(sock)
        sock.settimeout(timeout)
        try:
            sock.connect(addr.path)
        except OSError as e:
            sock.close()
            raise TransportError(f"{name}: cannot connect: {e.strerror or e}") from None
        sock.settimeout(None)
        return SocketStream(sock, name)
    sock = _tcp_connect(addr, timeout)
    if addr.scheme == "tcp":
        sock.settimeout(None)
        return SocketStream(sock, name)
    opts = addr.tls or TlsOptions()
    try:
        tls_sock = opts.client_context().wrap_socket(sock, server_hostname=opts.hostname or addr.bind_host)
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise TransportError(f"{name}: TLS handshake failed: {e}") from None
    tls_sock.settimeout(None)
    return SocketStream(tls_sock, name)


def _fd_stream(addr: Address, mode: str) -> ByteStream:
    name = str(addr)
    try:
        st = os.fstat(addr.fd)
    except OSError as e:
        raise TransportError(f"{name}: {e.strerror or e}") from None
    if stat.S_ISSOCK(st.st_mode):
        return SocketStream(socket.socket(fileno=addr.fd), name)
    try:
        return FileStream(os.fdopen(addr.fd, mode, buffering=0), name)
    except OSError as e:
        raise TransportError(f"{name}: {e.strerror or e}") from None


class Listener:
    """The receiving end before the peer arrives (``-incoming``): bound at once, accepted later."""

    def __init__(self, addr: Address, sock: socket.socket | None = None) -> None:
        self.addr = addr
        self.sock = sock
        self.closed = False

    @property
    def uri(self) -> str:
        """The address peers connect to (with the real port when 0 was asked for)."""
        if self.sock is not None and self.addr.scheme in ("tcp", "tls"):
            host, port = self.sock.getsockname()[:2]
            return str(replace(self.addr, host=self.addr.host or host, port=port))
        return str(self.addr)

    def accept(self, timeout: float | None = None, cancelled: Callable[[], bool] | None = None) -> ByteStream:
        """Wait for the sender; ``cancelled()`` is polled so that a waiting listener can be stopped."""
        addr = self.addr
        name = str(addr)
        if addr.scheme == "file":
            try:
                return FileStream(open(addr.path, "rb"), name)  # noqa: SIM115
            except OSError as e:
                raise TransportError(f"{name}: cannot open: {e.strerror or e}") from None
        if addr.scheme == "exec":
            proc = _spawn(addr.command, sending=False)
            return ExecStream(proc, proc.stdout, name)
        if addr.scheme == "fd":
            return _fd_stream(addr, "rb")
        assert self.sock is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        self.sock.settimeout(0.1)
        while True:
            if self.closed or (cancelled is not None and cancelled()):
                raise TransportError(f"{name}: stopped waiting for the sender")
            try:
                conn, peer = self.sock.accept()
                break
            except (socket.timeout, TimeoutError):
                if deadline is not None and time.monotonic() > deadline:
                    raise TransportError(f"{name}: no sender connected within {timeout} s") from None
            except OSError as e:
                raise TransportError(f"{name}: accept failed: {e.strerror or e}") from None
        conn.settimeout(None)
        if addr.scheme == "tcp":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if addr.scheme == "tls":
            opts = addr.tls or TlsOptions()
            try:
                conn.settimeout(30)
                conn = opts.server_context().wrap_socket(conn, server_side=True)
                conn.settimeout(None)
            except (OSError, ssl.SSLError) as e:
                conn.close()
                raise TransportError(f"{name}: TLS handshake failed: {e}") from None
        return SocketStream(conn, name)

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            if self.addr.scheme == "unix":
                try:
                    os.unlink(self.addr.path)
                except OSError:
                    pass
            self.sock = None


def listen(addr: Address | str) -> Listener:
    """Prepare the receiving end: bind a socket now (unix: mode 0600; tcp: loopback unless named)."""
    if isinstance(addr, str):
        addr = parse_uri(addr)
    name = str(addr)
    if addr.scheme in ("file", "exec", "fd"):
        if addr.scheme == "file" and not os.path.exists(addr.path):
            raise TransportError(f"{name}: no such file")
        return Listener(addr)
    if addr.scheme == "unix":
        return Listener(addr, bind_unix(addr.path))
    if addr.scheme == "tls":
        (addr.tls or TlsOptions()).server_context()  # refuse missing certificates before anyone connects
    try:
        infos = socket.getaddrinfo(addr.bind_host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as e:
        raise TransportError(f"{name}: cannot listen: {e.strerror or e}") from None
    return Listener(addr, sock)


def bind_unix(path: str, backlog: int = BACKLOG) -> socket.socket:
    """A listening unix socket at ``path`` that only its owner can use (0600), replacing a stale socket.

    The mode is set between bind and listen, so nobody can connect before it is.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise TransportError(f"unix:{path}: {e.strerror or e}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise TransportError(f"unix:{path}: exists and is not a socket; refusing to replace it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise TransportError(f"unix:{path}: cannot listen: {e.strerror or e}") from None
    finally:
        os.umask(old)
    try:
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise TransportError(f"unix:{path}: cannot listen: {e.strerror or e}") from None
    return sock


__all__ = ["Address", "ByteStream", "ExecStream", "FileStream", "Listener", "SocketStream", "TlsOptions",
           "bind_unix", "connect", "is_loopback", "listen", "parse_uri"]
