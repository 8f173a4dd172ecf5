"""The one exception hierarchy of vmferry.

Every error vmferry raises on purpose derives from :class:`FerryError`.
Decoders raise only :class:`DecodeError` (or its subclass
:class:`TruncatedError`), whatever bytes they are fed; the error carries the
byte offset where decoding failed and the field path being decoded, so that
the CLI can print one line such as::

    $.cpu[0].env.regs[3]: expected 8 bytes, got 2 (at offset 0x1a4)
"""

from __future__ import annotations


class FerryError(Exception):
    """Root of every error vmferry raises deliberately."""


class DecodeError(FerryError):
    """Input bytes (or a tree) could not be decoded.

    ``offset`` is the absolute byte offset in the input (None when the input
    is not a byte stream, e.g. a tree) and ``path`` the field path, e.g.
    ``$.cpu[0].env.regs[3]``.
    """

    def __init__(self, message: str, offset: int | None = None, path: str = "$") -> None:
        self.message = message
        self.offset = offset
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (at offset {self.offset:#x})" if self.offset is not None else ""
        return f"{self.path}: {self.message}{where}"

    def __reduce__(self):  # keep pickling/copying sane for an exception with kwargs
        return (type(self), (self.message, self.offset, self.path))


class TruncatedError(DecodeError):
    """The input ended before a complete record."""


class EncodeError(FerryError):
    """A tree or event cannot be encoded (wrong type, out of range, missing field)."""

    def __init__(self, message: str, path: str = "$") -> None:
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}")

    def __reduce__(self):
        return (type(self), (self.message, self.path))


class SchemaError(FerryError):
    """A schema is missing, malformed, or does not fit the data."""


class CompatError(FerryError):
    """No transform path exists, or a transform cannot apply."""


class NegotiationError(FerryError):
    """Two endpoints cannot agree on capabilities."""


class TransportError(FerryError):
    """A transport URI is invalid or its connection failed."""
