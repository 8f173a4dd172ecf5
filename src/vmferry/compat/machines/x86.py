"""The transforms between consecutive x86 machine types of QEMU 7.2.

Found by diffing QEMU's own descriptions of streams saved under every machine
type (the vmdesc of real streams of the default devices plus ``e1000``,
``virtio-net-pci``, the USB controllers and ``VGA``; ``-dump-vmstate`` is
the same for all machine types of one binary) and by reading the compat
property tables (``hw_compat_X_Y`` in ``hw/core/machine.c``,
``pc_compat_X_Y`` in ``hw/i386/pc.c``) and the machine-option functions of
``hw/i386/pc_piix.c`` and ``hw/i386/pc_q35.c``.  Every transform says which
QEMU behaviour it mirrors.

Values follow one rule.  Going to a newer machine type, a field or
subsection the older one did not migrate gets the value the older machine
type's destination would have used after loading the stream: derived from
the stream where QEMU derives it (a ``post_load`` hook computing it from
other fields, RAM block sizes, the ACPI tables in guest memory), otherwise
the device's reset value.  Going to an older machine type, what it cannot
carry is dropped (those transforms are lossy), and values kept in another
form are converted back to the form that machine type writes.

Every step between two neighbouring machine types is registered, also the
many that change nothing a stream of these devices carries, with the
reason why not: the planner never assumes a step.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Callable, Mapping, Sequence

from ...errors import CompatError
from ...events import DeviceSection, RamBlock
from ...serialize.schema import Field, Vmsd
from ..ops import (
    Machine,
    Node,
    add_field,
    add_section,
    add_subsection,
    drop_field,
    drop_sections,
    drop_subsection,
    get,
    new_section,
    node,
    set_field,
    with_node,
)
from ..registry import Change, Registry
from . import pcie, virtio
from .releases import PC, PC_LINE, Q35, Q35_LINE

__all__ = ["register"]

SectionFn = Callable[[DeviceSection, Machine], DeviceSection]

#: The host page size QEMU 7.2 compares ACPI blob sizes with (x86-64 hosts).
HOST_PAGE_SIZE = 4096


def _vmsd(name: str, version: int, *fields: tuple[str, str, int] | Field) -> Vmsd:
    return Vmsd(name, version, 0, tuple(f if isinstance(f, Field) else Field(*f) for f in fields))


def _has(n: Node, key: str, path: Sequence[str] = ()) -> bool:
    tree: Mapping[str, Any] = n.tree
    for k in path:
        tree = tree[k]
    return key in tree


# ---------------------------------------------------------------------------
# Migration globals: configuration, footers, globalstate (hw_compat_2_3)
# ---------------------------------------------------------------------------

GLOBALSTATE = _vmsd("globalstate", 1, ("size", "uint32", 4), ("runstate", "buffer", 100))


def _runstate(sec: DeviceSection) -> bytes:
    raw = bytes(sec.state.get("runstate", b""))
    return raw.split(b"\0", 1)[0]


def globalstate_up(m: Machine) -> Machine:
    # hw_compat_2_3 turns store-global-state off: such a source sends globalstate only when
    # the run state is neither "running" nor "paused", and a destination that receives none
    # starts the guest (process_incoming_migration_bh).  A 2.4 source always sends it, so
    # the absent section becomes the state the old destination acts on: "running".
    sec = m.one("globalstate")
    if sec is not None:
        if _runstate(sec) in (b"running", b"paused"):
            raise CompatError(f"globalstate {_runstate(sec).decode()!r} in a stream of a machine type that does "
                              f"not send it for that run state: is the source machine type right?")
        return m
    state = b"running"
    tree = {"size": len(state) + 1, "runstate": state.ljust(100, b"\0")}
    return add_section(m, new_section("globalstate", 0, Node(GLOBALSTATE, tree)))


def globalstate_down(m: Machine) -> Machine:
    # The same rule the other way: a store-global-state=off source leaves it out for
    # "running" and "paused" (global_state_needed).
    sec = m.one("globalstate")
    if sec is not None and _runstate(sec) in (b"running", b"paused"):
        return drop_sections(m, "globalstate")
    return m


# ---------------------------------------------------------------------------
# fw_cfg
# ---------------------------------------------------------------------------

FW_CFG_DMA = _vmsd("fw_cfg/dma", 0, ("dma_addr", "uint64", 8))
FW_CFG_ACPI_MR = _vmsd("fw_cfg/acpi_mr", 1, ("table_mr_size", "uint64", 8), ("linker_mr_size", "uint64", 8),
                       ("rsdp_mr_size", "uint64", 8))
ACPI_TABLES = "/rom@etc/acpi/tables"
ACPI_LOADER = "/rom@etc/table-loader"
ACPI_RSDP = "/rom@etc/acpi/rsdp"


def fw_cfg_dma_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # hw_compat_2_4 sets fw_cfg_io dma_enabled=off: the older machine has no DMA interface,
    # so its DMA address register is the reset value 0 (fw_cfg_reset).
    n = node(sec)
    if _has(n, "fw_cfg/dma"):
        return sec
    return with_node(sec, add_subsection(n, FW_CFG_DMA, {"dma_addr": 0}, before="fw_cfg/acpi_mr"))


def _drop_sub(name: str, path: Sequence[str] = ()) -> SectionFn:
    def fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        n = node(sec)
        try:
            present = _has(n, name, path)
        except (KeyError, TypeError):
            return sec
        if not present:
            return sec
        return with_node(sec, drop_subsection(n, name, path=path))

    fn.__name__ = f"drop_{name.replace('/', '_')}"
    return fn


def _rsdp_size(head: bytes | None, block: RamBlock) -> int:
    """The size of the RSDP QEMU built, read back from the RSDP blob in guest memory (ACPI 5.2.5.3).

    Without the blob's bytes (a stream that did not send that page) the
    block length is the best the older machine type knew too.
    """
    if head is None or len(head) < 36 or head[:8] != b"RSD PTR ":
        return block.length
    if head[15] == 0:
        return 20  # ACPI 1.0 RSDP
    (length,) = struct.unpack_from("<I", head, 20)
    return length


def fw_cfg_acpi_mr_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # hw_compat_4_2 sets fw_cfg acpi-mr-restore=false.  On such a machine the ACPI blobs'
    # fw_cfg lengths after a migration are what the RAM blocks carry (ram_load resizes the
    # blocks; fw_cfg's resize callback follows).  fw_cfg/acpi_mr restores the exact blob
    # lengths and is sent only when one of them is not page aligned
    # (fw_cfg_acpi_mr_restore): derive them from the stream, the tables and the loader
    # from their RAM block lengths (QEMU pads both blobs to page multiples) and the RSDP
    # from the RSDP itself in guest memory.
    n = node(sec)
    if _has(n, "fw_cfg/acpi_mr"):
        return sec
    tables, loader, rsdp = m.block(ACPI_TABLES), m.block(ACPI_LOADER), m.block(ACPI_RSDP)
    if tables is None or loader is None or rsdp is None:
        return sec  # no ACPI blobs in RAM: nothing to restore
    sizes = {"table_mr_size": tables.length, "linker_mr_size": loader.length,
             "rsdp_mr_size": _rsdp_size(m.ram_head.get(ACPI_RSDP), rsdp)}
    if all(v % HOST_PAGE_SIZE == 0 for v in sizes.values()):
        return sec  # QEMU would not send it
    return with_node(sec, add_subsection(n, FW_CFG_ACPI_MR, sizes))


# ---------------------------------------------------------------------------
# pcspk, PCIHost: sections that older machine types do not migrate
# ---------------------------------------------------------------------------

PCSPK = _vmsd("pcspk", 1, ("data_on", "uint8", 1), ("dummy_refresh_clock", "uint8", 1))
PCIHOST = _vmsd("PCIHost", 1, ("config_reg", "uint32", 4))


def pcspk_up(m: Machine) -> Machine:
    # pc_compat_2_7 sets isa-pcspk migrate=off (vmstate_spk.needed = migrate_needed).  The
    # older destination keeps the speaker's initial state: data_on and the refresh-clock
    # toggle both 0.
    if m.one("pcspk") is not None or m.one("i8254") is None:
        return m
    return add_section(m, new_section("pcspk", 0, Node(PCSPK, {"data_on": 0, "dummy_refresh_clock": 0})),
                       after="i8254")


def pcihost_up(m: Machine) -> Machine:
    # hw_compat_5_0 sets pci-host-bridge x-config-reg-migration-enabled=off (pci_host_needed).
    # The older destination's CONFIG_ADDRESS register after loading is its reset value, 0.  One host bridge,
    # one PCIHost, however many buses: a pcie-root-port or pci-bridge adds a PCIBUS section of its own.
    if m.one("PCIHost") is not None or not m.find("PCIBUS"):
        return m
    return add_section(m, new_section("PCIHost", 0, Node(PCIHOST, {"config_reg": 0})), before="PCIBUS")


# ---------------------------------------------------------------------------
# SMBus (smbus_no_migration_support on pc/q35 <= 3.1)
# ---------------------------------------------------------------------------

PMSMB = _vmsd("pmsmb", 1, ("smb_stat", "uint8", 1), ("smb_ctl", "uint8", 1), ("smb_cmd", "uint8", 1),
              ("smb_addr", "uint8", 1), ("smb_data0", "uint8", 1), ("smb_data1", "uint8", 1),
              ("smb_index", "uint32", 4), Field("smb_data", "uint8", 1, count=32, array=True),
              ("smb_auxctl", "uint8", 1), ("smb_blkdata", "uint8", 1), ("i2c_enable", "bool", 1),
              ("op_done", "bool", 1), ("in_i2c_block_read", "bool", 1),
              ("start_transaction_on_status_read", "bool", 1))


def _pmsmb_reset(force_aux_blk: bool) -> dict[str, Any]:
    # pm_smbus_init + pm_smbus_reset: everything 0 except op_done; PIIX4 forces the
    # block-buffer bit (AUX_BLK, 0x02) of the auxiliary control register on.
    return {"smb_stat": 0, "smb_ctl": 0, "smb_cmd": 0, "smb_addr": 0, "smb_data0": 0, "smb_data1": 0,
            "smb_index": 0, "smb_data": [0] * 32, "smb_auxctl": 0x02 if force_aux_blk else 0, "smb_blkdata": 0,
            "i2c_enable": False, "op_done": True, "in_i2c_block_read": False,
            "start_transaction_on_status_read": False}


SMB_FIELD = Field("smb", "struct", 48, struct=PMSMB)


def piix4_smb_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # pc-i440fx-3.1 sets smbus_no_migration_support: piix4_vmstate_need_smbus is false and the
    # SMBus host controller is not migrated; the older destination keeps its reset state.
    n = node(sec)
    if _has(n, "smb"):
        return sec
    return with_node(sec, add_field(n, SMB_FIELD, _pmsmb_reset(True), after="apm"))


def ich9_smb_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # pc-q35-3.1 sets smbus_no_migration_support: ich9_vmstate_need_smbus is false for both
    # irq_enabled and smb; the older destination keeps the reset state (irq disabled).
    n = node(sec)
    if _has(n, "smb"):
        return sec
    n = add_field(n, Field("irq_enabled", "bool", 1), False, after="dev")
    return with_node(sec, add_field(n, SMB_FIELD, _pmsmb_reset(False), after="irq_enabled"))


def _drop_fields(*names: str) -> SectionFn:
    def fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        n = node(sec)
        changed = False
        for name in names:
            if name in n.tree:
                n = drop_field(n, name)
                changed = True
        return with_node(sec, n) if changed else sec

    fn.__name__ = "drop_" + "_".join(names)
    return fn


def smbus_eeprom_down(m: Machine) -> Machine:
    # smbus_eeprom_vmstate_needed is false with smbus_no_migration_support: the SPD EEPROMs
    # (sent by newer machine types once the guest read them) are not migrated.
    return drop_sections(m, "smbus-eeprom")


# ---------------------------------------------------------------------------
# i8042 (hw_compat_6_0: i8042 extended-state=false)
# ---------------------------------------------------------------------------

KBD_EXTENDED = _vmsd("pckbd/extended_state", 0, ("migration_flags", "uint32", 4), ("obsrc", "uint32", 4),
                     ("obdata", "uint8", 1), ("cbdata", "uint8", 1))
KBD_STAT_OBF, KBD_STAT_MOUSE_OBF = 0x01, 0x20
KBD_PENDING_KBD_COMPAT, KBD_PENDING_AUX_COMPAT = 0x01, 0x02
KBD_PENDING_CTRL_KBD, KBD_PENDING_CTRL_AUX, KBD_PENDING_KBD, KBD_PENDING_AUX = 0x04, 0x08, 0x10, 0x20
KBD_OBSRC_KBD, KBD_OBSRC_MOUSE = 0x01, 0x02


def pckbd_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # Mirrors kbd_post_load for a stream without pckbd/extended_state: the pending mask
    # comes in compat form (bits 0x01 keyboard, 0x02 aux) and is widened to
    # KBD_PENDING_KBD/AUX; the output-buffer source is derived from the status register
    # (OBF, and MOUSE_OBF for aux); obdata/cbdata keep their initial 0 and no throttle timer
    # is pending (the older machine type has none).
    n = node(sec)
    kbd = get(n, "kbd")
    if "pckbd/extended_state" in kbd:
        return sec
    if "pending_tmp" not in kbd:
        raise CompatError("kbd has no pending_tmp (QEMU 5.2 calls it pending): a stream of QEMU 5.2 read as QEMU "
                          "7.2's? name its QEMU version (--from-qemu-version 5.2, --from-machine MACHINE@5.2)")
    compat = kbd["pending_tmp"]
    if compat & ~(KBD_PENDING_KBD_COMPAT | KBD_PENDING_AUX_COMPAT):
        raise CompatError(f"pending_tmp={compat:#x}: a machine type without extended i8042 state writes only "
                          f"bits 0x01 and 0x02 (kbd_pre_save)")
    pending = compat
    if compat & KBD_PENDING_KBD_COMPAT:
        pending |= KBD_PENDING_KBD
    if compat & KBD_PENDING_AUX_COMPAT:
        pending |= KBD_PENDING_AUX
    pending &= KBD_PENDING_CTRL_KBD | KBD_PENDING_CTRL_AUX | KBD_PENDING_KBD | KBD_PENDING_AUX
    status = kbd["status"]
    obsrc = (KBD_OBSRC_MOUSE if status & KBD_STAT_MOUSE_OBF else KBD_OBSRC_KBD) if status & KBD_STAT_OBF else 0
    n = set_field(n, "pending_tmp", pending, path=("kbd",))
    n = add_subsection(n, KBD_EXTENDED, {"migration_flags": 0, "obsrc": obsrc, "obdata": 0, "cbdata": 0},
                       path=("kbd",))
    return with_node(sec, n)


def pckbd_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    # Mirrors kbd_pre_save without extended state: only "keyboard/aux data pending" survive,
    # as the compat bits; controller-originated bytes and the throttle timer are lost.
    n = node(sec)
    kbd = get(n, "kbd")
    if "pckbd/extended_state" not in kbd:
        return sec
    pending = kbd["pending_tmp"]
    compat = (KBD_PENDING_KBD_COMPAT if pending & KBD_PENDING_KBD else 0) | \
             (KBD_PENDING_AUX_COMPAT if pending & KBD_PENDING_AUX else 0)
    n = set_field(n, "pending_tmp", compat, path=("kbd",))
    return with_node(sec, drop_subsection(n, "pckbd/extended_state", path=("kbd",)))


# ---------------------------------------------------------------------------
# ACPI PCI hotplug
# ---------------------------------------------------------------------------

PCIHP_STATUS = _vmsd("acpi_pcihp_pci_status", 1, ("up", "uint32", 4), ("down", "uint32", 4))
ACPI_PCIHP_MAX_HOTPLUG_BUS = 256
ICH9_PCIHP = _vmsd("ich9_pm/pcihp", 1, ("acpi_pci_hotplug.hotplug_select", "uint32", 4),
                   Field("acpi_pci_hotplug.acpi_pcihp_pci_status", "struct", 8, count=ACPI_PCIHP_MAX_HOTPLUG_BUS,
                         array=True, struct=PCIHP_STATUS),
                   ("acpi_pci_hotplug.acpi_index", "uint32", 4))
ACPI_INDEX = "acpi_pci_hotplug.acpi_index"


def piix4_acpi_index_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # hw_compat_6_2 sets PIIX4_PM x-not-migrate-acpi-index=on (vmstate_test_migrate_acpi_index).
    # The field exists only with ACPI PCI hotplug on the root bus; the older destination's
    # acpi_index selector register keeps its reset value 0.
    n = node(sec)
    if ACPI_INDEX in n.tree or "acpi_pci_hotplug.hotplug_select" not in n.tree:
        return sec
    return with_node(sec, add_field(n, Field(ACPI_INDEX, "uint32", 4), 0,
                                    after="acpi_pci_hotplug.acpi_pcihp_pci_status"))


def ich9_pcihp_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # pc_compat_6_0 sets ICH9-LPC acpi-pci-hotplug-with-bridge-support=off: the older
    # machine has no ACPI PCI hotplug controller, so the newer one's starts from reset
    # (acpi_pcihp_reset: no slot selected, no pending up/down events).
    n = node(sec)
    pm = get(n, "pm")
    if "ich9_pm/pcihp" in pm:
        return sec
    tree = {"acpi_pci_hotplug.hotplug_select": 0,
            "acpi_pci_hotplug.acpi_pcihp_pci_status": [{"up": 0, "down": 0}] * ACPI_PCIHP_MAX_HOTPLUG_BUS,
            ACPI_INDEX: 0}
    return with_node(sec, add_subsection(n, ICH9_PCIHP, tree, path=("pm",)))


# ---------------------------------------------------------------------------
# HPET (hw_compat_2_11: hpet hpet-offset-saved=false)
# ---------------------------------------------------------------------------

HPET_OFFSET = _vmsd("hpet/offset", 1, ("hpet_offset", "uint64", 8))
HPET_CFG_ENABLE = 0x001
HPET_CLK_PERIOD = 10  # ns per HPET tick


def hpet_offset_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # Without hpet-offset-saved, hpet_post_load recomputes the offset between the main
    # counter and guest time: ticks_to_ns(hpet_counter) - QEMU_CLOCK_VIRTUAL.  The virtual
    # clock of a destination loading a stream is the stopped clock the "timer" section
    # carries (cpu_clock_offset), so the offset is derived from the two sections.  The
    # subsection is needed only while the HPET is enabled (hpet_offset_needed).
    n = node(sec)
    if _has(n, "hpet/offset") or not (sec.state.get("config", 0) & HPET_CFG_ENABLE):
        return sec
    timer = m.one("timer")
    if timer is None or "cpu_clock_offset" not in timer.state:
        raise CompatError("the HPET is enabled, but there is no 'timer' section to tell the guest time "
                          "its offset must be derived from")
    offset = (sec.state["hpet_counter"] * HPET_CLK_PERIOD - timer.state["cpu_clock_offset"]) % (1 << 64)
    return with_node(sec, add_subsection(n, HPET_OFFSET, {"hpet_offset": offset}))


# ---------------------------------------------------------------------------
# e1000
# ---------------------------------------------------------------------------

E1000_FULL_MAC = _vmsd("e1000/full_mac_state", 1, Field("mac_reg", "uint32", 4, count=0x8000, array=True))
E1000_TSO = _vmsd("e1000/tx_tso_state", 1, ("tx.tso_props.ipcss", "uint8", 1), ("tx.tso_props.ipcso", "uint8", 1),
                  ("tx.tso_props.ipcse", "uint16", 2), ("tx.tso_props.tucss", "uint8", 1),
                  ("tx.tso_props.tucso", "uint8", 1), ("tx.tso_props.tucse", "uint16", 2),
                  ("tx.tso_props.paylen", "uint32", 4), ("tx.tso_props.hdr_len", "uint8", 1),
                  ("tx.tso_props.mss", "uint16", 2), ("tx.tso_props.ip", "int8", 1),
                  ("tx.tso_props.tcp", "int8", 1))
_TSO_PROPS = ("ipcss", "ipcso", "ipcse", "tucss", "tucso", "tucse", "paylen", "hdr_len", "mss", "ip", "tcp")

# Register offsets (dword index = byte offset / 4) of the registers the main e1000
# section carries one by one (hw/net/e1000_regs.h).
E1000_REGS = {
    "CTRL": 0x00000, "STATUS": 0x00008, "EECD": 0x00010, "EERD": 0x00014, "MDIC": 0x00020, "VET": 0x00038,
    "ICR": 0x000C0, "ICS": 0x000C8, "IMS": 0x000D0, "IMC": 0x000D8, "RCTL": 0x00100, "TCTL": 0x00400,
    "LEDCTL": 0x00E00, "PBA": 0x01000, "RDBAL": 0x02800, "RDBAH": 0x02804, "RDLEN": 0x02808, "RDH": 0x02810,
    "RDT": 0x02818, "RDTR": 0x02820, "RADV": 0x0282C, "TDBAL": 0x03800, "TDBAH": 0x03804, "TDLEN": 0x03808,
    "TDH": 0x03810, "TDT": 0x03818, "TXDCTL": 0x03828, "TADV": 0x0382C, "MPC": 0x04010, "GPRC": 0x04074,
    "GPTC": 0x04080, "TORL": 0x040C0, "TORH": 0x040C4, "TOTL": 0x040C8, "TOTH": 0x040CC, "TPR": 0x040D0,
    "TPT": 0x040D4, "WUFC": 0x05808, "MANC": 0x05820, "SWSM": 0x05B50, "ITR": 0x000C4,
}
# The three VMSTATE_UINT32_SUB_ARRAY(mac_reg, ...) fields share one name, so their vmdesc
# names are mac_reg[0] (RA), mac_reg[1] (MTA) and mac_reg[2] (VFTA).
E1000_ARRAYS = {"mac_reg[0]": (0x05400, 32), "mac_reg[1]": (0x05200, 128), "mac_reg[2]": (0x05600, 128)}
E1000_MIT = {"RDTR": "mac_reg[RDTR]", "RADV": "mac_reg[RADV]", "TADV": "mac_reg[TADV]", "ITR": "mac_reg[ITR]"}


def e1000_full_mac_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # hw_compat_2_4 sets e1000 extra_mac_registers=off: only the registers of the main
    # section (and e1000/mit_state) are migrated and the others are neither written nor
    # read by that device model, so they stay 0 (mac_reg_init sets only registers the main
    # section carries).  e1000/full_mac_state is the whole register file: derive it from
    # the registers the stream carries.
    n = node(sec)
    if _has(n, "e1000/full_mac_state"):
        return sec
    regs = [0] * 0x8000
    state = sec.state
    for name, offset in E1000_REGS.items():
        key = f"mac_reg[{name}]"
        if key in state:
            regs[offset >> 2] = state[key]
    mit = state.get("e1000/mit_state", {})
    for name, key in E1000_MIT.items():
        if key in mit:
            regs[E1000_REGS[name] >> 2] = mit[key]
    for key, (offset, count) in E1000_ARRAYS.items():
        values = state.get(key)
        if not isinstance(values, list) or len(values) != count:
            raise CompatError(f"e1000 section without a {count}-element {key}: not QEMU 7.2's e1000 layout")
        regs[offset >> 2:(offset >> 2) + count] = list(values)
    return with_node(sec, add_subsection(n, E1000_FULL_MAC, {"mac_reg": regs}, before="e1000/tx_tso_state"))


def e1000_tso_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # hw_compat_2_11 sets e1000 migrate_tso_props=off: one set of offload properties travels
    # (mig_props), and e1000_post_load without e1000/tx_tso_state copies it into both
    # tx.props and tx.tso_props ("the best we can do is dupe the data").
    n = node(sec)
    if _has(n, "e1000/tx_tso_state"):
        return sec
    tree = {f"tx.tso_props.{p}": sec.state[f"mig_props.{p}"] for p in _TSO_PROPS}
    return with_node(sec, add_subsection(n, E1000_TSO, tree))


# ---------------------------------------------------------------------------
# VGA (hw_compat_2_12: VGA global-vmstate=true)
# ---------------------------------------------------------------------------

VRAM = "vga.vram"
#: The option ROM blocks of the devices that hw_compat_2_12 gives global-vmstate (VGA, cirrus-vga, vmware-svga,
#: qxl-vga): QEMU names a PCI device's ROM block after its vmsd ("<pci path>/<vmsd>.rom").
VGA_ROMS = ("vga.rom", "cirrus_vga.rom", "vmware_vga.rom", "qxl.rom")


def vga_vram_up(blocks: Sequence[RamBlock]) -> dict[str, str]:
    # With global-vmstate the VGA's video RAM is registered without its device path
    # (vmstate_register_ram(..., NULL)), so its RAM block is "vga.vram"; newer machine types
    # name it "<pci path>/vga.vram".  The path is the VGA device's: take it from the
    # device's option ROM block in the same list ("<pci path>/vga.rom", or cirrus-vga's, ...).
    names = [b.name for b in blocks]
    if VRAM not in names:
        return {}
    roms = [name.rsplit("/", 1)[0] for name in names if "/" in name and name.rsplit("/", 1)[1] in VGA_ROMS]
    if len(roms) != 1:
        raise CompatError(f"cannot tell which PCI device owns RAM block {VRAM!r}: expected the option ROM block of "
                          f"one VGA device ('<path>/{VGA_ROMS[0]}', '<path>/{VGA_ROMS[1]}', ...), found {len(roms)}")
    return {VRAM: f"{roms[0]}/{VRAM}"}


def vga_vram_down(blocks: Sequence[RamBlock]) -> dict[str, str]:
    return {b.name: VRAM for b in blocks if b.name.endswith("/" + VRAM)}


# ---------------------------------------------------------------------------
# Devices behind PCI Express ports (q35; libvirt puts every PCI device behind a pcie-root-port)
# ---------------------------------------------------------------------------


def _refuse_behind_express_slot(fn: SectionFn, why: str) -> SectionFn:
    """``fn``, but a CompatError for a device behind a PCI Express root or downstream port."""
    def wrapped(sec: DeviceSection, m: Machine) -> DeviceSection:
        if pcie.behind_express_slot(m, sec):
            raise CompatError(f"{sec.idstr}: {why}")
        return fn(sec, m)

    wrapped.__name__ = getattr(fn, "__name__", "wrapped")
    return wrapped


# ---------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------

_INVERSE = {"section-added": "section-removed", "section-removed": "section-added",
            "field-added": "field-removed", "field-removed": "field-added",
            "subsection-added": "subsection-removed", "subsection-removed": "subsection-added",
            "ram-block-renamed": "ram-block-renamed", "version": "version", "field-resized": "field-resized",
            "configuration-added": "configuration-removed", "footers-added": "footers-removed"}


def _inverse(changes: Sequence[Change]) -> list[Change]:
    return [dataclasses.replace(c, kind=_INVERSE[c.kind]) for c in changes]


class _Catalogue:
    """Registers a change on one line in both directions."""

    def __init__(self, reg: Registry, line: str, releases: Sequence[str]) -> None:
        self.reg = reg
        self.line = line
        self.names = list(releases)
        self.touched: set[tuple[str, str]] = set()

    def rel(self, version: str) -> str:
        return f"{self.line}-{version}"

    def step(self, newer: str) -> tuple[str, str]:
        """(older, newer) release names for the step that introduced ``newer``."""
        name = self.rel(newer)
        i = self.names.index(name)
        return self.names[i - 1], name

    def section(self, newer: str, section: str, name: str, *, up: SectionFn | None, down: SectionFn | None,
                mirrors: str, changes: Sequence[Change] = (), up_lossless: bool = True,
                down_lossless: bool = False, peek: Sequence[str] = ()) -> None:
        old, new = self.step(newer)
        ident: SectionFn = lambda sec, m: sec  # noqa: E731
        self.reg.section(section, old, new, up or ident, lossless=up_lossless, mirrors=mirrors, name=name,
                         changes=changes, peek=peek)
        self.reg.section(section, new, old, down or ident, lossless=down_lossless, mirrors=mirrors, name=name,
                         changes=_inverse(changes))
        self.touched.add((old, new))

    def machine(self, newer: str, name: str, *, up: Callable[[Machine], Machine] | None,
                down: Callable[[Machine], Machine] | None, mirrors: str, changes: Sequence[Change] = (),
                up_lossless: bool = True, down_lossless: bool = False,
                ram_up: Callable[[Sequence[RamBlock]], Mapping[str, str]] | None = None,
                ram_down: Callable[[Sequence[RamBlock]], Mapping[str, str]] | None = None,
                peek: Sequence[str] = ()) -> None:
        old, new = self.step(newer)
        self.reg.machine(old, new, up, lossless=up_lossless, mirrors=mirrors, name=name, ram=ram_up, peek=peek,
                         changes=changes)
        self.reg.machine(new, old, down, lossless=down_lossless, mirrors=mirrors, name=name, ram=ram_down,
                         changes=_inverse(changes))
        self.touched.add((old, new))

    def quiet(self, notes: Mapping[str, str]) -> None:
        """Register the steps that change nothing a stream carries, with the reason."""
        for old, new in zip(self.names, self.names[1:]):
            if (old, new) in self.touched:
                continue
            version = new.rsplit("-", 1)[1]
            why = notes.get(version, "no compat property of this step changes the migrated state of the "
                                     "supported devices")
            self.reg.machine(old, new, None, lossless=True, mirrors=why, name="no-change")
            self.reg.machine(new, old, None, lossless=True, mirrors=why, name="no-change")


# Why the steps without a transform need none (for the devices in scope).
_QUIET = {
    "2.6": "hw_compat_2_5/pc_compat_2_5: isa-fdc fallback=144 (drive geometry), pvscsi/vmxnet3 PCI layout, "
           "legacy fw_cfg file order (fw_cfg entries are not migrated), tsc-khz not saved (KVM only)",
    "2.9": "hw_compat_2_8/pc_compat_2_8: fw_cfg file slots, PCIe extended capability init and virtio-pci "
           "DEVCTL/LNKCTL/PM init (which bytes of a PCI Express device the guest may write, not what they hold), "
           "cirrus vgamem, kvmclock and ICH9 SMI broadcast (negotiated by firmware, not sent "
           "when unused), tcg-cpuid: no migrated state changes",
    "2.10": "hw_compat_2_9/pc_compat_2_9: pci-bridge shpc, intel-iommu, virtio-net MTU bypass (a feature offered "
            "only with host_mtu), mch extended TSEG size (its config register keeps what the "
            "guest last saw): no change for these devices",
    "2.11": "hw_compat_2_10/pc_compat_2_10: virtio input wheel axis, hv-max-vps, pci-hole64-fix (memory map "
            "only): no migrated state changes",
    "3.1": "hw_compat_3_0 is empty; pc_compat_3_0 changes CPUID bits of some CPU models only",
    "4.0.1": "pc-q35-4.0.1 differs from pc-q35-4.0 only in the default for split irqchip (KVM)",
    "4.2": "hw_compat_4_1: virtio-pci FLR capability (virtio-pci devices behind PCI Express ports only: none on "
           "the i440FX)",
    "5.2": "hw_compat_5_1/pc_compat_5_1: virtio queue counts of block/SCSI devices, ATS page alignment (PCI "
           "Express only), pvpanic events, kvmclock creation, ICH9 SMI CPU hotplug feature (negotiated by "
           "firmware): no change for these devices",
    "6.2": "hw_compat_6_1/pc_compat_6_1: vhost-vsock seqpacket, nvme-ns, Hyper-V version ids",
    "7.0": "hw_compat_6_2: PIIX4_PM x-not-migrate-acpi-index (the i440FX's power management device; q35's "
           "ICH9 always migrates acpi_index)",
    "7.1": "hw_compat_7_0/pc_compat_7_0: GICv3/NVMe only; AMD 1 TB hole (memory map)",
}


def _virtio_pci_steps(c: _Catalogue, vmsd: str) -> None:
    """The steps every virtio-pci device of vmsd ``vmsd`` takes: the proxy's and the virtio core's compat
    properties (see :mod:`.virtio`)."""
    c.section("2.5", vmsd, "virtio/extra_state", up=virtio.on_blob(virtio.extra_state_up),
              down=virtio.on_blob(virtio.extra_state_down),
              mirrors="hw_compat_2_4: virtio-pci migrate-extra=off (virtio_pci_has_extra_state)",
              changes=[Change("field-resized", vmsd, "virtio")])
    c.section("2.7", vmsd, "virtio-pci modern",
              up=_refuse_behind_express_slot(virtio.on_blob(virtio.modern_up), virtio.EXPRESS_MODERN),
              down=_refuse_behind_express_slot(virtio.on_blob(virtio.modern_down), virtio.EXPRESS_MODERN),
              mirrors="hw_compat_2_6: virtio-pci disable-modern=on, disable-legacy=off (legacy-only device: "
                      "no virtio 1.0 capabilities, no BAR 4, no VERSION_1, no modern queue state); refused "
                      "for a device behind a PCI Express port (modern-only, PCI Express on newer machine types)",
              changes=[Change("field-resized", vmsd, "virtio")])
    c.section("2.8", vmsd, "virtio-pci page-per-vq", up=virtio.on_blob(virtio.page_per_vq_off),
              down=virtio.on_blob(virtio.page_per_vq_on), up_lossless=True, down_lossless=True,
              mirrors="hw_compat_2_7: virtio-pci page-per-vq=on (virtio_pci_queue_mem_mult: notify "
                      "multiplier and BAR 4 size in the config space)")
    c.section("4.1", vmsd, "virtio/started", up=virtio.on_blob(virtio.started_up),
              down=virtio.on_blob(virtio.started_down),
              mirrors="hw_compat_4_0: virtio-device use-started=false (virtio_set_started, "
                      "virtio_started_needed)")
    c.section("5.0", vmsd, "virtio/disabled", up=None, down=virtio.on_blob(virtio.disabled_down),
              mirrors="hw_compat_4_2: virtio-device use-disabled-flag=false (virtio_set_disabled)")
    c.section("7.2", vmsd, "virtio ring reset", up=virtio.on_blob(virtio.ring_reset_up),
              down=virtio.on_blob(virtio.ring_reset_down), up_lossless=True, down_lossless=True,
              mirrors="hw_compat_7_1: virtio-device queue_reset=false (VIRTIO_F_RING_RESET not offered)")


def register(reg: Registry) -> None:
    """Register the x86 machine-type lines and every step between neighbours, both ways."""
    reg.line(PC_LINE, PC)
    reg.line(Q35_LINE, Q35)
    pc = _Catalogue(reg, PC_LINE, [r.name for r in PC])
    q35 = _Catalogue(reg, Q35_LINE, [r.name for r in Q35])
    both = (pc, q35)

    # 2.3 -> 2.4 (pc only): configuration, footers and globalstate
    pc.machine("2.4", "migration-globals", up=globalstate_up, down=globalstate_down,
               up_lossless=True, down_lossless=False,
               mirrors="hw_compat_2_3: migration send-configuration, send-section-footer and store-global-state "
                       "off; the stream gets/loses the configuration section (with the machine name QEMU "
                       "compares) and section footers, and globalstate is sent for every run state",
               changes=[Change("section-added", "globalstate"), Change("configuration-added", "configuration"),
                        Change("footers-added", "stream")])

    # 2.4 -> 2.5
    for c in both:
        c.section("2.5", "fw_cfg", "fw_cfg/dma", up=fw_cfg_dma_up, down=_drop_sub("fw_cfg/dma"),
                  mirrors="hw_compat_2_4: fw_cfg_io/fw_cfg_mem dma_enabled=off (fw_cfg/dma.needed = "
                          "fw_cfg_dma_enabled)",
                  changes=[Change("subsection-added", "fw_cfg", "fw_cfg/dma")])
        c.section("2.5", "e1000", "e1000/full_mac_state", up=e1000_full_mac_up, down=_drop_sub("e1000/full_mac_state"),
                  mirrors="hw_compat_2_4: e1000 extra_mac_registers=off (e1000_full_mac_needed)",
                  changes=[Change("subsection-added", "e1000", "e1000/full_mac_state")])

    # 2.7 -> 2.8
    for c in both:
        c.machine("2.8", "pcspk", up=pcspk_up, down=lambda m: drop_sections(m, "pcspk"),
                  mirrors="pc_compat_2_7: isa-pcspk migrate=off (vmstate_spk.needed)",
                  changes=[Change("section-added", "pcspk")])

    # 2.11 -> 2.12
    for c in both:
        c.section("2.12", "e1000", "e1000/tx_tso_state", up=e1000_tso_up, down=_drop_sub("e1000/tx_tso_state"),
                  mirrors="hw_compat_2_11: e1000 migrate_tso_props=off (e1000_tso_state_needed, e1000_post_load)",
                  changes=[Change("subsection-added", "e1000", "e1000/tx_tso_state")])
        c.section("2.12", "hpet", "hpet/offset", up=hpet_offset_up, down=_drop_sub("hpet/offset"),
                  mirrors="hw_compat_2_11: hpet hpet-offset-saved=false (hpet_offset_needed, hpet_post_load)",
                  changes=[Change("subsection-added", "hpet", "hpet/offset")])
        c.section("2.12", "cpu", "cpu/msr_smi_count", up=None, down=_drop_sub("cpu/msr_smi_count"),
                  mirrors="pc_compat_2_11: x86 CPU x-migrate-smi-count=off (msr_smi_count_needed); the older "
                          "machine's count after loading is 0, for which the subsection is not sent",
                  changes=[Change("subsection-added", "cpu", "cpu/msr_smi_count")])

    # 2.12 -> 3.0
    for c in both:
        c.machine("3.0", "vga-vram-name", up=None, down=None, up_lossless=True, down_lossless=True,
                  ram_up=vga_vram_up, ram_down=vga_vram_down,
                  mirrors="hw_compat_2_12: VGA global-vmstate=true (vga_common_init registers the video RAM "
                          "without the device path)",
                  changes=[Change("ram-block-renamed", "ram", VRAM)])

    # 3.1 -> 4.0
    pc.section("4.0", "piix4_pm", "piix4_pm/smb", up=piix4_smb_up, down=_drop_fields("smb"),
               mirrors="pc-i440fx-3.1 smbus_no_migration_support (piix4_vmstate_need_smbus)",
               changes=[Change("field-added", "piix4_pm", "smb")])
    q35.section("4.0", "ich9_smb", "ich9_smb/smb", up=ich9_smb_up, down=_drop_fields("smb", "irq_enabled"),
                mirrors="pc-q35-3.1 smbus_no_migration_support (ich9_vmstate_need_smbus)",
                changes=[Change("field-added", "ich9_smb", "irq_enabled"), Change("field-added", "ich9_smb", "smb")])
    for c in both:
        c.machine("4.0", "smbus-eeprom", up=None, down=smbus_eeprom_down,
                  mirrors="smbus_no_migration_support (smbus_eeprom_vmstate_needed); sent by newer machine types "
                          "only after the guest read an SPD EEPROM",
                  changes=[Change("section-added", "smbus-eeprom")])

    # 4.2 -> 5.0
    for c in both:
        c.section("5.0", "fw_cfg", "fw_cfg/acpi_mr", up=fw_cfg_acpi_mr_up, down=_drop_sub("fw_cfg/acpi_mr"),
                  peek=[ACPI_RSDP],
                  mirrors="hw_compat_4_2: fw_cfg acpi-mr-restore=false (fw_cfg_acpi_mr_restore; the RSDP size "
                          "is read from the RSDP in guest memory)",
                  changes=[Change("subsection-added", "fw_cfg", "fw_cfg/acpi_mr")])

    # 5.0 -> 5.1
    for c in both:
        c.machine("5.1", "PCIHost", up=pcihost_up, down=lambda m: drop_sections(m, "PCIHost"),
                  mirrors="hw_compat_5_0: pci-host-bridge x-config-reg-migration-enabled=off (pci_host_needed)",
                  changes=[Change("section-added", "PCIHost")])

    # 6.0 -> 6.1
    for c in both:
        c.section("6.1", "pckbd", "pckbd/extended_state", up=pckbd_up, down=pckbd_down,
                  mirrors="hw_compat_6_0: i8042 extended-state=false (kbd_extended_state_needed, kbd_pre_save, "
                          "kbd_post_load)",
                  changes=[Change("subsection-added", "pckbd", "kbd/pckbd/extended_state")])
    q35.section("6.1", "ICH9LPC", "ich9_pm/pcihp", up=ich9_pcihp_up, down=_drop_sub("ich9_pm/pcihp", ("pm",)),
                mirrors="pc_compat_6_0: ICH9-LPC acpi-pci-hotplug-with-bridge-support=off (vmstate_test_use_pcihp)",
                changes=[Change("subsection-added", "ICH9LPC", "pm/ich9_pm/pcihp")])

    # 6.2 -> 7.0
    pc.section("7.0", "piix4_pm", "piix4_pm/acpi_index", up=piix4_acpi_index_up, down=_drop_fields(ACPI_INDEX),
               mirrors="hw_compat_6_2: PIIX4_PM x-not-migrate-acpi-index=on (vmstate_test_migrate_acpi_index)",
               changes=[Change("field-added", "piix4_pm", ACPI_INDEX)])

    # virtio-net-pci: the proxy's and the virtio core's compat properties (see .virtio), and its vector count
    vn = "virtio-net"
    for c in both:
        _virtio_pci_steps(c, vn)
        c.section("6.0", vn, "virtio-net-pci vectors", up=virtio.on_blob(virtio.vectors_up),
                  down=virtio.on_blob(virtio.vectors_down),
                  mirrors="hw_compat_5_2: virtio-net-pci-base vectors=3 (virtio_net_pci_realize's default is "
                          "2 * queue pairs + 2)",
                  changes=[Change("field-resized", vn, "virtio")])

    # virtio-rng-pci: the same virtio-pci and virtio core steps, and its own vector count
    rng = "virtio-rng"
    for c in both:
        _virtio_pci_steps(c, rng)
        c.section("7.2", rng, "virtio-rng-pci vectors", up=virtio.on_blob(virtio.msix_added),
                  down=virtio.on_blob(virtio.msix_removed),
                  mirrors="hw_compat_7_1: virtio-rng-pci vectors=0 (no MSI-X capability, no BAR 1)",
                  changes=[Change("field-resized", rng, "virtio")])

    # virtio-balloon-pci (libvirt's default memory balloon): the same steps, and the size of its config, which
    # sizes its legacy I/O BAR too: that the destination keeps as the source had it (see .pinned)
    balloon = "virtio-balloon"
    short, full = virtio.BALLOON_CONFIG_SHORT, virtio.BALLOON_CONFIG_FULL
    for c in both:
        _virtio_pci_steps(c, balloon)
        for version, name, up, down, mirrors in (
                ("4.0", "virtio-balloon config size", full, short,
                 "hw_compat_3_1: virtio-balloon-device qemu-4-0-config-size=false (virtio_balloon_config_size: 8 "
                 "bytes, 16 on the 4.0 machine types)"),
                ("4.1", "virtio-balloon config size", short, full,
                 "hw_compat_4_0: virtio-balloon-device qemu-4-0-config-size=true"),
                ("5.1", "virtio-balloon page-poison", full, short,
                 "hw_compat_5_0: virtio-balloon-device page-poison=false (VIRTIO_BALLOON_F_PAGE_POISON: 16 bytes of "
                 "config, a 64-byte legacy I/O BAR)")):
            c.section(version, balloon, name, up=virtio.on_blob(virtio.balloon_config(up)),
                      down=virtio.on_blob(virtio.balloon_config(down)),
                      mirrors=mirrors + "; the destination keeps the source's value (compat/machines/pinned.py)",
                      changes=[Change("field-resized", balloon, "virtio")])

    for dev in (vn, rng, balloon):
        q35.section("4.2", dev, "virtio-pci FLR", up=virtio.on_blob(virtio.flr_up),
                    down=virtio.on_blob(virtio.flr_down), up_lossless=True, down_lossless=True,
                    mirrors="hw_compat_4_1: virtio-pci x-pcie-flr-init=off (pcie_cap_flr_init: Device Capabilities' "
                            "Function Level Reset bit, read-only and compared on load; a virtio-pci device behind a "
                            "PCI Express port only)")

    # PCI Express root ports (q35 only)
    rp = pcie.ROOT_PORT
    q35.section("2.10", rp, "pcie-root-port msix", up=pcie.root_port_msix_up, down=pcie.root_port_msix_down,
                mirrors="hw_compat_2_9: pcie-root-port x-migrate-msix=false (gen_rp_test_migrate_msix); the older "
                        "machine type's destination keeps the MSI-X table it reset",
                changes=[Change("field-added", rp, pcie.MSIX_FIELD)])
    q35.section("4.0", rp, "pcie-root-port link", up=pcie.on_config(pcie.link_speed(True)),
                down=pcie.on_config(pcie.link_speed(False)), up_lossless=True, down_lossless=True,
                mirrors="hw_compat_3_1: pcie-root-port x-speed=2_5, x-width=1 (pcie_cap_fill_slot_lnk: Link "
                        "Capabilities, Link Capabilities 2 and Link Control 2's target speed, read-only and compared "
                        "on load)")
    q35.section("4.0", rp, "pcie-root-port ACS", up=pcie.on_config(pcie.acs(True)), down=pcie.on_config(pcie.acs(False)),
                mirrors="hw_compat_3_1: pcie-root-port-base disable-acs=true (pcie_acs_init: the ACS extended "
                        "capability at 0x148, chained after AER; going down whatever the guest enabled is lost)")
    presence = ("pc_compat_6_0: ICH9-LPC acpi-pci-hotplug-with-bridge-support=off (acpi_pcihp_device_plug_cb: "
                "from 6.1 on ACPI hot-plug handles the buses of cold-plugged bridges, so a PCI Express slot no longer "
                "sets Slot Status' presence detect, read-only and compared on load)")
    hpc = ("pc_compat_6_1: ICH9-LPC x-keep-pci-slot-hpc=false, which with ACPI hot-plug of bridges gives "
           "pc-q35-6.1 alone x-native-hotplug=false on every PCI Express slot (pc_q35_init): Slot Capabilities' "
           "hot-plug bits and pcie-root-port's resource reserve capability, read-only and compared on load")
    for slot in pcie.PCIE_SLOTS:
        q35.section("6.1", slot, f"{slot} presence", up=pcie.on_config(pcie.slot_presence(True)),
                    down=pcie.on_config(pcie.slot_presence(False)), up_lossless=True, down_lossless=True,
                    mirrors=presence)
        q35.section("6.1", slot, f"{slot} hot-plug", up=pcie.on_config(pcie.native_hotplug(False)),
                    down=pcie.on_config(pcie.native_hotplug(True)), up_lossless=True, down_lossless=True, mirrors=hpc)
        q35.section("6.2", slot, f"{slot} hot-plug", up=pcie.on_config(pcie.native_hotplug(True)),
                    down=pcie.on_config(pcie.native_hotplug(False)), up_lossless=True, down_lossless=True,
                    mirrors=hpc)

    pc.quiet(_QUIET)
    q35.quiet(_QUIET)
