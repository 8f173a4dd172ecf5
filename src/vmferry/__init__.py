"""vmferry: migrate virtual machine state across versions, formats and machines.

Three independent layers (QEMU's "Migration/Next" design):

* :mod:`vmferry.serialize`: device state through visitors and VMState schemas;
* :mod:`vmferry.compat`: transforms between device-model versions;
* :mod:`vmferry.encode`: codecs (QEMU's stream byte for byte, JSON, ...).

They exchange the events of :mod:`vmferry.events`.
"""

from .errors import (
    CompatError,
    DecodeError,
    EncodeError,
    FerryError,
    NegotiationError,
    SchemaError,
    TransportError,
    TruncatedError,
)
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .serialize.describe import describe_section, describe_visit
    from .serialize.drive import visit_vmsd
    from .serialize.schema import Field, SchemaSet, Subsection, Vmsd
    from .serialize.visitor import Describer, LegacyReader, LegacyWriter, TreeBuilder, TreeReader, Visitor

#: The serializer's names, imported on first use (PEP 562): ``import vmferry`` and the command line's start
#: then load only what they use.
_LAZY = {
    "describe_section": "serialize.describe", "describe_visit": "serialize.describe",
    "visit_vmsd": "serialize.drive",
    "Field": "serialize.schema", "SchemaSet": "serialize.schema", "Subsection": "serialize.schema",
    "Vmsd": "serialize.schema",
    "Describer": "serialize.visitor", "LegacyReader": "serialize.visitor", "LegacyWriter": "serialize.visitor",
    "TreeBuilder": "serialize.visitor", "TreeReader": "serialize.visitor", "Visitor": "serialize.visitor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vmferry' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "CompatError",
    "DecodeError",
    "Describer",
    "EncodeError",
    "FerryError",
    "Field",
    "LegacyReader",
    "LegacyWriter",
    "NegotiationError",
    "SchemaError",
    "SchemaSet",
    "Subsection",
    "TransportError",
    "TreeBuilder",
    "TreeReader",
    "TruncatedError",
    "Visitor",
    "Vmsd",
    "describe_section",
    "describe_visit",
    "visit_vmsd",
]
