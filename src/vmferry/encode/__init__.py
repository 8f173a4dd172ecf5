"""Layer 3: codecs between the event stream and bytes, picked by name or sniffed.

Every codec offers the same surface (a module, or for the ASN.1 encoding
rules an object of :mod:`vmferry.encode.asn1`):

* ``NAME``, the format's name, and ``CAP``, its capability bit (:mod:`vmferry.caps`);
* ``sniff(head) -> bool``: whether a stream starting with ``head`` is in this format;
* ``decode(chunks, options=None) -> Iterator[Event]``, raising only DecodeError;
* ``encode(events) -> Iterator[bytes]`` (ferry also takes ``compress=``).

Codecs with heavy dependencies are imported only when used.  The order of
:data:`CODEC_MODULES` is the sniffing order (specific prefixes before
``json``, which takes any ``{``).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import FerryError

# name -> "module" or "module:attribute" (relative to this package).
CODEC_MODULES: dict[str, str] = {
    "legacy": ".legacy",
    "ferry": ".ferry",
    "jsonl": ".jsonl",
    "json": ".json",
    "cbor": ".cbor",
    "msgpack": ".msgpack",
    "asn1-ber": ".asn1:BER",
    "asn1-der": ".asn1:DER",
    "asn1-per": ".asn1:PER",
    "asn1-xer": ".asn1:XER",
}


class UnknownFormat(FerryError):
    """A format name or a stream's first bytes match no codec."""


def codec(name: str) -> Any:
    """The codec called ``name`` (a module, or an object with the same surface)."""
    if name not in CODEC_MODULES:
        raise UnknownFormat(f"unknown format {name!r}; known: {', '.join(CODEC_MODULES)}")
    where, _, attr = CODEC_MODULES[name].partition(":")
    mod = importlib.import_module(where, __name__)
    return getattr(mod, attr) if attr else mod


def sniff(head: bytes) -> str:
    """The name of the codec whose format starts with ``head`` (at least 64 bytes if the stream has them)."""
    for name in CODEC_MODULES:
        if codec(name).sniff(head):
            return name
    shown = head[:8].hex(" ")
    raise UnknownFormat(f"unrecognised stream format (first bytes: {shown or 'none, the input is empty'})")


def names() -> list[str]:
    return list(CODEC_MODULES)


def summary(name: str) -> str:
    """The first line of a codec's description."""
    doc = (codec(name).__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def cap(name: str) -> Any:
    """The capability bit of a codec (QEMU's own stream needs none: 0)."""
    from ..caps import Cap

    return getattr(codec(name), "CAP", Cap.NONE)


def info(name: str) -> dict[str, Any]:
    """What ``vmferry formats`` prints: bit, stream features, missing packages, description."""
    from importlib.util import find_spec

    from .. import caps

    mod = codec(name)
    bit = cap(name)
    missing = [m for m in getattr(mod, "REQUIRES", ()) if find_spec(m) is None]
    features = getattr(mod, "FEATURES", caps.Cap.NONE)
    if name == "ferry":
        features = caps.restrict(features, mod.available_caps())
    return {"name": name, "capability": caps.name(bit) if bit else "(mask 0)", "bit": int(bit),
            "features": caps.names(features), "missing": missing, "summary": summary(name)}
