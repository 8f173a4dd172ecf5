"""The vmdesc as each QEMU release writes it, and what a vmdesc tells of the QEMU that wrote it.

Four QEMU releases write the same descriptions three ways (seen in every
real stream of QEMU 5.2.0, 7.2, 10.0.13 and 11.1.2):

* an array described element by element gets an ``index`` on every element
  (5.2, 7.2), on all but the last (10.0) or on none (11.1)
  (:data:`~vmferry.serialize.visitor.ARRAY_INDEX_BY_QEMU`);
* QEMU 5.2 spaces its JSON the QJSON way (``{ "page_size" : 4096, ...``),
  6.0 and later as ``json.dumps`` does;
* 10.0 and 11.1 describe the configuration section first (spec §11.8).

:func:`restyle_fields` / :func:`restyle_vmsd` rewrite the array indexes of a
description from any of the three spellings to any other (for every step
between releases, the 7.2/10.0 one of :mod:`.qemu10` too): an array is a run
of neighbours of one name whose indexes, where present, count up from 0 (a
10.0 array ends with the one element without an index; an 11.1 array has
none at all).  :func:`writer_qemu` reads the clues back.  Pure functions.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Mapping

from ...errors import CompatError
from ...events import Event, Vmdesc
from ...serialize.qemu_vmdesc import has_neighbours
from ...serialize.visitor import ARRAY_INDEX_BY_QEMU

__all__ = ["is_qjson", "restyle_fields", "restyle_text", "restyle_vmsd", "restyled_object", "style_of", "styled",
           "writer_qemu", "writer_qemu_of"]


def style_of(qemu: str) -> str:
    """The array-index style of QEMU ``qemu`` (one of ``every``, ``all-but-last``, ``none``)."""
    try:
        return ARRAY_INDEX_BY_QEMU[qemu]
    except KeyError:
        raise CompatError(f"no vmdesc style known for QEMU {qemu}") from None


def _arrays(group: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split neighbours of one name into the arrays (and single fields) they describe."""
    if len(group) > 1 and all("index" not in e for e in group):
        return [group]  # QEMU 11.1: one array, no index anywhere
    out: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    for e in group:
        idx = e.get("index")
        if cur and (idx == 0 or "index" not in cur[-1]):
            out.append(cur)  # a new array starts, or the last one ended with its unindexed element
            cur = []
        if cur and idx is not None and idx != len(cur):
            raise CompatError(f"vmdesc field {e.get('name')!r}: index {idx} after {len(cur)} elements")
        cur.append(e)
    if cur:
        out.append(cur)
    return out


def _with_index(e: dict[str, Any], index: int | None) -> dict[str, Any]:
    rest = [(k, v) for k, v in e.items() if k not in ("name", "index")]
    head: list[tuple[str, Any]] = [("name", e["name"])] if "name" in e else []
    if index is not None:
        head.append(("index", index))
    return dict(head + rest)


def restyle_fields(fields: list[Any], style: str) -> list[Any]:
    """A vmdesc ``fields`` list with its arrays' indexes in ``style`` (nested descriptions too)."""
    flat: list[Any] = []
    for f in fields:
        if isinstance(f, Mapping):
            f = dict(f)
            if isinstance(f.get("struct"), Mapping):
                f["struct"] = restyle_vmsd(f["struct"], style)
            if isinstance(f.get("fields"), list):  # tmp / vstruct: the nested vmsd inline
                f["fields"] = restyle_fields(f["fields"], style)
            if isinstance(f.get("subsections"), list):
                f["subsections"] = [restyle_vmsd(s, style) if isinstance(s, Mapping) else s for s in f["subsections"]]
        flat.append(f)
    out: list[Any] = []
    i = 0
    while i < len(flat):
        f = flat[i]
        j = i + 1
        if isinstance(f, dict) and "name" in f and "array_len" not in f:
            while j < len(flat) and isinstance(flat[j], dict) and flat[j].get("name") == f["name"] \
                    and "array_len" not in flat[j]:
                j += 1
        if j - i == 1:
            out.append(_with_index(f, None) if isinstance(f, dict) and "index" in f else f)
            i = j
            continue
        for arr in _arrays(flat[i:j]):
            last = len(arr) - 1
            for k, e in enumerate(arr):
                keep = len(arr) > 1 and (style == "every" or (style == "all-but-last" and k < last))
                out.append(_with_index(e, k if keep else None))
        i = j
    return out


