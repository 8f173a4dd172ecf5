"""vmferry.live.channels.relay_multifd over socket pairs (no QEMU needed): a channel's bytes arrive unchanged,
whatever mix of packet layouts it carries, spliced or copied (tests/test_proxy_channels.py carries real QEMU
7.2 and 10.0 channels through the proxy)."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from test_multifd_header import ram_header

from vmferry.encode import multifd
from vmferry.errors import DecodeError
from vmferry.live import channels
from vmferry.live.channels import ChannelStats, Renames, relay_multifd
from vmferry.live.transport import SocketStream

PAGE = 4096


def _init(channel: int = 1) -> bytes:
    return struct.pack(">II16sB", multifd.MAGIC, multifd.VERSION, b"u" * 16, channel).ljust(multifd.INIT_SIZE, b"\0")


def _ram(number: int, pages: int, block: bytes = b"pc.ram", sync: bool = False) -> bytes:
    """A QEMU 7.2 RAM packet of ``pages`` pages, header and payload."""
    header = ram_header([(number * 128 + k) * PAGE for k in range(pages)], pages, PAGE, number=number,
                        flags=multifd.FLAG_SYNC if sync else 0, block=block)
    return header + bytes([number % 251]) * (pages * PAGE)


def _device_state(name: bytes, payload: bytes) -> bytes:
    """A QEMU 10.0 device-state packet (VFIO): a 276-byte header, then ``payload``."""
    h = bytearray(multifd.DEVICE_STATE_HEADER)
    struct.pack_into(">III", h, 0, multifd.MAGIC, multifd.VERSION, multifd.FLAG_DEVICE_STATE)
    h[12:12 + len(name)] = name
    struct.pack_into(">II", h, 12 + 256, 0, len(payload))
    return bytes(h) + payload


def _relay(stream: bytes, renames: Renames | None = None) -> tuple[bytes, ChannelStats]:
    """``stream`` sent through relay_multifd from one socket pair to another: what came out, and the stats."""
    src_w, src_r = socket.socketpair()
    dst_w, dst_r = socket.socketpair()
    out = bytearray()

    def send() -> None:
        try:
            src_w.sendall(stream)
        except OSError:  # the relay stopped reading (a corrupt packet)
            pass
        src_w.close()

    def drain() -> None:
        while data := dst_r.recv(1 << 20):
            out.extend(data)

    threads = [threading.Thread(target=send), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    source, dest = SocketStream(src_r, "source"), SocketStream(dst_w, "destination")
    stats = ChannelStats(3, "multifd")
    try:
        relay_multifd(source.read(4), source, dest, stats, renames or Renames({}), lambda: True)
    finally:
        src_r.close()
        dst_w.close()
        for t in threads:
            t.join()
        dst_r.close()
    return bytes(out), stats


MIXED = [_ram(0, 128), _device_state(b"0000:00:04.0/vfio", b"tiny"), _device_state(b"dev/b", b""),
         _ram(1, 5), _device_state(b"dev/c", os.urandom(3000)), _ram(2, 0, sync=True), _ram(3, 128)]


@pytest.fixture(params=["spliced", "copied"])
def how(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "copied":
        monkeypatch.setattr(channels, "_can_splice", lambda source, dest: False)
    return str(request.param)


def test_every_layout_passes_unchanged(how: str) -> None:
    """Device-state packets (QEMU 10.0's, whose header is shorter than a RAM packet's, with payloads shorter than
    a RAM header, empty, or longer) between RAM packets, full, short and empty, come out byte for byte."""
    stream = _init() + b"".join(MIXED)
    out, stats = _relay(stream)
    assert out == stream
    assert stats.packets == len(MIXED)
    assert stats.pages == 128 + 5 + 128
    assert stats.bytes_in == stats.bytes_out == len(stream)
    if how == "spliced":  # every payload byte
        assert stats.spliced == 261 * PAGE + 4 + 3000
    else:
        assert stats.spliced == 0


def test_a_renamed_block_changes_only_its_name(how: str) -> None:
    renames = Renames({"pc.ram": "pc.ram-renamed"})
    packets = [_ram(0, 3), _device_state(b"dev/a", b"xy"), _ram(1, 2)]
    out, _ = _relay(_init() + b"".join(packets), renames)
    assert out == _init() + _ram(0, 3, b"pc.ram-renamed") + packets[1] + _ram(1, 2, b"pc.ram-renamed")


def test_a_bad_magic_after_a_short_packet_is_named_with_its_offset(how: str) -> None:
    """A short packet, then a corrupt one: the offset counts the short packet's payload."""
    first = _device_state(b"dev/a", b"abc")
    bad = bytearray(_ram(1, 1))
    bad[0:4] = b"\xde\xad\xbe\xef"
    with pytest.raises(DecodeError) as e:
        _relay(_init() + first + bytes(bad))
    assert e.value.offset == multifd.INIT_SIZE + len(first)
    assert e.value.path == "$.multifd[3].packet[1]"
    assert "0xdeadbeef" in str(e.value)
