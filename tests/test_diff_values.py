"""``vmferry diff A B`` compares values as well as schemas: a changed register and a changed RAM page are found,
with ``--json``, in bounded memory (a digest per page, never both guests' RAM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from live_helpers import EndpointProcess, short_dir

from vmferry.compat.values import StreamValues, compare, flatten
from vmferry.events import RamBlock, RamMemSize, RamPages, RamZeros

CLI = [sys.executable, "-m", "vmferry.cli"]


def vmferry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=300)


def edited_copy(src: Path, tmp: Path) -> Path:
    """``src`` with cpu env.regs[3] changed (through the JSON form) and one RAM page changed (through ram files)."""
    doc_path = tmp / "s.json"
    assert vmferry("convert", "-q", str(src), str(doc_path), "--to", "json").returncode == 0
    doc = json.loads(doc_path.read_text())
    for rec in doc["records"]:
        if rec.get("t") == "device" and rec["idstr"] == "cpu":
            rec["state"]["env.regs"][3] ^= 0x5A5A
    doc_path.write_text(json.dumps(doc))
    regs = tmp / "regs.mig"
    assert vmferry("convert", "-q", str(doc_path), str(regs), "--to", "legacy").returncode == 0
    ram = tmp / "ram"
    assert vmferry("ram", "extract", "-q", str(regs), str(ram)).returncode == 0
    with open(ram / "pc.ram.ram", "r+b") as f:
        f.seek(0x123000 + 17)
        f.write(b"\xff")
    out = tmp / "b.mig"
    assert vmferry("ram", "inject", str(regs), str(ram), str(out)).returncode == 0
    return out


def test_a_changed_register_and_page_are_reported(qemu_corpus, tmp_path: Path) -> None:
    a = qemu_corpus["pc-7.2-running"]
    b = edited_copy(a, tmp_path)
    text = vmferry("diff", str(a), str(b))
    assert text.returncode == 0, text.stderr.decode()
    shown = text.stdout.decode()
    assert "env.regs[3]" in shown and "RAM pc.ram: 1 of 16,384 pages differ: 0x123000-0x123fff" in shown
    assert "no differences" not in shown.replace("schemas: no differences", "")

    out = vmferry("diff", str(a), str(b), "--json")
    assert out.returncode == 0
    values = json.loads(out.stdout)["values"]
    assert [(d["section"], d["field"]) for d in values["devices"]] == [("cpu/0", "env.regs[3]")]
    d = values["devices"][0]
    assert d["a"] ^ d["b"] == 0x5A5A
    ram = {r["block"]: r for r in values["ram"]}
    assert ram["pc.ram"]["ranges"] == [[0x123, 0x124]] and ram["pc.ram"]["differing_pages"] == 1
    assert all(r["differing_pages"] == 0 for name, r in ram.items() if name != "pc.ram")
    assert not values["only_in_a"] and not values["only_in_b"]

    same = vmferry("diff", str(a), str(a))
    assert "values: the same" in same.stdout.decode()
    assert "values" not in json.loads(vmferry("diff", str(a), str(b), "--json", "--schemas-only").stdout)


def test_two_256_mib_guests_are_compared_in_bounded_memory(tmp_path: Path) -> None:
    where = short_dir(tmp_path)
    a, b = where / "a.mig", where / "b.mig"
    with EndpointProcess(where, "ep", "--ram", "256M", "--fill", "random") as ep:
        assert vmferry("migrate", "--source", ep.address, "--to-file", str(a), "-q").returncode == 0
        ep.cmd("cont")  # the workload dirties pages, the counter moves on
        import time

        time.sleep(0.5)
        assert vmferry("migrate", "--source", ep.address, "--to-file", str(b), "-q").returncode == 0
    # The peak is VmHWM of /proc/self/status: the high-water mark of this process's own address space, mapped
    # file pages (the stream windows, the interpreter's libraries) included.  Not ru_maxrss: Linux folds the
    # peak RSS of the address space a process had before exec into it (exec_mmap), and a subprocess of pytest
    # starts in pytest's (vfork), so ru_maxrss reports the test runner's own peak whenever that is the larger
    # (213-299 MB late in the full suite, for a diff that peaks near 41 MB).
    probe = ("import json, sys\nfrom vmferry.cli import main\n"
             f"code = main(['diff', {str(a)!r}, {str(b)!r}, '--json'])\n"
             "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
             "print(json.dumps({'code': code, 'rss': hwm}), file=sys.stderr)\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300)
    stats = json.loads(run.stderr.decode().strip().splitlines()[-1])
    values = json.loads(run.stdout)["values"]
    pc_ram = next(r for r in values["ram"] if r["block"] == "pc.ram")
    assert stats["code"] == 0 and 0 < pc_ram["differing_pages"] < pc_ram["pages"] == 65536
    assert any(d["section"].startswith("vmferry-counter") or "count" in d["field"] for d in values["devices"]), \
        values["devices"][:5]
    # the guests hold 256 MiB of random RAM each; the diff holds 2 x 512 KiB of digests and a few mapped windows
    assert stats["rss"] < 192 * 1024, f"peak RSS (VmHWM) {stats['rss']} KiB"


def test_values_unit() -> None:
    ps = 4096
    a, b = StreamValues(), StreamValues()
    for v in (a, b):
        v.add(RamMemSize(4 * ps, [RamBlock("ram", 4 * ps)]))
    a.add(RamPages("ram", 0, 2, True, ps, data=b"\1" * ps + b"\2" * ps))
    a.add(RamZeros("ram", 0, 1, False, ps))  # sent again as zero: the last record counts
    b.add(RamPages("ram", ps, 1, True, ps, data=b"\2" * ps))
    b.add(RamPages("ram", 3 * ps, 1, False, ps, data=b"\3" * ps))
    d = compare(a, b)
    assert [(r.block, r.ranges) for r in d.ram] == [("ram", [(3, 4)])]
    assert dict(flatten({"a": [1, {"b": 2}], "c/d": {"e": 3}})) == {"a[0]": 1, "a[1].b": 2, "c/d.e": 3}