def restyle_vmsd(desc: Mapping[str, Any], style: str) -> dict[str, Any]:
    """A vmdesc device (or nested vmsd) entry with its arrays' indexes in ``style``."""
    out = dict(desc)
    if isinstance(out.get("fields"), list):
        out["fields"] = restyle_fields(out["fields"], style)
    if isinstance(out.get("subsections"), list):
        out["subsections"] = [restyle_vmsd(s, style) if isinstance(s, Mapping) else s for s in out["subsections"]]
    return out


def is_qjson(text: bytes) -> bool:
    """Whether a vmdesc is spaced the QJSON way (QEMU 5.2 and older)."""
    return text.lstrip()[:2] == b"{ "


def restyled_object(ev: Vmdesc, qemu: str) -> dict[str, Any]:
    """The vmdesc object of ``ev`` with every device's arrays indexed as QEMU ``qemu`` does.

    CompatError when ``ev`` is not a JSON object with a ``devices`` list.
    """
    try:
        obj = json.loads(ev.text)
    except ValueError:
        raise CompatError("the vmdesc is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("devices"), list):
        raise CompatError("the vmdesc has no 'devices' list")
    style = style_of(qemu)
    obj["devices"] = [restyle_vmsd(d, style) if isinstance(d, Mapping) else d for d in obj["devices"]]
    return obj


def restyle_text(ev: Vmdesc, qemu: str) -> Vmdesc:
    """``ev`` with every device's arrays indexed as QEMU ``qemu`` does, in its spacing.

    The configuration object (10.0, 11.1) is neither added nor removed here
    (the QEMU 10.0 step of :mod:`.qemu10` does that).
    """
    from ...encode.legacy import vmdesc_text

    return Vmdesc(vmdesc_text(restyled_object(ev, qemu), qjson=qemu == "5.2"))


def styled(qemu: str) -> Callable[[Iterator[Event]], Iterator[Event]]:
    """A stream transform writing the vmdesc as QEMU ``qemu`` does (:func:`restyle_text`)."""
    def fn(events: Iterator[Event]) -> Iterator[Event]:
        for ev in events:
            yield restyle_text(ev, qemu) if isinstance(ev, Vmdesc) else ev
    fn.__doc__ = f"The vmdesc as QEMU {qemu} writes it."
    return fn


def writer_qemu(text: bytes) -> list[str]:
    """The QEMU releases of the catalogue whose vmdesc looks like ``text``, most likely first.

    QJSON spacing: 5.2.  Otherwise as :func:`writer_qemu_of`.  Empty when
    ``text`` is not a vmdesc.
    """
    try:
        doc = json.loads(text)
    except ValueError:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
        return []
    return ["5.2"] if is_qjson(text) else writer_qemu_of(doc)


def writer_qemu_of(doc: Mapping[str, Any]) -> list[str]:
    """The QEMU releases (6.0 and later) whose vmdesc object looks like ``doc``, most likely first.

    Neighbours of one name without any index: 11.1 (then 10.0: the catalogue
    has 11.1's machine types from 10.0 on, and 11.1's streams of older ones
    are otherwise like 10.0's).  A configuration object, or an array's last
    element without an index: 10.0 (then 11.1, whose streams without
    element-by-element arrays look the same).  Otherwise 7.2.
    """
    devices = doc.get("devices")
    if has_neighbours(devices, lambda a, b: "index" not in a and "index" not in b):
        return ["11.1", "10.0"]
    if isinstance(doc.get("configuration"), dict) or \
            has_neighbours(devices, lambda a, b: "index" in a and "index" not in b):
        return ["10.0", "11.1"]
    return ["7.2"]
