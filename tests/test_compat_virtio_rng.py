"""virtio-rng-pci across pc-i440fx-7.1 and 7.2 (hw_compat_7_1 vectors=0), against what real QEMU 7.2 saves.

The MSI-X capability, table, pending bits and vectors that ``virtio.msix_added`` gives a 7.1 device must be the
bytes a 7.2 device of the same guest has, and ``msix_removed`` must give back the 7.1 device's bytes exactly.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmferry.cli import main
from vmferry.cli.files import decode_input, open_input
from vmferry.compat.machines import virtio
from vmferry.errors import CompatError
from vmferry.events import DeviceSection
from vmferry.live.qemu.process import QemuVM

pytestmark = pytest.mark.qemu

RNG = ("-device", "virtio-rng-pci")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("rng")
    out = {}
    for machine in ("pc-i440fx-7.1", "pc-i440fx-7.2"):
        with QemuVM(machine, RNG, boot_sector=True, workdir=where / machine) as vm:
            vm.save(where / f"{machine}.mig")
        out[machine] = where / f"{machine}.mig"
    return out


def _rng_blob(path: Path) -> bytes:
    (sec,) = [e for e in decode_input(open_input(str(path))) if isinstance(e, DeviceSection)
              and e.schema.name == "virtio-rng"]
    return bytes(sec.state["virtio"])


def test_msix_comes_and_goes_as_qemu_lays_it_out(saved: dict[str, Path]) -> None:
    old, new = _rng_blob(saved["pc-i440fx-7.1"]), _rng_blob(saved["pc-i440fx-7.2"])
    assert virtio.msix_vectors(virtio.parse_blob(old)["pci"]["config"]) == 0
    up = virtio.msix_added(virtio.parse_blob(old), None)  # type: ignore[arg-type]
    assert virtio.build_blob(up) == new
    down = virtio.msix_removed(virtio.parse_blob(new), None)  # type: ignore[arg-type]
    assert virtio.build_blob(down) == old
    assert virtio.msix_added(virtio.parse_blob(new), None)["pci"] == virtio.parse_blob(new)["pci"]  # type: ignore


def test_msix_the_guest_enabled_is_refused_going_down(saved: dict[str, Path]) -> None:
    t = virtio.parse_blob(_rng_blob(saved["pc-i440fx-7.2"]))
    cfg = bytearray(t["pci"]["config"])
    at = virtio.msix_at(cfg)
    assert at is not None
    struct.pack_into("<H", cfg, at + 2, struct.unpack_from("<H", cfg, at + 2)[0] | virtio.PCI_MSIX_FLAGS_ENABLE)
    with pytest.raises(CompatError, match="enabled MSI-X"):
        virtio.msix_removed(dict(t, pci=dict(t["pci"], config=bytes(cfg))), None)  # type: ignore[arg-type]


def test_a_7_1_stream_transformed_loads_into_7_2(saved: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "up.mig"
    assert main(["transform", "-q", str(saved["pc-i440fx-7.1"]), str(out), "--machine", "pc-i440fx-7.2"]) == 0
    assert _rng_blob(out) == _rng_blob(saved["pc-i440fx-7.2"])
    with QemuVM("pc-i440fx-7.2", RNG, incoming=True, boot_sector=True, workdir=tmp_path / "dst") as dst:
        assert dst.load(out) == "prelaunch"  # loaded, as saved: a guest that never ran
