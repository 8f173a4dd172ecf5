"""QEMU 11.1's newest x86 machine types, and the way down to QEMU 10.0's.

A release is a pair (QEMU version, machine type).  QEMU 11.1 (11.1.2) runs
``pc-i440fx``/``pc-q35`` 5.2 .. 11.1; the catalogue holds its newest ones,
10.0 .. 11.1 (10.0, 10.1, 10.2, 11.0, 11.1), and two kinds of steps join them to
QEMU 10.0's ``pc-i440fx-10.0`` / ``pc-q35-10.0`` (from where :mod:`.qemu10`
goes on to 7.2, and :mod:`.x86` and :mod:`.qemu5` further):

* the **machine-type steps**, inside QEMU 11.1: ``pc-i440fx-10.0@11.1`` <->
  ``pc-i440fx-10.1`` <-> ... <-> ``pc-i440fx-11.1``.  The compat tables in
  between (``hw_compat_10_0`` .. ``hw_compat_11_0``, ``pc_compat_10_0`` ..
  ``pc_compat_11_0``, read out of the 11.1 binary: QEMU 11.1's source was
  not at hand) change two things these streams carry: q35's ``mch``
  extended TSEG size register (``pc_compat_10_1`` ``mch.extended-tseg-mbytes=16``;
  64 from ``pc-q35-10.2`` on) and ``cpu/error_code`` (``pc_compat_10_1``
  ``x-migrate-error-code=false``); virtio-net's UDP tunnel offloads
  (``hw_compat_10_1``) are offered only with a backend that has them.
* the **QEMU-version step**, same machine type: ``pc-i440fx-10.0@11.1`` <->
  ``pc-i440fx-10.0``.  The wire bytes of every section are the same; QEMU
  11.1 sends the ``apic`` sections before every other device, always sends
  the CPU hotplug state (``piix4_pm/cpuhp``, ``ich9_pm/cpuhp``: 11.1 has no
  legacy CPU hotplug any more, the binary has no ``cpu-hotplug-legacy``
  property), writes no array ``index`` in the vmdesc (:mod:`.vmdesc`), and
  has CPU state 10.0 cannot hold (``cpu/apx``, ``cpu/cet``, ...).

The size QEMU 10.0 writes for a virtqueue no driver set up (1024) is one QEMU
11.1 refuses ("VQ 0 vring.num 1024 exceeds allocated max 256"): such
queues get the size the device allocated (virtio-net: 256, the control
queue 64), as 11.1 writes them, and back.  Left as the guest saw it, as
QEMU itself does loading the other's stream of the same machine type: the
ICH9 GCS "no reboot" bit (``ICH9LPC`` ``chip_config[0x3410]``: QEMU 10.0
resets it to 0x20 whatever the ``noreboot`` property, 11.1 follows the
property, off from ``pc-q35-8.0`` on).  Going up, the CPU hotplug state is not added: a QEMU 11.1
destination of a stream without it keeps its reset state, which is what the
subsection would carry (its length, the number of possible CPUs, is not in
the stream).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...errors import CompatError
from ...events import DeviceSection
from ..ops import Machine, drop_subsection, node, refuse_subsections, set_field, with_node
from ..registry import Change, Registry, Release
from . import virtio
from .qemu10 import QEMU_10_0
from .vmdesc import styled

__all__ = ["PC11", "Q35_11", "QEMU_11_1", "register"]

QEMU_11_1 = "11.1"
PC11_LINE = "pc-i440fx@11.1"
Q35_11_LINE = "pc-q35@11.1"

#: QEMU 11.1's machine types from 10.0 on (``-machine help``; 5.2 .. 9.2 are there too, not in this catalogue).
VERSIONS_11_1 = ["10.0", "10.1", "10.2", "11.0", "11.1"]


def _line(prefix: str, line: str) -> list[Release]:
    return [Release(f"{prefix}-10.0@{QEMU_11_1}", line, machine=f"{prefix}-10.0", qemu=QEMU_11_1)] + \
        [Release(f"{prefix}-{v}", line, qemu=QEMU_11_1) for v in VERSIONS_11_1[1:]]


PC11: list[Release] = _line("pc-i440fx", PC11_LINE)
Q35_11: list[Release] = _line("pc-q35", Q35_11_LINE)


# ---------------------------------------------------------------------------
# The QEMU-version step
# ---------------------------------------------------------------------------


def apic_first(m: Machine) -> Machine:
    """QEMU 11.1 sends every ``apic`` section first, in its own order; the others keep theirs."""
    apics = [s for s in m.sections if s.idstr == "apic"]
    if not apics or list(m.sections[:len(apics)]) == apics:
        return m
    rest = [s for s in m.sections if s.idstr != "apic"]
    return dataclasses.replace(m, sections=tuple(apics + rest))


def apic_in_id_order(m: Machine) -> Machine:
    """QEMU 10.0 sends sections in registration (section id) order: each ``apic`` after its CPU's."""
    apics = [s for s in m.sections if s.idstr == "apic"]
    if not apics:
        return m
    rest = [s for s in m.sections if s.idstr != "apic"]
    for a in sorted(apics, key=lambda s: s.section_id):
        pos = next((i for i, s in enumerate(rest) if s.section_id > a.section_id), len(rest))
        rest.insert(pos, a)
    return dataclasses.replace(m, sections=tuple(rest))


