"""A migration routed through vmferry proxies, as ``vmferry migrate --via-proxy`` sets it up.

:class:`ProxyRoute` runs the proxies in this process, each in its own thread:

* ``wire="legacy"``: source QEMU -> proxy -> destination QEMU;
* ``wire="ferry"``: source QEMU -> proxy -> ferry over tcp -> proxy ->
  destination QEMU, the second proxy standing where it would run on the
  destination host.  The two proxies' masks are intersected (limited to the
  bits asked for) like any two sides' capabilities, and the result decides
  the ferry wire's compression.

The proxy next to the destination converts the device state to ``machine``;
``observe`` sees every event of the stream as the source sent it.
The management tool (:mod:`vmferry.live.migrate`) points the destination's
``migrate-incoming`` at :attr:`dest_uri` and the source at :attr:`source_uri`,
then waits with :meth:`finish`; on any failure :meth:`abort` closes every
socket, so the source's migration fails and its guest keeps running.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import caps
from ..caps import Cap
from ..events import Event
from ..serialize.schema import SchemaSet
from . import proxy
from .proxy import Proxy, ProxyError, ProxyStats

__all__ = ["ProxyRoute", "link_mask"]


def link_mask(near_source: int, near_dest: int, requested: int | None = None) -> Cap:
    """What the two proxies of a ferry wire agree on: the intersection, limited to ``requested`` if given.

    Ferry itself and its framing are what makes the wire, so they stay even when not asked for.
    """
    agreed = caps.intersect(near_source, near_dest)
    if requested is not None:
        base = Cap.CODEC_FERRY | Cap.FERRY_FRAMING | Cap.FRAME_CRC32C | Cap.SELF_DESCRIBING
        agreed = caps.intersect(agreed, requested | base)
    return agreed


def _compression(mask: int) -> str:
    if mask & Cap.ZSTD:
        return "zstd"
    if mask & Cap.LZ4:
        return "lz4"
    return "none"


@dataclass
class ProxyRoute:
    """The proxies between one source and one destination; see the module doc."""

    workdir: str
    machine: str | None = None
    from_machine: str | None = None
    wire: str = "legacy"
    requested: int | None = None  # vmferry bits asked for on the ferry wire (None: plain ferry)
    observe: Callable[[Event], None] | None = None
    accept_timeout: float = 120.0
    schema: SchemaSet | None = None  # the source's devices, for a postcopy package (see vmferry.live.proxy)
    mask: Cap = Cap(0)
    proxies: list[Proxy] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.wire not in proxy.WIRES:
            raise ProxyError(f"unknown wire format {self.wire!r} (known: {', '.join(proxy.WIRES)})")
        self.dest_uri = f"unix:{os.path.join(self.workdir, 'dest.sock')}"
        self.source_uri = f"unix:{os.path.join(self.workdir, 'proxy.sock')}"
        near_dest = Proxy("tcp:127.0.0.1:0" if self.wire == "ferry" else self.source_uri, self.dest_uri,
                          machine=self.machine, from_machine=self.from_machine, accept_timeout=self.accept_timeout,
                          schema=self.schema)
        if self.wire == "legacy":
            near_dest.observe = self.observe
            self.proxies = [near_dest]
            return
        self.mask = link_mask(proxy.capabilities(), proxy.capabilities(), self.requested)
        near_dest.bind()
        near_source = Proxy(self.source_uri, near_dest.uri, wire="ferry", compress=_compression(self.mask),
                            observe=self.observe, accept_timeout=self.accept_timeout, schema=self.schema)
        self.proxies = [near_source, near_dest]

    def start(self) -> None:
        """Listen and carry, each proxy in a thread (the destination side first)."""
        for p in reversed(self.proxies):
            p.start()

    def finish(self, timeout: float = 60.0) -> list[ProxyStats]:
        """Wait for every proxy to be done; ProxyError with the first failure."""
        stats = [p.join(timeout) for p in self.proxies]
        for p, s in zip(self.proxies, stats):
            if s.error:
                raise ProxyError(f"proxy {p.listen_uri}: {s.error}")
            if not s.done:
                raise ProxyError(f"proxy {p.listen_uri} did not finish within {timeout:.0f} s")
        return stats

    def abort(self) -> None:
        for p in self.proxies:
            p.abort()

    def describe(self) -> dict[str, Any]:
        return {"wire": self.wire, "machine": self.machine, "from_machine": self.from_machine,
                "link_mask": int(self.mask), "link_names": caps.names(self.mask),
                "proxies": [dict(p.stats.as_dict(), listen=p.listen_uri, forward=p.forward_uri)
                            for p in self.proxies]}
