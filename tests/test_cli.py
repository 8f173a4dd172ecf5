"""The command line as a user meets it: exit codes, one-line errors, stdin/stdout, schema files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmferry.cli import main
from vmferry.cli.files import read_stream_vmdesc
from vmferry.encode import legacy


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmferry.cli", *args], input=stdin, capture_output=True,
                          timeout=120, env={**os.environ, "COLUMNS": "120"})


def test_help_explains_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("inspect", "convert", "formats"):
        assert cmd in out.stdout.decode()
    conv = run_cli("convert", "--help").stdout.decode()
    assert "--schema" in conv and "--to" in conv and "stdin" in conv


@pytest.mark.parametrize("args,message", [
    (["inspect", "no-such-file.mig"], "no-such-file.mig: no such file"),
    (["convert", "no-such-file.mig", "out.mig", "--to", "legacy"], "no such file"),
    (["inspect", "-"], "unrecognised stream format"),
])
def test_user_errors_are_one_line_exit_2(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "vmferry.cli", *args], input=b"", capture_output=True,
                         cwd=tmp_path, timeout=60)
    err = out.stderr.decode()
    assert out.returncode == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_no_command_prints_help_and_fails():
    out = run_cli()
    assert out.returncode == 2 and "usage" in out.stderr.decode()


@pytest.mark.qemu
def test_stdin_to_stdout_round_trip(qemu_corpus):
    data = qemu_corpus.get("pc-7.2-paused").read_bytes()
    as_json = run_cli("convert", "-", "-", "--to", "json", stdin=data)
    assert as_json.returncode == 0, as_json.stderr
    back = run_cli("convert", "-", "-", "--to", "legacy", stdin=as_json.stdout)
    assert back.returncode == 0, back.stderr
    assert back.stdout == data


@pytest.mark.qemu
def test_truncated_stream_names_offset_and_path(qemu_corpus, tmp_path):
    data = qemu_corpus.get("pc-7.2-paused").read_bytes()
    cut = data.index(b"\x03cpu\x00") + 200  # inside the cpu section
    (tmp_path / "cut.mig").write_bytes(data[:cut])
    out = run_cli("convert", str(tmp_path / "cut.mig"), str(tmp_path / "out.json"), "--to", "json")
    err = out.stderr.decode()
    assert out.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "offset 0x" in err and "$." in err
    assert not (tmp_path / "out.json").exists() and not list(tmp_path.glob("*partial*"))


@pytest.mark.qemu
def test_schema_from_vmdesc_json_file(qemu_corpus, tmp_path, capsys):
    donor = qemu_corpus.get("pc-2.3-nocfg")
    vmdesc = tmp_path / "vmdesc.json"
    vmdesc.write_bytes(read_stream_vmdesc(str(donor)))
    stream = qemu_corpus.get("pc-2.2-novmdesc")
    assert main(["convert", "-q", str(stream), str(tmp_path / "s.json"), "--to", "json", "--schema", str(vmdesc)]) == 0
    assert main(["convert", "-q", str(tmp_path / "s.json"), str(tmp_path / "s.mig"), "--to", "legacy"]) == 0
    assert (tmp_path / "s.mig").read_bytes() == stream.read_bytes()
    doc = (tmp_path / "s.json").read_text()
    assert doc.rstrip().endswith('"has_vmdesc": false}')


@pytest.mark.qemu
def test_schema_from_dump_vmstate_names_what_it_cannot_describe(qemu_corpus, tmp_path, capsys):
    dump = tmp_path / "dump.json"
    subprocess.run(["qemu-system-x86_64", "-machine", "pc-i440fx-2.2", "-nodefaults", "-display", "none",
                    "-dump-vmstate", str(dump)], check=True, timeout=60)
    stream = qemu_corpus.get("pc-2.2-novmdesc")
    assert main(["inspect", "--schema", str(dump), str(stream)]) == 2
    err = capsys.readouterr().err
    # 'timer' is registered outside any device class, so -dump-vmstate cannot describe it.
    assert "no schema for section 'timer'" in err and "-dump-vmstate" in err


def test_schema_file_of_the_wrong_kind(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    (tmp_path / "s.mig").write_bytes(b"QEVM\x00\x00\x00\x03\x00")
    assert main(["inspect", "--schema", str(bad), str(tmp_path / "s.mig")]) == 2
    assert "neither a stream, a vmdesc JSON nor a -dump-vmstate JSON" in capsys.readouterr().err


def test_header_only_stream_inspects(tmp_path, capsys):
    path = tmp_path / "tiny.mig"
    path.write_bytes(b"QEVM\x00\x00\x00\x03\x00")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(no configuration section)" in out and "EOF: yes" in out


def test_find_vmdesc_requires_exact_framing():
    assert legacy.find_vmdesc(b"\x00\x06\x00\x00\x00\x02{}") == (1, b"{}")
    assert legacy.find_vmdesc(b"\x00\x06\x00\x00\x00\x03{}") is None


def test_paths_never_leak_into_the_repository():
    repo = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    forbidden = ("/" + "work/", "/" + "tmp/")
    offenders = [f for f in tracked if f.endswith((".py", ".md", ".toml", ".sh", "Makefile", "run"))
                 and any(p in (repo / f).read_text(errors="replace") for p in forbidden)]
    assert not offenders, offenders
