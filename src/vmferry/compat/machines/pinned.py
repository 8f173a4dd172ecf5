"""Device properties that no edit of the stream can stand in for: the destination must keep the source's value.

Most compat properties of a machine type change what a device migrates, and
a transform of its section mirrors them.  Some change what the guest sees
in a way the saved state cannot follow.  ``hw_compat_5_0`` sets
virtio-balloon's ``page-poison`` off for machine types up to 5.0; from 5.1
the device offers VIRTIO_BALLOON_F_PAGE_POISON, its config grows by the
poison value, and its legacy I/O BAR grows from 32 to 64 bytes
(``virtio_pci_device_plugged`` rounds the region up to a power of two).
The BAR's address is in the stream, chosen by the guest's firmware for 32
bytes; QEMU refuses it where it is not 64-aligned ("Bad config data:
i=0x10"), and where it is, the larger BAR would cover the next device's
ports.  Moving the BAR would leave the guest's driver at the old ports.
The only faithful answer is a destination that runs the device as the
source did: :func:`pinned_properties` says which property, with which
value.  The same holds for ``qemu-4-0-config-size`` (on for the 4.0 machine
types alone, ``hw_compat_4_0`` and ``hw_compat_3_1``), which gives the
balloon its full config, and so the 64-byte BAR, without page-poison.  A
libvirt save image carries the answer in its domain XML (a
``<qemu:override>``: ``SaveImage.with_device_properties`` in
:mod:`vmferry.encode.libvirt_save`); for a plain QEMU the operator sets it on
the destination's command line.  The stream itself takes the target's config
size (``x86``'s balloon steps): a destination that loads more config than it
has skips the rest, one that loads less keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .releases import PC_LINE, Q35_LINE, version_of

__all__ = ["BALLOON", "PinnedProperty", "balloon_note", "balloon_pins", "is_balloon_section", "pinned_properties"]


@dataclass(frozen=True)
class PinnedProperty:
    """``device``'s property ``name`` must be ``value`` at the destination (a QEMU device type, as
    ``-global DEVICE.NAME=VALUE`` names it; the virtio-pci proxies take the same property)."""

    device: str
    name: str
    value: bool
    why: str

    @property
    def qemu_option(self) -> str:
        return f"-global {self.device}.{self.name}={'on' if self.value else 'off'}"


def _page_poison(v: tuple[int, ...]) -> bool:
    return v >= (5, 1)  # hw_compat_5_0: page-poison=false


def _config_size_4_0(v: tuple[int, ...]) -> bool:
    return (4, 0) <= v < (4, 1)  # hw_compat_4_0: qemu-4-0-config-size=true; hw_compat_3_1 sets it back to false


#: QEMU's device type of the memory balloon (virtio-balloon-pci's virtio device)
BALLOON = "virtio-balloon-device"

#: (device, property, its default for a machine version, the compat sets that say so)
_DEFAULTS: tuple[tuple[str, str, Callable[[tuple[int, ...]], bool], str], ...] = (
    (BALLOON, "page-poison", _page_poison, "hw_compat_5_0"),
    (BALLOON, "qemu-4-0-config-size", _config_size_4_0, "hw_compat_4_0/hw_compat_3_1"),
)


def _version(machine: str) -> tuple[int, ...] | None:
    if not machine.startswith((PC_LINE + "-", Q35_LINE + "-")):
        return None
    try:
        return version_of(machine)
    except ValueError:
        return None


def pinned_properties(source: str | None, target: str | None) -> list[PinnedProperty]:
    """The properties a guest saved under machine type ``source`` needs at a destination of machine type
    ``target`` (``pc-i440fx-2.12``, ``pc-q35-7.2@10.0``): those whose defaults differ between the two."""
    old, new = _version(source or ""), _version(target or "")
    if old is None or new is None:
        return []
    pins = []
    for device, name, default, compat in _DEFAULTS:
        value = default(old)
        if value != default(new):
            shown = "on" if value else "off"
            pins.append(PinnedProperty(device, name, value, f"{compat}: {device} {name} is {shown} under {source}, "
                                                              f"{'on' if not value else 'off'} under {target}"))
    return pins


def balloon_pins(source: str | None, target: str | None) -> list[PinnedProperty]:
    """:func:`pinned_properties` of the memory balloon."""
    return [p for p in pinned_properties(source, target) if p.device == BALLOON]


def is_balloon_section(idstr: str) -> bool:
    """Whether a device section (its idstr, e.g. ``0000:00:05.0/virtio-balloon``) is the memory balloon's."""
    return idstr.rsplit("/", 1)[-1] == "virtio-balloon"


def balloon_note(source: str | None, target: str | None) -> str | None:
    """What the destination QEMU's command line must keep for a balloon saved under ``source`` and loaded under
    ``target``, as one line for the operator; None when nothing."""
    pins = balloon_pins(source, target)
    if not pins:
        return None
    return (f"note: run the destination QEMU with {' '.join(p.qemu_option for p in pins)}: the stream's "
            f"virtio-balloon keeps the BAR the guest's driver holds ({'; '.join(p.why for p in pins)})")