#: cpu subsections QEMU 10.0 does not know (strings of the 11.1 binary against 10.0's target/i386/machine.c).
CPU_11_ONLY = ("cpu/apx", "cpu/cet", "cpu/cet_shstk", "cpu/error_code", "cpu/msr_pl0_ssp")


cpu_down = refuse_subsections(CPU_11_ONLY, "state QEMU 10.0 cannot load (APX, CET, or an exception error code "
                                           "in flight); use a CPU model without those features")


#: The virtio subsection that carries feature bits above 63 (QEMU 10.1+).
FEATURES_128 = "virtio/128bit_features"


def _has_subsection(blob: bytes, name: str) -> bool:
    raw = name.encode()
    return bytes([0x05, len(raw)]) + raw in blob  # QEMU_VM_SUBSECTION, name length, name


def features_128_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    # virtio_load of QEMU 10.0 does not know the subsection: the guest negotiated a feature above
    # bit 63 (virtio-net's UDP tunnel offloads), which no 10.0 device offers.
    if _has_subsection(bytes(sec.state.get("virtio", b"")), FEATURES_128):
        raise CompatError(f"{sec.idstr}: the guest negotiated virtio features above bit 63 ({FEATURES_128}: "
                          f"UDP tunnel offloads), which no older machine type offers")
    return sec


#: virtio-net's queue sizes (hw/net/virtio-net.c): rx_queue_size and tx_queue_size default to 256, the control
#: queue, the last one, is 64; QEMU 10.0 writes VIRTQUEUE_MAX_SIZE for a queue no driver set up.
VIRTIO_NET_QUEUE_SIZE, VIRTIO_NET_CTRL_QUEUE_SIZE, VIRTQUEUE_MAX_SIZE = 256, 64, 1024


