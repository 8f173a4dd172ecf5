"""``vmferry proxy``: live migration of a running guest between real QEMUs through the transcoder.

* QEMU -> proxy -> QEMU under the same machine type;
* pc-i440fx-2.12 -> pc-i440fx-7.2 and pc-q35-2.12 -> pc-q35-6.2 with an e1000, the proxy converting
  the device state;
* QEMU -> proxy (ferry on the wire) -> proxy -> QEMU;
* a proxy killed mid-migration: the source's migration fails and its guest keeps counting.

In each the guest's count goes on on the destination from where it stopped on the source.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from test_transport import certs  # noqa: F401  (the fixture)

from vmferry.cli import main
from vmferry.live.proxy import Proxy, ProxyError, ProxyStats
from vmferry.live.qemu.guest import parse_counts
from vmferry.live.qemu.process import QemuVM
from vmferry.live.transport import TlsOptions

UNLIMITED = {"max-bandwidth": 10 << 30}  # QEMU 7.2 defaults to 32 MiB/s


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vmf-proxy-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _wait_running(vm: QemuVM, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (state := vm.status()) != "running":
        assert state in ("inmigrate", "paused", "prelaunch", "postmigrate", "finish-migrate"), state
        assert time.monotonic() < deadline, f"destination still {state!r}"
        time.sleep(0.05)


def _check_continued(src_text: str, dst: QemuVM) -> None:
    before = parse_counts(src_text)
    assert before and before[-1] >= 5
    _wait_running(dst)
    dst.wait_for_count(before[-1] + 5, timeout=60)
    dst_text = dst.serial_text()
    assert not dst_text.startswith("1\r\n"), "the counter restarted"
    combined = parse_counts(src_text + dst_text)
    assert combined == list(range(1, len(combined) + 1)), combined[-40:]
    assert combined[-1] > before[-1] + 4


def _live(tmp_path: Path, sockdir: Path, src_machine: str, dst_machine: str, args: tuple[str, ...],
          proxies: list[Proxy], listen: str, dst_sock: Path) -> None:
    with QemuVM(src_machine, args, boot_sector=True, paused=False, name="source", workdir=tmp_path / "src") as src, \
            QemuVM(dst_machine, args, incoming=True, paused=False, boot_sector=True, name="destination",
                   workdir=tmp_path / "dst") as dst:
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        for p in reversed(proxies):
            p.start()
        src.wait_for_count(5, timeout=60)
        src.set_params(UNLIMITED)
        src.migrate(listen)
        src.wait_migration(timeout=120)
        assert src.status() == "postmigrate"
        for p in proxies:
            stats = p.join(60)
            assert stats.error is None and stats.done, stats
        _check_continued(src.serial_text(), dst)


@pytest.mark.qemu
def test_live_migration_through_the_proxy(tmp_path: Path, sockdir: Path) -> None:
    dst_sock = sockdir / "dst.sock"
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{dst_sock}", accept_timeout=120)
    _live(tmp_path, sockdir, "pc-i440fx-7.2", "pc-i440fx-7.2", (), [proxy], f"unix:{sockdir / 'proxy.sock'}",
          dst_sock)
    assert proxy.stats.input_format == "legacy"
    assert proxy.stats.bytes_in > 100_000 and proxy.stats.bytes_out > 100_000


CROSS = [("pc-i440fx-2.12", "pc-i440fx-7.2"), ("pc-q35-2.12", "pc-q35-6.2")]


@pytest.mark.qemu
@pytest.mark.parametrize(("a", "b"), CROSS, ids=[f"{a}->{b}" for a, b in CROSS])
def test_live_migration_to_a_newer_machine_type(tmp_path: Path, sockdir: Path, a: str, b: str) -> None:
    dst_sock = sockdir / "dst.sock"
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{dst_sock}", machine=b, accept_timeout=120)
    _live(tmp_path, sockdir, a, b, ("-device", "e1000"), [proxy], f"unix:{sockdir / 'proxy.sock'}", dst_sock)


@pytest.mark.qemu
def test_live_migration_with_ferry_between_two_proxies(tmp_path: Path, sockdir: Path) -> None:
    dst_sock = sockdir / "dst.sock"
    near_dst = Proxy("tcp:127.0.0.1:0", f"unix:{dst_sock}", accept_timeout=120).bind()
    near_src = Proxy(f"unix:{sockdir / 'proxy.sock'}", near_dst.uri, wire="ferry", accept_timeout=120)
    _live(tmp_path, sockdir, "pc-i440fx-7.2", "pc-i440fx-7.2", (), [near_src, near_dst],
          f"unix:{sockdir / 'proxy.sock'}", dst_sock)
    assert near_src.stats.input_format == "legacy"
    assert near_dst.stats.input_format == "ferry"


@pytest.mark.qemu
def test_a_killed_proxy_leaves_the_source_running(tmp_path: Path, sockdir: Path) -> None:
    proxy_sock = sockdir / "proxy.sock"
    dst_sock = sockdir / "dst.sock"
    with QemuVM("pc-i440fx-7.2", boot_sector=True, paused=False, name="source", workdir=tmp_path / "src") as src, \
            QemuVM("pc-i440fx-7.2", incoming=True, paused=False, boot_sector=True, name="destination",
                   workdir=tmp_path / "dst") as dst:
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
        proc = subprocess.Popen([sys.executable, "-m", "vmferry.cli", "proxy", "--listen", f"unix:{proxy_sock}",
                                 "--forward", f"unix:{dst_sock}", "-q"], env=env)
        try:
            deadline = time.monotonic() + 30
            while not proxy_sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            src.wait_for_count(3, timeout=60)
            src.set_params({"max-bandwidth": 65536})  # ~0.8 MB to send (zero pages are small): ~12 s
            src.migrate(f"unix:{proxy_sock}")
            deadline = time.monotonic() + 30
            while src.query_migrate().get("ram", {}).get("transferred", 0) < 100_000:
                assert src.query_migrate()["status"] in ("setup", "active") and time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 30
        while (status := src.query_migrate()["status"]) not in ("failed", "cancelled", "completed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status == "failed"
        assert src.status() == "running"
        n = src.counts()[-1]
        src.wait_for_count(n + 3, timeout=30)


@pytest.mark.qemu
def test_an_aborted_proxy_fails_the_migration_cleanly(tmp_path: Path, sockdir: Path) -> None:
    """The in-process proxy's abort() (what happens when the destination fails) closes the source too."""
    dst_sock = sockdir / "dst.sock"
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{dst_sock}", accept_timeout=60)
    with QemuVM("pc-i440fx-7.2", boot_sector=True, paused=False, name="source", workdir=tmp_path / "src") as src, \
            QemuVM("pc-i440fx-7.2", incoming=True, paused=False, boot_sector=True, name="destination",
                   workdir=tmp_path / "dst") as dst:
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        proxy.start()
        src.wait_for_count(3, timeout=60)
        src.set_params({"max-bandwidth": 65536})
        src.migrate(f"unix:{sockdir / 'proxy.sock'}")
        deadline = time.monotonic() + 30
        while proxy.stats.input_format == "":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dst.kill()  # the destination goes away: the proxy's writes fail and it closes the source
        stats = proxy.join(30)
        assert stats.error and not stats.done
        deadline = time.monotonic() + 30
        while (status := src.query_migrate()["status"]) not in ("failed", "cancelled", "completed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status == "failed"
        assert src.status() == "running"
        n = src.counts()[-1]
        src.wait_for_count(n + 3, timeout=30)


def test_proxy_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ProxyError, match="unix:, tcp: or tls:"):
        Proxy("file:x", "unix:y")
    with pytest.raises(ProxyError, match="wire"):
        Proxy("unix:x", "unix:y", wire="json")
    assert main(["proxy", "--listen", "unix:x", "--forward", "tcp:127.0.0.1:1", "--machine", "pc-nonesuch-1.0"]) != 0
    assert "pc-nonesuch" in capsys.readouterr().err


