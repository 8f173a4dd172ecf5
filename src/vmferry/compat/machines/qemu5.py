"""QEMU 5.2's newest x86 machine types, joined to the same machine types run by QEMU 7.2.

A release is a pair (QEMU version, machine type): ``pc-i440fx-5.2@5.2`` is
``pc-i440fx-5.2`` run by QEMU 5.2, and one **QEMU-version step** joins it to
``pc-i440fx-5.2``, the same machine type run by QEMU 7.2 (from there the 7.2
catalogue of :mod:`.x86` goes on, up to 7.2 and on to QEMU 10.0 and 11.1;
``pc-q35-5.2@5.2`` likewise).  The wire bytes of every section are the same
(QEMU 7.2 loads QEMU 5.2's streams of ``pc-*-5.2`` as they are, and 5.2
7.2's); what differs, seen in real streams of both QEMUs with the default
devices, e1000, e1000e, virtio-net-pci, the USB controllers and VGA:

* names in the vmdesc: ``ps2kbd`` / ``ps2mouse`` call their common state
  ``common`` in 5.2, ``parent_obj`` in 7.2 (the PS/2 devices became QOM
  devices); ``pckbd`` migrates its pending byte as ``kbd.pending`` in 5.2,
  as ``kbd.pending_tmp`` in 7.2 (``kbd_pre_save`` writes it; for a machine
  type without i8042 extended state, ``hw_compat_6_0``, it holds the same
  two bits);
* the section order: QEMU 5.2 creates the i8257 DMA controllers in
  ``pc_basic_device_init`` (after the PC speaker), QEMU 7.2 in the
  southbridge's realize (``hw/isa/piix3.c``, ``lpc_ich9.c``), before the
  southbridge registers its own state; so 7.2 sends ``dma`` before
  ``PIIX3``/``ICH9LPC`` and numbers the sections in between accordingly
  (section ids follow registration order; loaders ignore both);
* the vmdesc's spacing: QJSON in 5.2 (:mod:`.vmdesc`);
* state QEMU 5.2 cannot hold: the CPU subsections new in QEMU 6.0 .. 7.2.

Values 5.2 and 7.2 reset differently are left as the guest saw them, as
QEMU itself does when it loads the other's stream: virtio-net's VLAN filter
table (all zeros in 5.2, all ones in 7.2 until the guest programs it), the
PCI Express Link Status "Data Link Layer Link Active" bit of e1000e and
qemu-xhci (set in 5.2), a TCG-internal ``hflags2`` bit of the CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ...errors import CompatError
from ...events import DeviceSection, OpaqueSection
from ..ops import Machine, refuse_subsections, renaming
from ..registry import Change, Registry, Release
from .releases import QEMU_7_2
from .vmdesc import styled

__all__ = ["PC5", "Q35_5", "QEMU_5_2", "register"]

QEMU_5_2 = "5.2"
PC5_LINE = "pc-i440fx@5.2"
Q35_5_LINE = "pc-q35@5.2"

PC5: list[Release] = [Release(f"pc-i440fx-5.2@{QEMU_5_2}", PC5_LINE, machine="pc-i440fx-5.2", qemu=QEMU_5_2)]
Q35_5: list[Release] = [Release(f"pc-q35-5.2@{QEMU_5_2}", Q35_5_LINE, machine="pc-q35-5.2", qemu=QEMU_5_2)]

Section = DeviceSection | OpaqueSection


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


#: cpu subsections QEMU 5.2 does not know (target/i386/machine.c of 7.2 against 5.2's).
CPU_7_ONLY = ("cpu/amd_tsc_scale_msr", "cpu/arch_lbr", "cpu/intel_amx_xtile", "cpu/intel_sgx", "cpu/msr_xfd",
              "cpu/pdptrs", "cpu/pkrs", "cpu/svm_guest", "cpu/triple_fault")


cpu_down = refuse_subsections(CPU_7_ONLY, "state QEMU 5.2 cannot load (CPU features or KVM state added in "
                                          "QEMU 6.0 .. 7.2)")


# ---------------------------------------------------------------------------
# Section order
# ---------------------------------------------------------------------------

#: The southbridges that create the DMA controllers in QEMU 7.2.
SOUTHBRIDGES = ("PIIX3", "ICH9LPC")
#: What QEMU 5.2's pc_basic_device_init creates just before the DMA controllers (the last one present).
BEFORE_DMA_5_2 = ("hpet", "mc146818rtc", "i8254", "pcspk")


def _vmsd(s: Section) -> str:
    return s.schema.name if isinstance(s, DeviceSection) else s.idstr


def _renumber(sections: list[Section], lo: int, hi: int, old: Sequence[Section]) -> list[Section]:
    """Give the sections at ``lo .. hi`` (new order) the ids they held, ascending: registration order."""
    ids = sorted(s.section_id for s in old[lo:hi + 1])
    out = list(sections)
    for k, sid in zip(range(lo, hi + 1), ids):
        if out[k].section_id != sid:
            out[k] = dataclasses.replace(out[k], section_id=sid)
    return out


def dma_first(m: Machine) -> Machine:
    """QEMU 5.2 -> 7.2: the ``dma`` sections go before the southbridge's, ids renumbered."""
    secs = list(m.sections)
    dmas = [i for i, s in enumerate(secs) if s.idstr == "dma"]
    south = [i for i, s in enumerate(secs) if _vmsd(s) in SOUTHBRIDGES]
    if not dmas or not south or dmas[0] < south[0]:
        return m
    if dmas != list(range(dmas[0], dmas[-1] + 1)):
        raise CompatError("the dma sections are not next to each other: not a stream QEMU 5.2 wrote")
    at = south[0]
    new = secs[:at] + secs[dmas[0]:dmas[-1] + 1] + secs[at:dmas[0]] + secs[dmas[-1] + 1:]
    return dataclasses.replace(m, sections=tuple(_renumber(new, at, dmas[-1], secs)))


