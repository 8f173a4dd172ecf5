"""Four QEMU releases, any to any (issue 13): QEMU 5.2, 7.2, 10.0 and 11.1, each real, through vmferry.

* A running counting guest saved by one release's newest machine type and
  loaded by another's (every ordered pair: 12 on pc-i440fx, 12 on q35) goes
  on counting from where it stopped, with no gap and no restart, after
  ``vmferry transform``; the destination QEMU alone refuses the untransformed
  stream (at its configuration section).  The same with e1000, e1000e (q35)
  and virtio-net-pci, each release a source and a destination.
* QEMU 11.1 refuses QEMU 10.0's own stream of the same machine type with a
  virtio-net-pci (unset virtqueues' size); transformed, it loads.
* The removed-machine-type rescue: QEMU 7.2's pc-i440fx-2.12 / pc-q35-2.12,
  which QEMU 11.1 does not run, go to 11.1's newest machine types.
* A stream without a configuration section (pc-i440fx-2.3) transforms without
  ``--from-machine``.
* Every step that joins the releases (5.2@5.2 <-> 7.2's 5.2, 10.0@11.1 <->
  10.0's 10.0, 11.1's 10.0 .. 11.1), both ways, against the streams each
  QEMU itself writes of paused guests with the default devices, e1000,
  virtio-net-pci, the USB controllers, VGA (and e1000e on q35): the same
  sections in the same order with the same ids, the same values except the
  few each step documents as left alone, the same vmdesc; the target QEMU
  loads it; the way back gives the input byte for byte where the plan is
  lossless; the vmdesc tells which QEMU wrote each stream.
* Live: ``vmferry migrate --via-proxy`` from QEMU 5.2 to 11.1 and back.
* ``vmferry diff`` between adjacent releases' ``-dump-vmstate``: what no
  transform covers is outside the devices the catalogue covers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from live_helpers import SavedStreams, release_vm, short_dir
from test_live_qemu import Managed

from vmferry.cli import main
from vmferry.cli.compat import source_qemu
from vmferry.cli.files import decode_input, open_input, read_stream_vmdesc
from vmferry.compat import qemu_registry
from vmferry.compat.machines.vmdesc import is_qjson
from vmferry.events import Command, DeviceSection
from vmferry.live.qemu.guest import parse_counts
from vmferry.live.qemu.process import QemuError, QemuVM, qemu_command

pytestmark = [pytest.mark.qemu]

RELEASES = ("5.2", "7.2", "10.0", "11.1")
MARKS = {"5.2": pytest.mark.qemu5, "10.0": pytest.mark.qemu10, "11.1": pytest.mark.qemu11}
NEWEST = {(chipset, q): f"{chipset}-{q}" for chipset in ("pc-i440fx", "pc-q35") for q in RELEASES}

E1000_VIRTIO = ("-device", "e1000", "-device", "virtio-net-pci")
NICS_Q35 = ("-device", "e1000", "-device", "e1000e", "-device", "virtio-net-pci")
ALL = ("-device", "VGA", "-device", "e1000", "-device", "virtio-net-pci", "-device", "piix3-usb-uhci",
       "-device", "usb-ehci", "-device", "qemu-xhci", "-device", "usb-tablet,bus=usb-bus.0")


def _marks(*qemus: str) -> list[Any]:
    return [MARKS[q] for q in dict.fromkeys(qemus) if q in MARKS]




def _transform(src: Path, out: Path, machine: str, qemu: str, *more: str) -> int:
    return main(["transform", str(src), str(out), "--machine", machine, "--qemu-version", qemu, "-q", *more])


def _sections(path: Path) -> list[DeviceSection]:
    return [e for e in decode_input(open_input(str(path))) if isinstance(e, DeviceSection)]


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SavedStreams:
    return SavedStreams(tmp_path_factory.mktemp("releases"))


def _counts_on(src_text: str, dst: QemuVM) -> tuple[int, int]:
    """Wait until ``dst`` counted 5 past where the source stopped; check there is no gap and no restart."""
    before = parse_counts(src_text)
    assert before and before[-1] >= 5
    dst.wait_for_count(before[-1] + 5, timeout=60)
    dst_text = dst.serial_text()
    assert not dst_text.startswith("1\r\n"), "the counter restarted"
    combined = parse_counts(src_text + dst_text)
    assert combined == list(range(1, len(combined) + 1)), combined[-40:]
    return before[-1], combined[-1]


def _refused(src: Path, machine: str, qemu: str, args: tuple[str, ...], workdir: Path, received: str) -> None:
    with release_vm(machine, qemu, args, incoming=True, name="refuses", workdir=workdir) as dst:
        with pytest.raises(QemuError) as e:
            dst.load(src)
    assert f"Machine type received is '{received}'" in str(e.value), str(e.value)[-400:]


# ------------------------------------------------------------ running guests, every ordered pair


PAIRS = [pytest.param(chipset, qa, qb, marks=_marks(qa, qb), id=f"{chipset}:{qa}->{qb}")
         for chipset in ("pc-i440fx", "pc-q35") for qa in RELEASES for qb in RELEASES if qa != qb]


@pytest.mark.parametrize(("chipset", "qa", "qb"), PAIRS)
def test_a_running_guest_keeps_counting_from_any_release_to_any(saved: SavedStreams, tmp_path: Path, chipset: str,
                                                                  qa: str, qb: str) -> None:
    a, b = NEWEST[chipset, qa], NEWEST[chipset, qb]
    src, src_text = saved.get(a, qa, (), running=True)
    _refused(src, b, qb, (), tmp_path / "refuses", a)
    out = tmp_path / "out.mig"
    assert _transform(src, out, b, qb) == 0
    with release_vm(b, qb, (), incoming=True, paused=False, name="destination", workdir=tmp_path / "dst") as dst:
        assert dst.load(out) == "running"
        stopped, went_on = _counts_on(src_text, dst)
    plan = qemu_registry().plan(qemu_registry().resolve(a, qa), qemu_registry().resolve(b, qb))
    print(f"\n{a}@{qa} -> {b}@{qb}: stopped at {stopped}, went on to {went_on}; {len(plan.steps)} steps")


NIC_PAIRS = [pytest.param(chipset, qa, qb, args, marks=_marks(qa, qb), id=f"{chipset}:{qa}->{qb}")
             for chipset, args, pairs in (("pc-q35", NICS_Q35, [("5.2", "11.1"), ("11.1", "7.2"), ("7.2", "10.0"),
                                                                ("10.0", "5.2")]),
                                          ("pc-i440fx", E1000_VIRTIO, [("11.1", "5.2"), ("5.2", "10.0")]))
             for qa, qb in pairs]


@pytest.mark.parametrize(("chipset", "qa", "qb", "args"), NIC_PAIRS)
def test_network_cards_travel_too(saved: SavedStreams, tmp_path: Path, chipset: str, qa: str, qb: str,
                                  args: tuple[str, ...]) -> None:
    """e1000, e1000e (q35) and virtio-net-pci in one guest: each release is a source and a destination."""
    a, b = NEWEST[chipset, qa], NEWEST[chipset, qb]
    src, src_text = saved.get(a, qa, args, running=True)
    out = tmp_path / "out.mig"
    assert _transform(src, out, b, qb) == 0
    nics = {s.schema.name for s in _sections(out)} & {"e1000", "e1000e", "virtio-net"}
    assert nics == ({"e1000", "e1000e", "virtio-net"} if chipset == "pc-q35" else {"e1000", "virtio-net"})
    with release_vm(b, qb, args, incoming=True, paused=False, name="destination", workdir=tmp_path / "dst") as dst:
        assert dst.load(out) == "running"
        _counts_on(src_text, dst)


@pytest.mark.qemu10
@pytest.mark.qemu11
def test_qemu_11_1_refuses_qemu_10_0s_virtio_net_of_the_same_machine_type(saved: SavedStreams, tmp_path: Path) -> None:
    """QEMU 10.0 writes 1024 for the size of a virtqueue no driver set up, above what 11.1 allocates."""
    src, _ = saved.get("pc-i440fx-10.0", "10.0", E1000_VIRTIO, running=False)
    with release_vm("pc-i440fx-10.0", "11.1", E1000_VIRTIO, incoming=True, name="refuses",
                    workdir=tmp_path / "r") as dst:
        with pytest.raises(QemuError) as e:
            dst.load(src)
    assert "vring.num 1024 exceeds allocated max 256" in str(e.value)
    out = tmp_path / "out.mig"
    assert _transform(src, out, "pc-i440fx-10.0", "11.1") == 0
    with release_vm("pc-i440fx-10.0", "11.1", E1000_VIRTIO, incoming=True, name="loads", workdir=tmp_path / "l") as dst:
        assert dst.load(out) in ("prelaunch", "paused")


# ------------------------------------------------------------ a machine type 11.1 no longer has


def _machines(qemu: str) -> str:
    return subprocess.run([*qemu_command(qemu), "-machine", "help"], capture_output=True, text=True, check=True,
                          timeout=60).stdout


@pytest.mark.qemu11
@pytest.mark.parametrize("chipset", ["pc-i440fx", "pc-q35"])
def test_a_machine_type_the_newest_qemu_no_longer_has_is_rescued(saved: SavedStreams, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 chipset: str) -> None:
    a, b = f"{chipset}-2.12", NEWEST[chipset, "11.1"]
    assert f"{a} " not in _machines("11.1") and f"{b} " in _machines("11.1")
    src, src_text = saved.get(a, "7.2", ("-device", "e1000"), running=True)
    _refused(src, b, "11.1", ("-device", "e1000"), tmp_path / "refuses", a)
    out = tmp_path / "out.mig"
    assert _transform(src, out, b, "11.1", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == a and doc["path"][-1] == b
    assert f"{chipset}-7.2@10.0" in doc["path"] and f"{chipset}-10.0@11.1" in doc["path"]
    with release_vm(b, "11.1", ("-device", "e1000"), incoming=True, paused=False, name="destination",
             workdir=tmp_path / "dst") as dst:
        assert dst.load(out) == "running"
        _counts_on(src_text, dst)


@pytest.mark.qemu11
def test_a_stream_without_configuration_needs_no_from_machine(saved: SavedStreams, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """pc-i440fx-2.3 sends no configuration section: the one such machine type of the catalogue is taken."""
    src, src_text = saved.get("pc-i440fx-2.3", "7.2", (), running=True)
    assert not any(type(e).__name__ == "Configuration" for e in decode_input(open_input(str(src))))
    out = tmp_path / "out.mig"
    assert _transform(src, out, "pc-i440fx-11.1", "11.1", "--json") == 0
    assert json.loads(capsys.readouterr().out)["source"] == "pc-i440fx-2.3"
    with release_vm("pc-i440fx-11.1", "11.1", (), incoming=True, paused=False, name="destination",
             workdir=tmp_path / "dst") as dst:
        assert dst.load(out) == "running"
        _counts_on(src_text, dst)


# ------------------------------------------------------------ each step against QEMU's own streams

#: (chipset, source (machine version, QEMU), target (machine version, QEMU), what differs by design)
_STEP_EDGES = [("5.2", "5.2", "5.2", "7.2", "5.2"), ("10.0", "11.1", "10.0", "10.0", "11.1")] + \
    [(a, "11.1", b, "11.1", "") for a, b in zip(["10.0", "10.1", "10.2", "11.0"], ["10.1", "10.2", "11.0", "11.1"])]
STEPS = [pytest.param(chipset, f"{chipset}-{m}", q, f"{chipset}-{n}", r, kind, marks=_marks(q, r),
                      id=f"{chipset}-{m}@{q}->{n}@{r}")
         for chipset in ("pc-i440fx", "pc-q35") for ma, qa, mb, qb, kind in _STEP_EDGES
         for m, q, n, r in ((ma, qa, mb, qb), (mb, qb, ma, qa))]


def _strip_cpuhp(value: Any) -> Any:
    """A state tree or vmdesc without the CPU hotplug subsections (kept by design across 10.0 <-> 11.1), and
    without the sizes of the vmdesc entries that held one."""
    return _strip(value)[0]


def _strip(value: Any) -> tuple[Any, bool]:
    if isinstance(value, list):
        items = [_strip(v) for v in value if not (isinstance(v, dict) and str(v.get("vmsd_name")).endswith("/cpuhp"))]
        return [v for v, _ in items], len(items) != len(value) or any(c for _, c in items)
    if not isinstance(value, dict):
        return value, False
    out, cut = {}, False
    for k, v in value.items():
        if k.endswith("/cpuhp"):
            cut = True
            continue
        out[k], c = _strip(v)
        cut = cut or c
    if out.get("subsections") == []:
        del out["subsections"]
    if cut or (out.get("name") == "pm" and out.get("type") == "struct"):  # ICH9LPC's pm: its size counts cpuhp
        out.pop("size", None)
    return out, cut


def _left_alone(kind: str, vmsd: str, key: str) -> bool:
    """Values each step leaves as the guest saw them (see compat/machines/qemu5.py, qemu11.py), and the clocks:
    the RTC's readings and the ACPI PM timer's overflow flag depend on when each stream was made."""
    if vmsd == "mc146818rtc" or (vmsd == "piix4_pm" and key == "ar.pm1.evt.sts"):
        return True
    if kind == "5.2":  # virtio-net's VLAN table, PCIe Link Status DLLLA, a TCG hflags2 bit
        return (vmsd, key) in {("virtio-net", "virtio"), ("e1000e", "parent_obj[0]"), ("xhci", "parent_obj[0]"),
                               ("cpu", "env.hflags2")}
    if kind == "11.1":  # the ICH9 GCS no-reboot bit
        return (vmsd, key) == ("ICH9LPC", "chip_config")
    return False


@pytest.mark.parametrize(("chipset", "a", "qa", "b", "qb", "kind"), STEPS)
def test_each_step_gives_what_the_other_qemu_writes(saved: SavedStreams, tmp_path: Path, chipset: str, a: str, qa: str,
                                                   b: str, qb: str, kind: str) -> None:
    args = ALL + (("-device", "e1000e") if chipset == "pc-q35" else ())
    src, _ = saved.get(a, qa, args, running=False)
    real, _ = saved.get(b, qb, args, running=False)
    assert source_qemu(str(src))[0] == qa and source_qemu(str(real))[0] == qb  # type: ignore[index]
    out = tmp_path / "out.mig"
    assert _transform(src, out, b, qb) == 0
    got, want = _sections(out), _sections(real)
    assert [(s.idstr, s.instance_id, s.section_id) for s in got] == \
        [(s.idstr, s.instance_id, s.section_id) for s in want]  # order and ids too
    cpuhp = kind == "11.1"
    for h, w in zip(got, want):
        name = w.schema.name
        if not (cpuhp and name in ("piix4_pm", "ICH9LPC")):
            assert h.schema == w.schema and h.version_id == w.version_id, name
        hs, ws = (_strip_cpuhp(x.state) if cpuhp else x.state for x in (h, w))
        bad = [k for k in set(hs) | set(ws) if hs.get(k) != ws.get(k) and not _left_alone(kind, name, k)]
        assert not bad, f"{w.idstr}: {bad}"
    texts = [read_stream_vmdesc(str(p)) or b"{}" for p in (out, real)]
    assert is_qjson(texts[0]) == is_qjson(texts[1]) == (qb == "5.2")
    da, db = (json.loads(t) for t in texts)
    if cpuhp:
        da, db = _strip_cpuhp(da), _strip_cpuhp(db)
    assert da == db
    assert source_qemu(str(out))[0] == qb  # type: ignore[index]
    cmds = [[e.name for e in decode_input(open_input(str(p))) if isinstance(e, Command)] for p in (out, real)]
    assert cmds[0] == cmds[1]
    with release_vm(b, qb, args, incoming=True, name="destination", workdir=tmp_path / "dst") as dst:
        assert dst.load(out) in ("prelaunch", "paused")
    back = tmp_path / "back.mig"
    assert _transform(out, back, a, qa) == 0
    reg = qemu_registry()
    if reg.plan(reg.resolve(a, qa), reg.resolve(b, qb)).lossless:
        assert back.read_bytes() == src.read_bytes()


# ------------------------------------------------------------ live, through the proxies


LIVE = [pytest.param("pc-i440fx", "5.2", "11.1", marks=_marks("5.2", "11.1"), id="pc-i440fx:5.2->11.1"),
        pytest.param("pc-q35", "11.1", "5.2", marks=_marks("5.2", "11.1"), id="pc-q35:11.1->5.2")]


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    yield short_dir(tmp_path)


@pytest.mark.parametrize(("chipset", "qa", "qb"), LIVE)
def test_live_through_the_proxy_between_the_oldest_and_the_newest(where: Path, capsys: pytest.CaptureFixture[str],
                                                                 chipset: str, qa: str, qb: str) -> None:
    a, b = NEWEST[chipset, qa], NEWEST[chipset, qb]
    s = Managed(where, "src", a, ("-device", "e1000"), qemu_version=qa)
    d = Managed(where, "dst", b, ("-device", "e1000"), incoming=True, qemu_version=qb)
    with s as src, d as dst:
        src.wait_for_count(5, timeout=60)
        code = main(["migrate", "--source", s.address, "--dest", d.address, "--via-proxy", "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        route = json.loads(out.out)["route"]
        reg = qemu_registry()
        assert (route["from_machine"], route["machine"]) == (reg.resolve(a, qa), reg.resolve(b, qb))
        assert src.status() == "postmigrate"
        _counts_on(src.serial_text(), dst)


# ------------------------------------------------------------ diff of adjacent releases


#: The devices the catalogue covers (the default x86 devices, NICs, USB, VGA): none may be left uncovered.
COVERED_DEVICES = {"timer", "cpu_common", "cpu", "kvm-tpr-opt", "apic", "fw_cfg", "PCIHost", "PCIBUS", "I440FX", "mch",
                   "dma", "PIIX3", "ICH9LPC", "i8259", "ioapic", "hpet", "mc146818rtc", "i8254", "pcspk", "serial",
                   "fdc", "ps2kbd", "ps2mouse", "pckbd", "vmmouse", "port92", "ide", "i2c_bus", "piix4_pm",
                   "ich9_ahci", "ich9_smb", "acpi_build", "globalstate", "e1000", "e1000e", "virtio-net", "uhci",
                   "ehci", "xhci", "vga", "usb-ptr", "configuration"}
ADJACENT = [pytest.param(qa, qb, covered, marks=_marks(qa, qb), id=f"{qa}->{qb}") for qa, qb, covered in (
    ("5.2", "7.2", {("pckbd", "kbd/pending"), ("pckbd", "kbd/pckbd/extended_state"), ("ps2kbd", ""),
                    ("piix4_pm", "acpi_pci_hotplug.acpi_index")}),
    ("7.2", "10.0", {("hpet", "num_timers_save"), ("i8259", "i8259/ltim"), ("e1000e", "core.timadj")}),
    ("10.0", "11.1", {("mc146818rtc", "base_rtc"), ("hpet", "num_timers_save"), ("ich9_smb", "irq_enabled")}))]


@pytest.mark.parametrize(("qa", "qb", "covered"), ADJACENT)
def test_diff_of_adjacent_releases_says_what_no_transform_covers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 qa: str, qb: str,
                                                                 covered: set[tuple[str, str]]) -> None:
    files = []
    for q in (qa, qb):
        path = tmp_path / f"{q}.json"
        subprocess.run([*qemu_command(None if q == "7.2" else q), "-machine", NEWEST["pc-i440fx", q], "-nodefaults",
                        "-display", "none", "-dump-vmstate", str(path)], check=True, capture_output=True, timeout=60)
        files.append(str(path))
    assert main(["diff", *files, "--from-qemu-version", qa, "--qemu-version", qb, "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    reg = qemu_registry()
    assert report["plan"][0] == reg.resolve(NEWEST["pc-i440fx", qa], qa)
    assert report["plan"][-1] == reg.resolve(NEWEST["pc-i440fx", qb], qb)
    found = {(d["vmsd"], d["item"]) for d in report["differences"] if d["covered"]}
    assert covered <= found, covered - found
    uncovered = [d for d in report["differences"] if not d["covered"]]
    assert uncovered and len(uncovered) == report["uncovered"]
    assert not [d for d in uncovered if d["vmsd"] in COVERED_DEVICES], \
        [(d["kind"], d["vmsd"], d["item"]) for d in uncovered if d["vmsd"] in COVERED_DEVICES]
    assert main(["diff", *files, "--from-qemu-version", qa, "--qemu-version", qb]) == 3
    text = capsys.readouterr().out
    assert f"{len(report['differences'])} differences, {len(uncovered)} not covered" in text
    print(f"\n{qa} -> {qb}: {len(report['differences'])} differences, {len(uncovered)} not covered, in: "
          f"{', '.join(sorted({d['vmsd'] for d in uncovered}))}")
