"""Real libvirtd + QEMU: ``vmferry`` reads ``virsh save`` images, and moves them to a newer machine type.

A counting guest (vmferry.live.qemu.guest) is saved by libvirt 9.0 under
pc-i440fx-2.12 or pc-q35-2.12, as a domain of type ``qemu`` (TCG) and of
type ``kvm``; ``vmferry transform`` converts the QEMU stream inside to the
7.2 machine type and rewrites the XML's machine; ``virsh restore`` (or
``virsh start`` after ``managedsave``) then accepts it, and the guest counts
on from where it stopped.  Every ``save_image_format`` libvirt 9.0 knows is
tried, and images round-trip byte for byte through ``vmferry convert``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from libvirt_daemon import Domain, LibvirtDaemon, LibvirtError, kvm_missing, libvirtd  # noqa: F401  (the fixture)

from vmferry.cli import main
from vmferry.encode import legacy
from vmferry.encode import libvirt_save as ls
from vmferry.encode.libvirt_save import HEADER_SIZE, PADDING, Compression

pytestmark = [pytest.mark.libvirt, pytest.mark.qemu, pytest.mark.slow]

#: The domain types the restore tests run: TCG, and KVM where /dev/kvm is there.
KINDS = ["qemu", pytest.param("kvm", marks=pytest.mark.skipif(kvm_missing() is not None,
                                                               reason=f"no KVM: {kvm_missing()}"))]


def assert_counts_on(dom: Domain, before: int, more: int = 15) -> None:
    """The guest printed ``more`` numbers past ``before`` and every number follows the one before it."""
    dom.wait_for_count(len(dom.counts()) + more)
    counts = dom.counts()
    assert counts[-1] >= before + more
    gaps = [(a, b) for a, b in zip(counts, counts[1:]) if b != a + 1]
    assert not gaps, f"the count jumped or restarted: {gaps[:3]} ({counts[:3]}...{counts[-3:]})"


def start_counting(libvirtd: LibvirtDaemon, name: str, machine: str, kind: str = "qemu") -> Domain:
    dom = Domain(libvirtd, name, machine, kind=kind).define()
    dom.start()
    dom.wait_for_count(10)
    return dom


def vmferry(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def stream_bytes(image_path: Path) -> bytes:
    image, stored = ls.split([image_path.read_bytes()])
    return b"".join(bytes(c) for c in ls.qemu_stream(image, stored))


def machine_of(xml: str) -> str:
    found = re.search(r"<type [^>]*machine='([^']+)'", xml)
    assert found, xml
    return found[1]


def test_virsh_save_image_is_what_the_parser_says(libvirtd, tmp_path, capsys):
    dom = start_counting(libvirtd, "layout", "pc-i440fx-2.12")
    path = tmp_path / "layout.save"
    libvirtd.virsh("save", dom.name, str(path))
    data = path.read_bytes()
    image, stored = ls.split([data])
    assert data[:16] == b"LibvirtQemudSave" and image.header.version == 2 and image.header.byteorder == "<"
    assert (image.name, image.machine, image.domain_type) == ("layout", "pc-i440fx-2.12", "qemu")
    assert image.was_running and image.compression == Compression.RAW and image.cookie is not None
    assert image.cookie.startswith("<cookie>") and "<cpu" in image.cookie
    xml_len = len(image.xml.encode()) + 1
    assert image.header.cookie_offset == xml_len
    assert image.header.data_len == xml_len + len(image.cookie.encode()) + 1 + PADDING
    assert image.header.unused == (0,) * 14
    assert data[image.payload_offset:image.payload_offset + 4] == b"QEVM"
    # vmferry writes the same head libvirt wrote, and the QEMU stream re-encodes byte for byte
    assert image.with_xml(image.xml).head == data[:image.payload_offset]
    raw = data[image.payload_offset:]
    assert b"".join(bytes(c) for c in legacy.encode(legacy.decode([raw]))) == raw
    # libvirt stores the migratable XML (no default pci-root controller); save-image-dumpxml fills the defaults in
    dumped = libvirtd.virsh("save-image-dumpxml", str(path))
    assert "<name>layout</name>" in dumped and "machine='pc-i440fx-2.12'" in dumped
    # what vmferry inspect says of it
    vmferry("inspect", "--json", str(path))
    doc = json.loads(capsys.readouterr().out)
    assert doc["libvirt"]["domain"] == "layout" and doc["libvirt"]["xml"] == image.xml
    assert doc["machine"] == "pc-i440fx-2.12" and doc["libvirt"]["stream_offset"] == image.payload_offset
    libvirtd.virsh("undefine", dom.name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source, target", [("pc-i440fx-2.12", "pc-i440fx-7.2"), ("pc-q35-2.12", "pc-q35-7.2")])
def test_transform_then_virsh_restore_counts_on(libvirtd, tmp_path, source, target, kind):
    name = f"{kind}-{source.split('-')[1]}"
    dom = start_counting(libvirtd, name, source, kind)
    saved, moved = tmp_path / "old.save", tmp_path / "new.save"
    libvirtd.virsh("save", dom.name, str(saved))
    before = dom.counts()[-1]
    assert dom.state() == "shut off"
    # what the issue reports: libvirt alone refuses the new machine type
    xml = tmp_path / "new.xml"
    xml.write_text(libvirtd.virsh("save-image-dumpxml", str(saved)).replace(source, target))
    with pytest.raises(LibvirtError, match="machine type"):
        libvirtd.virsh("restore", str(saved), "--xml", str(xml))
    t0 = time.monotonic()
    vmferry("transform", "-q", str(saved), str(moved), "--machine", target)
    took = time.monotonic() - t0
    old, new = ls.parse(saved.read_bytes()), ls.parse(moved.read_bytes())
    assert new.machine == target and new.was_running and new.name == dom.name and new.domain_type == kind
    assert new.xml == old.xml.replace(f"machine='{source}'", f"machine='{target}'") and new.cookie == old.cookie
    libvirtd.virsh("restore", str(moved))
    assert dom.state() == "running"
    assert machine_of(libvirtd.virsh("dumpxml", dom.name)) == target
    # the domain's persistent definition is not in the image: restore leaves it as it was
    assert machine_of(libvirtd.virsh("dumpxml", "--inactive", dom.name)) == source
    assert_counts_on(dom, before)
    libvirtd.virsh("destroy", dom.name)
    libvirtd.virsh("undefine", dom.name)
    print(f"transform {source} -> {target} ({kind}): {took:.2f} s")


@pytest.mark.parametrize("source, target, devices", [
    ("pc-i440fx-2.12", "pc-i440fx-7.2", ("usb", "vga", "e1000", "virtio-net", "virtio-serial")),
    ("pc-q35-2.12", "pc-q35-7.2", ("vga",)),
    # libvirt puts virtio-net behind a pcie-root-port (and adds a spare one): the ports' link, ACS and hot-plug bits
    # and virtio-net's 4 KiB PCI Express config space cross the machine types
    ("pc-q35-2.12", "pc-q35-7.2", ("virtio-net",)),
    # libvirt's default memory balloon: page-poison (hw_compat_5_0) is kept off through a <qemu:override>
    ("pc-i440fx-2.12", "pc-i440fx-7.2", ("usb", "vga", "e1000", "virtio-serial", "balloon")),
    ("pc-i440fx-7.2", "pc-i440fx-2.12", ("balloon",)),  # and back down: page-poison kept on
    ("pc-i440fx-2.12", "pc-i440fx-4.0", ("balloon",)),  # 4.0 alone has qemu-4-0-config-size: kept off
    ("pc-q35-2.12", "pc-q35-7.2", ("balloon",)),  # behind the pcie-root-port libvirt adds: FLR, page-poison
    ("pc-i440fx-2.12", "pc-i440fx-7.2", ("rng",)),
    ("pc-i440fx-2.12", "pc-i440fx-7.2", ("cirrus",)),
], ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_domains_with_more_devices(libvirtd, tmp_path, source, target, devices):
    """Domains closer to what virt-install makes: which devices the transforms carry to 7.2 today."""
    dom = Domain(libvirtd, "dev-" + "-".join(devices) + source[2:6], source, devices=devices).define()
    dom.start()
    try:
        dom.wait_for_count(10)
        saved, moved = tmp_path / "old.save", tmp_path / "new.save"
        libvirtd.virsh("save", dom.name, str(saved))
        before = dom.counts()[-1]
        vmferry("transform", "-q", str(saved), str(moved), "--machine", target)
        libvirtd.virsh("restore", str(moved))
        assert_counts_on(dom, before)
        if "balloon" in devices:  # restored with the balloon as the source ran it
            log = (libvirtd.private("/var/log/libvirt") / "qemu" / f"{dom.name}.log").read_text()
            restore = log.rsplit("-machine ", 1)[1].splitlines()  # the last QEMU command line: the restore's
            balloon = [line for line in restore if "virtio-balloon-pci" in line]
            kept = {"pc-i440fx-7.2": '"page-poison":false', "pc-i440fx-2.12": '"page-poison":true',
                    "pc-i440fx-4.0": '"qemu-4-0-config-size":false', "pc-q35-7.2": '"page-poison":false'}[target]
            assert balloon and kept in balloon[0], balloon
    finally:
        libvirtd.virsh("destroy", dom.name, check=False)
        libvirtd.virsh("undefine", dom.name, check=False)


@pytest.mark.parametrize("kind", KINDS)
def test_managedsave_transform_define_then_start(libvirtd, tmp_path, kind):
    """The operator's managed-save workflow of docs/libvirt.md, step by step."""
    source, target = "pc-i440fx-2.12", "pc-i440fx-7.2"
    dom = start_counting(libvirtd, f"managed-{kind}", source, kind)
    libvirtd.virsh("managedsave", dom.name)
    before = dom.counts()[-1]
    path = libvirtd.managed_save_path(dom.name)
    assert path.exists() and ls.parse(path.read_bytes()).machine == source
    # libvirt's own edit of a managed save image refuses another machine type
    edited = tmp_path / "edited.xml"
    edited.write_text(libvirtd.virsh("managedsave-dumpxml", dom.name).replace(source, target))
    with pytest.raises(LibvirtError, match="machine type"):
        libvirtd.virsh("managedsave-define", dom.name, str(edited))
    # 1. convert next to it, 2. move it over the image (libvirt looks for it under its own name)
    new = path.with_name(path.name + ".new")
    vmferry("transform", "-q", str(path), str(new), "--machine", target)
    new.replace(path)
    assert "Managed save:   yes" in libvirtd.virsh("dominfo", dom.name)
    # 3. the persistent definition, for later cold boots: libvirt accepts it with the managed save image there
    persistent = libvirtd.virsh("dumpxml", "--inactive", "--security-info", dom.name)
    assert machine_of(persistent) == source
    defined = tmp_path / "defined.xml"
    defined.write_text(persistent.replace(f"machine='{source}'", f"machine='{target}'"))
    libvirtd.virsh("define", str(defined))
    assert path.exists()
    # 4. virsh start restores from the image, runs its XML, and deletes the image
    libvirtd.virsh("start", dom.name)
    assert_counts_on(dom, before)
    assert not path.exists()
    assert machine_of(libvirtd.virsh("dumpxml", dom.name)) == target
    assert machine_of(libvirtd.virsh("dumpxml", "--inactive", dom.name)) == target
    # a cold boot later runs the new machine type from the start
    libvirtd.virsh("destroy", dom.name)
    dom.serial_log.write_bytes(b"")
    libvirtd.virsh("start", dom.name)
    assert dom.wait_for_count(5) >= 5 and dom.counts()[0] == 1
    log = (libvirtd.private("/var/log/libvirt") / "qemu" / f"{dom.name}.log").read_text()
    assert re.findall(r"-machine ([\w.-]+)", log)[-1] == target
    libvirtd.virsh("destroy", dom.name)
    libvirtd.virsh("undefine", dom.name)


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "lzop"])
def test_each_save_image_format(libvirtd, tmp_path, fmt):
    """libvirt compresses with ``save_image_format``: the image round-trips, and a transformed one restores."""
    libvirtd.restart(save_image_format=fmt)
    try:
        dom = start_counting(libvirtd, f"fmt-{fmt}", "pc-i440fx-2.12")
        saved = tmp_path / f"{fmt}.save"
        libvirtd.virsh("save", dom.name, str(saved))
        before = dom.counts()[-1]
        image = ls.parse(saved.read_bytes())
        assert image.compression == Compression[fmt.upper()]
        copy = tmp_path / "copy.save"
        vmferry("convert", "-q", str(saved), str(copy))
        assert copy.read_bytes() == saved.read_bytes()  # byte for byte, compressed stream included
        raw = stream_bytes(saved)
        assert raw[:4] == b"QEVM"
        extracted = tmp_path / "stream.mig"
        vmferry("convert", "-q", str(saved), str(extracted), "--to", "legacy")
        assert extracted.read_bytes() == raw
        moved = tmp_path / "moved.save"
        vmferry("transform", "-q", str(saved), str(moved), "--machine", "pc-i440fx-7.2")
        assert ls.parse(moved.read_bytes()).compression == image.compression
        libvirtd.virsh("restore", str(moved))  # libvirt's `PROG -dc` reads vmferry's compression
        assert_counts_on(dom, before)
        libvirtd.virsh("destroy", dom.name)
        libvirtd.virsh("undefine", dom.name)
    finally:
        libvirtd.restart(save_image_format="raw")


