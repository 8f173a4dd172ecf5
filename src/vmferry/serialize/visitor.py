"""The Visitor API: one function per device both saves and loads.

A device's state is described once, by a function that calls the visitor
for every field in wire order and keeps what it returns::

    def visit_pit_channel(v: Visitor, c: PitChannel) -> PitChannel:
        c.count = v.i32("count", c.count)
        c.latched_count = v.u16("latched_count", c.latched_count)
        ...
        return c

The visitor decides the direction and the target.  Saving visitors take the
value passed in and return it unchanged; loading visitors ignore it (except
as a template: a None element of an array of pointers stays None) and return
what they read.  Visitors here:

* :class:`LegacyWriter` / :class:`LegacyReader`: QEMU's big-endian VMState
  bytes; names are not on the wire.
* :class:`TreeBuilder` / :class:`TreeReader`: plain Python trees (dicts,
  lists, ints, bools, bytes), spelt as described in
  :mod:`vmferry.serialize.schema`.
* :class:`Describer`: the description in QEMU's vmdesc JSON form.

Every error carries the field path (``$.channels[1].count``) and, for the
legacy reader, the byte offset.
"""

from __future__ import annotations

import builtins
import struct
from typing import Any, Callable, TypeVar

from ..errors import DecodeError, EncodeError, TruncatedError
from .schema import FLOAT_TYPES, INT_TYPES, int_range

T = TypeVar("T")
VisitFn = Callable[["Visitor", T], T]
ElementFn = Callable[["Visitor", str, Any], Any]

MAX_EMPTY_ELEMENTS = 4096  # zero-byte elements (empty structs) tolerated beyond the bytes left
NULL_POINTER_BYTE = 0x30  # written instead of a NULL element of an array of pointers
SUBSECTION_MARKER = 0x05  # QEMU_VM_SUBSECTION

_INT_STRUCTS = {
    (1, False): struct.Struct(">B"),
    (1, True): struct.Struct(">b"),
    (2, False): struct.Struct(">H"),
    (2, True): struct.Struct(">h"),
    (4, False): struct.Struct(">I"),
    (4, True): struct.Struct(">i"),
    (8, False): struct.Struct(">Q"),
    (8, True): struct.Struct(">q"),
}
_F64 = struct.Struct(">d")
_BE32 = struct.Struct(">I")


def int_codec(type_name: str) -> struct.Struct:
    size, signed = INT_TYPES[type_name]
    return _INT_STRUCTS[(size, signed)]


