"""PCI Express config space across machine types: finding capabilities, and the edits compat properties make.

QEMU compares the read-only bytes of a PCI device's config space on load
(``get_pci_config_device``: "Bad config data"), so every compat property
that changes what a device's config space holds needs a transform.  The
helpers here find the capabilities (the list at 0x34 and the extended list
at 0x100), find a section's config space, and make those edits:

* on every PCI Express device: Extended Tag (``hw_compat_9_1``) and the AER
  uncorrectable error mask (``hw_compat_7_2``), used by :mod:`.qemu10`;
* on root ports (``hw/pci-bridge/gen_pcie_root_port.c``,
  ``hw/pci-bridge/pcie_root_port.c``, ``hw/pci/pcie.c``), used by
  :mod:`.x86`: the link speed and width (``hw_compat_3_1`` x-speed,
  x-width), the ACS capability (``hw_compat_3_1`` disable-acs), native
  hot-plug and the slot's presence bit (``pc_compat_6_0`` ACPI hot-plug of
  bridges, ``pc_compat_6_1`` x-keep-pci-slot-hpc), on every PCI Express slot;
  and the MSI-X state (``hw_compat_2_9`` x-migrate-msix);
* on virtio-pci devices behind a PCI Express port, inside the ``virtio``
  blob (:mod:`.virtio`): the Function Level Reset bit (``hw_compat_4_1``
  x-pcie-flr-init).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Callable, Mapping

from ...errors import CompatError
from ...events import DeviceSection
from ...serialize.schema import Field, Vmsd
from ..ops import Machine, add_field, drop_field, node, with_node

# include/standard-headers/linux/pci_regs.h
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_VNDR, PCI_CAP_ID_EXP = 0x09, 0x10
PCI_CONFIG_SPACE_SIZE, PCIE_CONFIG_SPACE_SIZE = 0x100, 0x1000
PCI_EXT_CAP_ID_ERR, PCI_EXT_CAP_ID_ACS = 0x0001, 0x000D
PCI_ERR_UNCOR_MASK = 8
PCI_ERR_SIZEOF = 0x48

# The PCI Express capability's registers (offsets from the capability)
PCI_EXP_DEVCAP = 0x04
PCI_EXP_DEVCAP_EXT_TAG = 0x20
PCI_EXP_DEVCAP_FLR = 1 << 28
PCI_EXP_LNKCAP = 0x0C
PCI_EXP_LNKCAP_SLS, PCI_EXP_LNKCAP_MLW = 0x0000000F, 0x000003F0
PCI_EXP_LNKCAP_DLLLARC, PCI_EXP_LNKCAP_LBNC = 1 << 20, 1 << 21
PCI_EXP_SLTCAP = 0x14
PCI_EXP_SLTCAP_HPS, PCI_EXP_SLTCAP_HPC = 0x20, 0x40
PCI_EXP_SLTSTA = 0x1A
PCI_EXP_SLTSTA_PDS = 0x40
PCI_EXP_LNKCAP2 = 0x2C
PCI_EXP_LNKCAP2_SLS_2_5_TO_16 = 0x1E  # 2.5, 5, 8 and 16 GT/s
PCI_EXP_LNKCTL2 = 0x30
PCI_EXP_LNKCTL2_TLS = 0x000F

# QEMU_PCI_EXP_LNK_*: the codes of link speeds (LNKCAP SLS) and widths (LNKCAP MLW >> 4)
LNK_2_5GT, LNK_16GT = 1, 4
LNK_X1, LNK_X32 = 1, 32

#: ACS, as pcie_acs_init writes it for a downstream port: SV, TB, RR, CR, UF and DT.
PCI_ACS_VER, PCI_ACS_SIZEOF = 1, 8
ACS_DOWNSTREAM_BITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x40
#: pcie-root-port's offsets (GEN_PCIE_ROOT_PORT_AER_OFFSET, GEN_PCIE_ROOT_PORT_ACS_OFFSET).
ROOT_PORT_AER, ROOT_PORT_ACS = 0x100, 0x100 + PCI_ERR_SIZEOF

#: pci_bridge_qemu_reserve_cap_init: Red Hat's resource reserve capability (PCIBridgeQemuCap), 0x20 bytes.
REDHAT_PCI_CAP_RESOURCE_RESERVE = 1
RESERVE_CAP_LEN = 0x20
#: gen_rp_realize's default for a hot-pluggable slot without native hot-plug: 4 KiB of I/O, the rest unset (-1).
DEFAULT_IO_RESERVE = 0x1000

#: The vmsds of QEMU's PCI Express slots (TYPE_PCIE_SLOT), whose secondary bus is a PCI Express bus.
ROOT_PORT = "pcie-root-port"
PCIE_SLOTS = (ROOT_PORT, "ioh-3240-express-root-port", "xio3130-express-downstream-port")


# ---------------------------------------------------------------------------
# Finding capabilities
# ---------------------------------------------------------------------------


def caps(cfg: bytes | bytearray) -> list[tuple[int, int]]:
    """(offset, capability id) of the capability list at 0x34, in list order."""
    out = []
    pos, seen = cfg[PCI_CAPABILITY_LIST] & ~3, set()
    while pos and pos not in seen and pos + 2 <= len(cfg):
        seen.add(pos)
        out.append((pos, cfg[pos]))
        pos = cfg[pos + 1] & ~3
    return out


def cap(cfg: bytes | bytearray, cap_id: int) -> int | None:
    """The offset of the first capability ``cap_id`` (None if there is none)."""
    return next((pos for pos, c in caps(cfg) if c == cap_id), None)


def pcie_cap(cfg: bytes | bytearray) -> int | None:
    """The offset of the PCI Express capability in a config space (None if it has none)."""
    return cap(cfg, PCI_CAP_ID_EXP)


def ext_caps(cfg: bytes | bytearray) -> list[tuple[int, int]]:
    """(offset, extended capability id) of the extended capability list at 0x100, in list order."""
    out = []
    pos, seen = PCI_CONFIG_SPACE_SIZE, set()
    while pos and pos not in seen and pos + 4 <= len(cfg):
        seen.add(pos)
        header = int.from_bytes(cfg[pos:pos + 4], "little")
        if header == 0:
            break
        out.append((pos, header & 0xFFFF))
        pos = (header >> 20) & ~3
    return out


def ext_cap(cfg: bytes | bytearray, cap_id: int) -> int | None:
    """The offset of extended capability ``cap_id`` (None if it has none)."""
    return next((pos for pos, c in ext_caps(cfg) if c == cap_id), None)


def aer_cap(cfg: bytes | bytearray) -> int | None:
    """The offset of the AER extended capability (None if it has none)."""
    return ext_cap(cfg, PCI_EXT_CAP_ID_ERR)


def is_express(cfg: bytes | bytearray) -> bool:
    """Whether a config space is a PCI Express device's: 4 KiB with a PCI Express capability."""
    return len(cfg) > PCI_CONFIG_SPACE_SIZE and pcie_cap(cfg) is not None


