"""Layer 3: codecs between the event stream and bytes, picked by name or sniffed.

Every codec module offers the same surface: ``NAME``, ``sniff(head) -> bool``,
``decode(chunks, options) -> Iterator[Event]`` and
``encode(events) -> Iterator[bytes]``.  Codecs with heavy dependencies are
imported only when used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import FerryError

# name -> module (relative to this package); order matters for sniffing.
CODEC_MODULES: dict[str, str] = {
    "legacy": ".legacy",
    "json": ".json",
}


class UnknownFormat(FerryError):
    """A format name or a stream's first bytes match no codec."""


def codec(name: str) -> ModuleType:
    """The codec module called ``name``."""
    if name not in CODEC_MODULES:
        raise UnknownFormat(f"unknown format {name!r}; known: {', '.join(CODEC_MODULES)}")
    return importlib.import_module(CODEC_MODULES[name], __name__)


def sniff(head: bytes) -> str:
    """The name of the codec whose format starts with ``head`` (at least 16 bytes if the stream has them)."""
    for name in CODEC_MODULES:
        if codec(name).sniff(head):
            return name
    shown = head[:8].hex(" ")
    raise UnknownFormat(f"unrecognised stream format (first bytes: {shown or 'none, the input is empty'})")


def names() -> list[str]:
    return list(CODEC_MODULES)
