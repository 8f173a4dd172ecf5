"""The return path between two vmferry endpoints: messages and the agreement (sans-IO).

On a socket (unix, tcp, tls) the source opens the connection with the
return-path protocol instead of sending the stream straight away:

1. source -> destination: ``b"VFRP"``, a version byte, then a HELLO message
   (its capability mask, the version range of each of its devices, its RAM
   blocks);
2. destination -> source: WELCOME (its mask, the version it wants of each
   device, its RAM blocks), or RESULT with an error when it cannot take this
   source at all;
3. source -> destination: the migration stream, in any codec, cut into
   DATA messages, then DONE (or ABORT when the source gives up);
4. destination -> source: RESULT, ``{"ok": true}`` once it has loaded the
   whole stream and is about to run, or ``{"ok": false, "error": ...}``.

Without a return path (a file, a pipe, or a mask without ``return-path``)
the stream goes bare and ends where the transport ends.

Every message is ``u8 type, u32 length`` and a body: JSON for HELLO,
WELCOME and RESULT (at most :data:`MAX_JSON` bytes), raw stream bytes for
DATA.  :class:`MessageReader` is fed bytes and hands back messages;
:func:`agree` decides what the source sends.  No I/O here: the drivers live
in :mod:`vmferry.live.endpoint`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ..caps import Cap
from ..errors import NegotiationError

MAGIC = b"VFRP"
VERSION = 1
PREAMBLE = MAGIC + bytes([VERSION])

HELLO = 1
WELCOME = 2
DATA = 3
DONE = 4
ABORT = 5
RESULT = 6
NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", DATA: "DATA", DONE: "DONE", ABORT: "ABORT", RESULT: "RESULT"}
JSON_TYPES = (HELLO, WELCOME, RESULT, ABORT)

HEAD = struct.Struct(">BI")
MAX_JSON = 1 << 20
MAX_DATA = 64 << 20


def pack_head(kind: int, length: int) -> bytes:
    return HEAD.pack(kind, length)


def pack_json(kind: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_JSON:
        raise NegotiationError(f"{NAMES[kind]} message of {len(data)} bytes is too large")
    return HEAD.pack(kind, len(data)) + data


@dataclass
class Message:
    kind: int
    body: Any  # dict for the JSON messages, a read-only memoryview for DATA, None for DONE

    @property
    def name(self) -> str:
        return NAMES.get(self.kind, f"type-{self.kind}")


class MessageReader:
    """Bytes in, messages out.  ``preamble=True`` first expects ``VFRP`` and the version."""

    def __init__(self, preamble: bool = False) -> None:
        self._buf = bytearray()
        self._want_preamble = preamble

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next_message(self) -> Message | None:
        if self._want_preamble:
            if len(self._buf) < len(PREAMBLE):
                return None
            if bytes(self._buf[:4]) != MAGIC:
                raise NegotiationError("not a vmferry return-path connection")
            if self._buf[4] != VERSION:
                raise NegotiationError(f"return-path protocol version {self._buf[4]}, this vmferry speaks {VERSION}")
            del self._buf[:len(PREAMBLE)]
            self._want_preamble = False
        if len(self._buf) < HEAD.size:
            return None
        kind, length = HEAD.unpack_from(self._buf, 0)
        check_head(kind, length)
        if len(self._buf) < HEAD.size + length:
            return None
        body = bytes(self._buf[HEAD.size:HEAD.size + length])
        del self._buf[:HEAD.size + length]
        return decode_body(kind, body)

    @property
    def pending(self) -> int:
        return len(self._buf)


def check_head(kind: int, length: int) -> None:
    """Refuse an unknown type or an implausible length before anything is allocated."""
    if kind not in NAMES:
        raise NegotiationError(f"unknown return-path message type {kind}")
    limit = MAX_DATA if kind == DATA else 0 if kind == DONE else MAX_JSON
    if length > limit:
        raise NegotiationError(f"{NAMES[kind]} message of {length} bytes (at most {limit})")


def decode_body(kind: int, body: bytes | memoryview) -> Message:
    if kind == DATA:
        return Message(kind, memoryview(body).toreadonly())
    if kind == DONE:
        return Message(kind, None)
    try:
        obj = json.loads(bytes(body))
    except ValueError as e:
        raise NegotiationError(f"{NAMES[kind]} message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise NegotiationError(f"{NAMES[kind]} message is not a JSON object")
    return Message(kind, obj)


# ---------------------------------------------------------------------------
# HELLO, WELCOME and the agreement
# ---------------------------------------------------------------------------


@dataclass
class Hello:
    """What the source offers: its mask, ``vmsd -> [minimum, newest]`` of its devices, its RAM blocks."""

    mask: int
    devices: dict[str, list[int]]
    ram: dict[str, int]
    machine: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"mask": int(self.mask), "devices": self.devices, "ram": self.ram, "machine": self.machine}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Hello:
        mask = _int(obj, "mask")
        devices = obj.get("devices")
        if not isinstance(devices, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)
                for k, v in devices.items()):
            raise NegotiationError("HELLO: 'devices' must map vmsd names to [minimum, newest]")
        return cls(mask, devices, _ram(obj, "HELLO"), str(obj.get("machine", "")))


@dataclass
class Welcome:
    """What the destination wants: its mask, ``vmsd -> version`` of its devices, its RAM blocks."""

    mask: int
    devices: dict[str, int]
    ram: dict[str, int]
    machine: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"mask": int(self.mask), "devices": self.devices, "ram": self.ram, "machine": self.machine}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Welcome:
        mask = _int(obj, "mask")
        devices = obj.get("devices")
        if not isinstance(devices, dict) or not all(isinstance(k, str) and _is_int(v) for k, v in devices.items()):
            raise NegotiationError("WELCOME: 'devices' must map vmsd names to versions")
        return cls(mask, devices, _ram(obj, "WELCOME"), str(obj.get("machine", "")))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _int(obj: dict[str, Any], key: str) -> int:
    v: Any = obj.get(key)
    if not _is_int(v) or v >= 1 << 64:
        raise NegotiationError(f"'{key}' must be an unsigned 64-bit integer")
    return int(v)


def _ram(obj: dict[str, Any], what: str) -> dict[str, int]:
    ram = obj.get("ram", {})
    if not isinstance(ram, dict) or not all(isinstance(k, str) and _is_int(v) for k, v in ram.items()):
        raise NegotiationError(f"{what}: 'ram' must map block names to lengths")
    return dict(ram)


@dataclass
class DevicePlan:
    """How one device travels: produced at ``newest``, sent at ``send``, by ``how``.

    ``how`` is ``"as-is"`` (same version), ``"vmstate"`` (the model saves the
    older version itself, QEMU's since-version rule), ``"transform"`` (a
    registered compat transform converts the newest tree; see
    :func:`plan_devices`) or ``"receiver"`` (sent at ``newest``, the
    destination converts it).
    """

    vmsd: str
    newest: int
    send: int
    how: str


@dataclass
class Agreement:
    """What the source sends: the common mask, the codec, each device's version."""

    mask: Cap
    codec: str
    devices: dict[str, DevicePlan] = field(default_factory=dict)
    return_path: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"mask": int(self.mask), "codec": self.codec, "return_path": self.return_path,
                "devices": {k: {"newest": p.newest, "send": p.send, "how": p.how} for k, p in self.devices.items()}}