def _get32(cfg: bytearray, at: int) -> int:
    return int(struct.unpack_from("<I", cfg, at)[0])


def _put32(cfg: bytearray, at: int, value: int) -> None:
    struct.pack_into("<I", cfg, at, value)


def _get16(cfg: bytearray, at: int) -> int:
    return int(struct.unpack_from("<H", cfg, at)[0])


def _put16(cfg: bytearray, at: int, value: int) -> None:
    struct.pack_into("<H", cfg, at, value)


# ---------------------------------------------------------------------------
# A section's config space
# ---------------------------------------------------------------------------

ConfigEdit = Callable[[bytearray], bytearray]


def express_config(sec: DeviceSection) -> tuple[str, str] | None:
    """Where a section keeps a PCI Express device's config space: (PCIDevice field, config key)."""
    for f in sec.schema.fields:
        pci = sec.state.get(f.name)
        if f.struct is None or f.struct.name != "PCIDevice" or not isinstance(pci, Mapping):
            continue
        for key, value in pci.items():
            if key.startswith("config") and isinstance(value, (bytes, bytearray)) \
                    and len(value) > PCI_CONFIG_SPACE_SIZE:
                return f.name, key
    return None


def edit_config(sec: DeviceSection, edit: ConfigEdit) -> DeviceSection:
    """``sec`` with ``edit`` applied to its PCI Express config space (``sec`` itself if it has none or nothing
    changed)."""
    where = express_config(sec)
    if where is None:
        return sec
    field, key = where
    pci = sec.state[field]
    cfg = bytes(pci[key])
    new = bytes(edit(bytearray(cfg)))
    if new == cfg:
        return sec
    if len(new) != len(cfg):
        raise CompatError(f"{sec.idstr}: a config space edit changed its size from {len(cfg)} to {len(new)}")
    state = dict(sec.state, **{field: dict(pci, **{key: new})})
    return dataclasses.replace(sec, state=state, desc={})


