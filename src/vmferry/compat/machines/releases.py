"""The QEMU x86 machine types vmferry converts between, as releases.

Two lines, oldest first: ``pc-i440fx-2.3`` .. ``pc-i440fx-7.2`` and
``pc-q35-2.4`` .. ``pc-q35-7.2`` (with ``pc-q35-4.0.1``, the 4.0-stable
machine type).  All are machine types of the QEMU 7.2 binary: a stream is
saved by QEMU 7.2 under one of them and loaded by QEMU 7.2 under another.

What a machine type's streams look like at the top level (spec §1.2, §2.4,
§4.6): ``hw_compat_2_3`` turns ``send-configuration``,
``send-section-footer`` and ``store-global-state`` off, so ``pc-i440fx-2.3``
streams have no configuration section and no footers; the vmdesc is
suppressed only up to ``pc-i440fx-2.2`` (``suppress-vmdesc=on`` in its
default machine options), which is outside these lines.
"""

from __future__ import annotations

from ..registry import Release

__all__ = ["PC", "PC_LINE", "Q35", "Q35_LINE", "QEMU_7_2", "all_releases", "version_of"]

#: The QEMU version whose machine types these lines are.
QEMU_7_2 = "7.2"
PC_LINE = "pc-i440fx"
Q35_LINE = "pc-q35"

_VERSIONS = ["2.3", "2.4", "2.5", "2.6", "2.7", "2.8", "2.9", "2.10", "2.11", "2.12", "3.0", "3.1",
             "4.0", "4.1", "4.2", "5.0", "5.1", "5.2", "6.0", "6.1", "6.2", "7.0", "7.1", "7.2"]
_Q35_VERSIONS = [v for v in _VERSIONS if v != "2.3"]
_Q35_VERSIONS.insert(_Q35_VERSIONS.index("4.1"), "4.0.1")


def _pc(v: str) -> Release:
    old = v == "2.3"  # hw_compat_2_3: send-configuration, send-section-footer off
    return Release(f"pc-i440fx-{v}", PC_LINE, configuration=not old, footers=not old, vmdesc=True, qemu=QEMU_7_2)


PC: list[Release] = [_pc(v) for v in _VERSIONS]
Q35: list[Release] = [Release(f"pc-q35-{v}", Q35_LINE, qemu=QEMU_7_2) for v in _Q35_VERSIONS]


def all_releases() -> list[Release]:
    return PC + Q35


def version_of(release: str) -> tuple[int, ...]:
    """``pc-q35-4.0.1`` -> (4, 0, 1); ``pc-i440fx-7.2@10.0`` -> (7, 2)."""
    return tuple(int(x) for x in release.split("@", 1)[0].rsplit("-", 1)[1].split("."))