class Visitor:
    """Base class: the primitive and container methods every visitor offers."""

    loading = False
    #: The version the current top-level vmsd is visited at (a section header's
    #: version), for visit functions with since-version fields; None: the newest.
    version: int | None = None

    def __init__(self) -> None:
        self._path: list[str] = ["$"]

    # --- paths -----------------------------------------------------------
    @property
    def path(self) -> str:
        parts = self._path
        out = parts[0]
        for i in range(1, len(parts)):
            part = parts[i]
            if part.startswith("["):
                out += part
            elif not (i >= 2 and parts[i - 1].startswith("[") and parts[i - 2] == part):
                out += "." + part  # an array element visited under the array's own name adds nothing
        return out

    def _push(self, part: str) -> None:
        self._path.append(part)

    def _pop(self) -> None:
        self._path.pop()

    # --- primitives (named wrappers) ---------------------------------------
    def u8(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "uint8")

    def u16(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "uint16")

    def u32(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "uint32")

    def u64(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "uint64")

    def i8(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "int8")

    def i16(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "int16")

    def i32(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "int32")

    def i64(self, name: str, value: int = 0) -> int:
        return self.integer(name, value, "int64")

    def timer(self, name: str, value: int = 0) -> int:
        """A QEMUTimer: its expiry in ns, ``2**64 - 1`` when not armed."""
        return self.integer(name, value, "timer")

    def unused(self, name: str, size: int) -> bytes:
        """``VMSTATE_UNUSED``: ``size`` bytes, zero when saved, ignored on load."""
        return self.buffer(name, bytes(size), size, "unused_buffer")

    # --- primitives every visitor implements -----------------------------
    def integer(self, name: str, value: int, type_name: str) -> int:
        raise NotImplementedError

    def bool(self, name: str, value: bool | int = False) -> bool | int:
        raise NotImplementedError

    def float64(self, name: str, value: float = 0.0) -> float:
        raise NotImplementedError

    def buffer(self, name: str, value: bytes | None, size: int, type_name: str = "buffer") -> bytes:
        """``size`` raw bytes.  For a buffer whose size is another field, pass that value."""
        raise NotImplementedError

    def cstr(self, name: str, value: bytes = b"", type_name: str = "capability") -> bytes:
        """A counted string: u8 length then the bytes (at most 255)."""
        raise NotImplementedError

    def null(self, name: str, type_name: str) -> None:
        """A NULL element of an array of pointers (one byte 0x30 on the wire)."""
        raise NotImplementedError

    # --- containers --------------------------------------------------------
    def struct(self, name: str, value: T, fn: VisitFn, vmsd_name: str, version: int,
               type_name: str = "struct") -> T:
        """A nested VMState (``VMSTATE_STRUCT``); ``fn(v, value)`` visits its fields."""
        raise NotImplementedError

    def array(self, name: str, values: list | None, count: int, fn: ElementFn,
              compressible: builtins.bool = True) -> list:
        """``count`` elements, each visited by ``fn(v, name, element)``.

        The count is fixed or the value of an earlier field: both look alike
        on the wire.  A None element of an array of pointers is visited with
        :meth:`null` by ``fn``; see :func:`pointer_element`.
        ``compressible`` mirrors QEMU's vmdesc rule: False for arrays whose
        elements may differ (field tests, structs with subsections).
        """
        raise NotImplementedError

    def subsection(self, name: str, version: int, needed: builtins.bool, fn: VisitFn, value: Any) -> Any:
        """A subsection; saved iff ``needed``.  Returns its value, or None when absent."""
        raise NotImplementedError

    def end_subsections(self, parent: str) -> None:
        """Called after the last subsection of ``parent``; readers check nothing is left."""


def pointer_element(fn: ElementFn, type_name: str) -> ElementFn:
    """Wrap an element visitor so that None elements travel as NULL pointers."""

    def visit(v: Visitor, name: str, value: Any) -> Any:
        if value is None:
            return v.null(name, type_name)
        return fn(v, name, value)

    return visit


