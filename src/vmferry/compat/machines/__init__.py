"""The QEMU machine-type catalogue: releases and transforms for four QEMU releases' x86 machine types.

:func:`qemu_registry` returns a :class:`~vmferry.compat.registry.Registry`
holding, for ``pc-i440fx`` and ``pc-q35`` each, a line per QEMU release and
a transform for every step between neighbours, in both directions:

* QEMU 7.2: 2.3 .. 7.2 (q35 from 2.4; :mod:`.x86`);
* QEMU 10.0: 7.2 .. 10.0, joined to 7.2's 7.2 (:mod:`.qemu10`);
* QEMU 11.1: 10.0 .. 11.1, joined to 10.0's 10.0 (:mod:`.qemu11`);
* QEMU 5.2: 5.2, joined to 7.2's 5.2 (:mod:`.qemu5`).

So one chain of steps joins any two (QEMU release, machine type) pairs of
the catalogue, also a machine type that a newer QEMU no longer has to one
that it has (7.2's ``pc-i440fx-2.12`` to 11.1's ``pc-i440fx-11.1``).  The
registry is built once and shared; do not register more transforms into it
(build your own with :func:`build_registry`).
"""

from __future__ import annotations

from functools import lru_cache

from ..registry import Registry
from . import qemu5, qemu10, qemu11, x86
from .qemu5 import PC5, Q35_5, QEMU_5_2
from .qemu10 import PC10, Q35_10, QEMU_10_0
from .qemu11 import PC11, Q35_11, QEMU_11_1
from .releases import PC, PC_LINE, Q35, Q35_LINE, QEMU_7_2, all_releases, version_of

__all__ = ["PC", "PC5", "PC10", "PC11", "PC_LINE", "Q35", "Q35_5", "Q35_10", "Q35_11", "Q35_LINE", "QEMU_5_2",
           "QEMU_7_2", "QEMU_10_0", "QEMU_11_1", "all_releases", "build_registry", "qemu_registry", "version_of"]


def build_registry() -> Registry:
    """A fresh registry with the QEMU x86 catalogue."""
    reg = Registry()
    x86.register(reg)
    qemu5.register(reg)
    qemu10.register(reg)
    qemu11.register(reg)
    return reg


@lru_cache(maxsize=1)
def qemu_registry() -> Registry:
    """The shared registry with the QEMU x86 catalogue."""
    return build_registry()
