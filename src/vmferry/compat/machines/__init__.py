"""The QEMU machine-type catalogue: releases and transforms for QEMU 7.2's and 10.0's x86 machine types.

:func:`qemu_registry` returns a :class:`~vmferry.compat.registry.Registry`
holding the lines ``pc-i440fx`` (2.3 .. 7.2) and ``pc-q35`` (2.4 .. 7.2) of
QEMU 7.2 and a transform for every step between neighbours, in both
directions (:mod:`.x86`), and QEMU 10.0's ``pc-i440fx-10.0`` and
``pc-q35-10.0`` with the steps down to QEMU 7.2's newest machine types
(:mod:`.qemu10`).  The registry is built once and shared; do not register more
transforms into it (build your own with :func:`build_registry`).
"""

from __future__ import annotations

from functools import lru_cache

from ..registry import Registry
from . import qemu10, x86
from .qemu10 import PC10, Q35_10, QEMU_10_0
from .releases import PC, PC_LINE, Q35, Q35_LINE, QEMU_7_2, all_releases, version_of

__all__ = ["PC", "PC10", "PC_LINE", "Q35", "Q35_10", "Q35_LINE", "QEMU_10_0", "QEMU_7_2", "all_releases",
           "build_registry", "qemu_registry", "version_of"]


def build_registry() -> Registry:
    """A fresh registry with the QEMU x86 catalogue."""
    reg = Registry()
    x86.register(reg)
    qemu10.register(reg)
    return reg


@lru_cache(maxsize=1)
def qemu_registry() -> Registry:
    """The shared registry with the QEMU x86 catalogue."""
    return build_registry()
