"""libvirt's QEMU save image: its header, domain XML and cookie, around QEMU's own stream.

``virsh save`` and ``virsh managedsave`` write a file that starts with a
header of libvirt's (libvirt 9.0 ``src/qemu/qemu_saveimage.h``,
``virQEMUSaveHeader``), 92 bytes in the host's byte order::

    magic[16]      "LibvirtQemudSave", or "LibvirtQemudPart" until the image is complete
    u32 version    2 (QEMU_SAVE_VERSION; 1 had no compression: its stream is raw)
    u32 data_len   bytes of XML + cookie + zero padding that follow the header
    u32 was_running    1: libvirt resumes the guest after ``virsh restore``
    u32 compressed     0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop (libvirt 9.0); 5 zstd and
                       6 sparse (mapped-ram) in later libvirt
    u32 cookieOffset   where the cookie starts in the data (0: no cookie)
    u32 unused[14]

then ``data_len`` bytes: the domain XML with its NUL, the cookie
(``<cookie>`` with the guest CPU) with its NUL, and zeros.  A fresh save
pads by 64 KiB, so that ``virsh save-image-define`` can write a longer XML
in place; such an edit keeps ``data_len`` and fails when the new XML and
cookie do not fit.  QEMU's migration stream follows, written by QEMU
through ``PROG -c`` (``xz -c -3``) when compressed and read back through
``PROG -dc`` (``lzop -dc --ignore-warn``).  libvirt reads a header whose
version is above 2 byte-swapped, then refuses it if it still is.

This module does no I/O.  :func:`split` takes the image's chunks and gives
back a :class:`SaveImage` (header, XML, cookie, domain name, machine type,
``was_running``, compression) and the chunks of the stream after it;
:func:`qemu_stream` decompresses those lazily (gzip, bzip2 and xz with the
standard library, zstd with ``compression.zstd`` (``backports.zstd``
before Python 3.14), lzop with its framing read here
and LZO1X blocks by ``lzallright``), in chunks of at most
:data:`MAX_CHUNK` bytes, and :func:`compress` compresses a stream again.
:meth:`SaveImage.with_machine` rewrites ``<os><type machine=...>`` and
:meth:`SaveImage.with_emulator` ``<devices><emulator>``, and
:meth:`SaveImage.with_device_properties` adds a ``<qemu:override>``; each
leaves every other byte of the XML as it was; :attr:`SaveImage.head` is
the header and data, byte for byte as read when nothing changed.

Errors are :class:`~vmferry.errors.DecodeError` with the offset in the
file (``$.libvirt...`` paths); lengths are bounded before anything is
allocated (:data:`MAX_DATA_LEN`, :data:`LZOP_MAX_BLOCK`).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any, Iterable, Iterator
from xml.parsers import expat

from ..errors import DecodeError, EncodeError, TruncatedError

__all__ = [
    "Compression",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHUNK",
    "MAX_DATA_LEN",
    "PADDING",
    "PARTIAL_MAGIC",
    "SaveHeader",
    "SaveImage",
    "compress",
    "encode",
    "parse",
    "parse_header",
    "qemu_stream",
    "sniff",
    "split",
]

NAME = "libvirt-save"
#: virQEMUSaveHeader.magic of a complete image (QEMU_SAVE_MAGIC) and of one still being written (QEMU_SAVE_PARTIAL).
MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
#: QEMU_SAVE_VERSION of libvirt 9.0 (and still of libvirt 11): the newest header version.
VERSION = 2
_FIELDS = "16s5I14I"
#: sizeof(virQEMUSaveHeader): 16 bytes of magic, 5 words, 14 unused words.
HEADER_SIZE = struct.calcsize("<" + _FIELDS)
#: What virQEMUSaveDataWrite adds to a fresh image's XML and cookie ("allows the user to edit the XML").
PADDING = 64 * 1024
#: libvirt hands the XML and the cookie over RPC as strings of at most VIR_NET_MESSAGE_STRING_MAX
#: (4 MiB, src/rpc/virnetprotocol.x) each, so no image it writes has more data than both plus the padding.
MAX_DATA_LEN = 2 * (4 << 20) + PADDING
#: Decompressed chunks are at most this long, whatever the compressed input.
MAX_CHUNK = 4 << 20


class Compression(IntEnum):
    """``virQEMUSaveHeader.compressed`` (virQEMUSaveFormat): on-disk values, never reused."""

    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3
    LZOP = 4
    ZSTD = 5  # libvirt after 9.0
    SPARSE = 6  # libvirt 11: QEMU's mapped-ram layout, not a stream

    @property
    def label(self) -> str:
        """The name ``save_image_format`` in qemu.conf gives it (and the program libvirt runs)."""
        return self.name.lower()


#: What libvirt runs to compress (``PROG -c``; xz also ``-3``); decompression is ``PROG -dc``.
COMPRESS_COMMANDS: dict[Compression, tuple[str, ...]] = {
    Compression.GZIP: ("gzip", "-c"),
    Compression.BZIP2: ("bzip2", "-c"),
    Compression.XZ: ("xz", "-c", "-3"),
    Compression.LZOP: ("lzop", "-c"),
    Compression.ZSTD: ("zstd", "-c"),
}


def sniff(head: bytes) -> bool:
    """Whether ``head`` starts a libvirt save image (complete or partial)."""
    return bytes(head[:16]) in (MAGIC, PARTIAL_MAGIC)


# ---------------------------------------------------------------------------
# header
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveHeader:
    """virQEMUSaveHeader, as read; ``byteorder`` is ``"<"`` or ``">"`` (the writing host's)."""

    magic: bytes
    version: int
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int
    unused: tuple[int, ...] = (0,) * 14
    byteorder: str = "<"

    @property
    def complete(self) -> bool:
        """False for an image libvirt did not finish writing (its magic is ``LibvirtQemudPart``)."""
        return self.magic == MAGIC

    @property
    def compression(self) -> Compression:
        """How the QEMU stream is stored: version 1 images are always raw (libvirt ignores the field)."""
        return Compression(self.compressed) if self.version >= 2 else Compression.RAW

    def pack(self) -> bytes:
        return struct.pack(self.byteorder + _FIELDS, self.magic, self.version, self.data_len, self.was_running,
                           self.compressed, self.cookie_offset, *self.unused)


def parse_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> SaveHeader:
    """The header at the start of ``buf`` (at least :data:`HEADER_SIZE` bytes), checked as libvirt does and more.

    ``offset`` is where ``buf`` starts in the file, for errors.
    """
    if len(buf) < HEADER_SIZE:
        raise TruncatedError(f"libvirt save header truncated: expected {HEADER_SIZE} bytes, got {len(buf)}",
                             offset + len(buf), "$.libvirt.header")
    magic = bytes(buf[:16])
    if magic not in (MAGIC, PARTIAL_MAGIC):
        raise DecodeError(f"not a libvirt save image: magic {magic[:16]!r}", offset, "$.libvirt.header.magic")
    order = "<"
    words = struct.unpack_from("<5I14I", buf, 16)
    as_read = words[0]
    if words[0] > VERSION:  # libvirt: "convert endianness and try again"
        order = ">"
        words = struct.unpack_from(">5I14I", buf, 16)
    version, data_len, was_running, compressed, cookie_offset = words[:5]
    if not 1 <= version <= VERSION:
        raise DecodeError(f"libvirt save image version {as_read} is not supported (1..{VERSION}, in either "
                          "byte order)", offset + 16, "$.libvirt.header.version")
    if data_len == 0 or data_len > MAX_DATA_LEN:
        raise DecodeError(f"invalid data length {data_len} (1..{MAX_DATA_LEN})", offset + 20,
                          "$.libvirt.header.data_len")
    if was_running > 1:
        raise DecodeError(f"was_running is {was_running}, not 0 or 1", offset + 24, "$.libvirt.header.was_running")
    if version >= 2:
        if compressed not in Compression.__members__.values():
            raise DecodeError(f"unknown compression {compressed}", offset + 28, "$.libvirt.header.compressed")
        if compressed == Compression.SPARSE:
            raise DecodeError("a sparse (mapped-ram) image holds no migration stream; vmferry cannot read it",
                              offset + 28, "$.libvirt.header.compressed")
    if cookie_offset >= data_len:
        raise DecodeError(f"cookie offset {cookie_offset} is not inside the {data_len} data bytes", offset + 32,
                          "$.libvirt.header.cookieOffset")
    return SaveHeader(magic, version, data_len, was_running, compressed, cookie_offset, tuple(words[5:]), order)


# ---------------------------------------------------------------------------
# the image: header, XML, cookie
# ---------------------------------------------------------------------------

# Patterns, compiled on first use (``re`` keeps them cached): reading a QEMU stream needs none of them.
_MACHINE_RE = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ATTR = r"""\s+([A-Za-z_:][\w:.-]*)\s*=\s*(?:'[^'<]*'|"[^"<]*")"""
_START_TAG = rb"<type((?:" + _ATTR.encode() + rb")*)\s*(/?)>"
_DEVICES_TAG = rb"<devices(?:" + _ATTR.encode() + rb")*\s*>"
_EMULATOR_TAG = rb"<emulator(?:" + _ATTR.encode() + rb")*\s*(/?)>"
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"  # libvirt's <qemu:...> elements
_ATTR_RE = rb"""(\s+)([A-Za-z_:][\w:.-]*)(\s*=\s*)(?:'([^'<]*)'|"([^"<]*)")"""


@dataclass(frozen=True)
class _XmlFacts:
    name: str | None
    domain_type: str | None
    machine: str | None
    arch: str | None
    type_tag: tuple[int, int] | None  # byte span of the <os><type ...> start tag in the XML
    devices_at: int | None = None  # byte offset just after the <devices> start tag
    emulators: tuple[tuple[int, int], ...] = ()  # byte spans of the text of each <devices><emulator>
    domain_end: int | None = None  # byte offset of </domain>
    balloon: str | None = None  # the alias of a virtio <memballoon> (libvirt's own: balloon0)
    overrides: bool = False  # the XML has a <qemu:override> already


def _tag_end(xml: bytes, at: int, pattern: bytes, what: str, offset: int) -> re.Match[bytes]:
    """The start tag that expat reported at byte ``at``, matched by ``pattern``."""
    m = re.compile(pattern).match(xml, at)
    if m is None:  # expat accepted it, so only odd spacing or quoting can get here
        raise DecodeError(f"cannot locate {what} in the domain XML", offset + at, f"$.libvirt.xml.{what}")
    return m


def _xml_facts(xml: bytes, offset: int) -> _XmlFacts:
    """Read the domain name, type, ``<os><type>`` and where ``<devices><emulator>`` is in ``xml`` with expat;
    no DTDs, no entities."""
    p = expat.ParserCreate()
    stack: list[str] = []
    found: dict[str, Any] = {"name": None, "domain_type": None, "machine": None, "arch": None, "span": None,
                             "devices": None, "end": None, "balloon": None, "overrides": False}
    qemu_prefixes: set[str] = set()  # prefixes bound to libvirt's qemu namespace
    emulators: list[tuple[int, int]] = []
    text: list[str] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        stack.append(tag)
        qemu_prefixes.update(k[6:] for k, v in attrs.items() if k.startswith("xmlns:") and v == QEMU_NAMESPACE)
        prefix, _, local = tag.rpartition(":")
        if local == "override" and prefix in qemu_prefixes:
            found["overrides"] = True
        if stack == ["domain"]:
            found["domain_type"] = attrs.get("type")
        elif stack == ["domain", "os", "type"] and found["span"] is None:
            at = p.CurrentByteIndex
            found["span"] = (at, _tag_end(xml, at, _START_TAG, "os.type", offset).end())
            found["machine"] = attrs.get("machine")
            found["arch"] = attrs.get("arch")
        elif stack == ["domain", "devices"] and found["devices"] is None:
            found["devices"] = _tag_end(xml, p.CurrentByteIndex, _DEVICES_TAG, "devices", offset).end()
        elif stack == ["domain", "devices", "emulator"]:
            m = _tag_end(xml, p.CurrentByteIndex, _EMULATOR_TAG, "devices.emulator", offset)
            emulators.append((m.end(), m.end()) if m.group(1) else (m.end(), -1))  # an empty element: no text
        elif stack == ["domain", "devices", "memballoon"] and attrs.get("model", "").startswith("virtio"):
            found["balloon"] = "balloon0"
        elif stack == ["domain", "devices", "memballoon", "alias"] and found["balloon"] is not None:
            found["balloon"] = attrs.get("name") or "balloon0"
        elif stack == ["domain", "name"]:
            text.clear()

    def end(tag: str) -> None:
        if stack == ["domain", "name"]:
            found["name"] = "".join(text)
        elif stack == ["domain", "devices", "emulator"] and emulators[-1][1] < 0:
            emulators[-1] = (emulators[-1][0], p.CurrentByteIndex)  # where </emulator> starts
        elif stack == ["domain"]:
            found["end"] = p.CurrentByteIndex
        stack.pop()

    def chars(data: str) -> None:
        if stack == ["domain", "name"]:
            text.append(data)

    def refuse(*_: Any) -> None:
        raise DecodeError("the domain XML declares a DTD or entities (libvirt never writes one)",
                          offset + p.CurrentByteIndex, "$.libvirt.xml")

    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    p.StartDoctypeDeclHandler = refuse
    p.EntityDeclHandler = refuse
    try:
        p.Parse(xml, True)
    except expat.ExpatError as e:
        raise DecodeError(f"the domain XML is not well-formed: {expat.errors.messages[e.code]} "
                          f"(line {e.lineno}, column {e.offset})", offset + max(p.ErrorByteIndex, 0),
                          "$.libvirt.xml") from None
    if found["span"] is None:
        raise DecodeError("the domain XML has no <os><type> element", offset, "$.libvirt.xml.os.type")
    return _XmlFacts(found["name"], found["domain_type"], found["machine"], found["arch"], found["span"],
                     found["devices"], tuple(emulators), found["end"], found["balloon"], found["overrides"])


def _cstring(data: bytes, start: int, end: int, what: str, path: str) -> bytes:
    """The NUL-terminated string at ``data[start:end]`` (without its NUL)."""
    nul = data.find(b"\0", start, end)
    if nul < 0:
        raise DecodeError(f"the {what} has no terminating NUL in its {end - start} bytes", HEADER_SIZE + start, path)
    return data[start:nul]


def _utf8(data: bytes, offset: int, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"not UTF-8: {e.reason}", offset + e.start, path) from None


@dataclass(frozen=True)
class SaveImage:
    """A parsed save image head: the header and the ``data_len`` bytes of XML, cookie and padding."""

    header: SaveHeader
    #: the data_len bytes after the header, exactly as read
    data: bytes
    #: the header's 92 bytes exactly as read (equal to header.pack(), kept to be safe)
    raw_header: bytes
    xml: str
    cookie: str | None
    name: str | None
    domain_type: str | None
    machine: str | None
    arch: str | None
    #: the libvirt alias of the domain's virtio memory balloon (virtio-balloon-pci), if it has one
    balloon: str | None = None
    _type_tag: tuple[int, int] = (0, 0)
    _devices_at: int | None = None
    _emulators: tuple[tuple[int, int], ...] = ()
    _domain_end: int | None = None
    _overrides: bool = False

    @property
    def head(self) -> bytes:
        """Header, XML, cookie and padding: the bytes before the QEMU stream."""
        return self.raw_header + self.data

    @property
    def payload_offset(self) -> int:
        """Where the (possibly compressed) QEMU stream starts in the file."""
        return HEADER_SIZE + self.header.data_len

    @property
    def compression(self) -> Compression:
        return self.header.compression

    @property
    def was_running(self) -> bool:
        return bool(self.header.was_running)

    @property
    def complete(self) -> bool:
        return self.header.complete

    def summary(self) -> dict[str, Any]:
        """What ``vmferry inspect`` shows of the container."""
        h = self.header
        return {"domain": self.name, "domain_type": self.domain_type, "machine": self.machine, "arch": self.arch,
                "was_running": self.was_running, "compression": self.compression.label,
                "complete": self.complete, "version": h.version, "byte_order": "little" if h.byteorder == "<" else "big",
                "data_len": h.data_len, "xml_bytes": len(self.xml.encode()),
                "cookie_bytes": len(self.cookie.encode()) if self.cookie is not None else None,
                "stream_offset": self.payload_offset}

    def with_xml(self, xml: str) -> SaveImage:
        """This image with another domain XML, written as ``virsh save-image-define`` writes it.

        virQEMUSaveDataWrite: the XML and the cookie each with its NUL, the
        cookie offset moved to follow the XML, zeros up to ``data_len``;
        ``data_len`` is kept when they fit (so the stream stays where it was)
        and otherwise set as a fresh save sets it (their length + 64 KiB),
        where libvirt's own edit would refuse ("new xml too large to fit in file").
        """
        x = xml.encode() + b"\0"
        c = self.cookie.encode() + b"\0" if self.cookie is not None else b""
        if b"\0" in x[:-1] or b"\0" in c[:-1]:
            raise EncodeError("a NUL inside the XML or cookie", "$.libvirt.xml")
        length = len(x) + len(c)
        data_len = self.header.data_len if length <= self.header.data_len else length + PADDING
        if data_len > MAX_DATA_LEN:
            raise EncodeError(f"the XML and cookie need {data_len} bytes, more than libvirt reads ({MAX_DATA_LEN})",
                              "$.libvirt.xml")
        header = replace(self.header, data_len=data_len, cookie_offset=len(x) if c else 0)
        data = x + c + bytes(data_len - length)
        raw = header.pack()
        return parse(raw + data, allow_partial=True)

    def with_machine(self, machine: str) -> SaveImage:
        """This image with ``<os><type machine=...>`` set to ``machine``; nothing else in the XML changes."""
        if not re.compile(_MACHINE_RE).fullmatch(machine):
            raise EncodeError(f"not a machine type name: {machine!r}", "$.libvirt.xml.os.type.machine")
        xml = self.xml.encode()
        start, end = self._type_tag
        tag = xml[start:end]
        for m in re.compile(_ATTR_RE).finditer(tag):
            if m.group(2) == b"machine":
                quote = b"'" if m.group(4) is not None else b'"'
                new = m.group(1) + m.group(2) + m.group(3) + quote + machine.encode() + quote
                tag = tag[:m.start()] + new + tag[m.end():]
                break
        else:
            tag = b"<type machine='" + machine.encode() + b"'" + tag[len(b"<type"):]
        return self.with_xml((xml[:start] + tag + xml[end:]).decode())

    def with_emulator(self, emulator: str) -> SaveImage:
        """This image with ``<devices><emulator>`` set to ``emulator`` (an absolute path): the QEMU binary
        libvirt runs for the restored domain.  Added after ``<devices>`` when the XML has none."""
        if not emulator.startswith("/") or any(c in emulator for c in "\0\n"):
            raise EncodeError(f"not an absolute path for <emulator>: {emulator!r}", "$.libvirt.xml.devices.emulator")
        text = emulator.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").encode()  # XML text
        xml = self.xml.encode()  # the offsets the parse found are the XML's bytes
        if len(self._emulators) > 1:
            raise EncodeError("the domain XML has more than one <emulator>", "$.libvirt.xml.devices.emulator")
        if self._emulators:
            start, end = self._emulators[0]
            if start == end and xml[start - 2:start] == b"/>":  # <emulator/>: no text to replace
                start -= 2
                text = b">" + text + b"</emulator>"
            return self.with_xml((xml[:start] + text + xml[end:]).decode())
        if self._devices_at is None:
            raise EncodeError("the domain XML has no <devices> to hold an <emulator>", "$.libvirt.xml.devices")
        at = self._devices_at
        return self.with_xml((xml[:at] + b"<emulator>" + text + b"</emulator>" + xml[at:]).decode())

    def with_device_properties(self, alias: str, properties: dict[str, bool]) -> SaveImage:
        """This image with ``properties`` set on the QEMU device libvirt calls ``alias``: a ``<qemu:override>``
        (libvirt 8.2 and later) added before ``</domain>``, its namespace declared on itself.  Refused when the
        XML has a ``<qemu:override>`` already (the two would have to be merged by hand)."""
        if self._overrides:
            raise EncodeError("the domain XML has a <qemu:override> already; add the properties "
                              f"{', '.join(properties)} of device {alias} to it by hand", "$.libvirt.xml")
        if self._domain_end is None or not re.compile(r"[\w.-]+").fullmatch(alias):
            raise EncodeError(f"cannot add a <qemu:override> for device {alias!r}", "$.libvirt.xml")
        props = "".join(f"<qemu:property name='{name}' type='bool' value='{'true' if value else 'false'}'/>"
                        for name, value in properties.items())
        override = (f"  <qemu:override xmlns:qemu='{QEMU_NAMESPACE}'>\n    <qemu:device alias='{alias}'>\n"
                    f"      <qemu:frontend>{props}</qemu:frontend>\n    </qemu:device>\n  </qemu:override>\n")
        xml = self.xml.encode()
        at = self._domain_end
        return self.with_xml((xml[:at] + override.encode() + xml[at:]).decode())


def parse(head: bytes | bytearray | memoryview, *, allow_partial: bool = False, offset: int = 0) -> SaveImage:
    """The image whose first bytes are ``head`` (at least header + data_len of them; more are ignored).

    ``allow_partial`` accepts an image libvirt never finished (``LibvirtQemudPart``),
    which ``virsh restore`` refuses ("save image is incomplete").
    """
    header = parse_header(head, offset)
    if not header.complete and not allow_partial:
        raise DecodeError("the save image is incomplete (libvirt had not finished writing it)", offset,
                          "$.libvirt.header.magic")
    end = HEADER_SIZE + header.data_len
    if len(head) < end:
        raise TruncatedError(f"libvirt save data truncated: expected {header.data_len} bytes, "
                             f"got {len(head) - HEADER_SIZE}", offset + len(head), "$.libvirt.data")
    data = bytes(head[HEADER_SIZE:end])
    xml_end = header.cookie_offset or header.data_len
    xml = _cstring(data, 0, xml_end, "domain XML", "$.libvirt.xml")
    cookie = None
    if header.cookie_offset:
        cookie = _cstring(data, header.cookie_offset, header.data_len, "cookie", "$.libvirt.cookie")
    xml_text = _utf8(xml, offset + HEADER_SIZE, "$.libvirt.xml")
    cookie_text = None
    if cookie is not None:
        cookie_text = _utf8(cookie, offset + HEADER_SIZE + header.cookie_offset, "$.libvirt.cookie")
    facts = _xml_facts(xml, offset + HEADER_SIZE)
    return SaveImage(header, data, bytes(head[:HEADER_SIZE]), xml_text, cookie_text, facts.name, facts.domain_type,
                     facts.machine, facts.arch, facts.balloon, facts.type_tag or (0, 0), facts.devices_at,
                     facts.emulators, facts.domain_end, facts.overrides)


# ---------------------------------------------------------------------------
# chunks in, chunks out
# ---------------------------------------------------------------------------

Chunk = bytes | bytearray | memoryview


def split(chunks: Iterable[Chunk], *, allow_partial: bool = False) -> tuple[SaveImage, Iterator[Chunk]]:
    """Read the image head from ``chunks``; the image and the chunks of the stored stream after it.

    Only the head is copied; the rest of the chunk that holds its end and
    every later chunk are handed on as they come.
    """
    it = iter(chunks)
    buf = bytearray()
    need = HEADER_SIZE
    tail: memoryview | None = None
    while True:
        chunk = next(it, None)
        if chunk is None:
            if len(buf) < HEADER_SIZE:
                parse_header(buf)  # raises TruncatedError
            parse(buf, allow_partial=allow_partial)  # raises TruncatedError
        view = memoryview(chunk).cast("B") if chunk is not None else memoryview(b"")
        take = need - len(buf)
        buf += view[:take]
        if len(buf) >= HEADER_SIZE and need == HEADER_SIZE:
            need = HEADER_SIZE + parse_header(buf).data_len
            buf += view[take:take + need - HEADER_SIZE]
            take += need - HEADER_SIZE
        if len(buf) >= need:
            tail = view[take:]
            break
    image = parse(buf, allow_partial=allow_partial)

    def rest() -> Iterator[Chunk]:
        if tail is not None and len(tail):
            yield tail
        yield from it

    return image, rest()


def encode(image: SaveImage, stored: Iterable[Chunk]) -> Iterator[Chunk]:
    """The file: ``image.head``, then ``stored``, the stream as the image stores it (see :func:`compress`)."""
    yield image.head
    yield from stored


def qemu_stream(image: SaveImage, stored: Iterable[Chunk]) -> Iterator[Chunk]:
    """QEMU's migration stream from the stored chunks that follow ``image``'s head: decompressed, lazily."""
    return decompress(stored, image.compression, image.payload_offset)


# ---------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------


def decompress(chunks: Iterable[Chunk], compression: Compression, offset: int = 0) -> Iterator[Chunk]:
    """``chunks`` decompressed as ``PROG -dc`` would, in pieces of at most :data:`MAX_CHUNK` bytes.

    ``offset`` is where the compressed data starts in the file; a
    DecodeError names the offset of the compressed chunk where it was found.
    Input after the end of the compressed data is an error, as is input
    that ends inside it.
    """
    if compression == Compression.RAW:
        return iter(chunks)
    # each library is imported when an image needs it: reading a raw image (the common case) loads none
    if compression == Compression.GZIP:
        return _zlib_like(chunks, lambda: zlib.decompressobj(wbits=31), offset, "gzip", zlib.error)
    if compression == Compression.BZIP2:
        import bz2

        return _zlib_like(chunks, bz2.BZ2Decompressor, offset, "bzip2", OSError)
    if compression == Compression.XZ:
        import lzma

        return _zlib_like(chunks, lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), offset, "xz", lzma.LZMAError)
    if compression == Compression.ZSTD:
        zstd = _zstd_module()
        if zstd is None:
            raise DecodeError("a zstd-compressed image needs backports.zstd (vmferry[libvirt]) before Python 3.14",
                              offset, "$.libvirt.stream.zstd")
        return _zlib_like(chunks, zstd.ZstdDecompressor, offset, "zstd", zstd.ZstdError)
    if compression == Compression.LZOP:
        return _lzop_decode(chunks, offset)
    raise DecodeError(f"cannot decompress {compression.label}", offset, "$.libvirt.stream")