def on_express_devices(edit: ConfigEdit) -> Callable[[Machine], Machine]:
    """A machine transform applying ``edit`` to the config space of every PCI Express device with a PCIDevice
    field (not to virtio-pci devices, whose config space is inside their ``virtio`` field)."""
    def fn(m: Machine) -> Machine:
        for sec in m.sections:
            if isinstance(sec, DeviceSection):
                new = edit_config(sec, edit)
                if new is not sec:
                    m = m.replace(sec, new)
        return m
    return fn


def on_config(edit: Callable[[bytearray, DeviceSection, Machine], bytearray]) \
        -> Callable[[DeviceSection, Machine], DeviceSection]:
    """A section transform applying ``edit(cfg, sec, m)`` to the section's PCI Express config space."""
    def fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        return edit_config(sec, lambda cfg: edit(cfg, sec, m))
    fn.__name__ = getattr(edit, "__name__", "on_config")
    return fn


def _path(idstr: str) -> str:
    return idstr.split("/", 1)[0]


def secondary_devices(m: Machine, port: DeviceSection) -> list[DeviceSection]:
    """The device sections below a bridge: QEMU names a device behind one ``<bridge's path>:<slot>.<function>``
    (pcibus_get_dev_path), e.g. ``0000:00:01.0:00.0/virtio-net`` behind ``0000:00:01.0/pcie-root-port``."""
    prefix = _path(port.idstr) + ":"
    return [s for s in m.sections if isinstance(s, DeviceSection) and s is not port and "/" in s.idstr
            and s.idstr.startswith(prefix)]


def parent_bridge(m: Machine, sec: DeviceSection) -> DeviceSection | None:
    """The section of the bridge ``sec`` sits behind (None on a root bus, or if the bridge has no section)."""
    path = _path(sec.idstr)
    if path.count(":") < 3:  # "0000:00:02.0": on the root bus
        return None
    parent = path.rsplit(":", 1)[0]
    for s in m.sections:
        if isinstance(s, DeviceSection) and s is not sec and "/" in s.idstr and _path(s.idstr) == parent:
            return s
    return None


def behind_express_slot(m: Machine, sec: DeviceSection) -> bool:
    """Whether ``sec`` is a device on the secondary bus of a PCI Express root or downstream port."""
    parent = parent_bridge(m, sec)
    return parent is not None and parent.schema.name in PCIE_SLOTS


# ---------------------------------------------------------------------------
# Every PCI Express device (QEMU 10.0's machine types)
# ---------------------------------------------------------------------------


def ext_tag(on: bool) -> ConfigEdit:
    # hw_compat_9_1: PCIDevice x-pcie-ext-tag=off.  The 10.0 machine types set "Extended Tag Field
    # Supported" in Device Capabilities, a read-only bit QEMU compares on load ("Bad config data").
    def edit(cfg: bytearray) -> bytearray:
        pos = pcie_cap(cfg)
        if pos is not None:
            i = pos + PCI_EXP_DEVCAP
            cfg[i] = cfg[i] | PCI_EXP_DEVCAP_EXT_TAG if on else cfg[i] & ~PCI_EXP_DEVCAP_EXT_TAG
        return cfg
    return edit


