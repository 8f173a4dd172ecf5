"""libvirt save images under the rules every output and input of the CLI follows (issue 17): one writer
(``cli.common.output_file``: random partial names, links to the input refused, signals clean up), images
0600 and streams extracted from them no more open than the image, ``--from`` (``libvirt-save``), ``--json``,
``ram extract|inject`` and ``migrate --from-file`` on images."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from cli_helpers import CLI, one_line_error, partials, signal_while_writing
from test_libvirt_save import COOKIE, XML, write_like_libvirt

from vmferry.encode import libvirt_save as ls
from vmferry.encode.libvirt_save import Compression



def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=300, **kw)


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, out.stderr.decode()
    return out


@pytest.fixture(scope="module")
def stream_212(qemu_corpus) -> bytes:
    return qemu_corpus["pc-2.12-paused"].read_bytes()


@pytest.fixture
def image(stream_212, tmp_path) -> Path:
    path = tmp_path / "t1.save"
    path.write_bytes(write_like_libvirt(XML, COOKIE, stream_212, Compression.GZIP))
    return path


def stream_of(path: Path) -> bytes:
    head, stored = ls.split([path.read_bytes()])
    return b"".join(bytes(c) for c in ls.qemu_stream(head, stored))


# ---------------------------------------------------------------------------
# output files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_an_image_output_that_is_the_input_is_refused(image, tmp_path, link):
    data = image.read_bytes()
    out = tmp_path / "out.save"
    if link == "symlink":
        os.symlink(image.name, out)
    else:
        os.link(image, out)
    for cmd in (["convert", "-q", str(image), str(out)],
                ["convert", "-q", str(image), str(out), "--compress", "xz"],
                ["transform", "-q", str(image), str(out), "--machine", "pc-i440fx-7.2"]):
        assert "same file" in one_line_error(run(*cmd))
    assert image.read_bytes() == data and not partials(tmp_path)


def test_stdout_appending_to_the_image_is_refused(image):
    data = image.read_bytes()
    with open(image, "ab") as f:
        out = subprocess.run([*CLI, "convert", "-q", str(image), "-"], stdout=f, stderr=subprocess.PIPE, timeout=120)
    assert "stdout is the input file" in one_line_error(out)
    assert image.read_bytes() == data


def test_a_planted_symlink_beside_an_image_output_is_not_written_through(image, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.save"
    os.symlink(victim, f"{out}.vmferry-partial")  # the name libvirt2's own writer used, unlinked then reused
    ok(run("transform", "-q", str(image), str(out), "--machine", "pc-i440fx-7.2"))
    assert victim.read_bytes() == b"precious" and ls.parse(out.read_bytes()).machine == "pc-i440fx-7.2"
    assert not [p for p in partials(tmp_path) if not p.is_symlink()]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_images_come_out_0600_and_streams_as_the_image(image, tmp_path, mode):
    image.chmod(mode)
    ok(run("convert", "-q", str(image), str(tmp_path / "copy.save")))
    ok(run("convert", "-q", str(image), str(tmp_path / "xz.save"), "--compress", "xz"))
    ok(run("transform", "-q", str(image), str(tmp_path / "new.save"), "--machine", "pc-i440fx-7.2"))
    for name in ("copy.save", "xz.save", "new.save"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    # the guest's RAM taken out of the image is no more readable than the image was
    ok(run("convert", "-q", str(image), str(tmp_path / "s.mig"), "--to", "legacy"))
    ok(run("transform", "-q", str(image), str(tmp_path / "s.json"), "--machine", "pc-i440fx-7.2", "--to", "json"))
    for name in ("s.mig", "s.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.fixture(scope="module")
def big_image(stream_212, tmp_path_factory) -> bytes:
    """A raw image of 16 MiB and more: the first 16 MiB of the guest's RAM random (ram extract, then inject).

    Read from a pipe, an image's head is parsed once the first 4 MiB have come (or the end): the output file
    is created only then.
    """
    where = tmp_path_factory.mktemp("big")
    (where / "s.mig").write_bytes(stream_212)
    ok(run("ram", "extract", "-q", str(where / "s.mig"), str(where / "ram")))
    blocks = json.loads((where / "ram" / "blocks.json").read_text())
    name = next(b["file"] for b in blocks["blocks"] if b["block"] == "pc.ram")
    with open(where / "ram" / name, "r+b") as f:
        f.write(os.urandom(16 << 20))
    ok(run("ram", "inject", "-q", str(where / "s.mig"), str(where / "ram"), str(where / "big.mig")))
    return write_like_libvirt(XML, COOKIE, (where / "big.mig").read_bytes())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_removes_a_partial_image(big_image, tmp_path, sig):
    data = big_image
    assert len(data) > 16 << 20
    out = tmp_path / "out.save"
    rc, err = signal_while_writing(["transform", "-q", "-", str(out), "--machine", "pc-i440fx-7.2"], data,
                                   tmp_path, sig)
    assert rc == 128 + sig or rc == -sig, (rc, err)
    assert err.count("\n") <= 1 and "Traceback" not in err, err
    assert not partials(tmp_path) and not out.exists()


# ---------------------------------------------------------------------------
# --from
# ---------------------------------------------------------------------------


def test_from_libvirt_save(image, stream_212, tmp_path):
    out = ok(run("inspect", "--json", "--from", "libvirt-save", str(image)))
    assert json.loads(out.stdout)["libvirt"]["domain"] == "t1"
    ok(run("convert", "-q", "--from", "libvirt-save", str(image), str(tmp_path / "c.save")))
    assert (tmp_path / "c.save").read_bytes() == image.read_bytes()
    # a stream is no save image, whatever --from says: the error names the magic
    bare = tmp_path / "s.mig"
    bare.write_bytes(stream_212)
    err = one_line_error(run("inspect", "--from", "libvirt-save", str(bare)))
    assert "$.libvirt.header.magic" in err and "(at offset 0x0)" in err


@pytest.mark.parametrize("fmt", ["legacy", "json"])
def test_a_stream_format_given_for_an_image_is_refused(image, tmp_path, fmt):
    for cmd in (["inspect", "--from", fmt, str(image)],
                ["convert", "-q", "--from", fmt, str(image), str(tmp_path / "o.mig"), "--to", "legacy"],
                ["transform", "-q", "--from", fmt, str(image), str(tmp_path / "o.save"), "--machine",
                 "pc-i440fx-7.2"],
                ["ram", "extract", "--from", fmt, str(image), str(tmp_path / "ram")]):
        err = one_line_error(run(*cmd))
        assert f"a libvirt save image, not a {fmt} stream" in err and "--from libvirt-save" in err, err
    assert not list(p for p in tmp_path.iterdir() if p != image)


# ---------------------------------------------------------------------------
# --json
# ---------------------------------------------------------------------------


def test_json_of_image_outputs(image, tmp_path):
    doc = json.loads(ok(run("convert", "--json", str(image), str(tmp_path / "c.save"))).stdout)
    assert doc["input_format"] == doc["format"] == "libvirt-save"
    assert doc["bytes"] == (tmp_path / "c.save").stat().st_size == image.stat().st_size
    assert doc["libvirt"]["compression"] == "gzip"
    doc = json.loads(ok(run("convert", "--json", str(image), str(tmp_path / "x.save"), "--compress", "xz")).stdout)
    assert doc["bytes"] == (tmp_path / "x.save").stat().st_size and doc["libvirt"]["compression"] == "xz"
    doc = json.loads(ok(run("transform", "--json", "-q", str(image), str(tmp_path / "n.save"), "--machine",
                            "pc-i440fx-7.2")).stdout)
    assert doc["format"] == "libvirt-save" and doc["machine"] == "pc-i440fx-7.2"
    assert doc["libvirt"]["machine"] == "pc-i440fx-7.2" and doc["bytes"] == (tmp_path / "n.save").stat().st_size
    doc = json.loads(ok(run("convert", "--json", str(image), str(tmp_path / "s.mig"), "--to", "legacy")).stdout)
    assert (doc["input_format"], doc["format"]) == ("libvirt-save", "legacy")
    assert doc["bytes"] == (tmp_path / "s.mig").stat().st_size


def test_transform_emulator(image, stream_212, tmp_path):
    """--emulator names the QEMU binary in the image's XML; an input that is no image, or --to, refuses it
    in one line before any output exists."""
    out = tmp_path / "e.save"
    ok(run("transform", "-q", str(image), str(out), "--machine", "pc-i440fx-11.1", "--emulator", "/opt/qemu-11.1"))
    moved = ls.parse(out.read_bytes())
    assert moved.machine == "pc-i440fx-11.1" and "<emulator>/opt/qemu-11.1</emulator>" in moved.xml
    assert "/usr/bin/qemu-system-x86_64" not in moved.xml and moved.cookie == COOKIE
    plain = tmp_path / "plain.mig"
    plain.write_bytes(stream_212)
    for args, message in (((str(plain), str(tmp_path / "p.mig")), "the input is no image"),
                          ((str(image), str(tmp_path / "l.mig"), "--to", "legacy"), "which --to leaves out"),
                          ((str(image), str(tmp_path / "r.save")), "not an absolute path")):
        err = one_line_error(run("transform", "-q", *args, "--machine", "pc-i440fx-7.2", "--emulator",
                                 "qemu" if "r.save" in args[1] else "/opt/q"))
        assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.save", "plain.mig", "t1.save"]


# ---------------------------------------------------------------------------
# ram extract | inject
# ---------------------------------------------------------------------------


def test_ram_of_an_image(image, stream_212, tmp_path):
    bare = tmp_path / "s.mig"
    bare.write_bytes(stream_212)
    ok(run("ram", "extract", "-q", str(image), str(tmp_path / "from-image")))
    ok(run("ram", "extract", "-q", str(bare), str(tmp_path / "from-stream")))
    files = sorted(p.name for p in (tmp_path / "from-image").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "from-stream").iterdir()) and "blocks.json" in files
    for name in files:
        assert (tmp_path / "from-image" / name).read_bytes() == (tmp_path / "from-stream" / name).read_bytes()
    # an image in, an image out: the head as it was, the stream what inject makes of the bare stream
    out = tmp_path / "out.save"
    doc = json.loads(ok(run("ram", "inject", "--json", str(image), str(tmp_path / "from-image"), str(out))).stdout)
    ok(run("ram", "inject", "-q", str(bare), str(tmp_path / "from-stream"), str(tmp_path / "want.mig")))
    assert doc["format"] == "libvirt-save" and doc["bytes"] == out.stat().st_size
    assert doc["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    head = ls.parse(image.read_bytes())
    assert out.read_bytes()[:head.payload_offset] == image.read_bytes()[:head.payload_offset]
    assert stream_of(out) == (tmp_path / "want.mig").read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # --to: the bare stream
    ok(run("ram", "inject", "-q", str(image), str(tmp_path / "from-image"), str(tmp_path / "s2.mig"), "--to",
           "legacy"))
    assert (tmp_path / "s2.mig").read_bytes() == (tmp_path / "want.mig").read_bytes()


# ---------------------------------------------------------------------------
# migrate --from-file
# ---------------------------------------------------------------------------


@pytest.mark.qemu
def test_migrate_from_an_image(tmp_path):
    """A counting guest saved to a file, wrapped as libvirt does (gzip), restored from the image: it counts on."""
    from live_helpers import short_dir
    from test_migrate_file import Managed

    from vmferry.live.qemu.guest import parse_counts

    where = short_dir(tmp_path)
    guest, image = where / "guest.mig", where / "guest.save"
    s = Managed(where, "src")
    with s as src:
        src.wait_for_count(3, timeout=60)
        ok(run("migrate", "--source", s.address, "--to-file", str(guest), "-q"))
        saved = src.counts()[-1]
    image.write_bytes(write_like_libvirt(XML.replace("pc-i440fx-2.12", "pc-i440fx-7.2"), COOKIE, guest.read_bytes(),
                                         Compression.GZIP))
    d = Managed(where, "dst", incoming=True)
    with d as dst:
        ok(run("migrate", "--from-file", str(image), "--dest", d.address, "-q"))
        assert dst.status() == "running"
        dst.wait_for_count(saved + 3, timeout=60)
        counts = parse_counts(dst.serial_text())
        assert counts[0] == saved + 1 and counts == list(range(saved + 1, saved + 1 + len(counts))), counts[:20]