def dma_after_speaker(m: Machine) -> Machine:
    """QEMU 7.2 -> 5.2: the ``dma`` sections go after the PC speaker (or what 5.2 creates before them)."""
    secs = list(m.sections)
    dmas = [i for i, s in enumerate(secs) if s.idstr == "dma"]
    if not dmas:
        return m
    anchors = [i for i, s in enumerate(secs) if _vmsd(s) in BEFORE_DMA_5_2 and i > dmas[-1]]
    if not anchors:
        return m
    if dmas != list(range(dmas[0], dmas[-1] + 1)):
        raise CompatError("the dma sections are not next to each other: not a stream QEMU 7.2 wrote")
    end = anchors[-1]
    new = secs[:dmas[0]] + secs[dmas[-1] + 1:end + 1] + secs[dmas[0]:dmas[-1] + 1] + secs[end + 1:]
    return dataclasses.replace(m, sections=tuple(_renumber(new, dmas[0], end, secs)))


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

PS2 = "hw/input/ps2.c (QEMU 7.2): the PS/2 keyboard and mouse are QOM devices; their common state, 'common' in " \
      "QEMU 5.2, is 'parent_obj' (same 272 bytes); QEMU 5.2 registers them with vmstate_register, so its " \
      "-dump-vmstate does not list them, but its streams carry them"
PENDING = "hw/input/pckbd.c (QEMU 6.1): 5.2's 'kbd.pending' travels as 'kbd.pending_tmp' (kbd_pre_save); with " \
          "hw_compat_6_0 i8042 extended-state=false, as for pc-*-5.2, it holds the same bits (0x01 keyboard, " \
          "0x02 aux)"
DMA = "hw/i386/pc.c (QEMU 5.2) creates the i8257 DMA controllers after the PC speaker, hw/isa/piix3.c and " \
      "lpc_ich9.c (QEMU 7.2) in the southbridge's realize: the sections are sent, and numbered, in registration " \
      "order (loaders ignore both)"
VMDESC = "migration/qjson.c (QEMU 5.2) spaces the vmdesc '{ \"name\" : ... }'; QEMU 6.0 replaced it by the JSON " \
         "writer; loaders ignore the vmdesc"