def no_unc_mask(cfg: bytearray) -> bytearray:
    # hw_compat_7_2: PCIDevice x-pcie-err-unc-mask=off.  Older machine types have no AER
    # Uncorrectable Error Mask register: it reads 0 and QEMU compares it on load.  (Going up it
    # stays as the guest saw it, 0: the newer machine type lets the guest write it.)
    pos = aer_cap(cfg)
    if pos is not None:
        cfg[pos + PCI_ERR_UNCOR_MASK:pos + PCI_ERR_UNCOR_MASK + 4] = bytes(4)
    return cfg


def flr(on: bool) -> ConfigEdit:
    # hw_compat_4_1: virtio-pci x-pcie-flr-init=off.  Newer machine types set "Function Level Reset
    # Capability" in Device Capabilities (pcie_cap_flr_init), read-only and compared on load; a
    # conventional PCI device has no PCI Express capability and is left alone.
    def edit(cfg: bytearray) -> bytearray:
        pos = pcie_cap(cfg) if len(cfg) > PCI_CONFIG_SPACE_SIZE else None
        if pos is not None:
            devcap = _get32(cfg, pos + PCI_EXP_DEVCAP)
            _put32(cfg, pos + PCI_EXP_DEVCAP, devcap | PCI_EXP_DEVCAP_FLR if on else devcap & ~PCI_EXP_DEVCAP_FLR)
        return cfg
    return edit


# ---------------------------------------------------------------------------
# Root ports
# ---------------------------------------------------------------------------


def _exp(cfg: bytearray, sec: DeviceSection) -> int:
    pos = pcie_cap(cfg)
    if pos is None:
        raise CompatError(f"{sec.idstr}: a PCI Express port without a PCI Express capability")
    return pos


def _lnkcap(speed: int, width: int) -> int:
    return (speed & PCI_EXP_LNKCAP_SLS) | ((width << 4) & PCI_EXP_LNKCAP_MLW)


def link_speed(fast: bool) -> Callable[[bytearray, DeviceSection, Machine], bytearray]:
    """hw_compat_3_1: pcie-root-port x-speed=2_5, x-width=1; newer machine types default to 16 GT/s x32.

    pcie_cap_fill_slot_lnk fills Link Capabilities (speed, width; Link
    Bandwidth Notification and Data Link Layer Link Active Reporting above
    2.5 GT/s or x1), Link Capabilities 2 (the supported speeds, above 5 GT/s)
    and Link Control 2's Target Link Speed (above 2.5 GT/s).  All of them are
    read-only and compared on load.  A port whose link is neither default
    (x-speed or x-width given on the command line, which the compat property
    does not override) is left as it is.  Link Status is not compared and
    keeps what the guest saw.
    """
    old, new = _lnkcap(LNK_2_5GT, LNK_X1), _lnkcap(LNK_16GT, LNK_X32) | PCI_EXP_LNKCAP_DLLLARC | PCI_EXP_LNKCAP_LBNC
    mask = PCI_EXP_LNKCAP_SLS | PCI_EXP_LNKCAP_MLW | PCI_EXP_LNKCAP_DLLLARC | PCI_EXP_LNKCAP_LBNC
    src, dst = (old, new) if fast else (new, old)

    def edit(cfg: bytearray, sec: DeviceSection, m: Machine) -> bytearray:
        pos = _exp(cfg, sec)
        lnkcap = _get32(cfg, pos + PCI_EXP_LNKCAP)
        if lnkcap & mask != src:
            return cfg
        _put32(cfg, pos + PCI_EXP_LNKCAP, (lnkcap & ~mask) | dst)
        _put32(cfg, pos + PCI_EXP_LNKCAP2, PCI_EXP_LNKCAP2_SLS_2_5_TO_16 if fast else 0)
        lnkctl2 = _get16(cfg, pos + PCI_EXP_LNKCTL2) & ~PCI_EXP_LNKCTL2_TLS
        _put16(cfg, pos + PCI_EXP_LNKCTL2, lnkctl2 | (LNK_16GT if fast else 0))
        return cfg

    edit.__name__ = "link_16gt_x32" if fast else "link_2_5gt_x1"
    return edit


