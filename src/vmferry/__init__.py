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
from .serialize.describe import describe_section, describe_visit
from .serialize.drive import visit_vmsd
from .serialize.schema import Field, SchemaSet, Subsection, Vmsd
from .serialize.visitor import Describer, LegacyReader, LegacyWriter, TreeBuilder, TreeReader, Visitor

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
