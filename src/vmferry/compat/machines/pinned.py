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
value.  A libvirt save image carries the answer in its domain XML
(``<qemu:override>``, :meth:`vmferry.encode.libvirt_save.SaveImage.with_device_properties`);
for a plain QEMU the operator sets it on the destination's command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from .releases import PC_LINE, Q35_LINE, version_of

__all__ = ["PinnedProperty", "pinned_properties"]


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


#: (device, property, the first machine version with the new default, the default before it, the compat set)
_PINS = (("virtio-balloon-device", "page-poison", (5, 1), False, "hw_compat_5_0"),)


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
    for device, name, since, before, compat in _PINS:
        if (old >= since) != (new >= since):
            value = before if old < since else not before
            pins.append(PinnedProperty(device, name, value, f"{compat}: {device} {name} is "
                                       f"{'on' if not before else 'off'} from machine type "
                                       f"{'.'.join(map(str, since))}, {'on' if before else 'off'} before; "
                                       f"{source} had it {'on' if value else 'off'}"))
    return pins