def acs(on: bool) -> Callable[[bytearray, DeviceSection, Machine], bytearray]:
    """hw_compat_3_1: pcie-root-port-base disable-acs=true (pcie_acs_init, "Added in 4.1").

    Newer machine types chain an ACS capability after AER, at 0x148, with the
    downstream port's bits (SV, TB, RR, CR, UF, DT) and its control register
    at reset (0: the guest of the older machine type had none to enable).
    Going down it is removed, and with it whatever the guest enabled.
    """
    def edit(cfg: bytearray, sec: DeviceSection, m: Machine) -> bytearray:
        found = ext_caps(cfg)
        has = [pos for pos, c in found if c == PCI_EXT_CAP_ID_ACS]
        if on:
            if has:
                return cfg
            if [pos for pos, _ in found] != [ROOT_PORT_AER] or any(cfg[ROOT_PORT_ACS:ROOT_PORT_ACS + PCI_ACS_SIZEOF]):
                raise CompatError(f"{sec.idstr}: extended capabilities {[hex(p) for p, _ in found]}, not the root "
                                  f"port's AER alone at {ROOT_PORT_AER:#x}: cannot add ACS at {ROOT_PORT_ACS:#x}")
            aer = _get32(cfg, ROOT_PORT_AER)
            _put32(cfg, ROOT_PORT_AER, (aer & 0xFFFFF) | (ROOT_PORT_ACS << 20))
            _put32(cfg, ROOT_PORT_ACS, PCI_EXT_CAP_ID_ACS | (PCI_ACS_VER << 16))
            _put16(cfg, ROOT_PORT_ACS + 4, ACS_DOWNSTREAM_BITS)
            _put16(cfg, ROOT_PORT_ACS + 6, 0)
            return cfg
        if not has:
            return cfg
        if [pos for pos, _ in found] != [ROOT_PORT_AER, ROOT_PORT_ACS]:
            raise CompatError(f"{sec.idstr}: extended capabilities {[hex(p) for p, _ in found]}, not the root "
                              f"port's AER and ACS: cannot remove ACS")
        aer = _get32(cfg, ROOT_PORT_AER)
        _put32(cfg, ROOT_PORT_AER, aer & 0xFFFFF)
        cfg[ROOT_PORT_ACS:ROOT_PORT_ACS + PCI_ACS_SIZEOF] = bytes(PCI_ACS_SIZEOF)
        return cfg

    edit.__name__ = "add_acs" if on else "drop_acs"
    return edit


