"""Descriptions in QEMU's vmdesc form, from schemas or from visit functions."""

from __future__ import annotations

from typing import Any, Callable

from .drive import visit_vmsd
from .schema import Vmsd
from .visitor import Describer, Visitor


def describe_section(vmsd: Vmsd, state: dict[str, Any], idstr: str, instance_id: int,
                     version: int | None = None, array_index: str = "every") -> dict[str, Any]:
    """The vmdesc ``devices`` entry QEMU would write for ``state`` saved with ``vmsd``.

    ``array_index`` picks the QEMU whose way of marking array elements to
    follow (see :data:`~vmferry.serialize.visitor.ARRAY_INDEX_BY_QEMU`).
    """
    d = Describer(array_index)
    d._path = [f"$.{idstr}"]
    visit_vmsd(d, vmsd, state, version)
    if vmsd.old_style:  # QEMU writes these by hand, with "size" before "type"
        fields = [{"name": f["name"], "size": f["size"], "type": f["type"]} for f in d.fields]
        return {"name": idstr, "instance_id": instance_id, "size": d.size, "fields": fields}
    return d.device(idstr, instance_id, vmsd.name, vmsd.version_id if version is None else version)


def describe_visit(fn: Callable[[Visitor, Any], Any], state: Any, idstr: str, instance_id: int,
                   vmsd_name: str, version: int, array_index: str = "every") -> dict[str, Any]:
    """The vmdesc entry for a device described by a visit function."""
    d = Describer(array_index)
    d._path = [f"$.{idstr}"]
    fn(d, state)
    return d.device(idstr, instance_id, vmsd_name, version)