def _zlib_like(chunks: Iterable[Chunk], make: Any, offset: int, what: str,
               damaged: type[Exception]) -> Iterator[bytes]:
    """gzip, bzip2, xz, zstd: concatenated members (streams) as ``PROG -dc`` reads them, with bounded output;
    ``damaged``: the library's own error for bad data."""
    path = f"$.libvirt.stream.{what}"
    d = make()
    is_zlib = isinstance(d, type(zlib.decompressobj()))
    pos = offset  # file offset of the next chunk
    fed = False
    for chunk in chunks:
        data = bytes(chunk)
        at = pos
        pos += len(data)
        while data or fed and not d.eof:
            if d.eof:
                d = make()  # the next member: anything else there is damage
            fed = True
            try:
                out = d.decompress(data, MAX_CHUNK)
            except (damaged, OSError, EOFError, ValueError) as e:
                raise DecodeError(f"{what} data damaged: {e}", at, path) from None
            if out:
                yield out
            if d.eof:
                data = d.unused_data
                if not data:
                    break
            elif is_zlib:
                data = d.unconsumed_tail
                if not data and len(out) < MAX_CHUNK:
                    break  # all input taken and no output held back
            else:
                data = b""
                if d.needs_input:
                    break
    if not fed:
        raise TruncatedError(f"no {what} data after the save image header", pos, path)
    if not d.eof:
        raise TruncatedError(f"the {what} data ends early", pos, path)