def _reserve_cap(next_cap: int) -> bytes:
    # PCIBridgeQemuCap: id, next, len, type, bus_res (u32), io (u64), mem (u32), mem_pref_32 (u32),
    # mem_pref_64 (u64); unset values are -1.
    return struct.pack("<BBBBIQIIQ", PCI_CAP_ID_VNDR, next_cap, RESERVE_CAP_LEN, REDHAT_PCI_CAP_RESOURCE_RESERVE,
                       0xFFFFFFFF, DEFAULT_IO_RESERVE, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


def _reserve_at(cfg: bytearray) -> int | None:
    for pos, c in caps(cfg):
        if c == PCI_CAP_ID_VNDR and cfg[pos + 3] == REDHAT_PCI_CAP_RESOURCE_RESERVE:
            return pos
    return None


def _free_space(cfg: bytearray, size: int) -> int:
    # pci_find_space: the first gap of ``size`` bytes above the standard header that no capability uses
    # (QEMU's map of used bytes: each capability's length, which the list does not carry; the root port's are
    # SSVID 8, MSI-X 12, PCI Express 0x3c, PM 8, MSI up to 24 bytes: take what their ids say).
    lengths = {0x0D: 8, 0x11: 12, 0x10: 0x3C, 0x01: 8, 0x05: 24}
    used = bytearray(PCI_CONFIG_SPACE_SIZE)
    used[:0x40] = b"\1" * 0x40
    for pos, c in caps(cfg):
        n = cfg[pos + 2] if c == PCI_CAP_ID_VNDR else lengths.get(c)
        if n is None:
            raise CompatError(f"capability {c:#x} at {pos:#x}: its length is unknown, so is QEMU's free space")
        used[pos:pos + n] = b"\1" * n
    for pos in range(0x40, PCI_CONFIG_SPACE_SIZE - size + 1, 4):
        if not any(used[pos:pos + size]):
            return pos
    raise CompatError("no room in the config space for another capability")


def slot_presence(acpi: bool) -> Callable[[bytearray, DeviceSection, Machine], bytearray]:
    """pc_compat_6_0: ICH9-LPC acpi-pci-hotplug-with-bridge-support=off.

    From pc-q35-6.1 on, ACPI PCI hot-plug takes over the secondary bus of
    every cold-plugged bridge (acpi_pcihp_device_plug_cb: the ACPI hot-plug
    handler, or none for a PCI Express slot with hotplug=off), so a PCI
    Express slot no longer plugs the devices behind it (pcie_cap_slot_plug_cb)
    and its Slot Status has no Presence Detect State, a read-only bit QEMU
    compares on load.  Older machine types set it on a slot with a device
    behind it (its section's name says so).  Link Status (Data Link Layer
    Link Active) changes the same way but is not compared: it keeps what the
    guest saw.
    """
    def edit(cfg: bytearray, sec: DeviceSection, m: Machine) -> bytearray:
        pos = _exp(cfg, sec) + PCI_EXP_SLTSTA
        sltsta = _get16(cfg, pos)
        if acpi or not secondary_devices(m, sec):
            _put16(cfg, pos, sltsta & ~PCI_EXP_SLTSTA_PDS)
        else:
            _put16(cfg, pos, sltsta | PCI_EXP_SLTSTA_PDS)
        return cfg

    edit.__name__ = "acpi_presence" if acpi else "slot_presence"
    return edit


def native_hotplug(on: bool) -> Callable[[bytearray, DeviceSection, Machine], bytearray]:
    """pc-q35-6.1: no native hot-plug on PCI Express slots.

    ``pc_compat_6_1`` sets ICH9-LPC x-keep-pci-slot-hpc=false, which with ACPI
    hot-plug of bridges on gives pc-q35-6.1 alone (pc_q35_init)
    x-native-hotplug=false on every PCI Express slot: Slot Capabilities loses
    Hot-Plug Surprise and Hot-Plug Capable (pcie_cap_slot_init), and a
    pcie-root-port gets Red Hat's resource reserve capability with 4 KiB of
    I/O at the head of its list (gen_rp_realize,
    pci_bridge_qemu_reserve_cap_init) for the firmware to reserve.  All of
    them are read-only and compared on load.

    A slot without hot-plug (hotplug=off: neither capability bit) is the same
    under every machine type.  On pc-q35-6.1 a pcie-root-port tells the two
    apart by its reserve capability (there only for a hot-pluggable slot);
    the other slots (ioh3420, xio3130-downstream) cannot, and are taken as
    hot-pluggable, QEMU's default.  A pcie-root-port with a reserve of its own
    (bus-reserve, io-reserve, ... given) is refused.
    """
    def edit(cfg: bytearray, sec: DeviceSection, m: Machine) -> bytearray:
        pos = _exp(cfg, sec)
        sltcap = _get32(cfg, pos + PCI_EXP_SLTCAP)
        reserve = sec.schema.name == ROOT_PORT
        at = _reserve_at(cfg) if reserve else None
        if at is not None and bytes(cfg[at:at + RESERVE_CAP_LEN]) != _reserve_cap(cfg[at + 1]):
            raise CompatError(f"{sec.idstr}: a resource reserve capability of its own (bus-reserve, io-reserve, "
                              f"mem-reserve, pref32-reserve or pref64-reserve given): not covered")
        if on:
            if sltcap & PCI_EXP_SLTCAP_HPC or (reserve and at is None):
                return cfg  # native hot-plug already, or a slot without hot-plug
            _put32(cfg, pos + PCI_EXP_SLTCAP, sltcap | PCI_EXP_SLTCAP_HPS | PCI_EXP_SLTCAP_HPC)
            if at is not None:
                _unlink(cfg, at)
                cfg[at:at + RESERVE_CAP_LEN] = bytes(RESERVE_CAP_LEN)
            return cfg
        if not sltcap & PCI_EXP_SLTCAP_HPC:
            return cfg  # a slot without hot-plug
        if at is not None:
            raise CompatError(f"{sec.idstr}: a hot-pluggable slot with a resource reserve capability under a "
                              f"machine type with native hot-plug: not a stream QEMU writes")
        _put32(cfg, pos + PCI_EXP_SLTCAP, sltcap & ~(PCI_EXP_SLTCAP_HPS | PCI_EXP_SLTCAP_HPC))
        if reserve:
            new = _free_space(cfg, RESERVE_CAP_LEN)
            cfg[new:new + RESERVE_CAP_LEN] = _reserve_cap(cfg[PCI_CAPABILITY_LIST])
            cfg[PCI_CAPABILITY_LIST] = new
        return cfg

    edit.__name__ = "native_hotplug" if on else "no_native_hotplug"
    return edit


def _unlink(cfg: bytearray, at: int) -> None:
    """Take the capability at ``at`` out of the list (pci_del_capability)."""
    prev = PCI_CAPABILITY_LIST
    for pos, _ in caps(cfg):
        if pos == at:
            cfg[prev] = cfg[at + 1]
            return
        prev = pos + 1
    raise CompatError(f"no capability at {at:#x}")


# ---------------------------------------------------------------------------
# pcie-root-port's MSI-X state (hw_compat_2_9 x-migrate-msix=false)
# ---------------------------------------------------------------------------

#: VMSTATE_MSIX_TEST(parent_obj.parent_obj.parent_obj.parent_obj, ...): the one vector's table entry and the
#: pending bit array, as vmstate_msix writes them (msix_save).
MSIX_FIELD = "parent_obj.parent_obj.parent_obj.parent_obj"
MSIX_ENTRY_SIZE = 16
ROOT_PORT_MSIX_VECTORS = 1  # GEN_PCIE_ROOT_PORT_MSIX_NR_VECTOR


def _msix_field(vectors: int) -> Field:
    size = vectors * MSIX_ENTRY_SIZE + (vectors + 7) // 8
    return Field(MSIX_FIELD, "struct", size, struct=Vmsd("msix", 0, 0, (Field("msix", "msix state", size),)))


def msix_reset(vectors: int) -> bytes:
    """The MSI-X table and pending bits after msix_reset: every vector masked, nothing pending."""
    return (bytes(12) + struct.pack("<I", 1)) * vectors + bytes((vectors + 7) // 8)


def root_port_msix_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # An older machine type's destination does not load the root port's MSI-X table: it keeps the
    # one it reset (msix_reset), every vector masked and nothing pending.
    n = node(sec)
    if MSIX_FIELD in n.tree:
        return sec
    field = _msix_field(ROOT_PORT_MSIX_VECTORS)
    return with_node(sec, add_field(n, field, {"msix": msix_reset(ROOT_PORT_MSIX_VECTORS)}))


def root_port_msix_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    n = node(sec)
    return with_node(sec, drop_field(n, MSIX_FIELD)) if MSIX_FIELD in n.tree else sec