# ----------------------------------------------------------------- without QEMU


def _send(uri: str, data: bytes, piece: int = 65536) -> None:
    """Send ``data`` in writes of ``piece`` bytes, then wait for the receiver to close.  A proxy that fails
    closes the connection, which is not this sender's error."""
    from vmferry.errors import TransportError
    from vmferry.live.transport import connect

    try:
        with connect(uri) as s:
            for i in range(0, len(data), piece):
                s.write(data[i:i + piece])
            s.close_write()
            while s.read(4096):
                pass
    except TransportError:
        pass


def _through_one_proxy(sockdir: Path, data: bytes, piece: int = 65536, sink_uri: str = "unix:",
                       **options: Any) -> tuple[bytes, ProxyStats]:
    """``data`` sent through one proxy (QEMU's format out) to ``sink_uri`` (default: a unix socket): what
    arrived, and the proxy's stats."""
    import threading

    from vmferry.live.transport import listen

    sink = listen(f"unix:{sockdir / 'sink.sock'}" if sink_uri == "unix:" else sink_uri)
    proxy = Proxy(f"unix:{sockdir / 'p.sock'}", sink.uri, accept_timeout=30, **options).bind()
    proxy.start()
    sender = threading.Thread(target=_send, args=(f"unix:{sockdir / 'p.sock'}", data, piece))
    sender.start()
    with sink.accept(30) as got:
        received = b"".join(got.chunks())
    sink.close()
    sender.join(30)
    return received, proxy.join(30)