def _unset_queue_sizes(to_11_1: bool) -> Any:
    def fn(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
        queues = t["queues"]
        out = []
        for i, q in enumerate(queues):
            size = VIRTIO_NET_CTRL_QUEUE_SIZE if i == len(queues) - 1 else VIRTIO_NET_QUEUE_SIZE
            old, new = (VIRTQUEUE_MAX_SIZE, size) if to_11_1 else (size, VIRTQUEUE_MAX_SIZE)
            out.append(dict(q, num=new) if q["desc"] == 0 and q["num"] == old else q)
        return t if out == queues else dict(t, queues=out)
    fn.__name__ = "unset_queue_sizes_" + ("11_1" if to_11_1 else "10_0")
    return fn


# ---------------------------------------------------------------------------
# The machine-type steps
# ---------------------------------------------------------------------------

#: q35 MCH config registers (hw/pci-host/q35.c).
MCH_EXT_TSEG_MBYTES, MCH_ESMRAMC = 0x50, 0x9E
ESMRAMC_T_EN, ESMRAMC_TSEG_SZ_MASK, ESMRAMC_TSEG_EXT = 0x01, 0x06, 0x06
EXT_TSEG_10_1, EXT_TSEG_10_2 = 16, 64


def _ext_tseg(src: int, dst: int) -> Any:
    # mch_reset writes the query value and mch_update answers it at once with the machine type's
    # extended-tseg-mbytes; mch_update_smram sizes TSEG from the property, not from the register.
    def fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        n = node(sec)
        pci = n.tree.get("parent_obj")
        key = next((k for k in (pci or {}) if k.startswith("config")), None)
        if pci is None or key is None or len(pci[key]) < MCH_ESMRAMC + 1:
            return sec
        cfg = bytearray(pci[key])
        value = int.from_bytes(cfg[MCH_EXT_TSEG_MBYTES:MCH_EXT_TSEG_MBYTES + 2], "little")
        esmramc = cfg[MCH_ESMRAMC]
        if esmramc & ESMRAMC_T_EN and esmramc & ESMRAMC_TSEG_SZ_MASK == ESMRAMC_TSEG_EXT:
            raise CompatError(f"the guest's firmware uses an extended TSEG of {value} MiB, which the other machine "
                              f"type sizes {dst} MiB")
        if value != src:
            return sec
        cfg[MCH_EXT_TSEG_MBYTES:MCH_EXT_TSEG_MBYTES + 2] = dst.to_bytes(2, "little")
        return with_node(sec, set_field(n, key, bytes(cfg), path=("parent_obj",)))
    return fn


def error_code_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    n = node(sec)
    return with_node(sec, drop_subsection(n, "cpu/error_code")) if "cpu/error_code" in n.tree else sec


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

APIC = "QEMU 11.1 saves the APIC before every other device (every 11.1 stream, every machine type, TCG and " \
       "KVM); 10.0 in registration order, after its CPU; loaders take any order, section ids are the same"
CPUHP = "hw/acpi (QEMU 11.1): no legacy CPU hotplug (no cpu-hotplug-legacy property), so the modern CPU hotplug " \
        "state is always sent; QEMU 10.0 sends it once the guest switched to the modern interface, and loading it " \
        "switches a 10.0 destination to it"
VMDESC = "migration/vmstate.c (QEMU 10.1+): an array described element by element has no index at all (10.0: on " \
         "all but the last element); loaders ignore the vmdesc"
CPU = "target/i386/machine.c (QEMU 11.1): cpu/apx, cpu/cet, cpu/cet_shstk, cpu/msr_pl0_ssp (CPU models with APX " \
      "or CET), cpu/error_code (not sent for machine types <= 10.1)"
SINCE = "hw/rtc/mc146818rtc.c, hw/timer/hpet.c, hw/i2c/smbus_ich9.c (QEMU 10.1+): support for loading versions " \
        "older than 3 (RTC) and 2 (HPET) and for SMBus-less ICH9 (machine types <= 3.1) was dropped with those " \
        "machine types, so the fields lost their since-version and field tests; both QEMUs write and load the " \
        "same bytes"
RTC_FIELDS = ("irq_coalesced", "period", "base_rtc", "last_update", "offset", "update_timer", "next_alarm_time")
SINCE_CHANGES = [Change("field-changed", "mc146818rtc", f) for f in RTC_FIELDS] + \
    [Change("field-changed", "hpet", "num_timers_save"), Change("field-changed", "ich9_smb", "irq_enabled")]

_NO_CHANGE = {
    "10.1": "hw_compat_10_0: scsi-hd dpofua, vfio-pci migration details, ramfb/vfio-pci-nohotplug x86 option ROM, "
            "qemu-vdagent chardev; pc_compat_10_0: x86 CPUID properties (x-consistent-cache, "
            "x-vendor-cpuid-only-v2, x-arch-cap-always-on, x-pdcm-on-even-without-pmu): streams of both machine "
            "types are the same for these devices",
    "11.0": "hw_compat_10_2: scsi-block migrate-pr (scsi-block devices), isa-cirrus-vga global-vmstate (ISA Cirrus "
            "VGA); pc_compat_10_2 is empty: streams of both machine types are the same for these devices",
    "11.1": "hw_compat_11_0: virtio-mmio queue size (microvm), chardev-vc encoding, tpm-crb chunked migration "
            "(TPM CRB devices), tpm-tis-device and arm-smmuv3 (Arm), migration switchover-ack-legacy (only with the "
            "switchover-ack capability, over a return path); pc_compat_11_0 is empty: streams of both machine "
            "types are the same for these devices",
}


def register(reg: Registry) -> None:
    """Register the QEMU 11.1 lines and the steps to and from QEMU 10.0's newest machine types."""
    reg.line(PC11_LINE, PC11)
    reg.line(Q35_11_LINE, Q35_11)
    for prefix, line in (("pc-i440fx", PC11), ("pc-q35", Q35_11)):
        home = f"{prefix}-10.0"
        assert reg.release(home).qemu == QEMU_10_0
        _version_step(reg, home, line[0].name)
        _machine_steps(reg, {r.name.split("@", 1)[0].rsplit("-", 1)[1]: r.name for r in line}, prefix == "pc-q35")


def _version_step(reg: Registry, old: str, new: str) -> None:
    reg.machine(old, new, apic_first, lossless=True, mirrors=APIC, name="apic first")
    reg.machine(new, old, apic_in_id_order, lossless=True, mirrors=APIC, name="apic after its CPU")
    for vmsd, item in (("piix4_pm", "piix4_pm/cpuhp"), ("ICH9LPC", "pm/ich9_pm/cpuhp")):
        reg.section(vmsd, old, new, lambda s, m: s, lossless=True, name=f"{vmsd} cpuhp",
                    mirrors=CPUHP + "; not added going up (a destination without it keeps its reset state, which "
                                    "the subsection would carry)",
                    changes=[Change("subsection-added", vmsd, item)])
        reg.section(vmsd, new, old, lambda s, m: s, lossless=True, name=f"{vmsd} cpuhp",
                    mirrors=CPUHP + "; kept going down (the guest booted on 11.1 uses the modern interface)",
                    changes=[Change("subsection-removed", vmsd, item)])
    reg.section("cpu", old, new, lambda s, m: s, lossless=True, name="cpu (11.1 subsections)",
                mirrors=CPU + "; a 10.0 CPU has none of them",
                changes=[Change("subsection-added", "cpu", s) for s in CPU_11_ONLY])
    reg.section("cpu", new, old, cpu_down, lossless=True, name="cpu (11.1 subsections)",
                mirrors=CPU + "; refused going down",
                changes=[Change("subsection-removed", "cpu", s) for s in CPU_11_ONLY])
    reg.section("virtio-net", new, old, features_128_down, lossless=True, name=FEATURES_128,
                mirrors="hw/virtio/virtio.c (QEMU 10.1+): virtio/128bit_features carries feature bits above 63; "
                        "refused going down when the guest negotiated one")
    queues = "hw/virtio/virtio.c (QEMU 10.1+): virtio_load refuses a queue size above the size the device " \
             "allocated ('VQ 0 vring.num 1024 exceeds allocated max 256'); QEMU 10.0 writes VIRTQUEUE_MAX_SIZE " \
             "(1024) for a queue no driver set up, 11.1 the allocated size (virtio-net: 256, the control queue 64)"
    reg.section("virtio-net", old, new, virtio.on_blob(_unset_queue_sizes(True)), lossless=True,
                name="virtio-net unset queue sizes", mirrors=queues + "; set to the allocated size")
    reg.section("virtio-net", new, old, virtio.on_blob(_unset_queue_sizes(False)), lossless=True,
                name="virtio-net unset queue sizes", mirrors=queues + "; set back to 1024")
    reg.machine(old, new, None, lossless=True, mirrors=SINCE, name="since-versions", changes=SINCE_CHANGES)
    reg.machine(new, old, None, lossless=True, mirrors=SINCE, name="since-versions", changes=SINCE_CHANGES)
    reg.stream(old, new, styled(QEMU_11_1), lossless=True, mirrors=VMDESC, name="vmdesc (QEMU 11.1)")
    reg.stream(new, old, styled(QEMU_10_0), lossless=True, mirrors=VMDESC, name="vmdesc (QEMU 10.0)")


def _machine_steps(reg: Registry, at: dict[str, str], q35: bool) -> None:
    """The steps between QEMU 11.1's machine types ``at[version]``, from 10.0 to 11.1."""
    # 10.1 -> 10.2: hw_compat_10_1, pc_compat_10_1
    old, new = at["10.1"], at["10.2"]
    if q35:
        tseg = "pc_compat_10_1: mch extended-tseg-mbytes=16 (64 from pc-q35-10.2 on): the MCH register at 0x50 " \
               "that answers the firmware's query"
        reg.section("mch", old, new, _ext_tseg(EXT_TSEG_10_1, EXT_TSEG_10_2), lossless=True, name="mch ext TSEG",
                    mirrors=tseg + "; refused if the guest enabled an extended TSEG")
        reg.section("mch", new, old, _ext_tseg(EXT_TSEG_10_2, EXT_TSEG_10_1), lossless=True, name="mch ext TSEG",
                    mirrors=tseg + "; refused if the guest enabled an extended TSEG")
    err = "pc_compat_10_1: x86 CPU x-migrate-error-code=false (cpu/error_code, the error code of an exception " \
          "being delivered)"
    reg.section("cpu", old, new, lambda s, m: s, lossless=True, name="cpu/error_code", mirrors=err + "; none sent",
                changes=[Change("subsection-added", "cpu", "cpu/error_code")])
    reg.section("cpu", new, old, error_code_down, lossless=False, name="cpu/error_code", mirrors=err + "; dropped",
                changes=[Change("subsection-removed", "cpu", "cpu/error_code")])
    tunnel = "hw_compat_10_1: virtio-net host_tunnel, host_tunnel_csum, guest_tunnel, guest_tunnel_csum off " \
             "(offered only with a backend that has UDP tunnel offloads, e.g. tap)"
    reg.section("virtio-net", old, new, lambda s, m: s, lossless=True, name="virtio-net tunnel",
                mirrors=tunnel + "; nothing negotiated yet")
    reg.section("virtio-net", new, old, features_128_down, lossless=True, name="virtio-net tunnel",
                mirrors=tunnel + "; refused if the guest negotiated them")

    for v, why in _NO_CHANGE.items():
        prev = VERSIONS_11_1[VERSIONS_11_1.index(v) - 1]
        a, b = at[prev], at[v]
        reg.machine(a, b, None, lossless=True, mirrors=why, name="no-change")
        reg.machine(b, a, None, lossless=True, mirrors=why, name="no-change")

    # Sections a transform changed get a new vmdesc entry: written as 11.1 writes it.
    for prev, v in zip(VERSIONS_11_1, VERSIONS_11_1[1:]):
        for a, b in ((at[prev], at[v]), (at[v], at[prev])):
            reg.stream(a, b, styled(QEMU_11_1), lossless=True, name="vmdesc (QEMU 11.1)", mirrors=VMDESC)