def codec_for(mask: int) -> str:
    """The codec a mask calls for: ``ferry`` when framing and the ferry codec are both agreed, else QEMU's."""
    if mask & Cap.FERRY_FRAMING and mask & Cap.CODEC_FERRY:
        return "ferry"
    return "legacy"


def compression_for(mask: int, wanted: str) -> str:
    """``wanted`` (none, zstd, lz4) if the mask allows it, else ``none``."""
    bit = {"zstd": Cap.ZSTD, "lz4": Cap.LZ4}.get(wanted)
    return wanted if bit is not None and mask & bit else "none"


TransformLookup = Any  # Callable[[str, int, int], bool]: is there a transform vmsd: from -> to?


def plan_devices(ours: dict[str, tuple[int, int]], theirs: dict[str, int], mask: int,
                 has_transform: TransformLookup | None = None) -> dict[str, DevicePlan]:
    """Decide each device's version: always produce the newest, convert to what the destination runs.

    ``ours`` maps vmsd -> (minimum, newest) the source's models can save,
    ``theirs`` vmsd -> version the destination wants.  Raises
    :class:`NegotiationError` naming the device when nothing can bridge the
    two versions, or when the two sides do not have the same devices.
    """
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the destination lacks {', '.join(missing)}")
        if extra:
            parts.append(f"the source lacks {', '.join(extra)}")
        raise NegotiationError("the two machines differ: " + "; ".join(parts))
    out: dict[str, DevicePlan] = {}
    for vmsd, (low, newest) in sorted(ours.items()):
        want = theirs[vmsd]
        if want == newest:
            out[vmsd] = DevicePlan(vmsd, newest, newest, "as-is")
        elif has_transform is not None and has_transform(vmsd, newest, want):
            # Transforms plug in here: the newest tree is converted by vmferry.compat.
            out[vmsd] = DevicePlan(vmsd, newest, want, "transform")
        elif low <= want < newest and mask & Cap.DEVICE_VERSIONS:
            out[vmsd] = DevicePlan(vmsd, newest, want, "vmstate")
        elif mask & Cap.RECEIVER_TRANSFORMS:
            out[vmsd] = DevicePlan(vmsd, newest, newest, "receiver")
        else:
            raise NegotiationError(f"device {vmsd!r}: the destination runs version {want}, the source saves "
                                   f"{low}..{newest}, and no transform bridges them")
    return out


def agree(hello: Hello, welcome: Welcome, own_versions: dict[str, tuple[int, int]],
          has_transform: TransformLookup | None = None) -> Agreement:
    """The source's decision once it has the destination's WELCOME."""
    mask = Cap(hello.mask & welcome.mask)
    if hello.ram != welcome.ram:
        raise NegotiationError(f"RAM differs: source {_fmt_ram(hello.ram)}, destination {_fmt_ram(welcome.ram)}")
    if hello.machine and welcome.machine and hello.machine != welcome.machine:
        raise NegotiationError(f"machine types differ: source {hello.machine!r}, destination {welcome.machine!r}")
    devices = plan_devices(own_versions, welcome.devices, mask, has_transform)
    return Agreement(mask, codec_for(mask), devices, return_path=True)


def _fmt_ram(ram: dict[str, int]) -> str:
    return ", ".join(f"{k} {v >> 20} MiB" for k, v in sorted(ram.items())) or "none"


__all__ = ["ABORT", "DATA", "DONE", "HELLO", "MAGIC", "PREAMBLE", "RESULT", "WELCOME", "Agreement", "DevicePlan",
           "Hello", "Message", "MessageReader", "Welcome", "agree", "check_head", "codec_for", "compression_for",
           "decode_body", "pack_head", "pack_json", "plan_devices"]
