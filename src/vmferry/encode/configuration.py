"""The ``configuration`` VMState that follows a stream's header (spec §1.2).

QEMU's ``vmstate_configuration`` (migration/savevm.c): the machine type name
as ``len`` + bytes, then up to three subsections in this order.
"""

from __future__ import annotations

from ..serialize.schema import Field, Subsection, Vmsd

CONFIGURATION_VMSD = Vmsd(
    "configuration", 1, 1,
    fields=(
        Field("len", "uint32", 4),
        Field("name", "buffer", 0, size_field="len"),
    ),
    subsections=(
        Subsection(Vmsd("configuration/target-page-bits", 1, 1, (Field("target_page_bits", "uint32", 4),))),
        Subsection(Vmsd("configuration/capabilities", 1, 1, (
            Field("caps_count", "uint32", 4),
            Field("capabilities", "capability", 0, count_field="caps_count"),
        ))),
        Subsection(Vmsd("configuration/uuid", 1, 1, (Field("uuid", "buffer", 16),))),
    ),
)


def configuration_state(machine: str, capabilities: list[str] | None = None, uuid: bytes | None = None) -> dict:
    """A configuration tree for ``machine`` (e.g. ``pc-i440fx-7.2``)."""
    name = machine.encode("ascii")
    state: dict = {"len": len(name), "name": name}
    if capabilities:
        caps = [c.encode("ascii") for c in capabilities]
        state["configuration/capabilities"] = {"caps_count": len(caps), "capabilities": caps}
    if uuid is not None:
        state["configuration/uuid"] = {"uuid": bytes(uuid)}
    return state
