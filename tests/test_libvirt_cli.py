"""``vmferry libvirt inspect|copy|transform`` on save images (written as libvirt writes them, real QEMU streams)."""

from __future__ import annotations

import json

import pytest
from test_libvirt_save import COOKIE, XML, write_like_libvirt

from vmferry.cli import main
from vmferry.encode import legacy
from vmferry.encode import libvirt_save as ls
from vmferry.encode.libvirt_save import Compression
from vmferry.events import Configuration


@pytest.fixture
def image_212(qemu_corpus, tmp_path):
    """A gzip-compressed save image of a pc-i440fx-2.12 guest."""
    stream = qemu_corpus["pc-2.12-paused"].read_bytes()
    path = tmp_path / "t1.save"
    path.write_bytes(write_like_libvirt(XML, COOKIE, stream, Compression.GZIP))
    return path


def test_inspect(image_212, capsys):
    assert main(["libvirt", "inspect", str(image_212)]) == 0
    out = capsys.readouterr().out
    assert "domain: t1 (type kvm)" in out and "machine type: pc-i440fx-2.12 (QEMU stream: pc-i440fx-2.12)" in out
    assert "was running: yes" in out and "compression: gzip" in out
    assert main(["libvirt", "inspect", "--json", str(image_212)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["machine"] == doc["stream_machine"] == "pc-i440fx-2.12" and doc["device_sections"] > 5


def test_copy_is_byte_for_byte(image_212, tmp_path):
    out = tmp_path / "copy.save"
    assert main(["libvirt", "copy", str(image_212), str(out)]) == 0
    assert out.read_bytes() == image_212.read_bytes()


def test_transform_rewrites_stream_and_xml(image_212, tmp_path):
    out = tmp_path / "new.save"
    assert main(["libvirt", "transform", str(image_212), str(out), "--machine", "pc-i440fx-7.2",
                 "--compress", "xz"]) == 0
    image, stored = ls.split([out.read_bytes()])
    assert image.machine == "pc-i440fx-7.2" and image.compression == Compression.XZ and image.was_running
    config = next(ev for ev in legacy.decode(ls.qemu_stream(image, stored)) if isinstance(ev, Configuration))
    assert config.machine == "pc-i440fx-7.2"


def test_damage_exits_2_with_one_line_and_writes_nothing(image_212, tmp_path, capsys):
    data = image_212.read_bytes()
    bad = tmp_path / "bad.save"
    bad.write_bytes(data[:20] + b"\0\0\0\0" + data[24:])  # data_len 0
    out = tmp_path / "out.save"
    assert main(["libvirt", "transform", str(bad), str(out), "--machine", "pc-i440fx-7.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_len" in err and "(at offset 0x14)" in err
    assert not out.exists()
    bad.write_bytes(data[: len(data) - 100])  # the gzip stream cut short
    assert main(["libvirt", "copy", str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gzip" in err and not out.exists()