NOT_SENT = "not sent for pc-*-5.2 by QEMU 7.2 either (hw_compat_6_0 i8042 extended-state=false, hw_compat_6_2 " \
           "PIIX4_PM x-not-migrate-acpi-index=on, pc_compat_6_0 ICH9-LPC acpi-pci-hotplug-with-bridge-support=off): " \
           "class differences no stream of this machine type carries"
CPU = "target/i386/machine.c: cpu subsections new in QEMU 6.0 .. 7.2 (AMX, arch LBR, SGX, XFD, PKRS, SVM guest " \
      "state, PDPTRs, triple fault, AMD TSC scaling; KVM or CPU models with those features)"


def register(reg: Registry) -> None:
    """Register QEMU 5.2's pc-i440fx-5.2 and pc-q35-5.2 and the steps to QEMU 7.2's."""
    reg.line(PC5_LINE, PC5)
    reg.line(Q35_5_LINE, Q35_5)
    for old, new in ((PC5[0].name, "pc-i440fx-5.2"), (Q35_5[0].name, "pc-q35-5.2")):
        assert reg.release(new).qemu == QEMU_7_2
        _version_step(reg, old, new)


def _version_step(reg: Registry, old: str, new: str) -> None:
    for vmsd in ("ps2kbd", "ps2mouse"):
        reg.section(vmsd, old, new, renaming("common", "parent_obj"), lossless=True, mirrors=PS2,
                    name=f"{vmsd} parent_obj",
                    changes=[Change("field-removed", vmsd, "common"), Change("field-added", vmsd, "parent_obj"),
                             Change("section-added", vmsd)])
        reg.section(vmsd, new, old, renaming("parent_obj", "common"), lossless=True, mirrors=PS2,
                    name=f"{vmsd} common",
                    changes=[Change("field-removed", vmsd, "parent_obj"), Change("field-added", vmsd, "common"),
                             Change("section-removed", vmsd)])
    reg.section("pckbd", old, new, renaming("pending", "pending_tmp", ("kbd",)), lossless=True, mirrors=PENDING,
                name="pckbd pending_tmp",
                changes=[Change("field-removed", "pckbd", "kbd/pending"),
                         Change("field-added", "pckbd", "kbd/pending_tmp")])
    reg.section("pckbd", new, old, renaming("pending_tmp", "pending", ("kbd",)), lossless=True, mirrors=PENDING,
                name="pckbd pending",
                changes=[Change("field-removed", "pckbd", "kbd/pending_tmp"),
                         Change("field-added", "pckbd", "kbd/pending")])
    reg.section("cpu", old, new, lambda s, m: s, lossless=True, name="cpu (6.0 .. 7.2 subsections)",
                mirrors=CPU + "; a 5.2 CPU has none of them",
                changes=[Change("subsection-added", "cpu", s) for s in CPU_7_ONLY])
    reg.section("cpu", new, old, cpu_down, lossless=True, name="cpu (6.0 .. 7.2 subsections)",
                mirrors=CPU + "; refused going down",
                changes=[Change("subsection-removed", "cpu", s) for s in CPU_7_ONLY])
    reg.machine(old, new, dma_first, lossless=True, mirrors=DMA, name="dma order")
    reg.machine(new, old, dma_after_speaker, lossless=True, mirrors=DMA, name="dma order")
    not_sent = [Change("subsection-added", "pckbd", "kbd/pckbd/extended_state"),
                Change("field-added", "piix4_pm", "acpi_pci_hotplug.acpi_index"),
                Change("subsection-added", "ICH9LPC", "pm/ich9_pm/pcihp")]
    reg.machine(old, new, None, lossless=True, mirrors=NOT_SENT, name="7.2 state not sent for 5.2", changes=not_sent)
    reg.machine(new, old, None, lossless=True, mirrors=NOT_SENT, name="7.2 state not sent for 5.2",
                changes=[dataclasses.replace(c, kind=c.kind.replace("added", "removed")) for c in not_sent])
    reg.stream(old, new, styled(QEMU_7_2), lossless=True, mirrors=VMDESC, name="vmdesc (QEMU 7.2)")
    reg.stream(new, old, styled(QEMU_5_2), lossless=True, mirrors=VMDESC, name="vmdesc (QEMU 5.2)")
