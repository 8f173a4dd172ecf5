"""The proxy carries what production migrations use: the return path, multifd, xbzrle, compress, switchover-ack.

Real QEMUs and a running counting guest each time, across machine types
(and QEMU releases), through one proxy and through two proxies with ferry
between them:

* ``return-path`` on both QEMUs: the destination's SHUT comes back through
  the proxies and the source completes only then; a destination that
  fails to load makes the source fail as it does direct;
* ``multifd`` with 4 channels (none, zlib and zstd): the proxy tells the
  channels apart by their first bytes, checks every packet header and
  splices the pages;
* xbzrle and compress (QEMU 7.2) and switchover-ack (QEMU 10.0) pass;
* a proxy killed mid-migration with multifd, and a corrupt multifd packet
  or channel magic: every channel closes, the source runs on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_proxy import _check_continued, sockdir  # noqa: F401  (the fixture)

from vmferry.encode import multifd
from vmferry.live.proxy import Proxy
from vmferry.live.qemu.process import QemuVM

pytestmark = pytest.mark.qemu

UNLIMITED = {"max-bandwidth": 10 << 30}
E1000 = ("-device", "e1000")


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


#: TCG and KVM: fleets run KVM guests, whose CPU state (kvmclock, MSRs, xsave) TCG does not have.
ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.skipif(not _kvm_usable(), reason="no usable /dev/kvm"))]


def _vm(machine: str, qemu: str, args: tuple[str, ...], workdir: Path, accel: str = "tcg", **kw: Any) -> QemuVM:
    # Under KVM the counting guest boots from a disk: the in-kernel interrupt controller of the nested KVM here
    # can lose the floppy's interrupt SeaBIOS waits for (it then finds no boot device).
    return QemuVM(machine, args, boot_sector=True, boot_disk=accel == "kvm", workdir=workdir,
                  qemu_version=None if qemu == "7.2" else qemu, accel=accel, **kw)


def _route(sockdir: Path, machine: str | None, wire: str) -> tuple[list[Proxy], str, Path]:
    """The proxies (destination side last), the URI the source migrates to, the destination's socket."""
    dst_sock = sockdir / "dst.sock"
    listen = f"unix:{sockdir / 'proxy.sock'}"
    if wire == "legacy":
        return [Proxy(listen, f"unix:{dst_sock}", machine=machine, accept_timeout=120)], listen, dst_sock
    near_dst = Proxy("tcp:127.0.0.1:0", f"unix:{dst_sock}", machine=machine, accept_timeout=120).bind()
    return [Proxy(listen, near_dst.uri, wire="ferry", accept_timeout=120), near_dst], listen, dst_sock


def _migrate(tmp_path: Path, sockdir: Path, a: str, qa: str, b: str, qb: str, args: tuple[str, ...],
             caps: dict[str, bool], params: dict[str, Any], wire: str = "legacy",
             source_args: tuple[str, ...] = (), accel: str = "tcg") -> list[Proxy]:
    proxies, listen, dst_sock = _route(sockdir, b, wire)
    with _vm(a, qa, args + source_args, tmp_path / "src", accel, paused=False, name="source") as src, \
            _vm(b, qb, args, tmp_path / "dst", accel, incoming=True, paused=False, name="destination") as dst:
        dst.set_caps(caps)
        dst.set_params({k: v for k, v in params.items() if k.startswith("multifd")})
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        for p in reversed(proxies):
            p.start()
        src.wait_for_count(5, timeout=60)
        src.set_caps(caps)
        src.set_params({**UNLIMITED, **params})
        src.migrate(listen)
        src.wait_migration(timeout=180)
        assert src.status() == "postmigrate"
        for p in proxies:
            stats = p.join(60)
            assert stats.error is None and stats.done, stats
        _check_continued(src.serial_text(), dst)
    return proxies


WIRES = ["legacy", "ferry"]


PAIRS = [("pc-i440fx-2.12", "7.2", E1000),
         pytest.param("pc-i440fx-10.0", "10.0", (), marks=pytest.mark.qemu10)]


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize(("a", "qa", "args"), PAIRS)
def test_the_return_path_crosses_the_proxies(tmp_path: Path, sockdir: Path, a: str, qa: str, args: tuple[str, ...],
                                             wire: str, accel: str) -> None:
    proxies = _migrate(tmp_path, sockdir, a, qa, "pc-i440fx-7.2", "7.2", args, {"return-path": True}, {}, wire,
                       accel=accel)
    for p in proxies:
        main = p.stats.channels[0]
        assert main.kind.startswith("main")
        # PING(1) after OPEN_RETURN_PATH is answered, and SHUT(0) says the destination loaded the stream
        assert main.messages.get("PONG", 0) >= 1 and main.messages.get("SHUT") == 1, main.messages
        assert p.stats.destination_status == 0


