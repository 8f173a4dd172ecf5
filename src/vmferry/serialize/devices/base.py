"""What every Python device model offers, and the version a visit runs at.

A device model is a dataclass holding one QEMU device's migrated state,
with QEMU's reset values as its defaults, plus one ``visit(v, s) -> s``
function (a static method) that both saves and loads it through any
:class:`~vmferry.serialize.visitor.Visitor`.  The class also names the vmsd
it mirrors and that vmsd's version range, so a registry can map a stream's
section to its model.

Field versions (QEMU's ``VMSTATE_*_V`` since-versions) depend on the version
the *top-level* section is saved or loaded at.  The visitor API has no such
notion yet, so :func:`load` and :func:`save` record it as ``v.version`` on
the visitor and the models read it back with :func:`visited_version`; a
visitor without it means the model's own (newest) version.  Nested structs
never consult it: QEMU visits a ``VMSTATE_STRUCT`` at the nested vmsd's own
version, whatever the section's version is.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from ...errors import DecodeError, EncodeError
from ..visitor import LegacyReader, Visitor

__all__ = ["TIMER_DISARMED", "DeviceModel", "load", "save", "visited_version"]

#: What ``VMSTATE_TIMER_PTR`` carries for a timer that is not armed (``-1`` as uint64).
TIMER_DISARMED = (1 << 64) - 1

M = TypeVar("M", bound="DeviceModel")


class DeviceModel:
    """The class-level surface every device model has."""

    VMSD_NAME: ClassVar[str]
    VERSION: ClassVar[int]
    MINIMUM_VERSION: ClassVar[int]

    @staticmethod
    def visit(v: Visitor, s: Any) -> Any:
        raise NotImplementedError


def visited_version(v: Visitor, current: int) -> int:
    """The version a top-level vmsd is visited at: ``v.version`` if set, else ``current``."""
    got = getattr(v, "version", None)
    return current if got is None else int(got)


def _check_version(cls: type[DeviceModel], v: Visitor, version: int | None) -> int:
    version = cls.VERSION if version is None else version
    if cls.MINIMUM_VERSION <= version <= cls.VERSION:
        return version
    message = (f"{cls.VMSD_NAME!r} version {version} is outside the supported range "
               f"{cls.MINIMUM_VERSION}..{cls.VERSION}")
    if v.loading:
        offset = v.base + v.pos if isinstance(v, LegacyReader) else None
        raise DecodeError(message, offset, v.path)
    raise EncodeError(message, v.path)


def load(cls: type[M], v: Visitor, version: int | None = None) -> M:
    """A model loaded by ``v`` (a loading visitor) at ``version`` (default: the newest).

    Whatever the stream leaves out (newer fields, absent subsections) keeps
    QEMU's reset value, as it would on a freshly started destination.
    """
    setattr(v, "version", _check_version(cls, v, version))
    out: M = cls.visit(v, cls())
    return out


def save(model: M, v: Visitor, version: int | None = None) -> M:
    """Save ``model`` through ``v`` (a saving visitor) at ``version`` (default: the newest)."""
    setattr(v, "version", _check_version(type(model), v, version))
    out: M = type(model).visit(v, model)
    return out
