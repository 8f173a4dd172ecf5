"""Capability bits for live migration, QEMU's capability names, and the return-path handshake (all pure)."""

from __future__ import annotations

import json

import pytest

from vmferry import caps
from vmferry.caps import Cap
from vmferry.errors import NegotiationError
from vmferry.live import handshake


def test_live_bits_have_fixed_numbers_and_names() -> None:
    assert int(Cap.RETURN_PATH) == 1 << 32
    assert int(Cap.RECEIVER_TRANSFORMS) == 1 << 33
    assert int(Cap.DEVICE_VERSIONS) == 1 << 34
    assert caps.names(caps.LIVE) == ["return-path", "receiver-transforms", "device-versions"]
    assert caps.from_names(["return-path", "zstd"]) == Cap.RETURN_PATH | Cap.ZSTD
    assert not caps.LIVE & (caps.FEATURES | caps.CODECS)
    assert caps.unknown(Cap.RETURN_PATH) == 0


def test_qemu_names_of_vmferry_bits() -> None:
    assert caps.qemu_name(Cap.RETURN_PATH) == "return-path"  # QEMU's capability of the same meaning
    assert caps.qemu_name(Cap.ZSTD) == "x-vmferry-zstd"
    for bit in caps.bits(caps.ALL_KNOWN):
        assert caps.from_qemu_name(caps.qemu_name(bit)) == bit
    assert caps.from_qemu_name("xbzrle") is None
    assert caps.from_qemu_name("x-vmferry-warp") is None
    listed = caps.to_qemu_list(Cap.ZSTD | Cap.RETURN_PATH, Cap.ZSTD)
    assert listed == [{"capability": "x-vmferry-zstd", "state": True}, {"capability": "return-path", "state": False}]
    assert caps.parse_qemu_list(listed) == {"x-vmferry-zstd": True, "return-path": False}
    assert caps.mask_from_qemu({"x-vmferry-zstd": True, "return-path": False, "xbzrle": True}) == (
        Cap.ZSTD, Cap.RETURN_PATH)


@pytest.mark.parametrize("bad", [{}, [1], [{"capability": "x"}], [{"capability": 1, "state": True}],
                                 [{"capability": "x", "state": "on"}]])
def test_parse_qemu_list_refuses_malformed(bad: object) -> None:
    with pytest.raises(ValueError):
        caps.parse_qemu_list(bad)


def test_qemu_plan_intersects_by_name() -> None:
    src = {"xbzrle": True, "events": True, "multifd": False, "only-src": True}
    dst = {"xbzrle": False, "events": True, "multifd": False, "only-dst": True}
    plan = caps.qemu_plan(src, dst)
    assert plan == {"xbzrle": False, "events": True, "multifd": False, "only-src": False, "only-dst": False}
    assert caps.qemu_plan(src, dst, ["multifd", "only-src"])["multifd"] is True
    assert caps.qemu_plan(src, dst, ["only-src"])["only-src"] is False  # not on both sides: never used
    assert "x-vmferry-zstd" not in caps.qemu_plan({"x-vmferry-zstd": True}, {"x-vmferry-zstd": True})


def test_split_requested() -> None:
    mask, qemu = caps.split_requested(["zstd", "x-vmferry-lz4", "xbzrle", "return-path"])
    assert mask == Cap.ZSTD | Cap.LZ4 | Cap.RETURN_PATH
    assert qemu == ["xbzrle", "return-path"]
    with pytest.raises(ValueError, match="warp"):
        caps.split_requested(["warp"])
    assert caps.QEMU_7_2_CAPABILITIES[0] == "xbzrle" and len(caps.QEMU_7_2_CAPABILITIES) == 21


# --------------------------------------------------------------------- handshake


def _feed_all(reader: handshake.MessageReader, data: bytes, step: int) -> list[handshake.Message]:
    out = []
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
        while (msg := reader.next_message()) is not None:
            out.append(msg)
    return out


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_messages_round_trip_in_any_cut(step: int) -> None:
    wire = (handshake.PREAMBLE + handshake.pack_json(handshake.HELLO, {"mask": 5})
            + handshake.pack_head(handshake.DATA, 3) + b"abc" + handshake.pack_head(handshake.DONE, 0)
            + handshake.pack_json(handshake.RESULT, {"ok": True}))
    msgs = _feed_all(handshake.MessageReader(preamble=True), wire, step)
    assert [m.name for m in msgs] == ["HELLO", "DATA", "DONE", "RESULT"]
    assert msgs[0].body == {"mask": 5} and bytes(msgs[1].body) == b"abc" and msgs[3].body == {"ok": True}


