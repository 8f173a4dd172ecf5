"""QEMU accepts what vmferry writes: edit a stream in its JSON form, load it, see the change.

The edits are the ones a person would make in the JSON document: a CPU
register in the ``cpu`` device record, and a byte of guest RAM (a page taken
out of a run of zero pages).  The result is loaded into a fresh QEMU 7.2
with ``-incoming defer``; HMP shows the new values.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from vmferry.cli import main
from vmferry.live.qemu.process import QemuVM

pytestmark = pytest.mark.qemu

RAM_PAGE = 0x20000  # a guest-physical page that the paused guest has never touched (a ZERO record)
MARK = b"vmferry!"
EAX = 0x1234ABCD


def _records(path: Path) -> tuple[str, list[dict], str]:
    lines = path.read_text().split("\n")
    head, body, tail = lines[0], [json.loads(x.rstrip(",")) for x in lines[1:-2]], lines[-2]
    return head, body, tail


def _write(path: Path, head: str, body: list[dict], tail: str) -> None:
    path.write_text("\n".join([head, ",\n".join(json.dumps(r) for r in body), tail, ""]))


def _split_zero_run(records: list[dict], block: str, offset: int, data: bytes) -> None:
    """Replace the zero page at ``offset`` of ``block`` by a page holding ``data``."""
    for i, rec in enumerate(records):
        if rec["t"] != "zeros" or rec["block"] != block:
            continue
        first, count = rec["offset"], rec["count"]
        if not first <= offset < first + count * 4096:
            continue
        k = (offset - first) // 4096
        parts = []
        if k:
            parts.append(dict(rec, count=k))
        page = data + bytes(4096 - len(data))
        parts.append({"t": "pages", "block": block, "offset": offset, "count": 1, "named": rec["named"] and not k,
                      "data": base64.b64encode(page).decode()})
        if k + 1 < count:
            parts.append(dict(rec, offset=offset + 4096, count=count - k - 1, named=False))
        records[i:i + 1] = parts
        return
    raise AssertionError(f"no zero run covers {block}+{offset:#x}")


def test_edited_register_and_ram_load_into_qemu(qemu_corpus, tmp_path):
    src = qemu_corpus.get("pc-7.2-paused")
    doc = tmp_path / "guest.json"
    assert main(["convert", "-q", str(src), str(doc), "--to", "json"]) == 0
    head, records, tail = _records(doc)
    cpu = next(r for r in records if r["t"] == "device" and r["idstr"] == "cpu")
    cpu["state"]["env.regs"][0] = EAX
    _split_zero_run(records, "pc.ram", RAM_PAGE, MARK)
    _write(doc, head, records, tail)
    edited = tmp_path / "edited.mig"
    assert main(["convert", "-q", str(doc), str(edited), "--to", "legacy"]) == 0
    assert edited.read_bytes() != src.read_bytes()

    with QemuVM("pc-i440fx-7.2", incoming=True, paused=True, workdir=tmp_path / "dst") as vm:
        state = vm.load(edited)
        assert state in ("paused", "prelaunch")
        regs = vm.hmp("info registers")
        assert re.search(r"EAX=1234abcd", regs, re.I), regs
        dump = vm.hmp(f"xp /8bx {RAM_PAGE:#x}")
        assert " ".join(f"0x{b:02x}" for b in MARK) in dump, dump


def test_out_of_range_edit_is_refused_with_its_path(qemu_corpus, tmp_path, capsys):
    src = qemu_corpus.get("pc-7.2-paused")
    doc = tmp_path / "guest.json"
    assert main(["convert", "-q", str(src), str(doc), "--to", "json"]) == 0
    head, records, tail = _records(doc)
    next(r for r in records if r["t"] == "device" and r["idstr"] == "cpu")["state"]["env.eip"] = 1 << 64
    _write(doc, head, records, tail)
    assert main(["convert", "-q", str(doc), str(tmp_path / "bad.mig"), "--to", "legacy"]) == 2
    err = capsys.readouterr().err
    # refused as it is read: the record's path and its offset in the document, before anything is written
    found = re.search(r"\$\.records\[(\d+)\]\.state\.env\.eip: \d+ out of range for uint64 .*at offset (0x[0-9a-f]+)", err)
    assert found, err
    assert records[int(found[1])]["idstr"] == "cpu" and 0 < int(found[2], 16) < doc.stat().st_size
    assert not (tmp_path / "bad.mig").exists()