@pytest.fixture(params=["tcp", "tls"])
def hop(request: pytest.FixtureRequest) -> tuple[TlsOptions | None, str]:
    """The wire between the two proxies: (the listening proxy's certificates, the query the other one connects with)."""
    if request.param == "tcp":
        return None, ""
    c = request.getfixturevalue("certs")
    return TlsOptions(cert=c["cert"], key=c["key"]), f"?ca={c['cert']}"


def test_a_built_stream_crosses_two_proxies_unchanged(sockdir: Path, hop: tuple[TlsOptions | None, str]) -> None:
    import threading

    from test_legacy_codec import build, full_stream

    from vmferry.live.transport import listen

    data = build(full_stream())
    started = time.monotonic()
    sink = listen(f"unix:{sockdir / 'sink.sock'}")
    tls, query = hop
    scheme = "tls" if tls else "tcp"
    near_dst = Proxy(f"{scheme}:127.0.0.1:0", f"unix:{sockdir / 'sink.sock'}", tls=tls, accept_timeout=30).bind()
    near_src = Proxy(f"unix:{sockdir / 'p.sock'}", near_dst.uri + query, wire="ferry", accept_timeout=30).bind()
    near_dst.start()
    near_src.start()
    sender = threading.Thread(target=_send, args=(f"unix:{sockdir / 'p.sock'}", data))
    sender.start()
    with sink.accept(30) as got:
        received = b"".join(got.chunks())
    sink.close()
    sender.join(30)
    assert near_src.join(30).done and near_dst.join(30).done
    assert received == data
    assert (near_src.stats.input_format, near_dst.stats.input_format) == ("legacy", "ferry")
    assert time.monotonic() - started < 20, "a proxy waited for an end of stream that TLS cannot send"


def test_when_the_destination_goes_away_the_source_is_closed(sockdir: Path) -> None:
    from test_legacy_codec import build, full_stream

    from vmferry.errors import TransportError
    from vmferry.live.transport import connect, listen

    data = build(full_stream())
    sink = listen(f"unix:{sockdir / 'sink.sock'}")
    proxy = Proxy(f"unix:{sockdir / 'p.sock'}", f"unix:{sockdir / 'sink.sock'}", accept_timeout=30).bind()
    proxy.start()
    src = connect(f"unix:{sockdir / 'p.sock'}")
    src.set_timeout(30)
    src.write(data[:64])  # the proxy sniffs the format and connects on
    sink.accept(30).abort()  # ... and the destination goes away
    sink.close()
    try:
        src.write(data[64:])
        src.close_write()
    except TransportError:
        pass
    stats = proxy.join(30)
    assert stats.error and not stats.done
    try:  # the proxy closed the source's connection: an end of stream or a reset, never a wait
        assert src.read(4096) == b""
    except TransportError as e:
        assert "timed out" not in str(e)
    src.abort()


def _ferry_stream() -> bytes:
    from test_legacy_codec import full_stream

    from vmferry.encode import ferry

    return b"".join(bytes(c) for c in ferry.encode(full_stream()))


@pytest.mark.parametrize("damage,message", [
    (lambda s: s[:200] + bytes([s[200] ^ 0xFF]) + s[201:], "CRC32C mismatch"),  # inside a frame
    (lambda s: s[:40] + bytes([s[40] ^ 0xFF]) + s[41:], "corrupted frame header"),  # the first frame's length
    (lambda s: s[:-40], "the stream ended while reading a ferry frame"),
    (lambda s: s[:20], "the stream ended while reading the ferry header"),
], ids=["corrupted-body", "corrupted-header", "truncated-frame", "truncated-header"])
def test_damaged_ferry_input_fails_the_proxy_with_its_reason(sockdir: Path, damage, message: str) -> None:
    """The proxy reads ferry input a frame at a time; damage anywhere still ends in one clear error."""
    received, stats = _through_one_proxy(sockdir, damage(_ferry_stream()))
    assert not stats.done and stats.error and message in stats.error, stats.error
    assert len(received) < len(_ferry_stream())  # the destination never sees a whole stream


