"""QEMU 10.0's newest x86 machine types, and the way down to QEMU 7.2's.

A release is a pair (QEMU version, machine type).  Two steps join QEMU
10.0's ``pc-i440fx-10.0`` / ``pc-q35-10.0`` to QEMU 7.2's ``pc-i440fx-7.2`` /
``pc-q35-7.2`` (and from there the 7.2 catalogue of :mod:`.x86` goes on down):

* the **machine-type step**, inside QEMU 10.0: ``pc-i440fx-10.0`` <->
  ``pc-i440fx-7.2@10.0`` (the 7.2 machine type run by QEMU 10.0).  Of the
  compat tables in between (``hw_compat_7_2`` .. ``hw_compat_9_2``,
  ``pc_compat_7_2`` .. ``pc_compat_9_2``) the ones that change anything
  for these streams are ``send-switchover-start`` (``hw_compat_9_2``): the
  10.0 machine types send the ``SWITCHOVER_START`` command (spec §11.4),
  older ones do not, and QEMU 7.2 refuses it ("MIG_CMD 0xb unknown"); and for
  q35's ``e1000e`` ``migrate-timadj``, ``x-pcie-err-unc-mask`` (``hw_compat_7_2``)
  and ``x-pcie-ext-tag`` (``hw_compat_9_1``).
* the **QEMU-version step**, same machine type: ``pc-i440fx-7.2@10.0`` <->
  ``pc-i440fx-7.2``.  The wire bytes of the default devices, ``e1000`` and
  ``virtio-net-pci`` are the same (spec §11.1); what differs is how QEMU 10.0
  *describes* them (``globalstate`` split into four fields, ``hpet``
  ``num_timers_save``, ``ich9_ahci`` ``ports`` unsigned, ``e1000e``'s unused
  pending flags, the vmdesc's configuration object and its array indexes,
  §11.8) and state 7.2 cannot hold (``i8259/ltim``, new ``cpu`` subsections,
  §11.9).

Transforms follow the rule of :mod:`.x86`: going to the newer release, a
value the older one lacks is what its destination would hold; going down,
what the older release cannot carry is dropped (lossy) or refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

from ...errors import CompatError
from ...events import (
    CMD_PACKAGED,
    CMD_SWITCHOVER_START,
    SECTION_END,
    Command,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    IterBegin,
    OpaqueSection,
    RamZeros,
    Vmdesc,
)
from ...serialize.schema import Field
from ..ops import (Machine, Node, add_field, at, drop_field, drop_subsection, has_field, node, refuse_subsections,
                   renaming, with_node)
from ..registry import Change, Registry, Release
from . import pcie, virtio
from .releases import QEMU_7_2
from .vmdesc import restyled_object

__all__ = ["PC10", "PC10_LINE", "Q35_10", "Q35_10_LINE", "QEMU_10_0", "register"]

QEMU_10_0 = "10.0"
PC10_LINE = "pc-i440fx@10.0"
Q35_10_LINE = "pc-q35@10.0"


#: QEMU 10.0's x86 machine types from 7.2 on (older ones are deprecated there and not in this catalogue).
VERSIONS_10_0 = ["7.2", "8.0", "8.1", "8.2", "9.0", "9.1", "9.2", "10.0"]


def _line(prefix: str, line: str) -> list[Release]:
    return [Release(f"{prefix}-7.2@{QEMU_10_0}", line, machine=f"{prefix}-7.2", qemu=QEMU_10_0)] + \
        [Release(f"{prefix}-{v}", line, qemu=QEMU_10_0) for v in VERSIONS_10_0[1:]]


PC10: list[Release] = _line("pc-i440fx", PC10_LINE)
Q35_10: list[Release] = _line("pc-q35", Q35_10_LINE)

#: QEMU_VM_COMMAND POSTCOPY_RAM_DISCARD (migration/savevm.c).
CMD_POSTCOPY_RAM_DISCARD = 6


# ---------------------------------------------------------------------------
# Stream: SWITCHOVER_START (hw_compat_9_2 send-switchover-start=off)
# ---------------------------------------------------------------------------


def drop_switchover_start(events: Iterator[Event]) -> Iterator[Event]:
    """Leave out every SWITCHOVER_START command (QEMU 7.2 and machine types <= 9.2 never send it)."""
    for ev in events:
        if isinstance(ev, Command) and ev.cmd == CMD_SWITCHOVER_START:
            continue
        yield ev


def add_switchover_start(events: Iterator[Event]) -> Iterator[Event]:
    """Write SWITCHOVER_START once, where QEMU 10.0 does (spec §11.4).

    At the start of switchover: before the first END section (precopy), or
    before the first POSTCOPY_RAM_DISCARD or PACKAGED command (postcopy).  A
    stream that reaches its device sections without one (background snapshot,
    device state only) gets none, as from QEMU 10.0.
    """
    pending = True
    for ev in events:
        if pending:
            if isinstance(ev, Command) and ev.cmd == CMD_SWITCHOVER_START:
                pending = False
            elif (isinstance(ev, IterBegin) and ev.kind == SECTION_END) or \
                    (isinstance(ev, Command) and ev.cmd in (CMD_POSTCOPY_RAM_DISCARD, CMD_PACKAGED)):
                yield Command(CMD_SWITCHOVER_START)
                pending = False
            elif isinstance(ev, (DeviceSection, OpaqueSection, Eof)):
                pending = False
        yield ev


def refuse_filled_zero_pages(events: Iterator[Event]) -> Iterator[Event]:
    """Refuse ZERO records whose fill byte is not 0 (spec §11.5): QEMU 7.2 loads them, 10.0 does not
    ("Found a zero page with value ..."); QEMU itself only writes 0."""
    for ev in events:
        if isinstance(ev, RamZeros) and ev.fill is not None and any(ev.fill):
            raise CompatError(f"RAM block {ev.block!r}: a ZERO record with fill byte {max(ev.fill):#04x} at "
                              f"{ev.offset:#x}, which QEMU 10.0 refuses")
        yield ev


#: The validated capabilities QEMU 7.2 knows (spec §1.2); 10.0 adds mapped-ram (§11.6, §11.7).
CAPABILITIES_7_2 = frozenset({"x-ignore-shared"})


def refuse_new_capabilities(events: Iterator[Event]) -> Iterator[Event]:
    """Refuse a configuration that announces a capability QEMU 7.2 does not know ("Received unknown
    capability"): mapped-ram lays RAM out at file offsets, which no stream transform can undo."""
    for ev in events:
        if isinstance(ev, Configuration):
            new = [c for c in ev.capabilities if c not in CAPABILITIES_7_2]
            if new:
                raise CompatError(f"capability {', '.join(new)}: QEMU 7.2 does not know it (a mapped-ram file "
                                  f"must be migrated again without mapped-ram)")
        yield ev


# ---------------------------------------------------------------------------
# Stream: the vmdesc as each QEMU writes it (spec §11.8)
# ---------------------------------------------------------------------------


def configuration_desc(config: Configuration) -> dict[str, Any]:
    """QEMU 10.0's vmdesc entry for a configuration section (spec §11.8)."""
    name = bytes(config.state.get("name", b""))
    desc: dict[str, Any] = {"vmsd_name": "configuration", "version": 1, "fields": [
        {"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": len(name)}]}
    subs = []
    for key, value in config.state.items():
        if key == "configuration/target-page-bits":
            subs.append({"vmsd_name": key, "version": 1, "fields": [
                {"name": "target_page_bits", "type": "uint32", "size": 4}]})
        elif key == "configuration/capabilities":
            caps = [bytes(c) for c in value.get("capabilities", [])]
            cap: dict[str, Any] = {"name": "capabilities"}
            if len(caps) > 1:
                cap["array_len"] = len(caps)
            # the size of the first element: QEMU 10.0 mis-sizes the others (§11.8)
            cap.update({"type": "capability", "size": 1 + len(caps[0]) if caps else 0})
            subs.append({"vmsd_name": key, "version": 1, "fields": [
                {"name": "caps_count", "type": "uint32", "size": 4}, cap]})
        elif key == "configuration/uuid":
            subs.append({"vmsd_name": key, "version": 1, "fields": [
                {"name": "uuid.data", "array_len": 16, "type": "uint8", "size": 1}]})
        elif key not in ("len", "name"):
            raise CompatError(f"no QEMU 10.0 description for configuration subsection {key!r}")
    if subs:
        desc["subsections"] = subs
    return desc


def _vmdesc_for(qemu: str) -> Any:
    def fn(events: Iterator[Event]) -> Iterator[Event]:
        config: Configuration | None = None
        for ev in events:
            if isinstance(ev, Configuration):
                config = ev
            elif isinstance(ev, Vmdesc):
                ev = restyle_vmdesc(ev, qemu, config)
            yield ev
    fn.__doc__ = f"The vmdesc as QEMU {qemu} writes it."
    return fn


def restyle_vmdesc(ev: Vmdesc, qemu: str, config: Configuration | None) -> Vmdesc:
    """``ev`` as QEMU ``qemu`` writes it: with (10.0) or without (7.2) the configuration object, array
    indexes as :func:`.vmdesc.restyle_vmsd` writes them for ``qemu``."""
    obj = restyled_object(ev, qemu)
    out: dict[str, Any] = {}
    if qemu == QEMU_10_0 and config is not None:
        out["configuration"] = obj.get("configuration") or configuration_desc(config)
    for k, v in obj.items():
        if k != "configuration":
            out[k] = v
    return Vmdesc(json.dumps(out).encode())


# ---------------------------------------------------------------------------
# Sections: what QEMU 10.0 describes differently, same bytes (spec §11.8, §11.9)
# ---------------------------------------------------------------------------

#: QEMU 7.2's globalstate: the run state name, NUL padded to 100 bytes.
RUNSTATE_7_2 = 100
#: QEMU 10.0: the same 100 bytes, split (to preserve a suspended run state).
RUNSTATE_10_0, UNUSED_10_0 = 32, 66


def globalstate_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # migration/global_state.c (10.0): runstate[32], has_vm_was_suspended = true (always written),
    # vm_was_suspended = vm_get_suspended(), unused[66] zeroed.  A 7.2 source had no such flag: a
    # guest it saved suspended has the run state "suspended".
    n = node(sec)
    if "has_vm_was_suspended" in n.tree:
        return sec
    raw = bytes(n.tree["runstate"])
    state = raw.split(b"\0", 1)[0]
    if any(raw[RUNSTATE_10_0:]):
        raise CompatError(f"globalstate run state {state[:40]!r} is longer than QEMU 10.0's 32 bytes")
    fields = []
    for f in n.vmsd.fields:
        if f.name == "runstate":
            fields += [Field("runstate", "buffer", RUNSTATE_10_0), Field("has_vm_was_suspended", "uint8", 1),
                       Field("vm_was_suspended", "uint8", 1), Field("unused", "buffer", UNUSED_10_0)]
        else:
            fields.append(f)
    tree: dict[str, Any] = {}
    for k, v in n.tree.items():
        if k == "runstate":
            tree.update({"runstate": raw[:RUNSTATE_10_0], "has_vm_was_suspended": 1,
                         "vm_was_suspended": int(state == b"suspended"), "unused": bytes(UNUSED_10_0)})
        else:
            tree[k] = v
    return with_node(sec, Node(dataclasses.replace(n.vmsd, fields=tuple(fields)), tree))


def globalstate_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    # QEMU 7.2 reads the NUL-terminated run state and ignores the rest; it writes zeros after it.
    n = node(sec)
    if "has_vm_was_suspended" not in n.tree:
        return sec
    raw = bytes(n.tree["runstate"])[:RUNSTATE_10_0].ljust(RUNSTATE_10_0, b"\0")
    fields = []
    for f in n.vmsd.fields:
        if f.name == "runstate":
            fields.append(Field("runstate", "buffer", RUNSTATE_7_2))
        elif f.name not in ("has_vm_was_suspended", "vm_was_suspended", "unused"):
            fields.append(f)
    tree: dict[str, Any] = {}
    for k, v in n.tree.items():
        if k == "runstate":
            tree["runstate"] = raw.ljust(RUNSTATE_7_2, b"\0")
        elif k not in ("has_vm_was_suspended", "vm_was_suspended", "unused"):
            tree[k] = v
    return with_node(sec, Node(dataclasses.replace(n.vmsd, fields=tuple(fields)), tree))


def _retype(path: tuple[str, ...], name: str, old: str, new: str) -> Any:
    def op(m: Node) -> Node:
        fields = tuple(dataclasses.replace(f, type=new) if f.name == name and f.type == old else f
                       for f in m.vmsd.fields)
        return Node(dataclasses.replace(m.vmsd, fields=fields), m.tree)

    def fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        n = node(sec)
        if not has_field(n, name, path):
            return sec
        out = at(n, path, op)
        return sec if out.vmsd == n.vmsd else with_node(sec, out)
    return fn


def i8259_ltim_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    # QEMU 7.2's pic_ioport_write ignores ICW1.LTIM ("level sensitive irq not supported"):
    # a 7.2 destination never had the bank-select state, so it is dropped.
    n = node(sec)
    return with_node(sec, drop_subsection(n, "i8259/ltim")) if "i8259/ltim" in n.tree else sec


#: cpu subsections QEMU 7.2 does not know (spec §11.9): state of CPU features 7.2 cannot model.
CPU_10_ONLY = ("cpu/fred", "cpu/msr_hwcr", "cpu/xen_vcpu")


cpu_down = refuse_subsections(CPU_10_ONLY, "the CPU uses a feature QEMU 7.2 cannot migrate (FRED, the AMD HWCR "
                                           "MSR, Xen emulation); use a CPU model without it")


#: virtio-net's USO feature bits (include/standard-headers/linux/virtio_net.h).
VIRTIO_NET_F_USO = {54: "GUEST_USO4", 55: "GUEST_USO6", 56: "HOST_USO"}


def uso_down(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # virtio_load refuses guest features the device does not offer.
    used = [name for bit, name in VIRTIO_NET_F_USO.items() if virtio.guest_features(t) >> bit & 1]
    if used:
        raise CompatError(f"the guest negotiated VIRTIO_NET_F_{', '.join(used)}, which machine types up to 8.1 "
                          f"do not offer")
    return t


def _refuse_early(m: Machine) -> Machine:
    # hw_compat_7_2: virtio-mem x-early-migration=false.  Moving virtio-mem's state between its
    # early and its normal section is not written.
    for s in m.sections:
        if s.idstr.endswith("-early"):
            raise CompatError(f"section {s.idstr!r}: virtio-mem early migration (hw_compat_7_2 "
                              f"x-early-migration) is not covered")
    return m


TIMADJ = Field("core.timadj", "int64", 8)


def e1000e_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    # hw_compat_7_2 e1000e migrate-timadj=off: the older machine type's destination keeps the
    # TIMADJ register at its reset value, 0.
    n = node(sec)
    return with_node(sec, add_field(n, TIMADJ, 0)) if TIMADJ.name not in n.tree else sec


def e1000e_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    n = node(sec)
    return with_node(sec, drop_field(n, TIMADJ.name)) if TIMADJ.name in n.tree else sec


#: QEMU 10.0's e1000e no longer migrates its interrupt-throttling "pending" flags: VMSTATE_UNUSED.
E1000E_PENDING = ((Field("core.itr_intr_pending", "bool", 1), "unused[0]"),
                  (Field("core.eitr_intr_pending", "bool", 1, count=5, array=True), "unused[1]"))


def _swap_fields(n: Node, swaps: dict[str, tuple[Field, Any]]) -> Node:
    fields = tuple(swaps[f.name][0] if f.name in swaps else f for f in n.vmsd.fields)
    tree = {(swaps[k][0].name if k in swaps else k): (swaps[k][1] if k in swaps else v) for k, v in n.tree.items()}
    return Node(dataclasses.replace(n.vmsd, fields=fields), tree)


def e1000e_pending_up(sec: DeviceSection, m: Machine) -> DeviceSection:
    n = node(sec)
    swaps = {f.name: (Field(unused, "unused_buffer", f.size * f.count), bytes(f.size * f.count))
             for f, unused in E1000E_PENDING if f.name in n.tree}
    return with_node(sec, _swap_fields(n, swaps)) if swaps else sec


def e1000e_pending_down(sec: DeviceSection, m: Machine) -> DeviceSection:
    # QEMU 7.2 reads the flags where 10.0 writes zeros: not pending, what a 7.2 destination of a
    # 10.0 source gets.
    n = node(sec)
    swaps = {unused: (f, [False] * f.count if f.array else False) for f, unused in E1000E_PENDING if unused in n.tree}
    return with_node(sec, _swap_fields(n, swaps)) if swaps else sec


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

#: Why the steps without a transform change nothing: compat entries, and streams of the default devices,
#: e1000, e1000e, virtio-net-pci, the USB controllers and VGA identical under both machine types
#: (QEMU 10.0.13, tests/test_compat_qemu10_real.py).
_SAME = "streams of both machine types are the same for these devices"
_NO_CHANGE = {
    "8.1": "hw_compat_8_0: migration multifd-flush-after-each-section (multifd channels only), PCI "
           "x-pcie-ari-nextfn-1 (ARI capability: SR-IOV devices only); pc_compat_8_0: virtio-mem; " + _SAME,
    "9.0": "hw_compat_8_2: migration zero-page-detection=legacy (multifd channels only), virtio-iommu; " + _SAME,
    "9.1": "hw_compat_9_0: SCSI, VFIO, sd-card, virtio-pci x-pcie-pm-no-soft-reset (virtio on PCI Express "
           "ports only); pc_compat_9_0: CPU model properties; " + _SAME,
}
SWITCHOVER = "hw_compat_9_2: migration send-switchover-start=off (spec §11.4)"

def register(reg: Registry) -> None:
    """Register the QEMU 10.0 lines and the steps to and from QEMU 7.2's newest machine types."""
    reg.line(PC10_LINE, PC10)
    reg.line(Q35_10_LINE, Q35_10)
    for prefix, line in (("pc-i440fx", PC10), ("pc-q35", Q35_10)):
        home = f"{prefix}-7.2"
        assert reg.release(home).qemu == QEMU_7_2
        _version_step(reg, home, line[0].name)
        names = {r.name.split("@", 1)[0].rsplit("-", 1)[1]: r.name for r in line}
        _machine_steps(reg, names)


def _version_step(reg: Registry, old: str, new: str) -> None:
    gs = "migration/global_state.c (QEMU 10.0): runstate[32], has_vm_was_suspended, vm_was_suspended, unused[66]"
    reg.section("globalstate", old, new, globalstate_up, lossless=True, mirrors=gs + "; same 100 bytes",
                changes=[Change("field-resized", "globalstate", "runstate"),
                         Change("field-added", "globalstate", "has_vm_was_suspended"),
                         Change("field-added", "globalstate", "vm_was_suspended"),
                         Change("field-added", "globalstate", "unused")])
    reg.section("globalstate", new, old, globalstate_down, lossless=False,
                mirrors=gs + "; QEMU 7.2 reads the run state only (vm_was_suspended is lost)",
                changes=[Change("field-resized", "globalstate", "runstate"),
                         Change("field-removed", "globalstate", "has_vm_was_suspended"),
                         Change("field-removed", "globalstate", "vm_was_suspended"),
                         Change("field-removed", "globalstate", "unused")])
    hpet = "hw/timer/hpet.c: num_timers became num_timers_save (same byte)"
    reg.section("hpet", old, new, renaming("num_timers", "num_timers_save"), lossless=True, mirrors=hpet,
                name="hpet num_timers_save",
                changes=[Change("field-removed", "hpet", "num_timers"), Change("field-added", "hpet", "num_timers_save")])
    reg.section("hpet", new, old, renaming("num_timers_save", "num_timers"), lossless=True, mirrors=hpet,
                name="hpet num_timers",
                changes=[Change("field-removed", "hpet", "num_timers_save"), Change("field-added", "hpet", "num_timers")])
    ahci = "hw/ide/ahci.c: ports checked as uint32 equal instead of int32 equal (same bytes)"
    reg.section("ich9_ahci", old, new, _retype(("ahci",), "ports", "int32 equal", "uint32 equal"), lossless=True,
                mirrors=ahci, name="ich9_ahci ports", changes=[Change("field-changed", "ich9_ahci", "ahci/ports")])
    reg.section("ich9_ahci", new, old, _retype(("ahci",), "ports", "uint32 equal", "int32 equal"), lossless=True,
                mirrors=ahci, name="ich9_ahci ports", changes=[Change("field-changed", "ich9_ahci", "ahci/ports")])
    ltim = "hw/intc/i8259_common.c: i8259/ltim (sent only after the guest set ICW1.LTIM)"
    reg.section("i8259", old, new, lambda s, m: s, lossless=True, name="i8259/ltim",
                mirrors=ltim + "; a 7.2 PIC has none, which is not sent",
                changes=[Change("subsection-added", "i8259", "i8259/ltim")])
    reg.section("i8259", new, old, i8259_ltim_down, lossless=False, name="i8259/ltim",
                mirrors=ltim + "; 7.2 ignores LTIM, dropped",
                changes=[Change("subsection-removed", "i8259", "i8259/ltim")])
    cpu = "target/i386/machine.c: cpu/fred, cpu/msr_hwcr, cpu/xen_vcpu (only for CPUs with those features)"
    reg.section("cpu", old, new, lambda s, m: s, lossless=True, name="cpu (10.0 subsections)",
                mirrors=cpu + "; a 7.2 CPU has none of them",
                changes=[Change("subsection-added", "cpu", s) for s in CPU_10_ONLY])
    reg.section("cpu", new, old, cpu_down, lossless=True, name="cpu (10.0 subsections)",
                mirrors=cpu + "; refused going down", changes=[Change("subsection-removed", "cpu", s) for s in CPU_10_ONLY])
    pend = "hw/net/e1000e.c (QEMU 10.0): itr_intr_pending, eitr_intr_pending became VMSTATE_UNUSED (same bytes)"
    pend_changes = [("core.itr_intr_pending", "unused[0]"), ("core.eitr_intr_pending", "unused[1]")]
    reg.section("e1000e", old, new, e1000e_pending_up, lossless=False, mirrors=pend + "; the flags are dropped",
                name="e1000e pending flags",
                changes=[Change(k, "e1000e", x) for a, b in pend_changes
                         for k, x in (("field-removed", a), ("field-added", b))])
    reg.section("e1000e", new, old, e1000e_pending_down, lossless=True, mirrors=pend + "; read as not pending",
                name="e1000e pending flags",
                changes=[Change(k, "e1000e", x) for a, b in pend_changes
                         for k, x in (("field-removed", b), ("field-added", a))])
    ide = "hw/ide/piix.c: QEMU 7.2 registers the PIIX IDE function's vmsd 'ide' at realize (vmstate_register), " \
          "10.0 in its device class (dc->vmsd), so only 10.0's -dump-vmstate lists it; both streams carry the " \
          "section, the same bytes"
    reg.machine(old, new, None, lossless=True, mirrors=ide, name="ide in -dump-vmstate",
                changes=[Change("section-added", "ide")])
    reg.machine(new, old, None, lossless=True, mirrors=ide, name="ide in -dump-vmstate",
                changes=[Change("section-removed", "ide")])
    desc = "migration/vmstate.c, savevm.c (QEMU 10.0): the vmdesc describes the configuration section first, " \
           "and an array's last element has no index (spec §11.8); loaders ignore the vmdesc"
    reg.stream(old, new, refuse_filled_zero_pages, lossless=True, name="zero-page fill",
               mirrors="migration/ram.c (QEMU 10.0): the loader rejects a ZERO record whose fill byte is not 0: "
                       "refused (QEMU never writes one)")
    reg.stream(old, new, _vmdesc_for(QEMU_10_0), lossless=True, mirrors=desc, name="vmdesc (QEMU 10.0)",
               changes=[Change("vmdesc-configuration-added", "vmdesc", "configuration")])
    reg.stream(new, old, refuse_new_capabilities, lossless=True, name="capabilities",
               mirrors="migration/options.c (QEMU 9.0): mapped-ram is a validated capability QEMU 7.2 does not "
                       "know: refused")
    reg.stream(new, old, _vmdesc_for(QEMU_7_2), lossless=True, mirrors=desc, name="vmdesc (QEMU 7.2)",
               changes=[Change("vmdesc-configuration-removed", "vmdesc", "configuration")])


def _machine_steps(reg: Registry, at: dict[str, str]) -> None:
    """The steps between QEMU 10.0's machine types ``at[version]``, from 7.2 to 10.0."""
    def step(a: str, b: str) -> tuple[str, str]:
        return at[a], at[b]

    # 7.2 -> 8.0: hw_compat_7_2
    old, new = step("7.2", "8.0")
    early = "hw_compat_7_2: virtio-mem x-early-migration=false (virtio-mem-device-early section)"
    reg.machine(old, new, _refuse_early, lossless=True, mirrors=early + ": refused", name="virtio-mem early")
    reg.machine(new, old, _refuse_early, lossless=True, mirrors=early + ": refused", name="virtio-mem early")
    timadj = "hw_compat_7_2: e1000e migrate-timadj=off (core.timadj, 8 bytes)"
    reg.section("e1000e", old, new, e1000e_up, lossless=True, mirrors=timadj + "; TIMADJ at reset, 0",
                name="e1000e timadj", changes=[Change("field-added", "e1000e", TIMADJ.name)])
    reg.section("e1000e", new, old, e1000e_down, lossless=False, mirrors=timadj + "; dropped",
                name="e1000e timadj", changes=[Change("field-removed", "e1000e", TIMADJ.name)])
    mask = ("hw_compat_7_2: PCIDevice x-pcie-err-unc-mask=off (AER uncorrectable error mask: read-only 0 on "
            "older machine types, compared on load)")
    reg.machine(old, new, None, lossless=True, mirrors=mask + "; the guest saw 0, which loads", name="PCIe AER mask")
    reg.machine(new, old, pcie.on_express_devices(pcie.no_unc_mask), lossless=False, mirrors=mask + "; cleared",
                name="PCIe AER mask")

    # 8.1 -> 8.2: hw_compat_8_1
    old, new = step("8.1", "8.2")
    uso = ("hw_compat_8_1: virtio-net host_uso, guest_uso4, guest_uso6 off (offered only with a backend that "
           "supports USO, e.g. tap)")
    reg.section("virtio-net", old, new, lambda s, m: s, lossless=True, mirrors=uso + "; nothing negotiated yet",
                name="virtio-net USO")
    reg.section("virtio-net", new, old, virtio.on_blob(uso_down), lossless=True,
                mirrors=uso + "; refused if the guest negotiated them", name="virtio-net USO")

    # 9.1 -> 9.2: hw_compat_9_1
    old, new = step("9.1", "9.2")
    ext = ("hw_compat_9_1: PCIDevice x-pcie-ext-tag=off (Device Capabilities 'Extended Tag Field Supported', "
           "a read-only bit QEMU compares on load), on every PCI Express device")
    reg.machine(old, new, pcie.on_express_devices(pcie.ext_tag(True)), lossless=True, mirrors=ext, name="PCIe ext-tag")
    reg.machine(new, old, pcie.on_express_devices(pcie.ext_tag(False)), lossless=True, mirrors=ext, name="PCIe ext-tag")
    vext = ext + " (virtio-net-pci behind a PCI Express port: in its virtio field)"
    reg.section("virtio-net", old, new, virtio.on_blob(virtio.on_config(pcie.ext_tag(True), "ext_tag_on")),
                lossless=True, mirrors=vext, name="virtio-pci ext-tag")
    reg.section("virtio-net", new, old, virtio.on_blob(virtio.on_config(pcie.ext_tag(False), "ext_tag_off")),
                lossless=True, mirrors=vext, name="virtio-pci ext-tag")

    # 9.2 -> 10.0: hw_compat_9_2
    old, new = step("9.2", "10.0")
    reg.stream(old, new, add_switchover_start, lossless=True, mirrors=SWITCHOVER, name="switchover-start",
               changes=[Change("command-added", "stream", "switchover-start")])
    reg.stream(new, old, drop_switchover_start, lossless=True, mirrors=SWITCHOVER, name="switchover-start",
               changes=[Change("command-removed", "stream", "switchover-start")])

    for v, why in _NO_CHANGE.items():
        prev = VERSIONS_10_0[VERSIONS_10_0.index(v) - 1]
        old, new = step(prev, v)
        reg.machine(old, new, None, lossless=True, mirrors=why, name="no-change")
        reg.machine(new, old, None, lossless=True, mirrors=why, name="no-change")

    # Sections a transform changed get a new vmdesc entry, written as 7.2 writes it: restyle.
    for prev, v in zip(VERSIONS_10_0, VERSIONS_10_0[1:]):
        for a, b in (step(prev, v), step(v, prev)):
            reg.stream(a, b, _vmdesc_for(QEMU_10_0), lossless=True, name="vmdesc (QEMU 10.0)",
                       mirrors="migration/vmstate.c (QEMU 10.0): an array's last element has no index (spec §11.8)")
