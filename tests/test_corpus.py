"""Golden streams saved by real QEMU 7.2: byte-exact round trips, descriptions, inspection.

Every stream of the corpus (tests/qemu_recipes.py: every flavour of spec §13,
pc and q35 machine types from 2.x to 7.2, isapc, NICs, USB, audio, VGA, a
running guest and two CPUs) must come back byte for byte through
``vmferry convert`` legacy -> legacy and legacy -> json -> legacy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu_corpus import SCHEMA_FOR
from qemu_recipes import RECIPES, names

from vmferry.cli.files import load_schema_file
from vmferry.cli import main
from vmferry.encode import legacy
from vmferry.events import Configuration, DeviceSection, RamPages, RamRecord, RamZeros
from vmferry.serialize.describe import describe_section

pytestmark = pytest.mark.qemu



def _convert(src: Path, dst: Path, to: str, schema: Path | None = None) -> None:
    argv = ["convert", "-q", str(src), str(dst), "--to", to]
    if schema is not None:
        argv += ["--schema", str(schema)]
    assert main(argv) == 0


@pytest.mark.parametrize("name", names())
def test_round_trips_byte_exact(name, qemu_corpus, tmp_path):
    src = qemu_corpus.get(name)
    schema = qemu_corpus.get(SCHEMA_FOR[name]) if name in SCHEMA_FOR else None
    original = src.read_bytes()

    _convert(src, tmp_path / "same.mig", "legacy", schema)
    assert (tmp_path / "same.mig").read_bytes() == original

    _convert(src, tmp_path / "state.json", "json", schema)
    _convert(tmp_path / "state.json", tmp_path / "back.mig", "legacy")
    assert (tmp_path / "back.mig").read_bytes() == original


@pytest.mark.parametrize("name", names())
def test_describer_reproduces_qemus_vmdesc(name, qemu_corpus):
    """Each device's tree, described again through its schema, gives QEMU's own vmdesc entry."""
    rec = RECIPES[name]
    schemas = load_schema_file(str(qemu_corpus.get(SCHEMA_FOR[name]))) if name in SCHEMA_FOR else None
    events = legacy.decode([qemu_corpus.get(name).read_bytes()], legacy.DecodeOptions(fallback_schemas=schemas))
    devices = 0
    for ev in events:
        if isinstance(ev, DeviceSection) and rec.has_vmdesc:
            again = describe_section(ev.schema, ev.state, ev.idstr, ev.instance_id, ev.version_id)
            assert json.dumps(again) == json.dumps(ev.desc), ev.idstr
            devices += 1
    assert devices > 0 or not rec.has_vmdesc


def test_stream_features_are_decoded(qemu_corpus):
    """The flavours really exercise what they are meant to (and vmferry sees it)."""

    def events(name):
        return list(legacy.decode([qemu_corpus.get(name).read_bytes()]))

    uuid = events("pc-7.2-uuid-ignore-shared")
    cfg = next(e for e in uuid if isinstance(e, Configuration))
    assert cfg.capabilities == ["x-ignore-shared"] and "configuration/uuid" in cfg.state
    xbzrle = events("pc-7.2-xbzrle-running")
    assert any(isinstance(e, RamRecord) and e.flags & 0x40 for e in xbzrle)
    compress = events("pc-7.2-compress")
    assert any(isinstance(e, RamRecord) and e.flags & 0x100 for e in compress)
    slirp = [e for e in events("pc-7.2-e1000-slirp") if isinstance(e, DeviceSection) and e.idstr == "slirp"]
    assert slirp and slirp[0].schema.old_style and len(slirp[0].state["data"]) == slirp[0].size
    running = events("pc-7.2-running")
    assert any(isinstance(e, RamPages) and e.block == "pc.ram" for e in running)
    assert any(isinstance(e, RamZeros) and not e.named for e in running)


def test_stream_without_vmdesc_needs_a_schema(qemu_corpus, capsys):
    assert main(["inspect", str(qemu_corpus.get("pc-2.2-novmdesc"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no schema for section" in err and "--schema" in err and "offset" in err


@pytest.mark.parametrize("name", ["pc-7.2-paused", "q35-7.2-paused", "pc-7.2-uuid-ignore-shared", "pc-2.3-nocfg"])
def test_inspect_summary(name, qemu_corpus, capsys):
    assert main(["inspect", str(qemu_corpus.get(name))]) == 0
    out = capsys.readouterr().out
    machine = RECIPES[name].machine_type
    if RECIPES[name].has_configuration:
        assert f"machine type: {machine}" in out
    assert "pc.ram" in out and "zero pages" in out
    assert "globalstate" in out or name == "pc-2.3-nocfg"
    assert main(["inspect", "--json", str(qemu_corpus.get(name))]) == 0
    doc = json.loads(capsys.readouterr().out)
    cpu = next(d for d in doc["devices"] if d["idstr"] == "cpu")
    assert isinstance(cpu["state"]["env.eip"], int)
    assert any(b["name"] == "pc.ram" and b["zero_pages"] + b["pages"] > 0 for b in doc["ram_blocks"])
