"""VMState schemas: QEMU's VMStateDescription as Python data.

A :class:`Vmsd` is a name, a version range, an ordered tuple of
:class:`Field` and an ordered tuple of :class:`Subsection`.  Schemas come from
three places and look the same afterwards: a stream's vmdesc JSON
(:mod:`vmferry.serialize.qemu_vmdesc`), QEMU's ``-dump-vmstate`` JSON, or
Python declarations.  :func:`vmferry.serialize.drive.visit_schema` walks a
schema with any visitor, so one schema both saves and loads.

Field types are QEMU's vmdesc type strings (spec §3.4).  The integer types
listed in :data:`INT_TYPES` decode to Python ints, ``bool`` to bool,
``struct``/``tmp``/``vstruct`` to dicts, ``capability`` to bytes (a counted
string), ``nullptr`` to None; every other type is an opaque buffer of
``size`` bytes (bytes in the tree).

The tree spelling: a struct is a dict keyed by field name; a field with
``count != 1`` (or a count field) is a list; a subsection is a dict stored
under its full vmsd name (which always contains ``/``, so it can never clash
with a field name) after the fields, in wire order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# type name -> (size, signed).  Sizes are wire sizes; every integer is big-endian.
INT_TYPES: dict[str, tuple[int, bool]] = {
    "int8": (1, True),
    "uint8": (1, False),
    "int16": (2, True),
    "uint16": (2, False),
    "int32": (4, True),
    "uint32": (4, False),
    "int64": (8, True),
    "uint64": (8, False),
    "uint8 equal": (1, False),
    "uint16 equal": (2, False),
    "int32 equal": (4, True),
    "uint32 equal": (4, False),
    "int64 equal": (8, False),  # QEMU's vmstate_info_uint64_equal is named "int64 equal"
    "uint64 equal": (8, False),
    "int32 le": (4, True),
    "timer": (8, False),
    "int32_as_uint16": (2, False),
    "uint16_from_uint8": (1, False),
}
FLOAT_TYPES = {"float64": 8}


def int_range(type_name: str) -> tuple[int, int]:
    """The smallest and largest value of an integer type of :data:`INT_TYPES`."""
    size, signed = INT_TYPES[type_name]
    bits = 8 * size
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
STRUCT_TYPES = ("struct", "tmp", "vstruct")

# A field_exists test or a subsection's needed() rule, evaluated on the tree of
# the enclosing vmsd as far as it has been read (``state``) and the version.
ExistsFn = Callable[[dict[str, Any], int], bool]
NeededFn = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class Field:
    """One VMStateField.

    ``count`` is the fixed element count (``VMS_ARRAY``); ``count_field``
    names an earlier field of the same vmsd holding the count (``VMS_VARRAY_*``).
    ``size_field`` names an earlier field holding a buffer's size
    (``VMS_VBUFFER``; the size is that value times ``size_multiplier``).
    A field is a list in the tree iff ``is_array``.
    ``pointers`` marks an array of pointers: None elements travel as byte 0x30.
    ``elements`` holds one Field per element when a vmdesc described the
    array element by element (``"index"`` entries) because the elements
    differ (e.g. a struct whose subsections differ per element).
    """

    name: str
    type: str
    size: int = 0
    count: int = 1
    count_field: str | None = None
    size_field: str | None = None
    size_multiplier: int = 1
    struct: "Vmsd | None" = None
    since: int = 0
    exists: ExistsFn | None = None
    pointers: bool = False
    array: bool = False
    elements: "tuple[Field, ...] | None" = None

    @property
    def is_array(self) -> bool:
        return self.array or self.count != 1 or self.count_field is not None or self.elements is not None

    @property
    def is_struct(self) -> bool:
        return self.type in STRUCT_TYPES


@dataclass(frozen=True, slots=True)
class Subsection:
    """A subsection and its ``needed`` rule.

    ``needed=None`` means "present iff the tree has it" when saving; when
    loading, presence is read from the stream (QEMU's look-ahead rule).
    """

    vmsd: "Vmsd"
    needed: NeededFn | None = None


@dataclass(frozen=True, slots=True)
class Vmsd:
    """A VMStateDescription."""

    name: str
    version_id: int
    minimum_version_id: int = 0
    fields: tuple[Field, ...] = ()
    subsections: tuple[Subsection, ...] = ()
    old_style: bool = False  # a vmsd-less handler described only by its size (e.g. slirp)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def subsection(self, name: str) -> Subsection | None:
        for s in self.subsections:
            if s.vmsd.name == name:
                return s
        return None


@dataclass(slots=True)
class SchemaSet:
    """Schemas for the sections of a stream, keyed by ``(idstr, instance_id)``.

    ``descs`` keeps each section's description in vmdesc form, ``page_size``
    the target page size, and ``origin`` says where the set came from.
    """

    sections: dict[tuple[str, int], Vmsd] = field(default_factory=dict)
    descs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    page_size: int = 4096
    origin: str = ""
    by_vmsd_name: dict[str, Vmsd] = field(default_factory=dict)

    def lookup(self, idstr: str, instance_id: int) -> tuple[Vmsd, dict[str, Any]] | None:
        key = (idstr, instance_id)
        if key in self.sections:
            return self.sections[key], self.descs.get(key, {})
        return None

    def __len__(self) -> int:
        return len(self.sections)
