"""The QEMU machine-type catalogue without QEMU: its shape, and each transform's values on small inputs."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmferry.compat import Machine, qemu_registry
from vmferry.compat.machines import PC, Q35, virtio, x86
from vmferry.compat.ops import Node, new_section
from vmferry.errors import CompatError
from vmferry.events import DeviceSection, RamBlock
from vmferry.serialize.describe import describe_section
from vmferry.serialize.schema import Field, Subsection, Vmsd


def test_every_neighbouring_step_is_registered_both_ways_with_its_reason() -> None:
    reg = qemu_registry()
    for line in (PC, Q35):
        names = [r.name for r in line]
        for a, b in zip(names, names[1:]):
            for s, t in ((a, b), (b, a)):
                ts = reg.transforms(s, t)
                assert ts, f"no transform {s} -> {t}"
                assert all(x.mirrors for x in ts), [x.name for x in ts if not x.mirrors]
    # + QEMU 10.0's (test_compat_qemu10), 11.1's and 5.2's (test_compat_releases)
    assert len(reg.releases) == len(PC) + len(Q35) + 16 + 10 + 2 == 24 + 24 + 16 + 10 + 2
    assert reg.release("pc-i440fx-2.3").configuration is False and reg.release("pc-i440fx-2.4").footers is True


def test_every_pair_of_a_line_has_one_plan() -> None:
    reg = qemu_registry()
    for line in (PC, Q35):
        names = [r.name for r in line]
        for a in names:
            for b in names:
                plan = reg.plan(a, b)
                assert plan.path[0] == a and plan.path[-1] == b
                assert len(plan.steps) == abs(names.index(a) - names.index(b))


def test_upgrades_are_lossless_and_downgrades_that_drop_are_lossy() -> None:
    reg = qemu_registry()
    assert reg.plan("pc-i440fx-2.3", "pc-i440fx-7.2").lossless
    assert reg.plan("pc-q35-2.4", "pc-q35-7.2").lossless
    assert not reg.plan("pc-i440fx-7.2", "pc-i440fx-2.12").lossless
    assert reg.plan("pc-i440fx-3.0", "pc-i440fx-2.12").lossless  # only the VGA RAM block's name changes


def test_no_path_between_the_lines_names_the_missing_step() -> None:
    with pytest.raises(CompatError, match=r"missing step: pc-i440fx-2.12 -> pc-q35-7.2"):
        qemu_registry().plan("pc-i440fx-2.12", "pc-q35-7.2")
    with pytest.raises(CompatError, match=r"unknown release 'pc-i440fx-12.0'"):  # 8.0 is QEMU 10.0's, 11.0 11.1's now
        qemu_registry().plan("pc-i440fx-7.2", "pc-i440fx-12.0")


# ------------------------------------------------------------ transforms


def sec(vmsd: Vmsd, tree: dict[str, Any], idstr: str | None = None, sid: int = 1) -> DeviceSection:
    name = idstr or vmsd.name
    return DeviceSection(sid, name, 0, vmsd.version_id, tree, vmsd, describe_section(vmsd, tree, name, 0))


KBD = Vmsd("pckbd", 3, 0, (Field("write_cmd", "uint8", 1), Field("status", "uint8", 1), Field("mode", "uint8", 1),
                           Field("pending_tmp", "uint8", 1)))
I8042 = Vmsd("pckbd", 3, 0, (Field("kbd", "struct", 4, struct=KBD),))


def kbd_section(status: int, pending: int) -> DeviceSection:
    return sec(I8042, {"kbd": {"write_cmd": 0, "status": status, "mode": 3, "pending_tmp": pending}})


@pytest.mark.parametrize(("status", "pending", "obsrc", "wide"), [
    (0x18, 0, 0, 0),
    (0x1D, 1, 1, 0x10),  # keyboard byte in the output buffer, keyboard data pending
    (0x3D, 2, 2, 0x20),  # mouse byte (MOUSE_OBF), aux data pending
    (0x1C, 3, 0, 0x30),
])
def test_pckbd_extended_state_mirrors_kbd_post_load(status: int, pending: int, obsrc: int, wide: int) -> None:
    up = x86.pckbd_up(kbd_section(status, pending), Machine("pc-i440fx-6.0"))
    kbd = up.state["kbd"]
    assert kbd["pending_tmp"] == wide
    assert kbd["pckbd/extended_state"] == {"migration_flags": 0, "obsrc": obsrc, "obdata": 0, "cbdata": 0}
    assert up.desc == {} or up.desc
    down = x86.pckbd_down(up, Machine("pc-i440fx-6.1"))
    assert down.state == kbd_section(status, pending).state


def test_pckbd_refuses_what_the_old_machine_never_writes() -> None:
    with pytest.raises(CompatError, match="pending_tmp=0x4"):
        x86.pckbd_up(kbd_section(0x18, 4), Machine("pc-i440fx-6.0"))


HPET = Vmsd("hpet", 2, 0, (Field("config", "uint64", 8), Field("isr", "uint64", 8), Field("hpet_counter", "uint64", 8)))
TIMER = Vmsd("timer", 2, 0, (Field("cpu_ticks_offset", "int64", 8), Field("unused", "unused_buffer", 8),
                             Field("cpu_clock_offset", "int64", 8)))


def test_hpet_offset_is_derived_from_the_counter_and_the_guest_clock() -> None:
    timer = sec(TIMER, {"cpu_ticks_offset": 5, "unused": bytes(8), "cpu_clock_offset": 2_000_000_000})
    enabled = sec(HPET, {"config": 1, "isr": 0, "hpet_counter": 300_000_000}, sid=2)
    m = Machine("pc-i440fx-2.11", (timer, enabled))
    up = x86.hpet_offset_up(enabled, m)
    assert up.state["hpet/offset"] == {"hpet_offset": 300_000_000 * 10 - 2_000_000_000}
    behind = sec(HPET, {"config": 1, "isr": 0, "hpet_counter": 1}, sid=2)
    assert x86.hpet_offset_up(behind, Machine("x", (timer, behind))).state["hpet/offset"]["hpet_offset"] == \
        (10 - 2_000_000_000) % (1 << 64)
    disabled = sec(HPET, {"config": 0, "isr": 0, "hpet_counter": 7}, sid=2)
    assert x86.hpet_offset_up(disabled, m) is disabled  # not needed while the HPET is off
    with pytest.raises(CompatError, match="no 'timer' section"):
        x86.hpet_offset_up(enabled, Machine("x", (enabled,)))


FW_CFG = Vmsd("fw_cfg", 2, 0, (Field("cur_entry", "uint16", 2),), (Subsection(x86.FW_CFG_DMA),))
ACPI_BLOCKS = (RamBlock("pc.ram", 1 << 26), RamBlock(x86.ACPI_TABLES, 0x20000), RamBlock(x86.ACPI_LOADER, 0x1000),
               RamBlock(x86.ACPI_RSDP, 0x1000))


def rsdp(revision: int, length: int = 36) -> bytes:
    head = b"RSD PTR " + bytes([0]) + b"BOCHS " + bytes([revision])
    return head + struct.pack("<I", 0) + struct.pack("<I", length) + bytes(64 - 24)


@pytest.mark.parametrize(("head", "size"), [(rsdp(0), 20), (rsdp(2, 36), 36), (None, 0x1000)])
def test_acpi_mr_sizes_come_from_the_ram_blocks_and_the_rsdp(head: bytes | None, size: int) -> None:
    fw = sec(FW_CFG, {"cur_entry": 0, "fw_cfg/dma": {"dma_addr": 0}})
    m = Machine("pc-i440fx-4.2", (fw,), ACPI_BLOCKS, {x86.ACPI_RSDP: head} if head else {})
    up = x86.fw_cfg_acpi_mr_up(fw, m)
    if size % 4096 == 0:
        assert up is fw  # every size page aligned: QEMU does not send it
        return
    assert up.state["fw_cfg/acpi_mr"] == {"table_mr_size": 0x20000, "linker_mr_size": 0x1000, "rsdp_mr_size": size}
    assert list(up.state) == ["cur_entry", "fw_cfg/dma", "fw_cfg/acpi_mr"]


def test_fw_cfg_dma_goes_before_acpi_mr() -> None:
    vmsd = Vmsd("fw_cfg", 2, 0, (Field("cur_entry", "uint16", 2),), (Subsection(x86.FW_CFG_ACPI_MR),))
    tree = {"cur_entry": 0, "fw_cfg/acpi_mr": {"table_mr_size": 1, "linker_mr_size": 2, "rsdp_mr_size": 3}}
    up = x86.fw_cfg_dma_up(sec(vmsd, tree), Machine("x"))
    assert list(up.state) == ["cur_entry", "fw_cfg/dma", "fw_cfg/acpi_mr"]
    assert [s.vmsd.name for s in up.schema.subsections] == ["fw_cfg/dma", "fw_cfg/acpi_mr"]


def test_vga_vram_block_takes_the_devices_path() -> None:
    blocks = [RamBlock("pc.ram", 1), RamBlock("vga.vram", 2), RamBlock("0000:00:02.0/vga.rom", 3)]
    assert x86.vga_vram_up(blocks) == {"vga.vram": "0000:00:02.0/vga.vram"}
    assert x86.vga_vram_down([RamBlock("0000:00:05.0/vga.vram", 2)]) == {"0000:00:05.0/vga.vram": "vga.vram"}
    assert x86.vga_vram_up([RamBlock("pc.ram", 1)]) == {}
    with pytest.raises(CompatError, match="which PCI device owns"):
        x86.vga_vram_up([RamBlock("vga.vram", 2)])
    # the other devices hw_compat_2_12 gives global-vmstate: their ROM block is named after their vmsd
    cirrus = [RamBlock("vga.vram", 2), RamBlock("0000:00:03.0/e1000.rom", 3),
              RamBlock("0000:00:02.0/cirrus_vga.rom", 3)]
    assert x86.vga_vram_up(cirrus) == {"vga.vram": "0000:00:02.0/vga.vram"}
    assert x86.vga_vram_up([RamBlock("vga.vram", 2), RamBlock("0000:00:04.0/vmware_vga.rom", 3)]) == \
        {"vga.vram": "0000:00:04.0/vga.vram"}
    with pytest.raises(CompatError, match="found 2"):  # two VGA devices: which one registered vga.vram is unknown
        x86.vga_vram_up([RamBlock("vga.vram", 2), RamBlock("0000:00:02.0/vga.rom", 3),
                         RamBlock("0000:00:05.0/qxl.rom", 3)])


def test_globalstate_follows_store_global_state() -> None:
    gs = Node(x86.GLOBALSTATE, {"size": 8, "runstate": b"running".ljust(100, b"\0")})
    prelaunch = Node(x86.GLOBALSTATE, {"size": 10, "runstate": b"prelaunch".ljust(100, b"\0")})
    empty = Machine("pc-i440fx-2.3", ())
    up = x86.globalstate_up(empty)
    assert up.sections[0].state == gs.tree
    assert x86.globalstate_down(up).sections == ()
    kept = Machine("pc-i440fx-2.4", (new_section("globalstate", 0, prelaunch),))
    assert x86.globalstate_down(kept) is kept and x86.globalstate_up(kept) is kept
    with pytest.raises(CompatError, match="is the source machine type right"):
        x86.globalstate_up(Machine("pc-i440fx-2.3", (new_section("globalstate", 0, gs),)))


E1000_FIELDS = ([Field(f"mig_props.{p}", "uint8", 1) for p in x86._TSO_PROPS]
                + [Field(f"mac_reg[{r}]", "uint32", 4) for r in ("CTRL", "STATUS", "VET", "RDT")]
                + [Field(f"mac_reg[{i}]", "uint32", 4, count=n, array=True) for i, n in enumerate((32, 128, 128))])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4), st.integers(0, 255), st.integers(0, 255))
def test_e1000_full_mac_state_is_the_register_file_the_stream_carries(regs: list[int], ra0: int, ipcss: int) -> None:
    vmsd = Vmsd("e1000", 2, 0, tuple(E1000_FIELDS), (Subsection(Vmsd("e1000/mit_state", 1, 0, (
        Field("mac_reg[RDTR]", "uint32", 4), Field("mac_reg[ITR]", "uint32", 4)))),))
    tree: dict[str, Any] = {f.name: 0 for f in E1000_FIELDS if not f.is_array}
    tree["mig_props.ipcss"] = ipcss
    tree.update({"mac_reg[CTRL]": regs[0], "mac_reg[STATUS]": regs[1], "mac_reg[VET]": regs[2], "mac_reg[RDT]": regs[3]})
    tree["mac_reg[0]"] = [ra0] + [0] * 31
    tree["mac_reg[1]"] = [0] * 128
    tree["mac_reg[2]"] = [0] * 127 + [9]
    tree["e1000/mit_state"] = {"mac_reg[RDTR]": 5, "mac_reg[ITR]": 6}
    e = sec(vmsd, tree)
    full = x86.e1000_full_mac_up(e, Machine("pc-i440fx-2.4")).state["e1000/full_mac_state"]["mac_reg"]
    assert len(full) == 0x8000
    assert (full[0], full[0x8 >> 2], full[0x38 >> 2], full[0x2818 >> 2]) == tuple(regs)
    assert full[0x5400 >> 2] == ra0 and full[(0x5600 >> 2) + 127] == 9
    assert full[0x2820 >> 2] == 5 and full[0xC4 >> 2] == 6
    assert sum(1 for x in full if x) == sum(1 for x in [*regs, ra0, 9, 5, 6] if x)
    tso = x86.e1000_tso_up(e, Machine("pc-i440fx-2.11")).state["e1000/tx_tso_state"]
    assert tso["tx.tso_props.ipcss"] == ipcss  # e1000_post_load dupes mig_props


# ---------------------------------------------------------------- virtio


def virtio_blob(vectors: int = 3, modern: bool = False, features: int = 0, queue_vectors: tuple[int, ...] = (0xFFFF,) * 3,
                status: int = 0) -> bytes:
    cfg = bytearray(256)
    cfg[0:4] = b"\xf4\x1a\x00\x10"
    cfg[0x06] = 0x10
    msix = bytes([0x11, 0]) + struct.pack("<H", vectors - 1) + struct.pack("<II", 1, 0x801)
    cfg = bytearray(virtio.convert_config(bytes(cfg[:0x34]) + bytes([0x40]) + bytes(11) + msix + bytes(256 - 0x4C),
                                          modern=modern, page=False))
    out = bytearray(struct.pack(">i", 2) + bytes(cfg) + bytes(16))
    out += (bytes(12) + struct.pack("<I", 1)) * vectors + bytes((vectors + 7) // 8)
    out += struct.pack(">H", 0xFFFF)
    out += struct.pack(">BBHII", status, 0, 0, features & 0xFFFFFFFF, 8) + bytes(8)
    out += struct.pack(">I", 3)
    for i in range(3):
        out += struct.pack(">IQH", 256, 0x10000 * (i + 1), 0) + struct.pack(">H", queue_vectors[i])
    out += b"\x52\x54\x00\x12\x34\x56" + bytes(30)  # the device's own state, opaque here
    tail = bytearray()
    if modern:
        tail += b"\x05\x15virtio/64bit_features" + struct.pack(">IQ", 1, features)
    return bytes(out + tail)


def test_virtio_blob_round_trips_and_finds_its_parts() -> None:
    blob = virtio_blob()
    t = virtio.parse_blob(blob)
    assert virtio.build_blob(t) == blob
    assert [q["desc"] for q in t["queues"]] == [0x10000, 0x20000, 0x30000]
    assert t["device"].startswith(b"\x52\x54\x00") and t["subsections"] == {}
    modern = virtio.modern_up(t, None)  # type: ignore[arg-type]
    cfg = modern["pci"]["config"]
    assert virtio.is_modern(cfg) and cfg[0x34] == 0x98 and virtio.msix_vectors(cfg) == 3
    avail, used = modern["subsections"]["virtio/virtqueues"]["vq"][0].values()
    assert avail == 0x10000 + 256 * 16 and used == 0x12000  # virtio_queue_update_rings, 4 KiB aligned
    again = virtio.parse_blob(virtio.build_blob(modern))
    assert again == modern
    back = virtio.modern_down(again, None)  # type: ignore[arg-type]
    assert virtio.build_blob(virtio.extra_state_down(back, None)) == blob  # type: ignore[arg-type]


def test_virtio_refuses_what_the_older_device_cannot_hold() -> None:
    t = virtio.parse_blob(virtio_blob(modern=True, features=1 << 32))
    with pytest.raises(CompatError, match="virtio 1.0 interface"):
        virtio.modern_down(t, None)  # type: ignore[arg-type]
    four = virtio.vectors_up(virtio.parse_blob(virtio_blob()), None)  # type: ignore[arg-type]
    assert virtio.msix_vectors(four["pci"]["config"]) == 4 and len(four["msix_table"]) == 64
    assert virtio.vectors_down(four, None)["msix_table"] == virtio.parse_blob(virtio_blob())["msix_table"]  # type: ignore[arg-type]
    busy = virtio.parse_blob(virtio_blob(vectors=4, queue_vectors=(1, 2, 3)))
    with pytest.raises(CompatError, match=r"MSI-X vector\(s\) 3"):
        virtio.vectors_down(busy, None)  # type: ignore[arg-type]
    ring = virtio.parse_blob(virtio_blob(modern=True, features=(1 << 40) | (1 << 32)))
    with pytest.raises(CompatError, match="RING_RESET"):
        virtio.ring_reset_down(ring, None)  # type: ignore[arg-type]
    started = virtio.started_up(virtio.parse_blob(virtio_blob(status=0x0F)), None)  # type: ignore[arg-type]
    assert started["subsections"]["virtio/started"] == {"started": True}
    with pytest.raises(CompatError, match="cannot read the virtio state"):
        virtio.parse_blob(b"\x00\x00")
