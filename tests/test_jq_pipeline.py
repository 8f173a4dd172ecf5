"""The pipeline of docs/format.md §7, for real: vmferry | jq | vmferry, and the sniffing and ``--from`` it needs.

jq 1.7 or later keeps 64-bit integers exact (1.6 rounds them): the test uses
the system's jq when it is that recent, else trixie's inside the QEMU 10.0
chroot (scripts/ensure-jq.sh, run by ``make test``).  Outside CI a missing
jq 1.7 skips, saying so; in CI it fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from vmferry.encode import jsonl, sniff

CLI = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "vmferry.cli"))


def _version(cmd: list[str]) -> tuple[int, int] | None:
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    m = re.match(r"jq-(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else None


def jq_command() -> list[str] | None:
    """A jq >= 1.7 to run: the system's, or the one in the QEMU 10.0 chroot."""
    candidates = [["jq"]]
    root = os.environ.get("VMFERRY_QEMU10_ROOT", "/var/cache/vmferry/qemu-10.0-trixie")
    if os.geteuid() == 0 and shutil.which("chroot"):
        candidates.append([shutil.which("chroot") or "chroot", root, "jq"])
    for cmd in candidates:
        v = _version(cmd)
        if v is not None and v >= (1, 7):
            return cmd
    return None


@pytest.fixture(scope="module")
def jq() -> str:
    cmd = jq_command()
    if cmd is None:
        reason = "jq >= 1.7 not found (scripts/ensure-jq.sh installs it; jq 1.6 rounds 64-bit integers)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("CI is set and " + reason, pytrace=False)
        pytest.skip(reason + " (CI unset, so skipping)")
    return " ".join(shlex.quote(a) for a in cmd)


def pipeline(command: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, timeout=300, cwd=cwd)


def test_jq_identity_gives_back_qemus_bytes(qemu_corpus, jq, tmp_path):
    src = qemu_corpus["pc-7.2-running"]
    out = pipeline(f"{CLI} convert -q {src} - --to jsonl | {jq} -c . | {CLI} convert -q - y.mig --to legacy",
                   tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    assert (tmp_path / "y.mig").read_bytes() == src.read_bytes()


def test_the_documented_edit_changes_that_register_only(qemu_corpus, jq, tmp_path):
    src = qemu_corpus["pc-7.2-running"]
    doc = (os.path.join(os.path.dirname(__file__), "..", "docs", "format.md"))
    text = open(doc).read()
    block = text[text.index("vmferry convert guest.mig - --to jsonl"):]
    jq_filter = re.search(r"jq -c '([^']+)'", block)[1]  # the filter exactly as the doc shows it
    out = pipeline(f"{CLI} convert -q {src} - --to jsonl | {jq} -c {shlex.quote(jq_filter)} "
                   f"| {CLI} convert -q - edited.mig --to legacy", tmp_path)
    assert out.returncode == 0, out.stderr.decode()

    def devices(path) -> dict[str, object]:
        got = subprocess.run([sys.executable, "-m", "vmferry.cli", "inspect", "--json", str(path)],
                             capture_output=True, timeout=120)
        assert got.returncode == 0, got.stderr
        return {f"{d['idstr']}/{d['instance_id']}": d.get("state", d.get("opaque"))
                for d in json.loads(got.stdout)["devices"]}

    before, after = devices(src), devices(tmp_path / "edited.mig")
    assert after["serial/0"]["state"]["scr"] == 7 and before["serial/0"]["state"]["scr"] != 7
    after["serial/0"]["state"]["scr"] = before["serial/0"]["state"]["scr"]
    assert after == before
    assert len((tmp_path / "edited.mig").read_bytes()) == len(src.read_bytes())


@pytest.mark.parametrize("first", [
    b'{"t": "stream", "format": "vmferry-jsonl", "version": 1}\n',
    b'{"t":"stream","format":"vmferry-jsonl","version":1}\n',          # jq -c
    b'{"format":"vmferry-jsonl","t":"stream","version":1}\n',          # jq -S -c
    b'  {"version": 1,   "format": "vmferry-jsonl", "t": "stream"}\n',
])
def test_json_lines_are_sniffed_by_parsing_the_first_line(first):
    assert jsonl.sniff(first) and sniff(first + b'{"t": "header", "version": 3}\n') == "jsonl"
    assert jsonl.sniff(first[:50])  # a head that ends inside the line: the format is named in it


def test_other_json_is_not_json_lines():
    assert not jsonl.sniff(b'{"format": "vmferry-json", "version": 1, "records": [\n')
    assert not jsonl.sniff(b'{"t": "stream", "format": "vmferry-cbor", "version": 1}\n')
    assert sniff(b'{"format": "vmferry-json", "version": 1, "records": [\n') == "json"


def test_from_names_the_input_format(qemu_corpus, tmp_path):
    src = qemu_corpus["pc-7.2-paused"]
    ok = pipeline(f"{CLI} convert -q --from legacy - out.mig --to legacy < {src}", tmp_path)
    assert ok.returncode == 0 and (tmp_path / "out.mig").read_bytes() == src.read_bytes()
    bad = pipeline(f"{CLI} inspect --from jsonl {src}", tmp_path)
    err = bad.stderr.decode()
    assert bad.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
