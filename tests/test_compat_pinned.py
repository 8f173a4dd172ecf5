"""vmferry.compat.machines.pinned: the device properties a destination must keep (no QEMU needed).

The libvirt side, with a real libvirtd and QEMU, is tests/test_libvirt_real.py::test_domains_with_more_devices
(the balloon restores on 7.2 from 2.12 and back, counting on)."""

from __future__ import annotations

import pytest

from vmferry.compat.machines.pinned import pinned_properties


@pytest.mark.parametrize("source, target, value", [
    ("pc-i440fx-2.12", "pc-i440fx-7.2", False),
    ("pc-q35-5.0", "pc-q35-5.1", False),  # the step where hw_compat_5_0 ends
    ("pc-i440fx-7.2", "pc-i440fx-2.12", True),
    ("pc-q35-5.1", "pc-q35-5.0", True),
    ("pc-i440fx-4.2", "pc-i440fx-11.1@11.1", False),
])
def test_page_poison_keeps_the_source_machine_type_s_value(source, target, value):
    (pin,) = pinned_properties(source, target)
    assert (pin.device, pin.name, pin.value) == ("virtio-balloon-device", "page-poison", value)
    assert pin.qemu_option == f"-global virtio-balloon-device.page-poison={'on' if value else 'off'}"
    assert pin.why.startswith("hw_compat_5_0") and source in pin.why and target in pin.why


@pytest.mark.parametrize("source, target, pins", [
    ("pc-i440fx-2.12", "pc-i440fx-4.0", {"qemu-4-0-config-size": False}),  # the BAR grows without page-poison
    ("pc-q35-4.0.1", "pc-q35-4.1", {"qemu-4-0-config-size": True}),
    ("pc-q35-4.0.1", "pc-q35-7.2", {"page-poison": False, "qemu-4-0-config-size": True}),
    ("pc-i440fx-7.2", "pc-i440fx-4.0", {"page-poison": True, "qemu-4-0-config-size": False}),
    ("pc-i440fx-4.0", "pc-i440fx-4.0", {}),
])
def test_the_4_0_config_size_is_kept_too(source, target, pins):
    assert {p.name: p.value for p in pinned_properties(source, target)} == pins


@pytest.mark.parametrize("source, target", [
    ("pc-i440fx-2.12", "pc-i440fx-5.0"),  # both before 5.1
    ("pc-q35-5.1", "pc-q35-11.1"),  # both from 5.1
    ("pc-i440fx-7.2", "pc-i440fx-7.2"),
    (None, "pc-i440fx-7.2"),  # unknown source: nothing to keep
    ("pc", "pc-i440fx-7.2"),  # an alias names no version
    ("virt-7.2", "pc-i440fx-2.12"),  # not an x86 line
    ("pc-i440fx-x.y", "pc-i440fx-7.2"),
])
def test_nothing_is_pinned_where_the_defaults_agree_or_cannot_be_known(source, target):
    assert pinned_properties(source, target) == []


def test_transform_of_a_bare_stream_names_the_destination_s_option(tmp_path, capsys):
    """Real QEMU 7.2: a pc-i440fx-2.12 guest with a virtio-balloon; the 7.2 destination needs page-poison off."""
    from vmferry.cli import main
    from vmferry.live.qemu.process import QemuVM

    saved, out = tmp_path / "b212.mig", tmp_path / "b72.mig"
    with QemuVM("pc-i440fx-2.12", ["-device", "virtio-balloon-pci"], workdir=tmp_path / "src") as src:
        src.save(saved)
    capsys.readouterr()
    assert main(["transform", str(saved), str(out), "--machine", "pc-i440fx-7.2"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-global virtio-balloon-device.page-poison=off" in err and "hw_compat_5_0" in err
    with QemuVM("pc-i440fx-7.2", ["-device", "virtio-balloon-pci", "-global", "virtio-balloon-device.page-poison=off"],
                incoming=True, workdir=tmp_path / "dst") as dst:
        assert dst.load(out) == "prelaunch"
    # -q says nothing; a machine type on the same side of 5.1 needs nothing
    assert main(["transform", "-q", str(saved), str(tmp_path / "q.mig"), "--machine", "pc-i440fx-7.2"]) == 0
    assert main(["transform", str(saved), str(tmp_path / "b50.mig"), "--machine", "pc-i440fx-5.0"]) == 0
    assert capsys.readouterr().err == ""


def test_the_proxy_names_the_destination_s_option(tmp_path, capsys):
    """Real QEMU 7.2: a pc-i440fx-2.12 guest with a virtio-balloon migrated live through ``vmferry proxy
    --machine pc-i440fx-7.2``.  The proxy cannot see the destination's command line, so it names the -global on
    stderr, once; with it the destination loads the stream."""
    import tempfile
    import time
    from pathlib import Path

    from cli_helpers import proxy_in_thread

    from vmferry.live.qemu.process import QemuVM

    balloon = ["-device", "virtio-balloon-pci"]
    with tempfile.TemporaryDirectory(prefix="vmf-pin-") as short, \
            QemuVM("pc-i440fx-2.12", balloon, workdir=tmp_path / "src") as src, \
            QemuVM("pc-i440fx-7.2", [*balloon, "-global", "virtio-balloon-device.page-poison=off"], incoming=True,
                   workdir=tmp_path / "dst") as dst:
        sock = Path(short)  # unix socket paths are short; tmp_path may be too long
        dst.cmd("migrate-incoming", uri=f"unix:{sock / 'dst.sock'}")
        command, result = proxy_in_thread(["--listen", f"unix:{sock / 'p.sock'}", "--forward",
                                           f"unix:{sock / 'dst.sock'}", "--machine", "pc-i440fx-7.2", "--timeout",
                                           "30"], sock / "p.sock")
        src.migrate(f"unix:{sock / 'p.sock'}")
        src.wait_migration(timeout=60)
        command.join(60)
        assert result == [0] and src.status() == "postmigrate"
        deadline = time.monotonic() + 30
        while (status := dst.query_migrate().get("status")) != "completed":  # loaded (a never-started guest)
            assert status in ("setup", "active") and time.monotonic() < deadline, f"the destination: {status}"
            time.sleep(0.05)
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1, notes
    assert notes[0].startswith("vmferry proxy: note: run the destination QEMU with "
                               "-global virtio-balloon-device.page-poison=off") and "hw_compat_5_0" in notes[0]