MULTIFD = [("none", "legacy"), ("zlib", "legacy"), ("zstd", "legacy"), ("zstd", "ferry")]


@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize(("compression", "wire"), MULTIFD, ids=[f"{c}-{w}" for c, w in MULTIFD])
def test_multifd_channels_cross_the_proxies(tmp_path: Path, sockdir: Path, compression: str, wire: str,
                                            accel: str) -> None:
    proxies = _migrate(tmp_path, sockdir, "pc-i440fx-2.12", "7.2", "pc-i440fx-7.2", "7.2", E1000,
                       {"multifd": True}, {"multifd-channels": 4, "multifd-compression": compression}, wire,
                       accel=accel)
    for p in proxies:
        kinds = [c.kind for c in p.stats.channels]
        assert kinds[0].startswith("main") and kinds.count("multifd") == 4, kinds
        carried = [c for c in p.stats.channels if c.kind == "multifd"]
        assert all(c.packets > 0 and c.done for c in carried)
        assert sum(c.pages for c in carried) > 0
    near = proxies[-1]
    if compression == "none":  # the pages went socket to socket
        assert sum(c.spliced for c in near.stats.channels if c.kind == "multifd") > 0


@pytest.mark.qemu10
@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("wire", WIRES)
def test_multifd_from_qemu_10_to_qemu_7_2(tmp_path: Path, sockdir: Path, wire: str, accel: str) -> None:
    # QEMU 7.2 syncs the multifd channels at the end of every RAM section and reads no zero pages from them:
    # a 10.0 source of a 10.0 machine type is told to do the same (the flag is a -global of the migration
    # object, fixed at start; zero-page-detection a parameter).
    proxies = _migrate(tmp_path, sockdir, "pc-i440fx-10.0", "10.0", "pc-i440fx-7.2", "7.2", (),
                       {"multifd": True}, {"multifd-channels": 4, "zero-page-detection": "legacy"}, wire,
                       source_args=("-global", "migration.multifd-flush-after-each-section=on"), accel=accel)
    assert [c.kind for c in proxies[0].stats.channels].count("multifd") == 4


@pytest.mark.parametrize("wire", WIRES)
def test_xbzrle_and_compress_cross_the_proxies(tmp_path: Path, sockdir: Path, wire: str) -> None:
    _migrate(tmp_path, sockdir, "pc-i440fx-2.12", "7.2", "pc-i440fx-7.2", "7.2", E1000,
             {"xbzrle": True, "return-path": True}, {}, wire)
    _migrate(tmp_path / "2", sockdir, "pc-i440fx-2.12", "7.2", "pc-i440fx-7.2", "7.2", E1000,
             {"compress": True}, {}, wire)


@pytest.mark.qemu10
@pytest.mark.parametrize("wire", WIRES)
def test_switchover_ack_crosses_the_proxies(tmp_path: Path, sockdir: Path, wire: str) -> None:
    proxies = _migrate(tmp_path, sockdir, "pc-i440fx-9.2", "10.0", "pc-i440fx-10.0", "10.0", E1000,
                       {"return-path": True, "switchover-ack": True}, {}, wire)
    assert all(p.stats.channels[0].messages.get("SWITCHOVER_ACK") == 1 for p in proxies)


def test_a_destination_failure_reaches_the_source_as_direct(tmp_path: Path, sockdir: Path) -> None:
    """The destination lacks a device the source has: it fails to load, and the source's migration fails."""
    (proxy,), listen, dst_sock = _route(sockdir, None, "legacy")
    with _vm("pc-i440fx-7.2", "7.2", ("-device", "i6300esb"), tmp_path / "src", paused=False,
             name="source") as src, \
            _vm("pc-i440fx-7.2", "7.2", (), tmp_path / "dst", incoming=True, paused=False,
                name="destination") as dst:
        dst.set_caps({"return-path": True})
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        proxy.start()
        src.wait_for_count(3, timeout=60)
        src.set_caps({"return-path": True})
        src.set_params(UNLIMITED)
        src.migrate(listen)
        status = _final_status(src)
        assert status == "failed"
        proxy.join(30)
        assert src.status() == "running"
        before = src.counts()[-1]
        src.wait_for_count(before + 3, timeout=30)


def _final_status(vm: QemuVM, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := vm.query_migrate().get("status")) not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return str(status)