def test_zstd_is_not_in_libvirt_9(libvirtd, tmp_path):
    """libvirt 9.0 knows no zstd: ``virsh save`` refuses the setting, and cannot restore a zstd image."""
    libvirtd.restart(save_image_format="zstd")
    try:
        dom = start_counting(libvirtd, "fmt-zstd", "pc-i440fx-2.12")
        saved = tmp_path / "zstd.save"
        with pytest.raises(LibvirtError, match="Invalid save image format"):
            libvirtd.virsh("save", dom.name, str(saved))
        assert dom.state() == "running" and not saved.exists()
    finally:
        libvirtd.restart(save_image_format="raw")
    libvirtd.virsh("save", dom.name, str(saved))
    moved = tmp_path / "moved.save"
    vmferry("transform", "-q", str(saved), str(moved), "--machine", "pc-i440fx-7.2", "--compress", "zstd")
    assert ls.parse(moved.read_bytes()).compression == Compression.ZSTD
    assert stream_bytes(moved)[:4] == b"QEVM"
    with pytest.raises(LibvirtError, match="Invalid compressed save format 5"):
        libvirtd.virsh("restore", str(moved))
    libvirtd.virsh("undefine", dom.name)


def test_damaged_images_fail_cleanly_and_write_nothing(libvirtd, tmp_path, capsys):
    dom = start_counting(libvirtd, "damaged", "pc-i440fx-2.12")
    saved = tmp_path / "good.save"
    libvirtd.virsh("save", dom.name, str(saved))
    libvirtd.virsh("undefine", dom.name)
    data = saved.read_bytes()
    image = ls.parse(data)
    xml_at = HEADER_SIZE + image.xml.index("<os>")
    cases = {
        "version": (data[:16] + b"\x07" + data[17:], 16),
        "xml": (data[:xml_at] + b"<0s" + data[xml_at + 3:], None),
        "truncated head": (data[:HEADER_SIZE + 100], HEADER_SIZE + 100),
        "stream": (data[:image.payload_offset + 40] + b"\xee" * 8 + data[image.payload_offset + 48:], None),
        "truncated stream": (data[:len(data) // 2], None),
    }
    capsys.readouterr()
    for what, (bad, offset) in cases.items():
        src, dst = tmp_path / f"{what}.save", tmp_path / f"{what}.out"
        src.write_bytes(bad)
        for argv in (["transform", "-q", str(src), str(dst), "--machine", "pc-i440fx-7.2"],
                     ["convert", "-q", str(src), str(dst)]):
            assert main(argv) == 2, what
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "at offset 0x" in err, (what, err)
            at = int(err.rsplit("at offset ", 1)[1].rstrip(")\n"), 16)
            assert at == offset if offset is not None else at >= HEADER_SIZE, (what, err)
            assert not dst.exists() and not list(tmp_path.glob(f"{dst.name}.*vmferry-partial")), what


@pytest.mark.qemu11
@pytest.mark.parametrize("source, compress", [("pc-i440fx-7.2", "raw"), ("pc-i440fx-2.12", "gzip")])
def test_qemu72_image_restores_under_libvirt_on_qemu111(libvirtd, tmp_path, source, compress):
    """Across releases (issue 14): a ``virsh save`` image of QEMU 7.2 restored by libvirt 9.0 on QEMU 11.1's machine type.

    libvirt 9.0 runs QEMU 11.1 (Debian forky's, in its chroot) through an
    ``<emulator>`` that execs it there (:meth:`LibvirtDaemon.release_emulator`);
    it probes it and runs it as it runs its own QEMU.  Two things QEMU 11.1
    needs from libvirt 9.0 that it does not give by default: the domain has
    ``<acpi/>`` (else libvirt passes ``-no-acpi``, which QEMU 11.1 no longer
    has: "-no-acpi: invalid option"), and the restore goes through a pipe
    (``--bypass-cache``: libvirt's iohelper reads the file): for a raw image
    libvirt hands QEMU the image file's own descriptor (``migrate-incoming
    fd:``), which QEMU 11.1 refuses ("fd: migration to a file is not
    supported. Use file: instead."); a compressed image (here gzip, which
    ``transform --compress`` writes) goes through the decompressor's pipe and
    needs no flag.  The image's XML names the emulator; QEMU 7.2's has no
    pc-i440fx-11.1.  The raw image keeps it and gets the 11.1 emulator from
    ``virsh restore --xml``; the gzip one gets it from ``transform
    --emulator`` and restores with a plain ``virsh restore``.
    """
    target = "pc-i440fx-11.1"
    emulator = libvirtd.release_emulator("11.1")
    dom = Domain(libvirtd, f"to-11.1-{source[10:]}", source, acpi=True).define()
    try:
        dom.start()
        dom.wait_for_count(10)
        saved, moved = tmp_path / "old.save", tmp_path / "new.save"
        libvirtd.virsh("save", dom.name, str(saved))
        before = dom.counts()[-1]
        t0 = time.monotonic()
        set_emulator = ("--emulator", str(emulator)) if compress == "gzip" else ()
        vmferry("transform", "-q", str(saved), str(moved), "--machine", target, "--qemu-version", "11.1",
                "--compress", compress, *set_emulator)
        took = time.monotonic() - t0
        image = ls.parse(moved.read_bytes())
        assert image.compression == Compression[compress.upper()]
        assert image.machine == target and image.was_running
        restore: tuple[str, ...] = ()
        if set_emulator:
            assert image.xml.count("<emulator>") == 1 and f"<emulator>{emulator}</emulator>" in image.xml
        else:
            assert f">{shutil.which('qemu-system-x86_64')}</emulator>" in image.xml
            with pytest.raises(LibvirtError, match=f"does not support machine type '{target}'"):
                libvirtd.virsh("restore", str(moved))  # the image's emulator: QEMU 7.2
            xml = tmp_path / "on-11.1.xml"
            xml.write_text(re.sub(r"<emulator>[^<]*</emulator>", f"<emulator>{emulator}</emulator>",
                                  libvirtd.virsh("save-image-dumpxml", str(moved))))
            # QEMU 11.1 refuses the raw image file's descriptor; libvirt's iohelper gives it a pipe
            with pytest.raises(LibvirtError, match="fd: migration to a file is not supported"):
                libvirtd.virsh("restore", str(moved), "--xml", str(xml))
            restore = ("--xml", str(xml), "--bypass-cache")
        t0 = time.monotonic()
        libvirtd.virsh("restore", str(moved), *restore)
        restored = time.monotonic() - t0
        assert dom.state() == "running"
        live = libvirtd.virsh("dumpxml", dom.name)
        assert machine_of(live) == target and f"<emulator>{emulator}</emulator>" in live
        log = (libvirtd.private("/var/log/libvirt") / "qemu" / f"{dom.name}.log").read_text()
        assert "qemu version: 11.1" in log.rsplit("starting up", 1)[1]
        assert_counts_on(dom, before)
        print(f"{source} (QEMU 7.2) -> {target} (QEMU 11.1), {compress}: transform {took:.2f} s, virsh restore {restored:.2f} s")
    finally:
        libvirtd.virsh("destroy", dom.name, check=False)
        libvirtd.virsh("undefine", dom.name, check=False)