@pytest.mark.parametrize("wire, match", [
    (b"QEVM\x00", "not a vmferry return-path"),
    (b"VFRP\x09", "version 9"),
    (handshake.PREAMBLE + b"\x63\x00\x00\x00\x00", "unknown return-path message type"),
    (handshake.PREAMBLE + bytes([handshake.HELLO]) + (handshake.MAX_JSON + 1).to_bytes(4, "big"), "too large|at most"),
    (handshake.PREAMBLE + bytes([handshake.HELLO]) + b"\x00\x00\x00\x02[]", "not a JSON object"),
    (handshake.PREAMBLE + bytes([handshake.HELLO]) + b"\x00\x00\x00\x02{x", "not JSON"),
    (handshake.PREAMBLE + bytes([handshake.DONE]) + b"\x00\x00\x00\x01", "at most 0"),
])
def test_message_reader_refuses_garbage(wire: bytes, match: str) -> None:
    r = handshake.MessageReader(preamble=True)
    r.feed(wire)
    with pytest.raises(NegotiationError, match=match):
        r.next_message()


def test_hello_and_welcome_validate() -> None:
    h = handshake.Hello(7, {"rtc": [1, 3]}, {"pc.ram": 4096}, "m")
    assert handshake.Hello.from_json(json.loads(json.dumps(h.to_json()))) == h
    with pytest.raises(NegotiationError, match="mask"):
        handshake.Hello.from_json({"mask": -1, "devices": {}})
    with pytest.raises(NegotiationError, match="devices"):
        handshake.Hello.from_json({"mask": 1, "devices": {"rtc": 3}})
    with pytest.raises(NegotiationError, match="devices"):
        handshake.Welcome.from_json({"mask": 1, "devices": {"rtc": [1, 3]}})
    with pytest.raises(NegotiationError, match="ram"):
        handshake.Welcome.from_json({"mask": 1, "devices": {}, "ram": {"x": "big"}})


def test_codec_choice_follows_the_mask() -> None:
    assert handshake.codec_for(0) == "legacy"
    assert handshake.codec_for(Cap.FERRY_FRAMING) == "legacy"  # framing without the codec bit
    assert handshake.codec_for(Cap.FERRY_FRAMING | Cap.CODEC_FERRY) == "ferry"
    assert handshake.compression_for(Cap.ZSTD, "zstd") == "zstd"
    assert handshake.compression_for(Cap.LZ4, "zstd") == "none"


def test_agreement_uses_the_intersection_and_the_destinations_versions() -> None:
    ours = {"mc146818rtc": (1, 3), "i8254": (2, 3)}
    full = Cap.FERRY_FRAMING | Cap.CODEC_FERRY | Cap.RETURN_PATH | Cap.DEVICE_VERSIONS
    hello = handshake.Hello(full, {k: list(v) for k, v in ours.items()}, {"pc.ram": 1 << 20})
    welcome = handshake.Welcome(full & ~Cap.CODEC_FERRY, {"mc146818rtc": 2, "i8254": 3}, {"pc.ram": 1 << 20})
    a = handshake.agree(hello, welcome, ours)
    assert a.mask == full & ~Cap.CODEC_FERRY and a.codec == "legacy"
    assert a.devices["mc146818rtc"].send == 2 and a.devices["mc146818rtc"].how == "vmstate"
    assert a.devices["i8254"].how == "as-is"
    # a transform, when one exists, is preferred over the VMState rule
    b = handshake.agree(hello, welcome, ours, has_transform=lambda vmsd, frm, to: vmsd == "mc146818rtc")
    assert b.devices["mc146818rtc"].how == "transform"


def test_agreement_refuses_what_cannot_be_bridged() -> None:
    ours = {"i8254": (2, 3)}
    hello = handshake.Hello(Cap.DEVICE_VERSIONS, {"i8254": [2, 3]}, {"pc.ram": 4096})
    with pytest.raises(NegotiationError, match="i8254.*version 1"):
        handshake.agree(hello, handshake.Welcome(Cap.DEVICE_VERSIONS, {"i8254": 1}, {"pc.ram": 4096}), ours)
    with pytest.raises(NegotiationError, match="no transform"):
        handshake.agree(hello, handshake.Welcome(0, {"i8254": 2}, {"pc.ram": 4096}), ours)
    with pytest.raises(NegotiationError, match="RAM differs"):
        handshake.agree(hello, handshake.Welcome(0, {"i8254": 3}, {"pc.ram": 8192}), ours)
    with pytest.raises(NegotiationError, match="destination lacks i8254"):
        handshake.agree(hello, handshake.Welcome(0, {}, {"pc.ram": 4096}), ours)
    # the receiver may convert what the source cannot
    both = Cap.DEVICE_VERSIONS | Cap.RECEIVER_TRANSFORMS
    hello.mask = both
    ok = handshake.agree(hello, handshake.Welcome(both, {"i8254": 1}, {"pc.ram": 4096}), ours)
    assert ok.devices["i8254"].how == "receiver" and ok.devices["i8254"].send == 3
