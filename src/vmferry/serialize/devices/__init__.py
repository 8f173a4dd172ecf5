"""Python device models of QEMU 7.2 devices, and a registry from vmsd name to model.

Each model is a dataclass whose defaults are QEMU's reset state and whose
``visit(v, s) -> s`` static method both saves and loads it through any
visitor (see :mod:`.base`).  :data:`MODELS` maps a section's vmsd name
(``DeviceSection.schema.name``) to its model class::

    cls = model_for(section.schema.name)
    dev = load(cls, LegacyReader(body), section.version_id)
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from ...errors import SchemaError
from .base import TIMER_DISARMED, DeviceModel, load, save, visited_version
from .i8254 import PITChannelState, PITCommonState
from .pckbd import ISAKBDState, KBDState, PS2KbdState, PS2Queue, PS2State
from .rtc import RTCState
from .serial import Fifo8, ISASerialState, SerialState

__all__ = [
    "MODELS",
    "TIMER_DISARMED",
    "DeviceModel",
    "Fifo8",
    "ISAKBDState",
    "ISASerialState",
    "KBDState",
    "PITChannelState",
    "PITCommonState",
    "PS2KbdState",
    "PS2Queue",
    "PS2State",
    "RTCState",
    "SerialState",
    "load",
    "model_for",
    "save",
    "visited_version",
]

_CLASSES: tuple[type[DeviceModel], ...] = (RTCState, PITCommonState, ISAKBDState, PS2KbdState, ISASerialState)

#: vmsd name -> model class.
MODELS: Mapping[str, type[DeviceModel]] = MappingProxyType({cls.VMSD_NAME: cls for cls in _CLASSES})


def model_for(vmsd_name: str) -> type[DeviceModel]:
    """The model class of a vmsd; :class:`~vmferry.errors.SchemaError` if there is none."""
    try:
        return MODELS[vmsd_name]
    except KeyError:
        raise SchemaError(f"no Python device model for vmsd {vmsd_name!r} "
                          f"(known: {', '.join(sorted(MODELS))})") from None
