"""libvirt save images through ``vmferry inspect``, ``convert``, ``transform`` and ``diff``.

The images are written as libvirt 9.0 writes them (test_libvirt_save.write_like_libvirt) around real QEMU
streams of the corpus; tests/test_libvirt_real.py does the same with images of a real libvirtd.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_libvirt_save import COOKIE, XML, write_like_libvirt

from vmferry.cli import main
from vmferry.cli.main import build_parser
from vmferry.encode import legacy
from vmferry.encode import libvirt_save as ls
from vmferry.encode.libvirt_save import HEADER_SIZE, Compression
from vmferry.events import Configuration

EVERY = [c for c in Compression if c != Compression.SPARSE]


@pytest.fixture(scope="module")
def stream_212(qemu_corpus) -> bytes:
    return qemu_corpus["pc-2.12-paused"].read_bytes()


@pytest.fixture
def image_212(stream_212, tmp_path) -> Path:
    """A gzip-compressed save image of a pc-i440fx-2.12 guest."""
    path = tmp_path / "t1.save"
    path.write_bytes(write_like_libvirt(XML, COOKIE, stream_212, Compression.GZIP))
    return path


def stream_of(path: Path) -> bytes:
    image, stored = ls.split([path.read_bytes()])
    return b"".join(bytes(c) for c in ls.qemu_stream(image, stored))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vmferry: error: ") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------


def test_inspect_shows_the_image_then_the_stream(image_212, capsys):
    assert main(["inspect", str(image_212)]) == 0
    out = capsys.readouterr().out
    assert f"{image_212}: libvirt save image, version 2, {image_212.stat().st_size:,} bytes" in out
    assert "domain: t1 (type kvm, arch x86_64)" in out and "machine type in the XML: pc-i440fx-2.12" in out
    assert "was running: yes" in out and "compression: gzip" in out
    # the usual summary of the stream inside
    assert "QEMU stream inside: legacy stream, version 3, gzip-compressed" in out
    assert "machine type: pc-i440fx-2.12" in out and "sections" in out and "RAM:" in out
    assert "warning" not in out


def test_inspect_json_has_the_image_and_the_stream(image_212, stream_212, tmp_path, capsys):
    assert main(["inspect", "--json", str(image_212)]) == 0
    doc = json.loads(capsys.readouterr().out)
    lv = doc["libvirt"]
    assert (lv["domain"], lv["machine"], lv["was_running"], lv["compression"]) == ("t1", "pc-i440fx-2.12", True, "gzip")
    assert lv["xml"] == XML and lv["cookie"] == COOKIE and lv["complete"] is True
    assert doc["format"] == "legacy" and doc["machine"] == "pc-i440fx-2.12" and len(doc["devices"]) > 5
    # the stream part is what inspect says of the bare stream
    bare = tmp_path / "bare.mig"
    bare.write_bytes(stream_212)
    assert main(["inspect", "--json", str(bare)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in doc.items() if k != "libvirt"} == plain


def test_inspect_says_when_the_xml_and_the_stream_disagree(stream_212, tmp_path, capsys):
    path = tmp_path / "edited.save"
    path.write_bytes(write_like_libvirt(XML.replace("pc-i440fx-2.12", "pc-i440fx-7.2"), COOKIE, stream_212))
    assert main(["inspect", str(path)]) == 0
    assert "warning: the XML names pc-i440fx-7.2 but the stream was saved under pc-i440fx-2.12" in \
        capsys.readouterr().out


def test_inspect_an_incomplete_image(stream_212, tmp_path, capsys):
    path = tmp_path / "part.save"
    path.write_bytes(b"LibvirtQemudPart" + write_like_libvirt(XML, COOKIE, stream_212)[16:])
    assert main(["inspect", str(path)]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", EVERY, ids=lambda c: c.label)
def test_convert_image_to_image_keeps_every_byte(stream_212, compression, tmp_path):
    src, dst = tmp_path / "in.save", tmp_path / "out.save"
    src.write_bytes(write_like_libvirt(XML, COOKIE, stream_212, compression))
    assert main(["convert", "-q", str(src), str(dst)]) == 0
    assert dst.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600  # as libvirt writes its images: they hold the guest's RAM


@pytest.mark.parametrize("order, version", [(">", 2), ("<", 1)], ids=["big-endian", "version-1"])
def test_convert_keeps_other_headers_too(stream_212, tmp_path, order, version):
    src, dst = tmp_path / "in.save", tmp_path / "out.save"
    src.write_bytes(write_like_libvirt(XML, None, stream_212, order=order, version=version))
    assert main(["convert", "-q", str(src), str(dst)]) == 0
    assert dst.read_bytes() == src.read_bytes()


def test_convert_changes_only_the_compression(stream_212, tmp_path):
    src = tmp_path / "gz.save"
    src.write_bytes(write_like_libvirt(XML, COOKIE, stream_212, Compression.GZIP))
    xz, raw = tmp_path / "xz.save", tmp_path / "raw.save"
    assert main(["convert", "-q", str(src), str(xz), "--compress", "xz"]) == 0
    assert ls.parse(xz.read_bytes()).compression == Compression.XZ and stream_of(xz) == stream_212
    # the head is the input's but for the compression word
    head = src.read_bytes()[:ls.parse(src.read_bytes()).payload_offset]
    assert xz.read_bytes()[:len(head)] == head[:28] + struct.pack("<I", 3) + head[32:]
    # and back to raw: exactly the image libvirt writes uncompressed
    assert main(["convert", "-q", str(xz), str(raw), "--compress", "raw"]) == 0
    assert raw.read_bytes() == write_like_libvirt(XML, COOKIE, stream_212, Compression.RAW)


def test_convert_to_a_format_extracts_the_stream(image_212, stream_212, tmp_path):
    mig, doc, back = tmp_path / "s.mig", tmp_path / "s.json", tmp_path / "back.mig"
    assert main(["convert", "-q", str(image_212), str(mig), "--to", "legacy"]) == 0
    assert mig.read_bytes() == stream_212  # the header, XML and cookie stay behind
    assert main(["convert", "-q", str(image_212), str(doc), "--to", "json"]) == 0
    assert main(["convert", "-q", str(doc), str(back), "--to", "legacy"]) == 0
    assert back.read_bytes() == stream_212


def test_convert_without_to_keeps_a_streams_format(stream_212, tmp_path):
    src, dst = tmp_path / "s.mig", tmp_path / "t.mig"
    src.write_bytes(stream_212)
    assert main(["convert", "-q", str(src), str(dst)]) == 0
    assert dst.read_bytes() == stream_212


def test_convert_refuses_what_an_image_cannot_hold(image_212, stream_212, tmp_path, capsys):
    out = tmp_path / "out.save"
    assert main(["convert", "-q", str(image_212), str(out), "--compress", "lz4"]) == 2
    assert "cannot be compressed as lz4" in one_line_error(capsys)
    mig = tmp_path / "s.mig"
    mig.write_bytes(stream_212)
    assert main(["convert", "-q", str(mig), str(out), "--compress", "gzip"]) == 2
    assert "applies to --to ferry" in one_line_error(capsys)
    part = tmp_path / "part.save"
    part.write_bytes(b"LibvirtQemudPart" + image_212.read_bytes()[16:])
    assert main(["convert", "-q", str(part), str(out)]) == 2
    assert "incomplete" in one_line_error(capsys)
    assert not out.exists() and not list(tmp_path.glob("*partial*"))
    # its stream can still be had
    assert main(["convert", "-q", str(part), str(mig), "--to", "legacy"]) == 0
    assert mig.read_bytes() == stream_212


def test_help_says_what_happens_to_the_container():
    text = subprocess.run([sys.executable, "-m", "vmferry.cli", "convert", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout
    assert "libvirt save image" in text and "byte for byte" in text and "left behind" in text
    text = subprocess.run([sys.executable, "-m", "vmferry.cli", "transform", "--help"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "libvirt save image" in text and "virsh restore" in text
    # one way of doing each thing: the main commands, no separate `vmferry libvirt`
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "libvirt" not in commands and {"inspect", "convert", "transform", "diff"} <= set(commands)


# ---------------------------------------------------------------------------
# transform
# ---------------------------------------------------------------------------


def test_transform_rewrites_the_stream_and_the_xml(image_212, stream_212, tmp_path, capsys):
    out, bare, bare72 = tmp_path / "new.save", tmp_path / "s.mig", tmp_path / "s72.mig"
    assert main(["transform", "-q", str(image_212), str(out), "--machine", "pc-i440fx-7.2"]) == 0
    before, after = ls.parse(image_212.read_bytes()), ls.parse(out.read_bytes())
    assert after.machine == "pc-i440fx-7.2" and after.was_running and after.compression == Compression.GZIP
    assert after.xml == XML.replace("machine='pc-i440fx-2.12'", "machine='pc-i440fx-7.2'")
    assert after.cookie == COOKIE and after.header.data_len == before.header.data_len
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # the stream inside is what transform makes of the bare stream
    bare.write_bytes(stream_212)
    assert main(["transform", "-q", str(bare), str(bare72), "--machine", "pc-i440fx-7.2"]) == 0
    assert stream_of(out) == bare72.read_bytes()
    config = next(ev for ev in legacy.decode([bare72.read_bytes()]) if isinstance(ev, Configuration))
    assert config.machine == "pc-i440fx-7.2"
    # --to extracts the converted stream
    extracted = tmp_path / "x.mig"
    assert main(["transform", "-q", str(image_212), str(extracted), "--machine", "pc-i440fx-7.2", "--to",
                 "legacy"]) == 0
    assert extracted.read_bytes() == bare72.read_bytes()


def test_transform_says_the_persistent_definition_is_left(image_212, tmp_path, capsys):
    capsys.readouterr()
    assert main(["transform", str(image_212), str(tmp_path / "n.save"), "--machine", "pc-i440fx-7.2"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "persistent definition of t1 still names pc-i440fx-2.12" in err
    assert "virsh define" in err


def test_transform_keeps_the_balloon_s_page_poison(stream_212, tmp_path, capsys):
    """libvirt's default memory balloon: 2.12 -> 7.2 crosses hw_compat_5_0 (compat/machines/pinned.py)."""
    src = tmp_path / "b.save"
    src.write_bytes(write_like_libvirt(XML.replace("  </devices>", "    <memballoon model='virtio'/>\n  </devices>"),
                                       COOKIE, stream_212))
    capsys.readouterr()
    assert main(["transform", str(src), str(tmp_path / "n.save"), "--machine", "pc-i440fx-7.2"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "memory balloon (balloon0) keeps page-poison=off" in err and "custom-device" in err
    new = ls.parse((tmp_path / "n.save").read_bytes())
    assert "<qemu:device alias='balloon0'>" in new.xml and "value='false'" in new.xml and new.balloon == "balloon0"
    # within one side of 5.1, or without a balloon, nothing is added
    assert main(["transform", "-q", str(tmp_path / "n.save"), str(tmp_path / "m.save"), "--machine",
                 "pc-i440fx-6.2"]) == 0
    assert ls.parse((tmp_path / "m.save").read_bytes()).xml == new.xml.replace("pc-i440fx-7.2", "pc-i440fx-6.2")


def test_transform_with_another_compression(image_212, tmp_path):
    out = tmp_path / "new.save"
    assert main(["transform", "-q", str(image_212), str(out), "--machine", "pc-i440fx-7.2", "--compress", "xz"]) == 0
    image = ls.parse(out.read_bytes())
    assert image.compression == Compression.XZ and image.machine == "pc-i440fx-7.2"
    assert next(ev for ev in legacy.decode([stream_of(out)]) if isinstance(ev, Configuration)).machine == \
        "pc-i440fx-7.2"


def test_transform_never_writes_over_its_input(image_212, tmp_path, capsys):
    data = image_212.read_bytes()
    link = tmp_path / "link.save"
    link.symlink_to(image_212)
    for out in (image_212, link, tmp_path / "." / image_212.name):
        assert main(["transform", "-q", str(image_212), str(out), "--machine", "pc-i440fx-7.2"]) == 2
        assert "same file" in one_line_error(capsys)
    assert image_212.read_bytes() == data and link.is_symlink()


def test_image_through_pipes(image_212, tmp_path):
    """``-`` in and out: an image read from stdin comes out an image on stdout."""
    run = [sys.executable, "-m", "vmferry.cli"]
    copy = subprocess.run([*run, "convert", "-", "-"], input=image_212.read_bytes(), capture_output=True, timeout=120)
    assert copy.returncode == 0 and copy.stdout == image_212.read_bytes(), copy.stderr
    moved = subprocess.run([*run, "transform", "-q", "-", "-", "--machine", "pc-i440fx-7.2"],
                           input=image_212.read_bytes(), capture_output=True, timeout=120)
    assert moved.returncode == 0, moved.stderr
    assert ls.parse(moved.stdout).machine == "pc-i440fx-7.2"


@pytest.mark.qemu10
def test_which_qemu_wrote_the_image(qemu_corpus, tmp_path):
    """A raw image ends with its stream, vmdesc included: transform reads there that QEMU 10.0 wrote it.

    A compressed image's vmdesc lies at the end of the compressed data, so a
    pc-i440fx-7.2 stream of QEMU 10.0 is taken for 7.2's unless --from-qemu-version says otherwise.
    """
    stream = qemu_corpus["pc-7.2-on-10.0-paused"].read_bytes()
    xml = XML.replace("pc-i440fx-2.12", "pc-i440fx-7.2")
    bare, want = tmp_path / "s.mig", tmp_path / "want.mig"
    bare.write_bytes(stream)
    assert main(["transform", "-q", str(bare), str(want), "--machine", "pc-i440fx-7.2"]) == 0
    assert want.read_bytes() != stream  # 7.2@10.0 -> 7.2@7.2 is not the identity
    raw, gz, out = tmp_path / "raw.save", tmp_path / "gz.save", tmp_path / "out.save"
    raw.write_bytes(write_like_libvirt(xml, COOKIE, stream))
    gz.write_bytes(write_like_libvirt(xml, COOKIE, stream, Compression.GZIP))
    assert main(["transform", "-q", str(raw), str(out), "--machine", "pc-i440fx-7.2"]) == 0
    assert stream_of(out) == want.read_bytes()
    assert main(["transform", "-q", str(gz), str(out), "--machine", "pc-i440fx-7.2", "--from-qemu-version",
                 "10.0"]) == 0
    assert stream_of(out) == want.read_bytes()
    assert main(["transform", "-q", str(gz), str(out), "--machine", "pc-i440fx-7.2"]) == 0
    assert stream_of(out) == stream  # taken for a 7.2 stream: nothing to do


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------


def test_diff_takes_images(image_212, stream_212, tmp_path, capsys):
    moved = tmp_path / "new.save"
    assert main(["transform", "-q", str(image_212), str(moved), "--machine", "pc-i440fx-7.2"]) == 0
    capsys.readouterr()
    assert main(["diff", "--json", str(image_212), str(moved)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["a"]["machine"] == "pc-i440fx-2.12" and report["b"]["machine"] == "pc-i440fx-7.2"
    assert report["differences"] and not report["uncovered"]
    # an image and the bare stream inside it: the same schemas
    bare = tmp_path / "bare.mig"
    bare.write_bytes(stream_212)
    assert main(["diff", "--json", str(image_212), str(bare)]) == 0
    assert json.loads(capsys.readouterr().out)["differences"] == []


# ---------------------------------------------------------------------------
# damage: one line naming the offset, exit 2, nothing written
# ---------------------------------------------------------------------------


def _damaged(raw: bytes, gz: bytes) -> dict[str, tuple[bytes, int | None]]:
    """name -> (image bytes, the offset the error must name, None: only that it names one)."""
    image = ls.parse(raw)
    start, dl = image.payload_offset, image.header.data_len
    return {
        "truncated header": (raw[:60], 60),
        "truncated xml": (raw[:HEADER_SIZE + 300], HEADER_SIZE + 300),
        "truncated raw stream": (raw[:len(raw) - 300], None),
        "truncated gzip stream": (gz[:len(gz) - 300], len(gz) - 300),
        "version flipped": (raw[:16] + bytes([raw[16] ^ 0x40]) + raw[17:], 16),
        "was_running flipped": (raw[:24] + bytes([raw[24] ^ 0x10]) + raw[25:], 24),
        "compressed flipped": (raw[:28] + bytes([raw[28] ^ 0x08]) + raw[29:], 28),
        "cookieOffset flipped": (raw[:34] + bytes([raw[34] ^ 0x80]) + raw[35:], 32),
        "data_len too short": (raw[:20] + struct.pack("<I", dl - 1000) + raw[24:], start - 1000),
        "data_len too long": (raw[:20] + struct.pack("<I", dl + 100) + raw[24:], start + 100),
        "data_len inside the xml": (raw[:20] + struct.pack("<I", 200) + raw[24:], 32),
        "data_len huge": (raw[:20] + struct.pack("<I", 0x7FFFFFFF) + raw[24:], 20),
        "stream damaged": (raw[:start + 40] + b"\xee" * 8 + raw[start + 48:], None),
    }


COMMANDS = {
    "inspect": lambda src, out: ["inspect", src],
    "convert": lambda src, out: ["convert", "-q", src, out],
    "convert --to json": lambda src, out: ["convert", "-q", src, out, "--to", "json"],
    "transform": lambda src, out: ["transform", "-q", src, out, "--machine", "pc-i440fx-7.2"],
    "diff": lambda src, out: ["diff", src, src],
}


def test_damaged_images_fail_cleanly_in_every_command(stream_212, tmp_path, capsys):
    raw = write_like_libvirt(XML, COOKIE, stream_212)
    gz = write_like_libvirt(XML, COOKIE, stream_212, Compression.GZIP)
    for what, (data, offset) in _damaged(raw, gz).items():
        src = tmp_path / "bad.save"
        src.write_bytes(data)
        for name, argv in COMMANDS.items():
            out = tmp_path / "out.save"
            assert main(argv(str(src), str(out))) == 2, (what, name)
            err = one_line_error(capsys)
            assert "at offset 0x" in err, (what, name, err)
            if offset is not None:
                assert f"(at offset {offset:#x})" in err, (what, name, err)
            else:
                assert int(err.rsplit("at offset ", 1)[1].rstrip(")\n"), 16) >= ls.parse(raw).payload_offset
            assert not out.exists() and not list(tmp_path.glob("*partial*")), (what, name)
        assert src.read_bytes() == data