def test_a_killed_proxy_with_multifd_leaves_the_source_running(tmp_path: Path, sockdir: Path) -> None:
    listen, dst_sock = sockdir / "proxy.sock", sockdir / "dst.sock"
    caps, params = {"multifd": True}, {"multifd-channels": 4}
    with _vm("pc-i440fx-2.12", "7.2", E1000, tmp_path / "src", paused=False, name="source") as src, \
            _vm("pc-i440fx-7.2", "7.2", E1000, tmp_path / "dst", incoming=True, paused=False,
                name="destination") as dst:
        dst.set_caps(caps)
        dst.set_params(params)
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        proc = subprocess.Popen([sys.executable, "-m", "vmferry.cli", "proxy", "--listen", f"unix:{listen}",
                                 "--forward", f"unix:{dst_sock}", "--machine", "pc-i440fx-7.2", "-q"])
        try:
            _wait_for(listen)
            src.set_caps(caps)
            src.wait_for_count(3, timeout=60)
            src.set_params({"max-bandwidth": 65536, **params})  # ~0.8 MB to send: caught mid-way
            src.migrate(f"unix:{listen}")
            _wait_for_bytes(src, 100_000)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
        assert _final_status(src) == "failed"
        assert src.status() == "running"
        before = src.counts()[-1]
        src.wait_for_count(before + 3, timeout=30)


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _wait_for_bytes(vm: QemuVM, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while vm.query_migrate().get("ram", {}).get("transferred", 0) < n:
        assert time.monotonic() < deadline, vm.query_migrate()
        time.sleep(0.02)


class _Tamper:
    """A relay between the source and the proxy that corrupts one byte of one multifd channel's stream."""

    def __init__(self, listen: Path, forward: Path, at: int, xor: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(listen))
        self.sock.listen(16)
        self.forward, self.at, self.xor = forward, at, xor
        self.tampered = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_UNIX)
            try:
                b.connect(str(self.forward))
            except OSError:  # the proxy has closed every channel already
                a.close()
                b.close()
                continue
            threading.Thread(target=self._pump, args=(a, b, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, forward: bool) -> None:
        seen = 0
        is_multifd = None
        try:
            while data := a.recv(65536):
                if forward and is_multifd is None:
                    is_multifd = multifd.is_multifd(data[:4])
                if forward and is_multifd and not self.tampered and seen <= self.at < seen + len(data):
                    buf = bytearray(data)
                    buf[self.at - seen] ^= self.xor
                    data, self.tampered = bytes(buf), True
                seen += len(data)
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


CORRUPTIONS = [("channel magic", 0, 0xFF), ("packet header", multifd.INIT_SIZE + 8, 0x80)]


@pytest.mark.parametrize(("what", "at", "xor"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupt_multifd_channel_closes_every_channel(tmp_path: Path, sockdir: Path, what: str, at: int,
                                                       xor: int) -> None:
    tamper_sock, dst_sock = sockdir / "tamper.sock", sockdir / "dst.sock"
    proxy = Proxy(f"unix:{sockdir / 'proxy.sock'}", f"unix:{dst_sock}", accept_timeout=60)
    caps, params = {"multifd": True}, {"multifd-channels": 4}
    with _vm("pc-i440fx-7.2", "7.2", (), tmp_path / "src", paused=False, name="source") as src, \
            _vm("pc-i440fx-7.2", "7.2", (), tmp_path / "dst", incoming=True, paused=False,
                name="destination") as dst:
        dst.set_caps(caps)
        dst.set_params(params)
        dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}")
        proxy.start()
        tamper = _Tamper(tamper_sock, sockdir / "proxy.sock", at, xor)
        try:
            src.wait_for_count(3, timeout=60)
            src.set_caps(caps)
            # ~0.8 MB to send, as in the killed-proxy test: the corrupt packet comes mid-precopy.  Unlimited, this
            # small guest's source could finish writing before a loaded machine's proxy read the corrupt bytes.
            src.set_params({"max-bandwidth": 65536, **params})
            src.migrate(f"unix:{tamper_sock}")
            assert _final_status(src) == "failed"
        finally:
            tamper.close()
        stats = proxy.join(30)
        assert tamper.tampered
        assert stats.error is not None and "multifd" in stats.error and "offset" in stats.error, stats.error
        assert "\n" not in stats.error
        assert all(c.done is False for c in stats.channels if c.error)
        assert src.status() == "running"
        before = src.counts()[-1]
        src.wait_for_count(before + 3, timeout=30)