def _paged_stream(pages: int = 600) -> bytes:
    """A QEMU stream with runs of random pages broken by zero pages and gaps, ending in a device section."""
    import json
    import random

    from test_legacy_codec import build, timer_section

    from vmferry.events import (
        SECTION_PART,
        SECTION_START,
        Eof,
        Header,
        IterBegin,
        IterEnd,
        RamBlock,
        RamEos,
        RamMemSize,
        RamPages,
        RamZeros,
        Vmdesc,
    )

    rng = random.Random(7)
    ram: list = []
    offset = 0
    while sum(r.count for r in ram) < pages:
        n = rng.randint(1, 90)
        if rng.random() < 0.2:
            ram.append(RamZeros("pc.ram", offset * 4096, n, not ram))
        else:
            ram.append(RamPages("pc.ram", offset * 4096, n, not ram, data=rng.randbytes(n * 4096)))
        offset += n + rng.choice((0, 0, 3))
    size = offset * 4096
    dev = timer_section()
    return build([Header(), IterBegin(SECTION_START, 2, "ram", 0, 4), RamMemSize(size, [RamBlock("pc.ram", size)]),
                  RamEos(), IterEnd(2, True), IterBegin(SECTION_PART, 2), *ram, RamEos(), IterEnd(2, True), dev,
                  Eof(), Vmdesc(json.dumps({"page_size": 4096, "devices": [dev.desc]}).encode())])


@pytest.mark.parametrize("write_size", [1 << 20, 4097, 61])
def test_page_runs_are_spliced_through_and_the_stream_is_unchanged(sockdir: Path, write_size: int) -> None:
    """QEMU's format in and out between unix sockets: the page runs go through a pipe (splice), whatever sizes
    the sender writes in; the output is the input, byte for byte."""
    data = _paged_stream()
    received, stats = _through_one_proxy(sockdir, data, write_size)
    assert stats.done, stats.error
    assert received == data
    assert stats.bytes_out == len(data)
    assert stats.bytes_spliced > len(data) // 2  # most of it: every page run still in the pipe


def test_page_runs_are_copied_into_a_tcp_socket(sockdir: Path) -> None:
    """Spliced into tcp, pages measured slower than copied: towards tcp the proxy copies."""
    data = _paged_stream(60)
    received, stats = _through_one_proxy(sockdir, data, sink_uri="tcp:127.0.0.1:0")
    assert stats.done, stats.error
    assert received == data
    assert stats.bytes_spliced == 0


def test_a_pipe_of_one_page_still_carries_the_stream_unchanged(sockdir: Path) -> None:
    """A pipe of one page is full after any read, so the proxy keeps nothing in it (else it would wait for room
    forever); no page record fits one read, so none is spliced: all are written from the decoded copy, and the
    output is still the input."""
    data = _paged_stream(60)
    received, stats = _through_one_proxy(sockdir, data, chunk_size=4096)
    assert stats.done, stats.error
    assert received == data
    assert stats.bytes_spliced == 0


def test_the_proxy_command_says_how_much_it_spliced(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    from cli_helpers import proxy_in_thread

    from vmferry.live.transport import listen

    data = _paged_stream(60)
    sink = listen(f"unix:{sockdir / 'sink.sock'}")
    command, result = proxy_in_thread(["--listen", f"unix:{sockdir / 'p.sock'}", "--forward",
                                       f"unix:{sockdir / 'sink.sock'}", "--timeout", "30"], sockdir / "p.sock")
    sender = threading.Thread(target=_send, args=(f"unix:{sockdir / 'p.sock'}", data))
    sender.start()
    with sink.accept(30) as got:
        received = b"".join(got.chunks())
    sink.close()
    sender.join(30)
    command.join(30)
    assert result == [0] and received == data
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"vmferry proxy: legacy in, {len(data)} bytes -> legacy out, {len(data)} bytes (")
    assert last.endswith(" of them spliced)")