def _check_int(v: Visitor, value: Any, type_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EncodeError(f"expected an integer for {type_name}, got {type(value).__name__}", v.path)
    lo, hi = int_range(type_name)
    if not lo <= value <= hi:
        raise EncodeError(f"{value} out of range for {type_name} [{lo}, {hi}]", v.path)
    return value


def _check_bytes(v: Visitor, value: Any, size: int | None) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise EncodeError(f"expected bytes, got {type(value).__name__}", v.path)
    if size is not None and len(data) != size:
        raise EncodeError(f"expected {size} bytes, got {len(data)}", v.path)
    return data


# ---------------------------------------------------------------------------
# QEMU's byte stream
# ---------------------------------------------------------------------------


class LegacyWriter(Visitor):
    """Saves into QEMU's VMState encoding (big-endian, no names, no lengths)."""

    def __init__(self, out: bytearray | None = None) -> None:
        super().__init__()
        self.out = out if out is not None else bytearray()

    def integer(self, name: str, value: int, type_name: str) -> int:
        self._push(name)
        self.out += int_codec(type_name).pack(_check_int(self, value, type_name))
        self._pop()
        return value

    def bool(self, name: str, value: bool | int = False) -> bool | int:
        self._push(name)
        if isinstance(value, bool):
            self.out.append(int(value))
        else:
            self.out.append(_check_int(self, value, "uint8"))
        self._pop()
        return value

    def float64(self, name: str, value: float = 0.0) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._push(name)
            raise EncodeError(f"expected a number for float64, got {type(value).__name__}", self.path)
        try:
            self.out += _F64.pack(value)
        except OverflowError:
            self._push(name)
            raise EncodeError(f"{value} does not fit a float64", self.path) from None
        return value

    def buffer(self, name: str, value: bytes | None, size: int, type_name: str = "buffer") -> bytes:
        self._push(name)
        if value is None:  # the tree has no bytes here: never make up ``size`` of them (a count read from input)
            raise EncodeError(f"expected {size} bytes, got None", self.path)
        data = _check_bytes(self, value, size)
        self.out += data
        self._pop()
        return data

    def cstr(self, name: str, value: bytes = b"", type_name: str = "capability") -> bytes:
        self._push(name)
        data = _check_bytes(self, value, None)
        if len(data) > 255:
            raise EncodeError(f"counted string of {len(data)} bytes (at most 255)", self.path)
        self.out.append(len(data))
        self.out += data
        self._pop()
        return data

    def null(self, name: str, type_name: str) -> None:
        self.out.append(NULL_POINTER_BYTE)
        return None

    def struct(self, name, value, fn, vmsd_name, version, type_name="struct"):
        self._push(name)
        out = fn(self, value)
        self._pop()
        return out

    def array(self, name, values, count, fn, compressible=True):
        self._push(name)
        if not isinstance(values, (list, tuple)):
            raise EncodeError(f"expected an array of {count} elements, got {type(values).__name__}", self.path)
        if len(values) != count:
            have = len(values)
            raise EncodeError(f"expected {count} elements, got {have}", self.path)
        out = []
        for i, item in enumerate(values):
            self._path.append(f"[{i}]")
            out.append(fn(self, name, item))
            self._path.pop()
        self._pop()
        return out

    def subsection(self, name, version, needed, fn, value):
        if not needed:
            return None
        self._push(name)
        encoded = name.encode()
        if len(encoded) > 255 or not 0 <= version <= 0xFFFF_FFFF:
            raise EncodeError(f"subsection {name[:40]!r} version {version}: QEMU writes a name of at most 255 "
                              "bytes and a u32 version", self.path)
        self.out.append(SUBSECTION_MARKER)
        self.out.append(len(encoded))
        self.out += encoded
        self.out += _BE32.pack(version)
        out = fn(self, value)
        self._pop()
        return out


class LegacyReader(Visitor):
    """Loads from QEMU's VMState encoding in ``buf[pos:end]``.

    ``base`` is the absolute stream offset of ``buf[0]``, used in errors.
    """

    loading = True

    def __init__(self, buf: bytes | memoryview, pos: int = 0, end: int | None = None, base: int = 0,
                 more_follows: bool = False) -> None:
        super().__init__()
        self.buf = memoryview(buf)
        self.pos = pos
        self.end = len(self.buf) if end is None else end
        self.base = base
        # The input goes on after ``end`` (a decoder's window): a subsection header cut by
        # ``end`` then means "read more", where at the true end it means "no subsection".
        self.more_follows = more_follows

    def _need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise TruncatedError(f"expected {n} bytes, got {self.end - self.pos}", self.base + self.pos, self.path)

    def integer(self, name: str, value: int, type_name: str) -> int:
        self._push(name)
        codec = int_codec(type_name)
        self._need(codec.size)
        (out,) = codec.unpack_from(self.buf, self.pos)
        self.pos += codec.size
        self._pop()
        return out

    def bool(self, name: str, value: bool | int = False) -> bool | int:
        self._push(name)
        self._need(1)
        raw = self.buf[self.pos]
        self.pos += 1
        self._pop()
        return bool(raw) if raw <= 1 else raw  # QEMU treats any non-zero as true; keep odd bytes exactly

    def float64(self, name: str, value: float = 0.0) -> float:
        self._push(name)
        self._need(8)
        (out,) = _F64.unpack_from(self.buf, self.pos)
        self.pos += 8
        self._pop()
        return out

    def buffer(self, name: str, value: bytes | None, size: int, type_name: str = "buffer") -> bytes:
        self._push(name)
        if size < 0:
            raise DecodeError(f"negative buffer size {size}", self.base + self.pos, self.path)
        self._need(size)
        out = bytes(self.buf[self.pos:self.pos + size])
        self.pos += size
        self._pop()
        return out

    def cstr(self, name: str, value: bytes = b"", type_name: str = "capability") -> bytes:
        self._push(name)
        self._need(1)
        n = self.buf[self.pos]
        self._need(1 + n)
        out = bytes(self.buf[self.pos + 1:self.pos + 1 + n])
        self.pos += 1 + n
        self._pop()
        return out

    def null(self, name: str, type_name: str) -> None:
        self._push(name)
        self._need(1)
        if self.buf[self.pos] != NULL_POINTER_BYTE:
            raise DecodeError(f"expected NULL pointer marker 0x30, got {self.buf[self.pos]:#04x}",
                              self.base + self.pos, self.path)
        self.pos += 1
        self._pop()
        return None

    def struct(self, name, value, fn, vmsd_name, version, type_name="struct"):
        self._push(name)
        out = fn(self, value)
        self._pop()
        return out

    def array(self, name, values, count, fn, compressible=True):
        self._push(name)
        if count < 0:
            raise DecodeError(f"negative element count {count}", self.base + self.pos, self.path)
        # Elements take at least one byte, except empty structs; a count far beyond what
        # is left is corrupt, and must not make us loop or allocate for it.
        if count > self.end - self.pos + MAX_EMPTY_ELEMENTS:
            raise TruncatedError(f"{count} elements cannot fit in the {self.end - self.pos} bytes left",
                                 self.base + self.pos, self.path)
        out = []
        for i in range(count):
            self._path.append(f"[{i}]")
            template = values[i] if values is not None and i < len(values) else _NO_TEMPLATE
            out.append(fn(self, name, None if template is _NO_TEMPLATE else template))
            self._path.pop()
        self._pop()
        return out

    def peek_subsection(self) -> str | None:
        """The name of the subsection that starts at the current position, if any."""
        p = self.pos
        if p >= self.end and self.more_follows:
            # Whether a subsection follows is in the next byte, which a live input may send only later: ask
            # for it (reading further ahead could wait for bytes the sender holds back until we answer).
            raise TruncatedError("the byte after the state is not read yet", self.base + p, self.path)
        if p >= self.end or self.buf[p] != SUBSECTION_MARKER:
            return None
        if p + 2 > self.end or p + 2 + self.buf[p + 1] > self.end:
            if self.more_follows:
                raise TruncatedError("subsection header cut short", self.base + p, self.path)
            return None  # QEMU's rule: a header the input cannot hold is no subsection
        n = self.buf[p + 1]
        return bytes(self.buf[p + 2:p + 2 + n]).decode("latin-1")

    def subsection(self, name, version, needed, fn, value):
        found = self.peek_subsection()
        if found != name:
            return None
        self._push(name)
        self.pos += 2 + len(name)
        self._need(4)
        (got,) = _BE32.unpack_from(self.buf, self.pos)
        if got > version:
            raise DecodeError(f"subsection version {got} is newer than {version}", self.base + self.pos, self.path)
        self.pos += 4
        out = fn(self, value)
        self._pop()
        return out

    def end_subsections(self, parent: str) -> None:
        # QEMU's look-ahead: a subsection marker whose name starts with the
        # parent's name but that nobody consumed is an unknown subsection.
        found = self.peek_subsection()
        if found is not None and len(found) >= len(parent) + 1 and found.startswith(parent):
            raise DecodeError(f"unknown or out-of-order subsection {found!r}", self.base + self.pos, self.path)


_NO_TEMPLATE = object()


# ---------------------------------------------------------------------------
# Plain Python trees
# ---------------------------------------------------------------------------


class _TreeVisitor(Visitor):
    """Shared container handling for the tree visitors: a stack of dicts/lists."""

    def __init__(self) -> None:
        super().__init__()
        self._frames: list[Any] = []


class TreeBuilder(_TreeVisitor):
    """Saves into a plain tree; ``tree`` is the result."""

    def __init__(self) -> None:
        super().__init__()
        self.tree: dict[str, Any] = {}
        self._frames = [self.tree]

    def _put(self, name: str, value: Any) -> Any:
        frame = self._frames[-1]
        if isinstance(frame, list):
            frame.append(value)
        else:
            if name in frame:
                raise EncodeError(f"field {name!r} visited twice; give duplicate fields distinct names", self.path)
            frame[name] = value
        return value

    def integer(self, name, value, type_name):
        self._push(name)
        _check_int(self, value, type_name)
        self._pop()
        return self._put(name, value)

    def bool(self, name, value=False):
        return self._put(name, value)

    def float64(self, name, value=0.0):
        return self._put(name, float(value))

    def buffer(self, name, value, size, type_name="buffer"):
        self._push(name)
        data = _check_bytes(self, bytes(size) if value is None else value, size)
        self._pop()
        return self._put(name, data)

    def cstr(self, name, value=b"", type_name="capability"):
        return self._put(name, bytes(value))

    def null(self, name, type_name):
        return self._put(name, None)

    def struct(self, name, value, fn, vmsd_name, version, type_name="struct"):
        self._push(name)
        sub: dict[str, Any] = {}
        self._frames.append(sub)
        out = fn(self, value)
        self._frames.pop()
        self._pop()
        self._put(name, sub)
        return out

    def array(self, name, values, count, fn, compressible=True):
        self._push(name)
        items: list[Any] = []
        self._frames.append(items)
        out = []
        for i in range(count):
            self._path.append(f"[{i}]")
            out.append(fn(self, name, values[i] if values is not None else None))
            self._path.pop()
        self._frames.pop()
        self._pop()
        self._put(name, items)
        return out

    def subsection(self, name, version, needed, fn, value):
        if not needed:
            return None
        self._push(name)
        sub: dict[str, Any] = {}
        self._frames.append(sub)
        out = fn(self, value)
        self._frames.pop()
        self._pop()
        self._put(name, sub)
        return out


class TreeReader(_TreeVisitor):
    """Loads from a plain tree."""

    loading = True

    def __init__(self, tree: dict[str, Any]) -> None:
        super().__init__()
        self._frames = [tree]
        self._cursor: list[int] = [0]
        self._used: list[set[str]] = [set()]

    def _enter(self, frame: Any) -> None:
        self._frames.append(frame)
        self._cursor.append(0)
        self._used.append(set())

    def _leave(self) -> None:
        frame = self._frames.pop()
        self._cursor.pop()
        used = self._used.pop()
        if isinstance(frame, dict) and len(used) < len(frame):
            self._unknown(frame, used)

    def _unknown(self, frame: dict[str, Any], used: set[str]) -> None:
        extra = next(k for k in frame if k not in used)
        raise DecodeError(f"unknown field {extra!r} (a misspelt name would be lost)", None, self.path)

    def finish(self) -> None:
        """Check that the visit used every key of the top-level tree."""
        if len(self._used[0]) < len(self._frames[0]):
            self._unknown(self._frames[0], self._used[0])

    def _get(self, name: str) -> Any:
        frame = self._frames[-1]
        if isinstance(frame, list):
            i = self._cursor[-1]
            self._cursor[-1] += 1
            if i >= len(frame):
                raise DecodeError(f"array has {len(frame)} elements, expected more", None, self.path)
            return frame[i]
        if not isinstance(frame, dict):
            raise DecodeError(f"expected an object, got {type(frame).__name__}", None, self.path)
        if name not in frame:
            raise DecodeError(f"missing field {name!r}", None, self.path)
        self._used[-1].add(name)
        return frame[name]

    def integer(self, name, value, type_name):
        self._push(name)
        out = self._get(name)
        if isinstance(out, bool) or not isinstance(out, int):
            raise DecodeError(f"expected an integer for {type_name}, got {type(out).__name__}", None, self.path)
        lo, hi = int_range(type_name)
        if not lo <= out <= hi:
            raise DecodeError(f"{out} out of range for {type_name}", None, self.path)
        self._pop()
        return out

    def bool(self, name, value=False):
        self._push(name)
        out = self._get(name)
        if not isinstance(out, int) or not 0 <= int(out) <= 255:
            raise DecodeError(f"expected a bool, got {out!r}", None, self.path)
        self._pop()
        return out

    def float64(self, name, value=0.0):
        self._push(name)
        out = self._get(name)
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            raise DecodeError(f"expected a number, got {type(out).__name__}", None, self.path)
        self._pop()
        return float(out)

    def buffer(self, name, value, size, type_name="buffer"):
        self._push(name)
        out = self._get(name)
        if not isinstance(out, (bytes, bytearray, memoryview)):
            raise DecodeError(f"expected bytes, got {type(out).__name__}", None, self.path)
        if len(out) != size:
            raise DecodeError(f"expected {size} bytes, got {len(out)}", None, self.path)
        self._pop()
        return bytes(out)

    def cstr(self, name, value=b"", type_name="capability"):
        self._push(name)
        out = self._get(name)
        if not isinstance(out, (bytes, bytearray)) or len(out) > 255:
            raise DecodeError("expected a counted string of at most 255 bytes", None, self.path)
        self._pop()
        return bytes(out)

    def null(self, name, type_name):
        self._push(name)
        out = self._get(name)
        if out is not None:
            raise DecodeError("expected null (a NULL pointer)", None, self.path)
        self._pop()
        return None

    def struct(self, name, value, fn, vmsd_name, version, type_name="struct"):
        self._push(name)
        sub = self._get(name)
        if not isinstance(sub, dict):
            raise DecodeError(f"expected an object, got {type(sub).__name__}", None, self.path)
        self._enter(sub)
        out = fn(self, value)
        self._leave()
        self._pop()
        return out

    def array(self, name, values, count, fn, compressible=True):
        self._push(name)
        items = self._get(name)
        if not isinstance(items, list):
            raise DecodeError(f"expected an array, got {type(items).__name__}", None, self.path)
        if len(items) != count:
            raise DecodeError(f"expected {count} elements, got {len(items)}", None, self.path)
        self._enter(items)
        out = []
        for i in range(count):
            self._path.append(f"[{i}]")
            template = values[i] if values is not None and i < len(values) else None
            out.append(fn(self, name, template))
            self._path.pop()
        self._leave()
        self._pop()
        return out

    def subsection(self, name, version, needed, fn, value):
        frame = self._frames[-1]
        if not isinstance(frame, dict) or name not in frame:
            return None
        self._push(name)
        self._used[-1].add(name)
        sub = frame[name]
        if not isinstance(sub, dict):
            raise DecodeError(f"expected an object, got {type(sub).__name__}", None, self.path)
        self._enter(sub)
        out = fn(self, value)
        self._leave()
        self._pop()
        return out


# ---------------------------------------------------------------------------
# vmdesc descriptions
# ---------------------------------------------------------------------------


#: How each QEMU release marks the elements of an array it describes element by
#: element: ``"every"`` element gets an ``index`` (5.2, 7.2), ``"all-but-last"``
#: (10.0: only while more than one element remains), ``"none"`` (11.1).
ARRAY_INDEX_STYLES = ("every", "all-but-last", "none")
ARRAY_INDEX_BY_QEMU = {"5.2": "every", "7.2": "every", "10.0": "all-but-last", "11.1": "none"}


class Describer(Visitor):
    """Saves a description in QEMU's vmdesc JSON form.

    Drive it like a writer (it needs the state: sizes, counts and which
    subsections are sent depend on it), then call :meth:`device` or read
    :attr:`fields` / :attr:`subsections`.  ``array_index`` (one of
    :data:`ARRAY_INDEX_STYLES`) says which QEMU's vmdesc to reproduce.
    """

    def __init__(self, array_index: str = "every") -> None:
        super().__init__()
        if array_index not in ARRAY_INDEX_STYLES:
            raise ValueError(f"array_index must be one of {', '.join(ARRAY_INDEX_STYLES)}, not {array_index!r}")
        self.array_index = array_index
        self.fields: list[dict[str, Any]] = []
        self.subsections: list[dict[str, Any]] = []
        self._frames: list[tuple[list, list]] = [(self.fields, self.subsections)]
        self.size = 0  # bytes written so far

    def device(self, idstr: str, instance_id: int, vmsd_name: str, version: int) -> dict[str, Any]:
        desc: dict[str, Any] = {"name": idstr, "instance_id": instance_id, "vmsd_name": vmsd_name,
                                "version": version, "fields": self.fields}
        if self.subsections:
            desc["subsections"] = self.subsections
        return desc

    def _entry(self, name: str, type_name: str, size: int) -> Any:
        self._frames[-1][0].append({"name": name, "type": type_name, "size": size})
        self.size += size

    def integer(self, name, value, type_name):
        self._push(name)
        _check_int(self, value, type_name)
        self._pop()
        self._entry(name, type_name, INT_TYPES[type_name][0])
        return value

    def bool(self, name, value=False):
        self._entry(name, "bool", 1)
        return value

    def float64(self, name, value=0.0):
        self._entry(name, "float64", FLOAT_TYPES["float64"])
        return value

    def buffer(self, name, value, size, type_name="buffer"):
        self._entry(name, type_name, size)
        return value

    def cstr(self, name, value=b"", type_name="capability"):
        self._entry(name, type_name, 1 + len(value))
        return value

    def null(self, name, type_name):
        self._entry(name, type_name, 1)
        return None

    def _nested(self, fn: VisitFn, value: Any) -> tuple[Any, list, list, int]:
        fields: list = []
        subs: list = []
        start = self.size
        self._frames.append((fields, subs))
        out = fn(self, value)
        self._frames.pop()
        return out, fields, subs, self.size - start

    def struct(self, name, value, fn, vmsd_name, version, type_name="struct"):
        self._push(name)
        out, fields, subs, size = self._nested(fn, value)
        self._pop()
        vmsd: dict[str, Any] = {"vmsd_name": vmsd_name, "version": version, "fields": fields}
        if subs:
            vmsd["subsections"] = subs
        entry: dict[str, Any] = {"name": name, "type": type_name}
        if type_name == "struct":
            entry["struct"] = vmsd
        else:  # tmp / vstruct: QEMU writes the nested vmsd's keys inline
            entry.update(vmsd)
        entry["size"] = size
        self._frames[-1][0].append(entry)
        return out

    def array(self, name, values, count, fn, compressible=True):
        self._push(name)
        entries: list[dict[str, Any]] = []
        out = []
        fields, _subs = self._frames[-1]
        for i in range(count):
            self._path.append(f"[{i}]")
            before = len(fields)
            out.append(fn(self, name, values[i] if values is not None else None))
            entries.extend(fields[before:])
            del fields[before:]
            self._path.pop()
        self._pop()
        if count == 1:
            fields.extend(entries)
        elif count > 1:
            # QEMU 7.2 compresses on a static rule and then describes every element like the
            # first; we also require the elements to really look alike, so the description
            # stays exact where QEMU's would not be (spec §4.5), and equals it everywhere else.
            if compressible and len(entries) == count and all(e == entries[0] for e in entries):
                first = dict(entries[0])
                compressed = {"name": first.pop("name"), "array_len": count}
                compressed.update(first)
                fields.append(compressed)
            else:
                last = len(entries) - 1
                for i, e in enumerate(entries):
                    if self.array_index == "none" or (self.array_index == "all-but-last" and i == last):
                        fields.append(e)
                        continue
                    indexed = {"name": e["name"], "index": i}
                    indexed.update({k: v for k, v in e.items() if k != "name"})
                    fields.append(indexed)
        return out

    def subsection(self, name, version, needed, fn, value):
        if not needed:
            return None
        self._push(name)
        self.size += 2 + len(name) + 4
        out, fields, subs, _size = self._nested(fn, value)
        self._pop()
        entry: dict[str, Any] = {"vmsd_name": name, "version": version, "fields": fields}
        if subs:
            entry["subsections"] = subs
        self._frames[-1][1].append(entry)
        return out
