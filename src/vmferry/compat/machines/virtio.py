"""virtio-pci devices (virtio-net-pci, -rng-pci, -balloon-pci) across machine types: the ``virtio`` field, opened up.

A virtio device's section (vmsd ``virtio-net``, version 11; ``virtio-rng``, version 1;
``virtio-balloon``, version 1) holds one field
of type ``virtio`` that QEMU writes with its own code (``virtio_save``), so
the vmdesc describes it only by its size.  :func:`parse_blob` splits it into
a tree and :func:`build_blob` writes the tree back, byte for byte:

* the transport's part (``virtio_pci_save_config``): the PCI device state
  (vmsd ``PCIDevice``: ``version_id``, the config space, 256 bytes or, for
  a PCI Express device behind a PCI Express port, 4 KiB, the irq state),
  the MSI-X table and pending-bit array, the config vector;
* the virtio core's fields: status, isr, queue_sel, the low 32 bits of the
  guest features, the device config, and per queue its size, descriptor
  table address, last avail index and (with MSI-X) vector;
* the device's own VMState (``vmstate_virtio_net_device``; virtio-rng has
  none): kept as bytes, no machine type changes it;
* the subsections of vmsd ``virtio`` (``virtio/64bit_features``,
  ``virtio/virtqueues``, ``virtio/extra_state`` with the virtio-pci proxy's
  ``virtio_pci/modern_state``, ...), decoded with vmferry's own VMState
  machinery from the declarations below (``hw/virtio/virtio.c``,
  ``hw/virtio/virtio-pci.c``).

The device part has no length on the wire; it ends where the chain of
``virtio/...`` subsections starts, which :func:`parse_blob` finds as the
first position from which those subsections parse exactly to the end.

The transforms then mirror what the compat properties change for
virtio-pci devices (``hw_compat_2_4`` .. ``hw_compat_7_1``): whether the
proxy migrates its extra state, legacy-only versus transitional devices
(the capability list and BAR 4 of the config space, the modern queue
state), one page per queue notification area, the ``started`` and
``disabled`` flags, the number of MSI-X vectors (virtio-net-pci's count,
virtio-rng-pci's MSI-X itself) and the ring-reset feature.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Callable

from ...errors import CompatError, DecodeError, EncodeError
from ...events import DeviceSection
from ...serialize.drive import visit_vmsd
from ...serialize.schema import Field, Subsection, Vmsd
from ...serialize.visitor import LegacyReader, LegacyWriter
from ..ops import Machine, Node, node, with_node
from . import pcie

__all__ = ["build_blob", "guest_features", "parse_blob"]

VIRTIO_QUEUE_MAX = 1024
PCI_CONFIG_SIZE = 256
MSIX_ENTRY_SIZE = 16
NO_VECTOR = 0xFFFF
VRING_DESC_SIZE = 16
VIRTIO_PCI_VRING_ALIGN = 4096

VIRTIO_CONFIG_S_DRIVER_OK = 0x04
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_RESET = 40

PCI_COMMAND, PCI_STATUS, PCI_CACHE_LINE_SIZE, PCI_LATENCY_TIMER = 0x04, 0x06, 0x0C, 0x0D
PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_4, PCI_CAPABILITY_LIST, PCI_INTERRUPT_LINE = 0x10, 0x20, 0x34, 0x3C
PCI_CAP_ID_VNDR, PCI_CAP_ID_MSIX = 0x09, 0x11
PCI_STATUS_CAP_LIST = 0x10
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_WRITABLE = 0xC000  # MSI-X enable and function mask
BAR4_TYPE = 0x0C  # 64-bit prefetchable memory (virtio_pci_realize's modern BAR)

# Virtio PCI capability structures (virtio 1.0 §4.1.4), as QEMU lays them out for a
# transitional device (virtio_pci_device_plugged): common, isr, device, notify and the
# PCI configuration access capability in BAR 4, then MSI-X at the top.
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5
MODERN_BAR = 4
LEGACY_MSIX_AT = 0x40
MODERN_CAPS_AT = {"common": 0x40, "isr": 0x50, "device": 0x60, "notify": 0x70, "pci": 0x84, "msix": 0x98}
REGION_SIZE = 0x1000
QUEUE_MEM_MULT_PAGE = 0x1000  # QEMU_VIRTIO_PCI_QUEUE_MEM_MULT, with page-per-vq
QUEUE_MEM_MULT = 4


# ---------------------------------------------------------------------------
# The subsections of vmsd "virtio"
# ---------------------------------------------------------------------------

def _v(name: str, version: int, *fields: Field, subsections: tuple[Subsection, ...] = ()) -> Vmsd:
    return Vmsd(name, version, 1, fields, subsections)


def _struct_array(name: str, vmsd: Vmsd) -> Field:
    return Field(name, "struct", 0, count=VIRTIO_QUEUE_MAX, array=True, struct=vmsd)


VIRTQUEUE_STATE = _v("virtqueue_state", 1, Field("avail", "uint64", 8), Field("used", "uint64", 8))
RINGSIZE_STATE = _v("ringsize_state", 1, Field("num_default", "uint32", 4))
PACKED_STATE = _v("packed_virtqueue_state", 1, Field("last_avail_idx", "uint16", 2),
                  Field("last_avail_wrap_counter", "bool", 1), Field("used_idx", "uint16", 2),
                  Field("used_wrap_counter", "bool", 1), Field("inuse", "uint32", 4))
MODERN_QUEUE = _v("virtio_pci/modern_queue_state", 1, Field("num", "uint16", 2), Field("unused", "unused_buffer", 1),
                  Field("enabled", "bool", 1), Field("desc", "uint32", 4, count=2, array=True),
                  Field("avail", "uint32", 4, count=2, array=True), Field("used", "uint32", 4, count=2, array=True))
MODERN_STATE = _v("virtio_pci/modern_state", 1, Field("dfselect", "uint32", 4), Field("gfselect", "uint32", 4),
                  Field("guest_features", "uint32", 4, count=2, array=True),
                  Field("vqs", "struct", 0, count=VIRTIO_QUEUE_MAX, array=True, struct=MODERN_QUEUE))

DEVICE_ENDIAN = _v("virtio/device_endian", 1, Field("device_endian", "uint8", 1))
FEATURES64 = _v("virtio/64bit_features", 1, Field("guest_features", "uint64", 8))
VIRTQUEUES = _v("virtio/virtqueues", 1, _struct_array("vq", VIRTQUEUE_STATE))
RINGSIZE = _v("virtio/ringsize", 1, _struct_array("vq", RINGSIZE_STATE))
BROKEN = _v("virtio/broken", 1, Field("broken", "bool", 1))
# virtio/extra_state's one field is the proxy's vmsd "virtio_pci", which has no fields
# and one subsection: on the wire that is the subsection, nested.
EXTRA_STATE = _v("virtio/extra_state", 1, subsections=(Subsection(MODERN_STATE),))
STARTED = _v("virtio/started", 1, Field("started", "bool", 1))
PACKED = _v("virtio/packed_virtqueues", 1, _struct_array("vq", PACKED_STATE))
DISABLED = _v("virtio/disabled", 1, Field("disabled", "bool", 1))

#: vmsd "virtio": no fields, these subsections in this order (vmstate_virtio).
VIRTIO = Vmsd("virtio", 1, 1, (), tuple(Subsection(s) for s in (
    DEVICE_ENDIAN, FEATURES64, VIRTQUEUES, RINGSIZE, BROKEN, EXTRA_STATE, STARTED, PACKED, DISABLED)))
_SUB_NAMES = {s.vmsd.name.encode() for s in VIRTIO.subsections}


# ---------------------------------------------------------------------------
# Parsing and building the blob
# ---------------------------------------------------------------------------


_caps = pcie.caps


def msix_at(cfg: bytes | bytearray) -> int | None:
    for p, cap in _caps(cfg):
        if cap == PCI_CAP_ID_MSIX:
            return p
    return None


def msix_vectors(cfg: bytes) -> int:
    p = msix_at(cfg)
    if p is None:
        return 0
    (flags,) = struct.unpack_from("<H", cfg, p + 2)
    return (flags & PCI_MSIX_FLAGS_QSIZE) + 1


def is_modern(cfg: bytes) -> bool:
    """Whether the config space carries the virtio 1.0 vendor capabilities (a transitional device)."""
    return any(cap == PCI_CAP_ID_VNDR for _, cap in _caps(cfg))


def parse_blob(data: bytes) -> dict[str, Any]:
    """The ``virtio`` field of a virtio-pci device section, as a tree (see the module docstring)."""
    try:
        return _parse(bytes(data))
    except (struct.error, IndexError, DecodeError, CompatError) as e:
        raise CompatError(f"cannot read the virtio state ({len(data)} bytes): {e}") from None


def _parse(b: bytes) -> dict[str, Any]:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(b):
            raise CompatError(f"virtio state ends at {len(b)} bytes, expected at least {pos + n}")
        out = b[pos:pos + n]
        pos += n
        return out

    (version_id,) = struct.unpack(">i", take(4))
    config = take(PCI_CONFIG_SIZE)
    if pcie.pcie_cap(config) is not None:
        # pci_device_save: a PCI Express device (a virtio-pci device behind a PCI Express port) saves
        # vmstate_pcie_device, with all 4 KiB of its config space
        config += take(pcie.PCIE_CONFIG_SPACE_SIZE - PCI_CONFIG_SIZE)
    irq_state = take(16)
    vectors = msix_vectors(config)
    t: dict[str, Any] = {"pci": {"version_id": version_id, "config": config, "irq_state": irq_state}}
    t["msix_table"] = take(vectors * MSIX_ENTRY_SIZE)
    t["msix_pba"] = take((vectors + 7) // 8)
    t["config_vector"] = struct.unpack(">H", take(2))[0] if vectors else None
    t["status"], t["isr"], t["queue_sel"], t["guest_features_lo"], config_len = struct.unpack(">BBHII", take(12))
    t["config"] = take(config_len)
    (nq,) = struct.unpack(">I", take(4))
    if nq > VIRTIO_QUEUE_MAX:
        raise CompatError(f"{nq} virtqueues (at most {VIRTIO_QUEUE_MAX})")
    queues = []
    for _ in range(nq):
        num, desc, last = struct.unpack(">IQH", take(14))
        vec = struct.unpack(">H", take(2))[0] if vectors else None
        queues.append({"num": num, "desc": desc, "last_avail_idx": last, "vector": vec})
    t["queues"] = queues
    rest = b[pos:]
    split, subs = _find_subsections(rest)
    t["device"] = rest[:split]
    t["subsections"] = subs
    return t


def _find_subsections(rest: bytes) -> tuple[int, dict[str, Any]]:
    p = rest.find(b"\x05")
    while p >= 0:
        n = rest[p + 1] if p + 1 < len(rest) else 0
        if rest[p + 2:p + 2 + n] in _SUB_NAMES:
            reader = LegacyReader(rest, p)
            try:
                tree = visit_vmsd(reader, VIRTIO, None)
            except DecodeError:
                tree = None
            if tree is not None and reader.pos == len(rest):
                return p, tree
        p = rest.find(b"\x05", p + 1)
    if not rest:
        return 0, {}
    # No virtio subsection at all (possible for a legacy device that migrates no extra
    # state): the device part runs to the end.
    return len(rest), {}


def build_blob(t: dict[str, Any]) -> bytes:
    """The bytes of a tree made by :func:`parse_blob` (and perhaps changed since)."""
    out = bytearray()
    pci = t["pci"]
    out += struct.pack(">i", pci["version_id"])
    out += pci["config"]
    out += pci["irq_state"]
    vectors = msix_vectors(pci["config"])
    if len(t["msix_table"]) != vectors * MSIX_ENTRY_SIZE or len(t["msix_pba"]) != (vectors + 7) // 8:
        raise CompatError(f"MSI-X table of {len(t['msix_table'])} bytes and PBA of {len(t['msix_pba'])} do not fit "
                          f"the {vectors} vectors the config space announces")
    out += t["msix_table"]
    out += t["msix_pba"]
    if vectors:
        out += struct.pack(">H", t["config_vector"])
    out += struct.pack(">BBHII", t["status"], t["isr"], t["queue_sel"], t["guest_features_lo"], len(t["config"]))
    out += t["config"]
    out += struct.pack(">I", len(t["queues"]))
    for q in t["queues"]:
        out += struct.pack(">IQH", q["num"], q["desc"], q["last_avail_idx"])
        if vectors:
            out += struct.pack(">H", q["vector"])
    out += t["device"]
    try:
        visit_vmsd(LegacyWriter(out), VIRTIO, t["subsections"])
    except EncodeError as e:
        raise CompatError(f"virtio subsections: {e}") from None
    return bytes(out)


# ---------------------------------------------------------------------------
# Transforms on the tree
# ---------------------------------------------------------------------------

BlobFn = Callable[[dict[str, Any], DeviceSection], dict[str, Any]]


def on_blob(fn: BlobFn) -> Callable[[DeviceSection, Machine], DeviceSection]:
    """A section transform for a virtio-pci device (vmsd ``virtio-net``, ``virtio-rng``, ...) that works on the
    parsed ``virtio`` field."""

    def section_fn(sec: DeviceSection, m: Machine) -> DeviceSection:
        n = node(sec)
        f = n.vmsd.field("virtio") if any(x.name == "virtio" for x in n.vmsd.fields) else None
        if f is None or not isinstance(sec.state.get("virtio"), (bytes, bytearray)):
            raise CompatError("no opaque 'virtio' field: not QEMU 7.2's virtio device layout")
        tree = parse_blob(sec.state["virtio"])
        new_tree = fn(tree, sec)
        if new_tree is tree:
            return sec
        data = build_blob(new_tree)
        fields = tuple(Field(x.name, x.type, len(data)) if x.name == "virtio" else x for x in n.vmsd.fields)
        state = dict(sec.state)
        state["virtio"] = data
        return with_node(sec, Node(dataclasses.replace(n.vmsd, fields=fields), state))

    section_fn.__name__ = fn.__name__
    return section_fn


def _subs(t: dict[str, Any]) -> dict[str, Any]:
    return dict(t["subsections"])


def _ordered(subs: dict[str, Any]) -> dict[str, Any]:
    return {s.vmsd.name: subs[s.vmsd.name] for s in VIRTIO.subsections if s.vmsd.name in subs}


def _with_subs(t: dict[str, Any], subs: dict[str, Any]) -> dict[str, Any]:
    out = dict(t)
    out["subsections"] = _ordered(subs)
    return out


def _guest_features(t: dict[str, Any]) -> int:
    f64 = t["subsections"].get("virtio/64bit_features")
    return f64["guest_features"] if f64 is not None else t["guest_features_lo"]


def guest_features(t: dict[str, Any]) -> int:
    """The features the guest negotiated, all 64 bits where the stream has them."""
    return _guest_features(t)


# --- hw_compat_2_4: virtio-pci migrate-extra=off -----------------------------


def extra_state_up(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # virtio_pci_has_extra_state: without VIRTIO_PCI_FLAG_MIGRATE_EXTRA the proxy's state
    # (vmsd virtio_pci) is not sent.  For the legacy-only devices of these machine types
    # it is empty (virtio_pci/modern_state is needed only for modern devices).
    subs = _subs(t)
    if "virtio/extra_state" in subs:
        return t
    if is_modern(t["pci"]["config"]):
        raise CompatError("a modern virtio-pci device without its extra state: not a stream QEMU writes")
    subs["virtio/extra_state"] = {}
    return _with_subs(t, subs)


def extra_state_down(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    subs = _subs(t)
    extra = subs.pop("virtio/extra_state", None)
    if extra is None:
        return t
    if extra:
        raise CompatError("the proxy's modern queue state cannot travel without migrate-extra")
    return _with_subs(t, subs)


# --- hw_compat_2_6: virtio-pci disable-modern=on ------------------------------


def _cap_bytes(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    size = 16 + len(extra)
    return bytes([PCI_CAP_ID_VNDR, 0, size, cfg_type, MODERN_BAR, 0, 0, 0]) + struct.pack("<II", offset, length) + extra


def _modern_caps(page_per_vq: bool) -> dict[int, bytes]:
    """The vendor capabilities of a transitional device, by offset (next pointers filled in later)."""
    mult = QUEUE_MEM_MULT_PAGE if page_per_vq else QUEUE_MEM_MULT
    at = MODERN_CAPS_AT
    return {
        at["common"]: _cap_bytes(CFG_COMMON, 0 * REGION_SIZE, REGION_SIZE),
        at["isr"]: _cap_bytes(CFG_ISR, 1 * REGION_SIZE, REGION_SIZE),
        at["device"]: _cap_bytes(CFG_DEVICE, 2 * REGION_SIZE, REGION_SIZE),
        at["notify"]: _cap_bytes(CFG_NOTIFY, 3 * REGION_SIZE, mult * VIRTIO_QUEUE_MAX, struct.pack("<I", mult)),
        at["pci"]: bytes([PCI_CAP_ID_VNDR, 0, 20, CFG_PCI]) + bytes(16),
    }


def _bar4_size(page_per_vq: bool) -> int:
    need = 3 * REGION_SIZE + (QUEUE_MEM_MULT_PAGE if page_per_vq else QUEUE_MEM_MULT) * VIRTIO_QUEUE_MAX
    size = 1
    while size < need:
        size <<= 1
    return size


def _notify_cap(cfg: bytes | bytearray) -> int:
    for p, cap in _caps(cfg):
        if cap == PCI_CAP_ID_VNDR and cfg[p + 3] == CFG_NOTIFY:
            return p
    raise CompatError("a modern virtio-pci device without a notify capability")


def page_per_vq(cfg: bytes) -> bool:
    p = _notify_cap(cfg)
    return struct.unpack_from("<I", cfg, p + 16)[0] == QUEUE_MEM_MULT_PAGE


def convert_config(src: bytes, *, modern: bool, page: bool = False, vectors: int | None = None) -> bytes:
    """The config space of the same device laid out as a legacy-only or a transitional device.

    What QEMU sets up (read-only for the guest) comes from the layout; what
    the guest writes (command, status, cache line size, latency, BARs 0-3,
    BAR 4 when both layouts have it, the interrupt line, the MSI-X enable and
    mask bits) comes from ``src``.
    """
    cfg = bytearray(src[:0x40]) + bytearray(PCI_CONFIG_SIZE - 0x40)
    old_msix = msix_at(src)
    msix: bytearray | None = None  # a device without MSI-X (virtio-balloon-pci) has none in either layout
    if old_msix is not None:
        (old_flags,) = struct.unpack_from("<H", src, old_msix + 2)
        n = (old_flags & PCI_MSIX_FLAGS_QSIZE) + 1 if vectors is None else vectors
        msix = bytearray(src[old_msix:old_msix + 12])
        struct.pack_into("<H", msix, 2, (old_flags & PCI_MSIX_FLAGS_WRITABLE) | (n - 1))
    elif vectors:
        raise CompatError("MSI-X vectors for a virtio-pci device without MSI-X: not covered")
    if modern:
        caps = _modern_caps(page)
        order = [MODERN_CAPS_AT[k] for k in ("msix", "pci", "notify", "device", "isr", "common")
                 if k != "msix" or msix is not None]
        if msix is not None:
            caps[MODERN_CAPS_AT["msix"]] = bytes(msix)
        keep_bar4 = is_modern(src)
        if keep_bar4:
            for p, cap in _caps(src):  # the guest-writable fields of the PCI config access capability
                if cap == PCI_CAP_ID_VNDR and src[p + 3] == CFG_PCI:
                    caps[MODERN_CAPS_AT["pci"]] = bytes(src[p:p + 20])
            bar4 = struct.unpack_from("<Q", src, PCI_BASE_ADDRESS_4)[0]
            size = _bar4_size(page)
            if bar4 & ~0xF & (size - 1):
                raise CompatError(f"the guest placed BAR 4 at {bar4 & ~0xF:#x}, which a {size:#x}-byte BAR 4 "
                                  f"cannot occupy")
        else:
            bar4 = BAR4_TYPE
        struct.pack_into("<Q", cfg, PCI_BASE_ADDRESS_4, bar4)
    else:
        caps = {LEGACY_MSIX_AT: bytes(msix)} if msix is not None else {}
        order = list(caps)
        struct.pack_into("<Q", cfg, PCI_BASE_ADDRESS_4, 0)
    for i, p in enumerate(order):
        body = bytearray(caps[p])
        body[1] = order[i + 1] if i + 1 < len(order) else 0
        cfg[p:p + len(body)] = body
    cfg[PCI_CAPABILITY_LIST] = order[0] if order else 0
    (status,) = struct.unpack_from("<H", cfg, PCI_STATUS)  # pci_add_capability sets Capabilities List
    struct.pack_into("<H", cfg, PCI_STATUS, status | PCI_STATUS_CAP_LIST if order else status & ~PCI_STATUS_CAP_LIST)
    return bytes(cfg)


def _vring_rings(q: dict[str, Any]) -> tuple[int, int]:
    """avail and used ring addresses of a legacy queue (virtio_queue_update_rings)."""
    if not q["num"] or not q["desc"]:
        return 0, 0
    avail = q["desc"] + q["num"] * VRING_DESC_SIZE
    used = avail + 4 + 2 * q["num"]
    used = (used + VIRTIO_PCI_VRING_ALIGN - 1) & ~(VIRTIO_PCI_VRING_ALIGN - 1)
    return avail, used


def _modern_queue_reset() -> dict[str, Any]:
    return {"num": 0, "unused": b"\0", "enabled": False, "desc": [0, 0], "avail": [0, 0], "used": [0, 0]}


#: Why a virtio-pci device behind a PCI Express port cannot cross hw_compat_2_6.
EXPRESS_MODERN = ("a virtio-pci device behind a PCI Express port is legacy-only on machine types up to 2.6 "
                  "(hw_compat_2_6 disable-modern=on, a conventional PCI device) and modern-only on newer ones "
                  "(disable-legacy=auto: another device ID, no legacy I/O BAR, a PCI Express device): the guest's "
                  "driver cannot follow, not covered")


def modern_up(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # hw_compat_2_6 sets virtio-pci disable-modern=on: the device is legacy-only.  The newer
    # machine's device is transitional: the virtio 1.0 capabilities and BAR 4 appear in
    # the config space, VIRTIO_F_VERSION_1 is offered, so virtio/64bit_features and
    # virtio/virtqueues are sent (their needed() test the host features), and the proxy's
    # modern state travels.  The guest keeps driving the legacy interface: the guest
    # features stay what they were, the ring addresses are the ones the legacy layout
    # implies (virtio_queue_update_rings) and the modern state is at reset.
    cfg = t["pci"]["config"]
    if is_modern(cfg):
        return t
    out = dict(t)
    out["pci"] = dict(t["pci"], config=convert_config(cfg, modern=True, page=True))
    subs = _subs(t)
    subs["virtio/64bit_features"] = {"guest_features": t["guest_features_lo"]}
    vq = []
    for i in range(VIRTIO_QUEUE_MAX):
        avail, used = _vring_rings(t["queues"][i]) if i < len(t["queues"]) else (0, 0)
        vq.append({"avail": avail, "used": used})
    subs["virtio/virtqueues"] = {"vq": vq}
    subs["virtio/extra_state"] = {"virtio_pci/modern_state": {
        "dfselect": 0, "gfselect": 0, "guest_features": [0, 0],
        "vqs": [_modern_queue_reset() for _ in range(VIRTIO_QUEUE_MAX)]}}
    return _with_subs(out, subs)


def modern_down(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    cfg = t["pci"]["config"]
    if not is_modern(cfg):
        return t
    if len(cfg) != PCI_CONFIG_SIZE:
        raise CompatError(EXPRESS_MODERN)
    if _guest_features(t) >> VIRTIO_F_VERSION_1 & 1:
        raise CompatError("the guest drives this virtio device through the virtio 1.0 interface, which a "
                          "legacy-only device (disable-modern=on) does not have")
    modern = t["subsections"].get("virtio/extra_state", {}).get("virtio_pci/modern_state")
    if modern and any(q["enabled"] for q in modern["vqs"]):
        raise CompatError("the guest enabled virtqueues through the virtio 1.0 interface")
    if _guest_features(t) >> 32:
        raise CompatError("guest features above bit 31 cannot travel without virtio/64bit_features")
    out = dict(t)
    out["pci"] = dict(t["pci"], config=convert_config(cfg, modern=False))
    subs = _subs(t)
    subs.pop("virtio/64bit_features", None)
    subs.pop("virtio/virtqueues", None)
    if "virtio/extra_state" in subs:
        subs["virtio/extra_state"] = {}
    return _with_subs(out, subs)


# --- hw_compat_2_7: virtio-pci page-per-vq=on ---------------------------------


def _with_page_per_vq(t: dict[str, Any], page: bool) -> dict[str, Any]:
    # The notify capability's length (one notification area per queue) and multiplier; BAR 4's size
    # follows, which the config space holds only as the bits of its address the guest cannot set.
    cfg = bytearray(t["pci"]["config"])
    p = _notify_cap(cfg)
    mult = QUEUE_MEM_MULT_PAGE if page else QUEUE_MEM_MULT
    struct.pack_into("<I", cfg, p + 12, mult * VIRTIO_QUEUE_MAX)
    struct.pack_into("<I", cfg, p + 16, mult)
    bar4 = struct.unpack_from("<Q", cfg, PCI_BASE_ADDRESS_4)[0]
    size = _bar4_size(page)
    if bar4 & ~0xF & (size - 1):
        raise CompatError(f"the guest placed BAR 4 at {bar4 & ~0xF:#x}, which a {size:#x}-byte BAR 4 cannot occupy")
    return dict(t, pci=dict(t["pci"], config=bytes(cfg)))


def page_per_vq_off(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # With page-per-vq each queue's notification address is a page apart (notify_off
    # multiplier 0x1000, a 4 MiB notify region, an 8 MiB BAR 4); without it they are 4
    # bytes apart (virtio_pci_queue_mem_mult).  Only the read-only capability fields and
    # BAR 4's size change; the BAR's address, if the guest set one, stays.
    cfg = t["pci"]["config"]
    if not is_modern(cfg) or not page_per_vq(cfg):
        return t
    return _with_page_per_vq(t, False)


def page_per_vq_on(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    cfg = t["pci"]["config"]
    if not is_modern(cfg) or page_per_vq(cfg):
        return t
    if _guest_features(t) >> VIRTIO_F_VERSION_1 & 1:
        raise CompatError("the guest drives this device through the virtio 1.0 interface and has computed its "
                          "notification addresses from the 4-byte multiplier; page-per-vq would move them")
    return _with_page_per_vq(t, True)


# --- hw_compat_4_1: virtio-pci x-pcie-flr-init=off -----------------------------


def on_config(edit: pcie.ConfigEdit, name: str) -> BlobFn:
    """A blob transform applying a config space edit (:mod:`.pcie`) to the proxy's PCI config space."""
    def fn(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
        cfg = bytes(t["pci"]["config"])
        new = bytes(edit(bytearray(cfg)))
        return t if new == cfg else dict(t, pci=dict(t["pci"], config=new))

    fn.__name__ = name
    return fn


#: A virtio-pci device behind a PCI Express port is a PCI Express device; from pc-*-4.2 on it offers
#: Function Level Reset (pcie_cap_flr_init).  A conventional PCI device is left alone.
flr_up, flr_down = on_config(pcie.flr(True), "flr_up"), on_config(pcie.flr(False), "flr_down")


# --- hw_compat_4_0: virtio-device use-started=false ----------------------------


def started_up(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # Without use-started, virtio_device_started() is the DRIVER_OK bit of the status;
    # with it, the started flag, which travels in virtio/started (needed when set).
    subs = _subs(t)
    if "virtio/started" in subs or not t["status"] & VIRTIO_CONFIG_S_DRIVER_OK:
        return t
    subs["virtio/started"] = {"started": True}
    return _with_subs(t, subs)


#: virtio-balloon's config (struct virtio_balloon_config): num_pages and actual, then free_page_hint_cmd_id and
#: poison_val, which QEMU sizes in (virtio_balloon_config_size) with page-poison (from 5.1) or
#: qemu-4-0-config-size (the 4.0 machine types alone)
BALLOON_CONFIG_SHORT, BALLOON_CONFIG_FULL = 8, 16


def balloon_config(size: int) -> BlobFn:
    """The balloon's saved config (``vdev->config``, the copy the guest last read) at ``size`` bytes: the fields
    a larger config adds are 0 (the free page hint command id STOP, no poison value); a shorter one drops them,
    as a destination that loads more config than it has skips the rest (virtio_load)."""

    def fn(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
        config = t["config"]
        if len(config) == size:
            return t
        if len(config) not in (BALLOON_CONFIG_SHORT, BALLOON_CONFIG_FULL):
            raise CompatError(f"{sec.idstr}: a virtio-balloon config of {len(config)} bytes (QEMU's are "
                              f"{BALLOON_CONFIG_SHORT} or {BALLOON_CONFIG_FULL})")
        return dict(t, config=config[:size] + bytes(max(0, size - len(config))))

    fn.__name__ = f"balloon_config_{size}"
    return fn


def _drop(name: str) -> BlobFn:
    def fn(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
        subs = _subs(t)
        if name not in subs:
            return t
        del subs[name]
        return _with_subs(t, subs)

    fn.__name__ = f"drop_{name.replace('/', '_')}"
    return fn


started_down = _drop("virtio/started")
# hw_compat_4_2: virtio-device use-disabled-flag=false: the flag is never set, so the
# older machine type's value is false, for which virtio/disabled is not sent.
disabled_down = _drop("virtio/disabled")


# --- hw_compat_5_2: virtio-net-pci vectors=3 ------------------------------------


def _default_vectors(t: dict[str, Any]) -> int:
    # virtio_net_pci_realize: 2 * queue pairs + 2; the device has 2 queues per pair and a
    # control queue.
    pairs = max((len(t["queues"]) - 1) // 2, 1)
    return 2 * pairs + 2


def _set_vectors(t: dict[str, Any], n: int) -> dict[str, Any]:
    old = msix_vectors(t["pci"]["config"])
    cfg = bytearray(t["pci"]["config"])
    p = msix_at(cfg)
    assert p is not None
    (flags,) = struct.unpack_from("<H", cfg, p + 2)
    struct.pack_into("<H", cfg, p + 2, (flags & ~PCI_MSIX_FLAGS_QSIZE) | (n - 1))
    table = bytearray(t["msix_table"][:n * MSIX_ENTRY_SIZE])
    for _ in range(old, n):  # msix_reset: a new entry is masked (vector control bit 0)
        table += bytes(12) + struct.pack("<I", 1)
    pba = bytearray((n + 7) // 8)
    for v in range(min(old, n)):
        if t["msix_pba"][v // 8] >> (v % 8) & 1:
            pba[v // 8] |= 1 << (v % 8)
    return dict(t, pci=dict(t["pci"], config=bytes(cfg)), msix_table=bytes(table), msix_pba=bytes(pba))


def vectors_up(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # virtio-net-pci's default number of MSI-X vectors: 3 on machine types <= 5.2
    # (hw_compat_5_2), 2 * queue pairs + 2 later.  The new vectors start masked and
    # unused, as after msix_reset; the guest keeps using the vectors it set up.
    n = msix_vectors(t["pci"]["config"])
    want = _default_vectors(t)
    if n != 3 or want == n:
        return t
    return _set_vectors(t, want)


def vectors_down(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    n = msix_vectors(t["pci"]["config"])
    if n != _default_vectors(t) or n == 3:
        return t
    used = [v for v in [t["config_vector"]] + [q["vector"] for q in t["queues"]] if v is not None and v != NO_VECTOR]
    high = sorted(v for v in used if v >= 3)
    if high:
        raise CompatError(f"the guest uses MSI-X vector(s) {', '.join(map(str, high))}, which the 3-vector device "
                          f"of the older machine type does not have")
    for v in range(3, n):
        ctrl = struct.unpack_from("<I", t["msix_table"], v * MSIX_ENTRY_SIZE + 12)[0]
        if not ctrl & 1:
            raise CompatError(f"the guest unmasked MSI-X vector {v}, which the 3-vector device does not have")
    return _set_vectors(t, 3)


# --- hw_compat_7_1: virtio-device queue_reset=false -----------------------------


def ring_reset_down(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # VIRTIO_F_RING_RESET is not offered by older machine types; virtio_load refuses guest
    # features the device does not offer.
    if _guest_features(t) >> VIRTIO_F_RING_RESET & 1:
        raise CompatError("the guest negotiated VIRTIO_F_RING_RESET, which the older machine type does not offer")
    return t


def ring_reset_up(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    return t


# --- hw_compat_7_1: virtio-rng-pci vectors=0 -------------------------------------

RNG_VECTORS = 2  # virtio_rng_pci_realize: an unspecified vector count becomes 2
MSIX_BAR = 1  # virtio-pci puts the MSI-X table at offset 0 of BAR 1, the pending bits at 0x800
MSIX_PBA_OFFSET = 0x800
PCI_BASE_ADDRESS_1 = 0x14
PCI_MSIX_FLAGS_ENABLE = 0x8000


def msix_added(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    # Machine types <= 7.1 give virtio-rng-pci no MSI-X (hw_compat_7_1 vectors=0); newer ones 2
    # vectors: a capability at the top of the list (QEMU compares the list on load) and BAR 1.
    # The guest keeps its INTx: MSI-X stays disabled, its vectors masked (msix_reset), and
    # BAR 1 unassigned (address 0) until the guest places it.
    cfg = bytearray(t["pci"]["config"])
    if msix_at(cfg) is not None:
        return t
    if not is_modern(bytes(cfg)):
        raise CompatError("legacy-only virtio-pci device without MSI-X: not covered")
    head = cfg[PCI_CAPABILITY_LIST]  # the last capability added: MSI-X follows it (0x98, or 0xdc behind a PCI
    if head < 0x40 or cfg[head] != PCI_CAP_ID_VNDR:  # Express port, after the PCI Express and PM capabilities)
        raise CompatError(f"a capability list headed at {head:#x}: not QEMU's virtio-pci layout")
    at = head + cfg[head + 2]
    if at + 12 > PCI_CONFIG_SIZE or any(cfg[at:at + 12]):
        raise CompatError(f"config space bytes at {at:#x} in use: not QEMU's virtio-pci layout")
    cfg[at:at + 12] = bytes([PCI_CAP_ID_MSIX, cfg[PCI_CAPABILITY_LIST]]) + struct.pack(
        "<HII", RNG_VECTORS - 1, MSIX_BAR, MSIX_PBA_OFFSET | MSIX_BAR)
    cfg[PCI_CAPABILITY_LIST] = at
    return dict(t, pci=dict(t["pci"], config=bytes(cfg)),
                msix_table=(bytes(12) + struct.pack("<I", 1)) * RNG_VECTORS, msix_pba=bytes((RNG_VECTORS + 7) // 8),
                config_vector=NO_VECTOR, queues=[dict(q, vector=NO_VECTOR) for q in t["queues"]])


def msix_removed(t: dict[str, Any], sec: DeviceSection) -> dict[str, Any]:
    cfg = bytearray(t["pci"]["config"])
    p = msix_at(cfg)
    if p is None:
        return t
    (flags,) = struct.unpack_from("<H", cfg, p + 2)
    if flags & PCI_MSIX_FLAGS_ENABLE:
        raise CompatError("the guest enabled MSI-X, which the older machine type's device does not have")
    if p != cfg[PCI_CAPABILITY_LIST] & 0xFC:
        raise CompatError("MSI-X is not first in the capability list: not QEMU's virtio-pci layout")
    cfg[PCI_CAPABILITY_LIST] = cfg[p + 1]
    cfg[p:p + 12] = bytes(12)
    cfg[PCI_BASE_ADDRESS_1:PCI_BASE_ADDRESS_1 + 4] = bytes(4)  # no BAR 1 there
    return dict(t, pci=dict(t["pci"], config=bytes(cfg)), msix_table=b"", msix_pba=b"", config_vector=None,
                queues=[dict(q, vector=None) for q in t["queues"]])
