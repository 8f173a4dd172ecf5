"""vmferry.encode.libvirt_save: libvirt's save image container, without libvirt.

The images here are written by :func:`write_like_libvirt`, which follows
libvirt 9.0's virQEMUSaveDataWrite/virQEMUSaveDataFinish byte for byte
(tests/test_libvirt_real.py checks the container against images a real
libvirtd wrote); the QEMU stream inside is a real one from the corpus.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmferry.encode import legacy
from vmferry.encode import libvirt_save as ls
from vmferry.encode.libvirt_save import HEADER_SIZE, MAGIC, PADDING, Compression
from vmferry.errors import DecodeError, EncodeError, TruncatedError

#: The shape of the XML libvirt 9.0 stores (from a real ``virsh save``, paths shortened).
XML = """<domain type='kvm'>
  <name>t1</name>
  <uuid>40411c2b-3956-42c2-bfc5-89eaa1d2f99f</uuid>
  <memory unit='KiB'>65536</memory>
  <currentMemory unit='KiB'>65536</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-2.12'>hvm</type>
    <boot dev='fd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='floppy'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/t1/boot.img'/>
      <target dev='fda' bus='fdc'/>
    </disk>
  </devices>
</domain>
"""
COOKIE = """<cookie>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <slirpHelper/>
</cookie>
"""
ALL = list(Compression)[:-1]  # every compression but sparse


def write_like_libvirt(xml: str, cookie: str | None, stream: bytes, compression: Compression = Compression.RAW,
                       was_running: bool = True, order: str = "<", version: int = 2) -> bytes:
    """A save image as libvirt 9.0 writes it (virQEMUSaveDataWrite + virQEMUSaveDataFinish)."""
    x = xml.encode() + b"\0"
    c = cookie.encode() + b"\0" if cookie is not None else b""
    data_len = len(x) + len(c) + PADDING
    header = struct.pack(order + "16s5I14I", MAGIC, version, data_len, int(was_running), int(compression),
                         len(x) if cookie is not None else 0, *([0] * 14))
    body = b"".join(ls.compress([stream], compression)) if version >= 2 else stream
    return header + x + c + bytes(PADDING) + body


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture(scope="module")
def stream(qemu_corpus) -> bytes:
    return qemu_corpus["pc-7.2-paused"].read_bytes()


# ---------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------


def test_header_layout_is_libvirts():
    assert HEADER_SIZE == 92  # 16 magic + 5 words + 14 unused words
    assert ls.sniff(MAGIC) and ls.sniff(b"LibvirtQemudPart") and not ls.sniff(b"QEVM\0\0\0\3")


@pytest.mark.parametrize("compression", ALL, ids=lambda c: c.label)
def test_split_gives_the_image_and_the_stream(stream, compression):
    image_bytes = write_like_libvirt(XML, COOKIE, stream, compression)
    for size in (1, 91, 92, 4096, len(image_bytes)):
        if size == 1 and compression != Compression.RAW:
            continue  # byte-sized chunks through a decompressor: the 92-byte sizes below cover the head
        image, rest = ls.split(chunked(image_bytes, size))
        assert image.name == "t1" and image.machine == "pc-i440fx-2.12" and image.domain_type == "kvm"
        assert image.was_running and image.compression == compression and image.complete
        assert image.xml == XML and image.cookie == COOKIE
        assert image.head == image_bytes[:image.payload_offset]
        stored = [bytes(c) for c in rest]
        assert b"".join(ls.encode(image, stored)) == image_bytes  # byte for byte
        assert b"".join(bytes(c) for c in ls.qemu_stream(image, stored)) == stream


@pytest.mark.parametrize("compression", ALL, ids=lambda c: c.label)
def test_the_stream_inside_round_trips_through_the_legacy_codec(stream, compression):
    image, rest = ls.split(chunked(write_like_libvirt(XML, COOKIE, stream, compression), 65536))
    again = b"".join(bytes(c) for c in legacy.encode(legacy.decode(ls.qemu_stream(image, rest))))
    assert again == stream


def test_summary_and_no_cookie():
    image = ls.parse(write_like_libvirt(XML, None, b"", was_running=False))
    s = image.summary()
    assert s["cookie_bytes"] is None and s["data_len"] == len(XML) + 1 + PADDING
    assert s["was_running"] is False and s["compression"] == "raw" and s["stream_offset"] == HEADER_SIZE + s["data_len"]


def test_big_endian_header_reads_and_writes_back():
    data = write_like_libvirt(XML, COOKIE, b"", Compression.XZ, order=">")
    image = ls.parse(data)
    assert image.header.byteorder == ">" and image.compression == Compression.XZ
    assert image.header.pack() == data[:HEADER_SIZE]
    moved = image.with_machine("pc-i440fx-7.2")
    assert moved.raw_header[:24] == struct.pack(">16s2I", MAGIC, 2, image.header.data_len)


def test_version_1_is_always_raw():
    image = ls.parse(write_like_libvirt(XML, None, b"", Compression.GZIP, version=1))
    assert image.header.compressed == 1 and image.compression == Compression.RAW


# ---------------------------------------------------------------------------
# rewriting the machine type
# ---------------------------------------------------------------------------


def test_with_machine_changes_only_the_attribute():
    before = ls.parse(write_like_libvirt(XML, COOKIE, b""))
    after = before.with_machine("pc-i440fx-7.2")
    assert after.machine == "pc-i440fx-7.2" and after.name == "t1"
    assert after.xml == XML.replace("machine='pc-i440fx-2.12'", "machine='pc-i440fx-7.2'")
    # as save-image-define writes it: data_len kept, cookie right after the XML, zeros to the end
    assert after.header.data_len == before.header.data_len
    assert after.header.cookie_offset == len(after.xml.encode()) + 1
    assert after.cookie == COOKIE and after.payload_offset == before.payload_offset
    assert after.data == after.xml.encode() + b"\0" + COOKIE.encode() + b"\0" + bytes(
        before.header.data_len - len(after.xml.encode()) - len(COOKIE.encode()) - 2)
    assert after.raw_header[:20] == before.raw_header[:20] and after.raw_header[36:] == before.raw_header[36:]
    assert after.with_machine("pc-i440fx-2.12").head == before.head  # back again: the same bytes


def test_with_machine_other_spellings():
    dq = XML.replace("<type arch='x86_64' machine='pc-i440fx-2.12'>", '<type machine = "pc-q35-2.12"  arch="x86_64">')
    image = ls.parse(write_like_libvirt(dq, None, b""))
    assert image.machine == "pc-q35-2.12"
    assert '<type machine = "pc-q35-7.2"  arch="x86_64">' in image.with_machine("pc-q35-7.2").xml
    bare = XML.replace(" machine='pc-i440fx-2.12'", "")
    image = ls.parse(write_like_libvirt(bare, None, b""))
    assert image.machine is None
    assert "<type machine='pc-i440fx-7.2' arch='x86_64'>hvm</type>" in image.with_machine("pc-i440fx-7.2").xml
    # a <type> elsewhere (a disk driver's) is not the machine's
    assert image.with_machine("pc-i440fx-7.2").xml.count("pc-i440fx-7.2") == 1
    with pytest.raises(Exception, match="not a machine type name"):
        image.with_machine("pc'><evil/>")


def test_with_emulator_sets_the_qemu_binary():
    image = ls.parse(write_like_libvirt(XML, COOKIE, b""))
    moved = image.with_emulator("/srv/qemu 11.1/run&exec")
    assert moved.xml == XML.replace("/usr/bin/qemu-system-x86_64", "/srv/qemu 11.1/run&amp;exec")
    assert moved.cookie == COOKIE and moved.machine == image.machine and moved.name == "t1"
    assert moved.with_emulator("/usr/bin/qemu-system-x86_64").head == image.head  # back again: the same bytes
    none = ls.parse(write_like_libvirt(XML.replace("    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n", ""),
                                       None, b""))
    assert "<devices><emulator>/opt/q</emulator>\n" in none.with_emulator("/opt/q").xml
    for bad, message in (("qemu-system-x86_64", "not an absolute path"), ("/a\nb", "not an absolute path")):
        with pytest.raises(EncodeError, match=message):
            image.with_emulator(bad)
    twice = XML.replace("</devices>", "<emulator>/b</emulator></devices>")
    with pytest.raises(EncodeError, match="more than one <emulator>"):
        ls.parse(write_like_libvirt(twice, None, b"")).with_emulator("/c")
    with pytest.raises(EncodeError, match="no <devices>"):
        ls.parse(write_like_libvirt(XML.replace("<devices>", "<x>").replace("</devices>", "</x>").replace(
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>", ""), None, b"")).with_emulator("/c")


def test_with_emulator_finds_the_element_the_parser_finds():
    """An <emulator> or <devices> in a comment, in a CDATA section or under another element is not the domain's;
    an empty <emulator/> gets its text."""
    decoys = XML.replace("<devices>", "<!-- <devices><emulator>/old</emulator> --><devices>", 1).replace(
        "</domain>", "<metadata><x:devices xmlns:x='urn:x'><emulator>/meta</emulator></x:devices></metadata>"
                     "<description><![CDATA[<emulator>/cdata</emulator>]]></description></domain>")
    moved = ls.parse(write_like_libvirt(decoys, None, b"")).with_emulator("/opt/q")
    assert moved.xml == decoys.replace("<emulator>/usr/bin/qemu-system-x86_64<", "<emulator>/opt/q<")
    empty = ls.parse(write_like_libvirt(XML.replace("<emulator>/usr/bin/qemu-system-x86_64</emulator>",
                                                    "<emulator />"), None, b""))
    assert "<emulator >/opt/q</emulator>" in empty.with_emulator("/opt/q").xml
    blank = ls.parse(write_like_libvirt(XML.replace("/usr/bin/qemu-system-x86_64</emulator>", "</emulator>"),
                                        None, b""))
    assert "<emulator>/opt/q</emulator>" in blank.with_emulator("/opt/q").xml
    no_devices = XML.replace("<devices>", "<!-- <devices> --><x>").replace("</devices>", "</x>").replace(
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>", "")
    with pytest.raises(EncodeError, match="no <devices>"):
        ls.parse(write_like_libvirt(no_devices, None, b"")).with_emulator("/c")


BALLOON = "    <memballoon model='virtio'>\n      <alias name='balloon0'/>\n    </memballoon>\n  </devices>"


def test_with_device_properties_adds_a_qemu_override():
    image = ls.parse(write_like_libvirt(XML.replace("  </devices>", BALLOON), COOKIE, b""))
    assert image.balloon == "balloon0" and ls.parse(write_like_libvirt(XML, None, b"")).balloon is None
    pinned = image.with_device_properties("balloon0", {"page-poison": False})
    override = pinned.xml[pinned.xml.index("  <qemu:override"):pinned.xml.index("</domain>")]
    assert pinned.xml == image.xml.replace("</domain>", override + "</domain>")  # nothing else changed
    assert f"xmlns:qemu='{ls.QEMU_NAMESPACE}'" in override and "<qemu:device alias='balloon0'>" in override
    assert "<qemu:property name='page-poison' type='bool' value='false'/>" in override
    assert pinned.cookie == COOKIE and pinned.balloon == "balloon0"
    # an XML with an override already is left to the operator (libvirt would not merge two); another prefix counts
    other = pinned.xml.replace("qemu:", "q:").replace("xmlns:qemu=", "xmlns:q=")
    for xml in (pinned.xml, other):
        with pytest.raises(EncodeError, match="has a <qemu:override> already"):
            ls.parse(write_like_libvirt(xml, None, b"")).with_device_properties("balloon0", {"page-poison": True})
    with pytest.raises(EncodeError, match="cannot add"):
        image.with_device_properties("a'b", {"page-poison": True})


def test_the_balloon_alias_is_the_domain_s_virtio_balloon():
    def balloon(devices: str) -> str | None:
        return ls.parse(write_like_libvirt(XML.replace("  </devices>", devices + "\n  </devices>"), None, b"")).balloon

    assert balloon("<memballoon model='virtio-transitional'><alias name='ua-b'/></memballoon>") == "ua-b"
    assert balloon("<memballoon model='virtio'/>") == "balloon0"  # no alias: libvirt's own
    assert balloon("<memballoon model='none'/>") is None
    assert balloon("<!-- <memballoon model='virtio'/> -->") is None


def test_with_xml_grows_data_len_only_when_it_must():
    image = ls.parse(write_like_libvirt(XML, COOKIE, b""))
    longer = image.with_xml(XML + "<!--" + "x" * (PADDING + 10) + "-->")
    need = len(longer.xml.encode()) + 1 + len(COOKIE.encode()) + 1
    assert longer.header.data_len == need + PADDING  # what a fresh save would write


# ---------------------------------------------------------------------------
# damage: clean errors with offsets
# ---------------------------------------------------------------------------


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


GOOD = write_like_libvirt(XML, COOKIE, b"QEVM\0\0\0\3", Compression.RAW)


@pytest.mark.parametrize("at, value, path, offset, message", [
    (0, b"LibvirtQemudSavX", "$.libvirt.header.magic", 0, "not a libvirt save image"),
    (0, b"LibvirtQemudPart", "$.libvirt.header.magic", 0, "incomplete"),
    (16, struct.pack("<I", 3), "$.libvirt.header.version", 16, "version 3"),
    (16, struct.pack("<I", 0), "$.libvirt.header.version", 16, "version 0"),
    (20, struct.pack("<I", 0), "$.libvirt.header.data_len", 20, "invalid data length 0"),
    (20, struct.pack("<I", 0xFFFFFFF0), "$.libvirt.header.data_len", 20, "invalid data length"),
    (24, struct.pack("<I", 7), "$.libvirt.header.was_running", 24, "was_running"),
    (28, struct.pack("<I", 9), "$.libvirt.header.compressed", 28, "unknown compression 9"),
    (28, struct.pack("<I", 6), "$.libvirt.header.compressed", 28, "sparse"),
    (32, struct.pack("<I", 0x20000), "$.libvirt.header.cookieOffset", 32, "cookie offset"),
    (HEADER_SIZE, b"<domain type='kvm'><os>", "$.libvirt.xml", None, "not well-formed"),
    (HEADER_SIZE, b"<!DOCTYPE d [<!ENTITY a 'b'>]>", "$.libvirt.xml", None, "DTD"),
    (HEADER_SIZE + 5, b"\xff", "$.libvirt.xml", HEADER_SIZE + 5, "UTF-8"),
])
def test_damaged_head(at, value, path, offset, message):
    with pytest.raises(DecodeError, match=message) as e:
        ls.split([_patched(GOOD, at, value)])
    assert e.value.path == path
    if offset is not None:
        assert e.value.offset == offset
    else:  # somewhere in the XML (expat's position)
        assert HEADER_SIZE <= e.value.offset < len(GOOD)


def test_xml_without_nul_or_os_type():
    whole = GOOD[:HEADER_SIZE] + b"<domain/>" * 10
    bad = struct.pack("<16s5I14I", MAGIC, 2, len(b"<domain/>" * 10), 1, 0, 0, *([0] * 14)) + b"<domain/>" * 10
    with pytest.raises(DecodeError, match="no terminating NUL"):
        ls.parse(bad)
    assert whole  # (same header, wrong length: covered by the truncation test)
    no_os = write_like_libvirt("<domain type='qemu'><name>x</name></domain>", None, b"")
    with pytest.raises(DecodeError, match="no <os><type>") as e:
        ls.parse(no_os)
    assert e.value.path == "$.libvirt.xml.os.type"


def test_partial_images_only_when_asked():
    partial = _patched(GOOD, 0, b"LibvirtQemudPart")
    image, _ = ls.split([partial], allow_partial=True)
    assert not image.complete and image.machine == "pc-i440fx-2.12"


def test_truncated_at_every_offset_of_the_head():
    head_len = HEADER_SIZE + ls.parse(GOOD).header.data_len
    for n in list(range(0, HEADER_SIZE + 40)) + list(range(head_len - 40, head_len)):
        with pytest.raises(TruncatedError) as e:
            ls.split(chunked(GOOD[:n], 7) if n else [])
        assert e.value.offset == n


@pytest.mark.parametrize("compression", ALL[1:], ids=lambda c: c.label)
def test_truncated_or_damaged_stored_stream(stream, compression):
    data = write_like_libvirt(XML, COOKIE, stream, compression)
    image = ls.parse(data)
    body = data[image.payload_offset:]
    rng = random.Random(int(compression))
    for cut in sorted({1, 5, len(body) // 2, len(body) - 1, *rng.sample(range(1, len(body)), 10)}):
        with pytest.raises(DecodeError):
            for _ in ls.qemu_stream(image, chunked(body[:cut], 4096)):
                pass
    with pytest.raises(DecodeError):  # bytes after the end
        for _ in ls.qemu_stream(image, [body, b"garbage!" * 4]):
            pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mutations_of_compressed_streams_fail_cleanly(data, stream):
    compression = data.draw(st.sampled_from(ALL[1:]))
    blob = b"".join(ls.compress([stream[:200_000]], compression))
    pos = data.draw(st.integers(0, len(blob) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = blob[:pos] + bytes([value]) + blob[pos + 1:]
    try:
        for _ in ls.decompress(chunked(mutated, 8192), compression, 1000):
            pass
    except DecodeError as e:
        assert e.offset is not None and e.offset >= 1000


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_random_bytes_after_the_magic(tail):
    try:
        image, rest = ls.split([MAGIC + tail])
        for _ in ls.qemu_stream(image, rest):
            pass
    except DecodeError:
        pass


def test_decompressed_chunks_are_bounded():
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = bomb.compress(bytes(64 << 20)) + bomb.flush()  # 64 MiB of zeros in ~64 KiB
    sizes = [len(c) for c in ls.decompress([blob], Compression.GZIP)]
    assert sum(sizes) == 64 << 20 and max(sizes) <= ls.MAX_CHUNK


@pytest.mark.parametrize("compression", ALL[1:], ids=lambda c: c.label)
def test_libvirts_decompressor_reads_what_vmferry_compresses(stream, compression, tmp_path):
    """``PROG -dc`` (what libvirt runs on restore) gives back the stream vmferry compressed."""
    prog = ls.COMPRESS_COMMANDS[compression][0]
    if shutil.which(prog) is None:
        pytest.skip(f"{prog} not installed")
    blob = b"".join(ls.compress(chunked(stream, 100_000), compression))
    extra = ["--ignore-warn"] if compression == Compression.LZOP else []
    out = subprocess.run([prog, "-dc", *extra], input=blob, capture_output=True, check=True).stdout
    assert out == stream
    # and the other way round: vmferry reads the program's own output
    theirs = subprocess.run(list(ls.COMPRESS_COMMANDS[compression]), input=stream, capture_output=True,
                            check=True).stdout
    assert b"".join(bytes(c) for c in ls.decompress(chunked(theirs, 10_000), compression)) == stream
    if compression in (Compression.BZIP2, Compression.XZ):  # same library, same settings: the same bytes
        assert theirs == blob
