"""Compatibility transforms between device-model releases and QEMU machine types.

* :mod:`.registry`: register transforms (one section, or the whole
  machine), plan the unique chain between two releases in either
  direction, apply it.
* :mod:`.ops`: the reusable operations transforms are made of: add, drop,
  rename and change fields, versions and subsections; add, drop, rename,
  split and merge sections.
* :mod:`.machines`: the catalogue of four QEMU releases' x86 machine types
  (5.2's ``pc-*-5.2``; 7.2's ``pc-i440fx-2.3`` .. ``7.2``, ``pc-q35-2.4`` ..
  ``7.2``; 10.0's 7.2 .. 10.0; 11.1's 10.0 .. 11.1), a release being a
  machine type of one QEMU version (``pc-i440fx-7.2@10.0``), one chain of
  steps joining any two of a chipset.
* :mod:`.stream`: apply a plan to an event stream, RAM passing through;
  stream transforms handle commands, the configuration and the vmdesc.
* :mod:`.check`: the static diff of two schema sets (``vmferry diff``).

Everything here is a pure function over events, trees and schemas: no I/O.
"""

from __future__ import annotations

from .machines import build_registry, qemu_registry
from .ops import Machine, Node, Part
from .registry import Change, Plan, Registry, Release, Step, Transform, apply
from .stream import source_release, transform_events

__all__ = [
    "Change",
    "Machine",
    "Node",
    "Part",
    "Plan",
    "Registry",
    "Release",
    "Step",
    "Transform",
    "apply",
    "build_registry",
    "qemu_registry",
    "source_release",
    "transform_events",
]
