"""PCI Express ports and devices behind them across q35 machine types, without QEMU.

The config spaces below are QEMU 7.2's own (``-M pc-q35-X -device
pcie-root-port,id=rp1,chassis=1,port=8,addr=0x1,multifunction=on -device
pcie-root-port,id=rp2,chassis=2,port=9,addr=0x1.0x1 -device
virtio-net-pci,bus=rp1 -S``, saved with ``migrate``; only the non-zero rows):
``USED`` is the port with virtio-net-pci behind it, ``SPARE`` the empty one,
``BOOTED`` a port after SeaBIOS ran (a libvirt save image of pc-q35-2.12).
Each step's transform must turn one machine type's bytes into the next's,
byte for byte, both ways.  The same against real QEMU, with loading, is in
tests/test_compat_qemu.py (``test_step_with_pcie_ports_gives_what_qemu_writes_and_loads``).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from vmferry.compat import Machine, apply, qemu_registry
from vmferry.compat.machines import pcie, virtio
from vmferry.errors import CompatError
from vmferry.events import DeviceSection
from vmferry.serialize.schema import Field, Vmsd

REG = qemu_registry()

RP_3_1_USED = {
    0x000: "36 1b 0c 00 00 00 10 00 00 00 04 06 00 00 81 00",
    0x010: "00 00 00 00 00 00 00 00 00 00 00 00 f0 00 00 00",
    0x020: "f0 ff 00 00 f1 ff 01 00 00 00 00 00 00 00 00 00",
    0x030: "00 00 00 00 54 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "0d 00 00 00 36 1b 00 00 11 40 00 00 00 00 00 00",
    0x050: "00 08 00 00 10 48 42 01 00 80 00 00 00 00 00 00",
    0x060: "11 04 00 08 00 00 11 20 7b 00 02 00 c0 01 40 00",
    0x070: "00 00 00 00 00 00 00 00 20 00 30 00 00 00 00 00",
    0x100: "01 00 02 00 00 00 00 00 00 00 00 00 30 20 46 00",
    0x110: "00 00 00 00 00 e0 00 00 a0 02 00 00 00 00 00 00",
}
RP_4_0_USED = {
    0x000: "36 1b 0c 00 00 00 10 00 00 00 04 06 00 00 81 00",
    0x010: "00 00 00 00 00 00 00 00 00 00 00 00 f0 00 00 00",
    0x020: "f0 ff 00 00 f1 ff 01 00 00 00 00 00 00 00 00 00",
    0x030: "00 00 00 00 54 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "0d 00 00 00 36 1b 00 00 11 40 00 00 00 00 00 00",
    0x050: "00 08 00 00 10 48 42 01 00 80 00 00 00 00 00 00",
    0x060: "04 06 30 08 00 00 11 20 7b 00 02 00 c0 01 40 00",
    0x070: "00 00 00 00 00 00 00 00 20 00 30 00 00 00 00 00",
    0x080: "1e 00 00 00 04 00 00 00 00 00 00 00 00 00 00 00",
    0x100: "01 00 82 14 00 00 00 00 00 00 00 00 30 20 46 00",
    0x110: "00 00 00 00 00 e0 00 00 a0 02 00 00 00 00 00 00",
    0x140: "00 00 00 00 00 00 00 00 0d 00 01 00 5f 00 00 00",
}
RP_6_0_SPARE = {
    0x000: "36 1b 0c 00 00 00 10 00 00 00 04 06 00 00 01 00",
    0x010: "00 00 00 00 00 00 00 00 00 00 00 00 f0 00 00 00",
    0x020: "f0 ff 00 00 f1 ff 01 00 00 00 00 00 00 00 00 00",
    0x030: "00 00 00 00 54 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "0d 00 00 00 36 1b 00 00 11 40 00 00 00 00 00 00",
    0x050: "00 08 00 00 10 48 42 01 00 80 00 00 00 00 00 00",
    0x060: "04 06 30 09 00 00 11 00 7b 00 02 00 c0 07 00 00",
    0x070: "00 00 00 00 00 00 00 00 20 00 30 00 00 00 00 00",
    0x080: "1e 00 00 00 04 00 00 00 00 00 00 00 00 00 00 00",
    0x100: "01 00 82 14 00 00 00 00 00 00 00 00 30 20 46 00",
    0x110: "00 00 00 00 00 e0 00 00 a0 02 00 00 00 00 00 00",
    0x140: "00 00 00 00 00 00 00 00 0d 00 01 00 5f 00 00 00",
}
RP_6_1_USED = {
    0x000: "36 1b 0c 00 00 00 10 00 00 00 04 06 00 00 81 00",
    0x010: "00 00 00 00 00 00 00 00 00 00 00 00 f0 00 00 00",
    0x020: "f0 ff 00 00 f1 ff 01 00 00 00 00 00 00 00 00 00",
    0x030: "00 00 00 00 90 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "0d 00 00 00 36 1b 00 00 11 40 00 00 00 00 00 00",
    0x050: "00 08 00 00 10 48 42 01 00 80 00 00 00 00 00 00",
    0x060: "04 06 30 08 00 00 11 00 1b 00 02 00 c0 01 00 00",
    0x070: "00 00 00 00 00 00 00 00 20 00 30 00 00 00 00 00",
    0x080: "1e 00 00 00 04 00 00 00 00 00 00 00 00 00 00 00",
    0x090: "09 54 20 01 ff ff ff ff 00 10 00 00 00 00 00 00",
    0x0a0: "ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff",
    0x100: "01 00 82 14 00 00 00 00 00 00 00 00 30 20 46 00",
    0x110: "00 00 00 00 00 e0 00 00 a0 02 00 00 00 00 00 00",
    0x140: "00 00 00 00 00 00 00 00 0d 00 01 00 5f 00 00 00",
}
RP_6_1_SPARE = {
    0x000: "36 1b 0c 00 00 00 10 00 00 00 04 06 00 00 01 00",
    0x010: "00 00 00 00 00 00 00 00 00 00 00 00 f0 00 00 00",
    0x020: "f0 ff 00 00 f1 ff 01 00 00 00 00 00 00 00 00 00",
    0x030: "00 00 00 00 90 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "0d 00 00 00 36 1b 00 00 11 40 00 00 00 00 00 00",
    0x050: "00 08 00 00 10 48 42 01 00 80 00 00 00 00 00 00",
    0x060: "04 06 30 09 00 00 11 00 1b 00 02 00 c0 07 00 00",
    0x070: "00 00 00 00 00 00 00 00 20 00 30 00 00 00 00 00",
    0x080: "1e 00 00 00 04 00 00 00 00 00 00 00 00 00 00 00",
    0x090: "09 54 20 01 ff ff ff ff 00 10 00 00 00 00 00 00",
    0x0a0: "ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff",
    0x100: "01 00 82 14 00 00 00 00 00 00 00 00 30 20 46 00",
    0x110: "00 00 00 00 00 e0 00 00 a0 02 00 00 00 00 00 00",
    0x140: "00 00 00 00 00 00 00 00 0d 00 01 00 5f 00 00 00",
}
RP_6_2_USED = {
    0x000: "36 1b 0c 00 00 00 10 00 00 00 04 06 00 00 81 00",
    0x010: "00 00 00 00 00 00 00 00 00 00 00 00 f0 00 00 00",
    0x020: "f0 ff 00 00 f1 ff 01 00 00 00 00 00 00 00 00 00",
    0x030: "00 00 00 00 54 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "0d 00 00 00 36 1b 00 00 11 40 00 00 00 00 00 00",
    0x050: "00 08 00 00 10 48 42 01 00 80 00 00 00 00 00 00",
    0x060: "04 06 30 08 00 00 11 00 7b 00 02 00 c0 01 00 00",
    0x070: "00 00 00 00 00 00 00 00 20 00 30 00 00 00 00 00",
    0x080: "1e 00 00 00 04 00 00 00 00 00 00 00 00 00 00 00",
    0x100: "01 00 82 14 00 00 00 00 00 00 00 00 30 20 46 00",
    0x110: "00 00 00 00 00 e0 00 00 a0 02 00 00 00 00 00 00",
    0x140: "00 00 00 00 00 00 00 00 0d 00 01 00 5f 00 00 00",
}
VIRTIO_2_7 = {
    0x000: "f4 1a 41 10 00 00 10 00 01 00 00 02 00 00 00 00",
    0x020: "0c 00 00 00 00 00 00 00 00 00 00 00 f4 1a 00 11",
    0x030: "00 00 00 00 dc 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "10 00 02 00 00 80 00 00 00 00 00 00 11 04 00 00",
    0x050: "00 00 11 00 00 00 00 00 00 00 00 00 00 00 00 00",
    0x060: "00 00 00 00 00 00 30 00 00 00 00 00 00 00 00 00",
    0x070: "00 00 00 00 00 00 00 00 00 00 00 00 01 40 03 00",
    0x080: "00 00 00 00 09 7c 10 01 04 00 00 00 00 00 00 00",
    0x090: "00 10 00 00 09 84 10 03 04 00 00 00 00 10 00 00",
    0x0a0: "00 10 00 00 09 94 10 04 04 00 00 00 00 20 00 00",
    0x0b0: "00 10 00 00 09 a4 14 02 04 00 00 00 00 30 00 00",
    0x0c0: "00 00 40 00 00 10 00 00 09 b4 14 05 00 00 00 00",
    0x0d0: "00 00 00 00 00 00 00 00 00 00 00 00 11 c8 02 00",
    0x0e0: "01 00 00 00 01 08 00 00 00 00 00 00 00 00 00 00",
}
VIRTIO_4_1 = {
    0x000: "f4 1a 41 10 00 00 10 00 01 00 00 02 00 00 00 00",
    0x020: "0c 00 00 00 00 00 00 00 00 00 00 00 f4 1a 00 11",
    0x030: "00 00 00 00 dc 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "10 00 02 00 00 80 00 00 00 00 00 00 11 04 00 00",
    0x050: "00 00 11 00 00 00 00 00 00 00 00 00 00 00 00 00",
    0x060: "00 00 00 00 00 00 30 00 00 00 00 00 00 00 00 00",
    0x070: "00 00 00 00 00 00 00 00 00 00 00 00 01 40 03 00",
    0x080: "00 00 00 00 09 7c 10 01 04 00 00 00 00 00 00 00",
    0x090: "00 10 00 00 09 84 10 03 04 00 00 00 00 10 00 00",
    0x0a0: "00 10 00 00 09 94 10 04 04 00 00 00 00 20 00 00",
    0x0b0: "00 10 00 00 09 a4 14 02 04 00 00 00 00 30 00 00",
    0x0c0: "00 10 00 00 04 00 00 00 09 b4 14 05 00 00 00 00",
    0x0d0: "00 00 00 00 00 00 00 00 00 00 00 00 11 c8 02 00",
    0x0e0: "01 00 00 00 01 08 00 00 00 00 00 00 00 00 00 00",
}
VIRTIO_4_2 = {
    0x000: "f4 1a 41 10 00 00 10 00 01 00 00 02 00 00 00 00",
    0x020: "0c 00 00 00 00 00 00 00 00 00 00 00 f4 1a 00 11",
    0x030: "00 00 00 00 dc 00 00 00 00 00 00 00 00 01 00 00",
    0x040: "10 00 02 00 00 80 00 10 00 00 00 00 11 04 00 00",
    0x050: "00 00 11 00 00 00 00 00 00 00 00 00 00 00 00 00",
    0x060: "00 00 00 00 00 00 30 00 00 00 00 00 00 00 00 00",
    0x070: "00 00 00 00 00 00 00 00 00 00 00 00 01 40 03 00",
    0x080: "00 00 00 00 09 7c 10 01 04 00 00 00 00 00 00 00",
    0x090: "00 10 00 00 09 84 10 03 04 00 00 00 00 10 00 00",
    0x0a0: "00 10 00 00 09 94 10 04 04 00 00 00 00 20 00 00",
    0x0b0: "00 10 00 00 09 a4 14 02 04 00 00 00 00 30 00 00",
    0x0c0: "00 10 00 00 04 00 00 00 09 b4 14 05 00 00 00 00",
    0x0d0: "00 00 00 00 00 00 00 00 00 00 00 00 11 c8 02 00",
    0x0e0: "01 00 00 00 01 08 00 00 00 00 00 00 00 00 00 00",
}
RP_2_12_BOOTED = {
    0x000: "36 1b 0c 00 03 01 10 00 00 00 04 06 00 00 81 00",
    0x010: "00 00 60 fe 00 00 00 00 00 01 01 00 c0 b0 00 00",
    0x020: "40 fe 50 fe a1 fe b1 fe 00 00 00 00 00 00 00 00",
    0x030: "00 00 00 00 54 00 00 00 00 00 00 00 0a 01 02 00",
    0x040: "0d 00 00 00 36 1b 00 00 11 40 00 00 00 00 00 00",
    0x050: "00 08 00 00 10 48 42 01 00 80 00 00 00 00 00 00",
    0x060: "11 04 00 08 00 00 11 20 7b 00 02 00 c0 01 40 00",
    0x070: "00 00 00 00 00 00 00 00 20 00 30 00 00 00 00 00",
    0x100: "01 00 02 00 00 00 00 00 00 00 00 00 30 20 46 00",
    0x110: "00 00 00 00 00 e0 00 00 a0 02 00 00 00 00 00 00",
}


def config(rows: dict[int, str], size: int = 4096) -> bytes:
    cfg = bytearray(size)
    for at, hexbytes in rows.items():
        row = bytes.fromhex(hexbytes.replace(" ", ""))
        cfg[at:at + len(row)] = row
    return bytes(cfg)


def patched(rows: dict[int, str], **at: int) -> bytes:
    """``rows`` with single bytes changed: ``patched(RP, x67=0x20)``."""
    cfg = bytearray(config(rows))
    for k, v in at.items():
        cfg[int(k[1:], 16)] = v
    return bytes(cfg)


PCIDEVICE = Vmsd("PCIDevice", 2, 0, (Field("version_id", "int32 le", 4), Field("config[1]", "pci config", 4096),
                                     Field("irq_state", "pci irq state", 16)))
AER_LOG = Vmsd("PCIE_AER_ERROR_LOG", 1, 0, (Field("log_num", "uint16", 2), Field("log_max", "uint16 equal", 2)))
PORT = "parent_obj.parent_obj.parent_obj"


def root_port(cfg: bytes, where: str = "0000:00:01.0", msix: bool = True, vmsd: str = pcie.ROOT_PORT) -> DeviceSection:
    fields = [Field(PORT, "struct", 4116, struct=PCIDEVICE),
              Field(PORT + ".exp.aer_log", "struct", 4, struct=AER_LOG)]
    tree: dict[str, Any] = {PORT: {"version_id": 2, "config[1]": cfg, "irq_state": bytes(16)},
                            PORT + ".exp.aer_log": {"log_num": 0, "log_max": 8}}
    if msix:
        fields.append(pcie._msix_field(1))
        tree[pcie.MSIX_FIELD] = {"msix": pcie.msix_reset(1)}
    return DeviceSection(3, f"{where}/{vmsd}", 0, 1, tree, Vmsd(vmsd, 1, 1, tuple(fields)), {})


def device_behind(where: str = "0000:00:01.0") -> DeviceSection:
    """Some device behind the port at ``where`` (its name is all the transforms look at)."""
    return DeviceSection(9, f"{where}:00.0/some-device", 0, 1, {"x": 1}, Vmsd("some-device", 1, 1,
                                                                             (Field("x", "uint8", 1),)), {})


def ports(m: Machine) -> dict[str, bytes]:
    return {s.idstr.split("/")[0]: s.state[PORT]["config[1]"] for s in m.sections
            if isinstance(s, DeviceSection) and s.schema.name in pcie.PCIE_SLOTS}


def step(a: str, b: str, *sections: DeviceSection) -> dict[str, bytes]:
    return ports(apply(REG.plan(f"pc-q35-{a}", f"pc-q35-{b}"), Machine(f"pc-q35-{a}", sections)))


def test_the_link_and_acs_of_a_root_port_follow_hw_compat_3_1() -> None:
    # 3.1: 2.5 GT/s x1, no ACS; 4.0: 16 GT/s x32 (+ LBNC, DLLLARC, LNKCAP2, LNKCTL2), ACS at 0x148 after AER
    assert step("3.1", "4.0", root_port(config(RP_3_1_USED)), device_behind())["0000:00:01.0"] == config(RP_4_0_USED)
    assert step("4.0", "3.1", root_port(config(RP_4_0_USED)), device_behind())["0000:00:01.0"] == config(RP_3_1_USED)
    # x-speed/x-width given on the command line (neither default) is left alone
    odd = patched(RP_3_1_USED, x60=0x13)  # 8 GT/s x1
    assert step("3.1", "4.0", root_port(odd))["0000:00:01.0"][0x60:0x64] == odd[0x60:0x64]


def test_a_root_port_loses_presence_at_6_1_and_native_hot_plug_on_6_1_alone() -> None:
    used, spare = "0000:00:01.0", "0000:00:01.1"
    six = step("6.0", "6.1", root_port(config(RP_4_0_USED)), root_port(config(RP_6_0_SPARE), spare), device_behind())
    # Link Status (Data Link Layer Link Active, 0x67) is not compared on load: it keeps what the guest saw
    assert six[used] == patched(RP_6_1_USED, x67=0x20) and six[spare] == config(RP_6_1_SPARE)
    two = step("6.1", "6.2", root_port(config(RP_6_1_USED)), device_behind())
    assert two[used] == config(RP_6_2_USED)
    assert step("6.2", "6.1", root_port(config(RP_6_2_USED)), device_behind())[used] == config(RP_6_1_USED)
    back = step("6.1", "6.0", root_port(config(RP_6_1_USED)), root_port(config(RP_6_1_SPARE), spare), device_behind())
    assert back[used] == patched(RP_4_0_USED, x67=0x00) and back[spare] == config(RP_6_0_SPARE)
    # presence follows the devices behind the port, not the port's own bytes
    assert step("6.1", "6.0", root_port(config(RP_6_1_USED)))[used][0x6E] == 0
    # a slot without hot-plug (hotplug=off: neither bit, and no reserve capability on 6.1) is left alone
    off = patched(RP_6_2_USED, x68=0x1B)
    assert step("6.2", "6.1", root_port(off))[used] == off
    assert step("6.1", "6.2", root_port(off))[used] == off


def test_other_pcie_slots_lose_only_the_slot_bits() -> None:
    # ioh3420 keeps its capabilities elsewhere (PCI Express at 0x90) and gets no reserve capability
    cfg = bytearray(4096)
    cfg[0x34], cfg[0x90:0x92] = 0x90, b"\x10\x00"
    struct.pack_into("<IH", cfg, 0x90 + 0x14, 0x7B, 0x0000)
    struct.pack_into("<H", cfg, 0x90 + 0x1A, 0x40)
    ioh = root_port(bytes(cfg), "0000:00:02.0", msix=False, vmsd="ioh-3240-express-root-port")
    six = step("6.0", "6.1", ioh, device_behind("0000:00:02.0"))["0000:00:02.0"]
    assert six[0x90 + 0x14] == 0x1B and six[0x90 + 0x1A] == 0 and six[0x34] == 0x90
    assert step("6.1", "6.2", root_port(six, "0000:00:02.0", msix=False, vmsd="ioh-3240-express-root-port"))[
        "0000:00:02.0"][0x90 + 0x14] == 0x7B


def test_a_booted_root_port_keeps_what_the_firmware_wrote() -> None:
    booted = config(RP_2_12_BOOTED)
    up = step("2.12", "7.2", root_port(booted, msix=True), device_behind())["0000:00:01.0"]
    # bus numbers, windows, command, bridge control as SeaBIOS set them; link, ACS and presence as 7.2's
    want = bytearray(booted)
    want[0x60:0x63] = bytes.fromhex("040630")
    want[0x80], want[0x84], want[0x6E] = 0x1E, 0x04, 0x00
    want[0x100:0x104] = bytes.fromhex("01008214")
    want[0x148:0x150] = bytes.fromhex("0d0001005f000000")
    assert up == bytes(want)
    back = step("7.2", "2.12", root_port(up), device_behind())["0000:00:01.0"]
    assert back == booted


def test_the_msix_state_of_a_root_port_follows_hw_compat_2_9() -> None:
    m = Machine("pc-q35-2.9", (root_port(config(RP_3_1_USED), msix=False),))
    up = apply(REG.plan("pc-q35-2.9", "pc-q35-2.10"), m).sections[0]
    assert isinstance(up, DeviceSection)
    # as a fresh 2.10 port writes it: one vector, masked; no pending bit
    assert up.state[pcie.MSIX_FIELD] == {"msix": bytes(12) + b"\x01\x00\x00\x00" + b"\x00"}
    assert [f.name for f in up.schema.fields][-1] == pcie.MSIX_FIELD and up.schema.fields[-1].size == 17
    down = apply(REG.plan("pc-q35-2.10", "pc-q35-2.9"), Machine("pc-q35-2.10", (up,))).sections[0]
    assert isinstance(down, DeviceSection) and pcie.MSIX_FIELD not in down.state and down.schema == m.sections[0].schema


def test_what_the_root_port_transforms_cannot_tell_is_refused() -> None:
    own = bytearray(config(RP_6_1_USED))
    own[0x94:0x98] = b"\x02\x00\x00\x00"  # bus-reserve=2
    with pytest.raises(CompatError, match="a resource reserve capability of its own"):
        step("6.1", "6.2", root_port(bytes(own)))
    extra = bytearray(config(RP_3_1_USED))
    extra[0x102:0x104] = b"\x82\x14"  # AER -> 0x148 ...
    extra[0x148:0x14C] = b"\x0b\x00\x01\x00"  # ... a vendor-specific extended capability
    with pytest.raises(CompatError, match="cannot add ACS"):
        step("3.1", "4.0", root_port(bytes(extra)))


# ---------------------------------------------------------------- virtio-net-pci behind a port


def express_blob(cfg: bytes, status: int = 0) -> bytes:
    """A virtio-net-pci state as virtio_save writes it for a PCI Express device (3 MSI-X vectors, 3 queues)."""
    assert virtio.msix_vectors(cfg) == 3
    out = bytearray(struct.pack(">i", 2) + cfg + bytes(16))
    out += (bytes(12) + struct.pack("<I", 1)) * 3 + bytes(1)
    out += struct.pack(">H", 0xFFFF)
    out += struct.pack(">BBHII", status, 0, 0, 0, 8) + bytes(8)
    out += struct.pack(">I", 3)
    for i in range(3):
        out += struct.pack(">IQH", 256, 0, 0) + struct.pack(">H", 0xFFFF)
    out += b"\x52\x54\x00\x12\x34\x56" + bytes(30)
    out += b"\x05\x15virtio/64bit_features" + struct.pack(">IQ", 1, 0)
    return bytes(out)


def test_a_virtio_pci_device_behind_a_port_has_4_kib_of_config_space() -> None:
    blob = express_blob(config(VIRTIO_4_1))
    t = virtio.parse_blob(blob)
    assert len(t["pci"]["config"]) == 4096 and t["device"].startswith(b"\x52\x54\x00")
    assert virtio.build_blob(t) == blob
    # hw_compat_4_1 x-pcie-flr-init: Device Capabilities' FLR bit
    flr = virtio.flr_up(t, None)  # type: ignore[arg-type]
    assert flr["pci"]["config"] == config(VIRTIO_4_2)
    assert virtio.flr_down(flr, None)["pci"]["config"] == config(VIRTIO_4_1)  # type: ignore[arg-type]
    # hw_compat_2_7 page-per-vq: the notify capability (at 0xb4 here, after the PCI Express and PM capabilities)
    page = virtio.page_per_vq_on(t, None)  # type: ignore[arg-type]
    assert page["pci"]["config"] == config(VIRTIO_2_7)
    assert virtio.page_per_vq_off(page, None)["pci"]["config"] == config(VIRTIO_4_1)  # type: ignore[arg-type]
    # a conventional PCI device has no FLR bit to set
    plain = {"pci": {"config": config(VIRTIO_4_1)[:256]}}
    assert virtio.flr_up(plain, None) is plain  # type: ignore[arg-type]


def virtio_net(where: str, blob: bytes) -> DeviceSection:
    vmsd = Vmsd("virtio-net", 11, 11, (Field("virtio", "virtio", len(blob)),))
    return DeviceSection(5, f"{where}/virtio-net", 0, 11, {"virtio": blob}, vmsd, {})


def test_a_virtio_device_behind_a_port_does_not_cross_hw_compat_2_6() -> None:
    from test_compat_machines import virtio_blob

    legacy = virtio_blob()
    behind = Machine("pc-q35-2.6", (root_port(config(RP_3_1_USED), msix=False), virtio_net("0000:00:01.0:00.0", legacy)))
    with pytest.raises(CompatError, match="legacy-only on machine types up to 2.6 .* modern-only on newer ones"):
        apply(REG.plan("pc-q35-2.6", "pc-q35-2.7"), behind)
    modern = Machine("pc-q35-2.7", (root_port(config(RP_3_1_USED), msix=False),
                                    virtio_net("0000:00:01.0:00.0", express_blob(config(VIRTIO_2_7)))))
    with pytest.raises(CompatError, match="the guest's driver cannot follow"):
        apply(REG.plan("pc-q35-2.7", "pc-q35-2.6"), modern)
    # on the root bus the device is a conventional PCI one and goes on as before
    root = Machine("pc-q35-2.6", (virtio_net("0000:00:03.0", legacy),))
    out = apply(REG.plan("pc-q35-2.6", "pc-q35-2.7"), root).sections[0]
    assert isinstance(out, DeviceSection) and virtio.is_modern(virtio.parse_blob(out.state["virtio"])["pci"]["config"])