def _zstd_module() -> Any:
    """CPython 3.14's ``compression.zstd``, or its backport ``backports.zstd`` (same API as lzma's)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        try:
            from backports import zstd  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return None
    return zstd



# lzop's file format (lzop 1.04, src/lzop.h / src/p_lzo.c)
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
_F_ADLER32_D, _F_ADLER32_C, _F_STDIN, _F_STDOUT = 0x1, 0x2, 0x4, 0x8
_F_H_EXTRA_FIELD, _F_H_FILTER, _F_H_CRC32, _F_CRC32_D, _F_CRC32_C = 0x40, 0x800, 0x1000, 0x100, 0x200
_F_OS_UNIX = 0x03000000
#: lzop's MAX_BLOCK_SIZE: no block of a valid file decompresses to more.
LZOP_MAX_BLOCK = 64 << 20
#: lzop's default block size.
LZOP_BLOCK = 256 << 10
_LZO1X_METHODS = (1, 2, 3)  # M_LZO1X_1, M_LZO1X_1_15, M_LZO1X_999: one bitstream


class _Bytes:
    """Pulls exact byte counts from an iterable of chunks (for lzop's framing), counting the offset."""

    def __init__(self, chunks: Iterable[Chunk], offset: int) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()
        self._start = 0
        self.pos = offset

    def take(self, n: int, path: str) -> bytes:
        while len(self._buf) - self._start < n:
            chunk = next(self._it, None)
            if chunk is None:
                raise TruncatedError(f"lzop data truncated: expected {n} bytes, got {len(self._buf) - self._start}",
                                     self.pos + len(self._buf) - self._start, path)
            if self._start:
                del self._buf[:self._start]
                self._start = 0
            self._buf += chunk
        out = bytes(self._buf[self._start:self._start + n])
        self._start += n
        self.pos += n
        return out

    def at_end(self) -> bool:
        while len(self._buf) - self._start == 0:
            chunk = next(self._it, None)
            if chunk is None:
                return True
            self._buf = bytearray(chunk)
            self._start = 0
        return False


def _lzo() -> Any:
    try:
        import lzallright
    except ImportError:
        return None
    return lzallright


def _lzop_decode(chunks: Iterable[Chunk], offset: int) -> Iterator[bytes]:
    path = "$.libvirt.stream.lzop"
    lib = _lzo()
    if lib is None:
        raise DecodeError("an lzop-compressed image needs the lzallright package (vmferry[libvirt]), or decompress it "
                          "with lzop first", offset, path)
    src = _Bytes(chunks, offset)
    first = True
    while first or not src.at_end():  # lzop -dc reads concatenated files too
        first = False
        at = src.pos
        if src.take(9, path + ".magic") != LZOP_MAGIC:
            raise DecodeError("not lzop data (bad magic)", at, path + ".magic")
        hstart = src.pos
        head = bytearray(src.take(6, path + ".header"))
        version, _lib_version, _needed = struct.unpack(">HHH", head[:6])
        if version < 0x0940:
            raise DecodeError(f"lzop file version {version:#x} is older than vmferry reads (0x0940)", hstart, path)
        head += src.take(2 + 4 + 4 + 4 + 4 + 1, path + ".header")
        method, _level, flags, _mode, _mt_lo, _mt_hi, name_len = struct.unpack(">BBIIIIB", head[6:])
        if method not in _LZO1X_METHODS:
            raise DecodeError(f"lzop method {method} is not an LZO1X method", hstart + 6, path + ".method")
        if flags & _F_H_FILTER:
            raise DecodeError("lzop filters are not supported", hstart + 8, path + ".flags")
        head += src.take(name_len, path + ".name")
        check = struct.unpack(">I", src.take(4, path + ".header_checksum"))[0]
        want = zlib.crc32(head) if flags & _F_H_CRC32 else zlib.adler32(head)
        if check != want:
            raise DecodeError(f"lzop header checksum {check:#010x}, computed {want:#010x}", src.pos - 4, path)
        if flags & _F_H_EXTRA_FIELD:
            extra_len = struct.unpack(">I", src.take(4, path + ".extra"))[0]
            if extra_len > LZOP_MAX_BLOCK:
                raise DecodeError(f"lzop extra field of {extra_len} bytes", src.pos - 4, path + ".extra")
            src.take(extra_len + 4, path + ".extra")
        while True:
            at = src.pos
            dst_len = struct.unpack(">I", src.take(4, path + ".block"))[0]
            if dst_len == 0:
                break
            src_len = struct.unpack(">I", src.take(4, path + ".block"))[0]
            if dst_len > LZOP_MAX_BLOCK or src_len > dst_len or src_len == 0:
                raise DecodeError(f"lzop block of {src_len} bytes for {dst_len}", at, path + ".block")
            d_adler = struct.unpack(">I", src.take(4, path))[0] if flags & _F_ADLER32_D else None
            d_crc = struct.unpack(">I", src.take(4, path))[0] if flags & _F_CRC32_D else None
            c_adler = c_crc = None
            if src_len < dst_len:
                c_adler = struct.unpack(">I", src.take(4, path))[0] if flags & _F_ADLER32_C else None
                c_crc = struct.unpack(">I", src.take(4, path))[0] if flags & _F_CRC32_C else None
            data_at = src.pos
            data = src.take(src_len, path + ".block")
            if c_adler is not None and zlib.adler32(data) != c_adler or c_crc is not None and zlib.crc32(data) != c_crc:
                raise DecodeError("lzop block checksum (compressed) does not match", data_at, path + ".block")
            if src_len < dst_len:
                try:
                    out = lib.LZOCompressor().decompress(data, output_size_hint=dst_len)
                except Exception as e:  # noqa: BLE001 - lzallright raises its own LZOError types
                    raise DecodeError(f"lzop block damaged: {e}", data_at, path + ".block") from None
                if len(out) != dst_len:
                    raise DecodeError(f"lzop block gave {len(out)} bytes, its header says {dst_len}", data_at,
                                      path + ".block")
            else:
                out = data
            if d_adler is not None and zlib.adler32(out) != d_adler or d_crc is not None and zlib.crc32(out) != d_crc:
                raise DecodeError("lzop block checksum does not match", data_at, path + ".block")
            yield out


def _lzop_encode(chunks: Iterable[Chunk], block: int = LZOP_BLOCK) -> Iterator[bytes]:
    """What ``lzop -c`` writes from a pipe (method LZO1X-1, adler32 of each block, no name, mtime 0)."""
    lib = _lzo()
    if lib is None:
        raise EncodeError("lzop compression needs the lzallright package (vmferry[libvirt])", "$.libvirt.stream.lzop")
    flags = _F_ADLER32_D | _F_STDIN | _F_STDOUT | _F_OS_UNIX
    head = struct.pack(">HHHBBIIIIB", 0x1040, 0x20A0, 0x0940, 1, 5, flags, 0, 0, 0, 0)
    yield LZOP_MAGIC + head + struct.pack(">I", zlib.adler32(head))
    comp = lib.LZOCompressor()
    pending = bytearray()

    def blocks(final: bool) -> Iterator[bytes]:
        while len(pending) >= block or (final and pending):
            raw = bytes(pending[:block])
            del pending[:block]
            packed = comp.compress(raw)
            body = packed if len(packed) < len(raw) else raw
            yield struct.pack(">III", len(raw), len(body), zlib.adler32(raw)) + body

    for chunk in chunks:
        pending += chunk
        yield from blocks(False)
    yield from blocks(True)
    yield b"\0\0\0\0"


def compress(chunks: Iterable[Chunk], compression: Compression) -> Iterator[Chunk]:
    """``chunks`` compressed so that libvirt's ``PROG -dc`` reads them back.

    The settings are the programs' defaults as libvirt runs them: gzip
    level 6, bzip2 level 9, xz preset 3 (``xz -c -3``) with CRC64, zstd level
    3 with its checksum, lzop LZO1X-1 in 256 KiB blocks.
    """
    if compression == Compression.RAW:
        yield from chunks
        return
    if compression == Compression.LZOP:
        yield from _lzop_encode(chunks)
        return
    c: Any
    if compression == Compression.GZIP:
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
    elif compression == Compression.BZIP2:
        import bz2

        c = bz2.BZ2Compressor(9)
    elif compression == Compression.XZ:
        import lzma

        c = lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=3)
    elif compression == Compression.ZSTD and (zstd := _zstd_module()) is not None:
        c = zstd.ZstdCompressor(options={zstd.CompressionParameter.compression_level: 3,
                                         zstd.CompressionParameter.checksum_flag: 1})
    else:
        raise EncodeError(f"cannot compress as {compression.label}", "$.libvirt.stream")
    for chunk in chunks:
        out = c.compress(bytes(chunk))
        if out:
            yield out
    yield c.flush()
