"""What ``vmferry`` does to the files around it: partial outputs, links to the input, permissions, signals,
a closed stdout (issue 17)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from cli_helpers import CLI, one_line_error, partials, signal_while_writing



def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=120, **kw)


@pytest.fixture
def stream(qemu_corpus, tmp_path) -> Path:
    src = tmp_path / "in.mig"
    src.write_bytes(qemu_corpus["pc-7.2-paused"].read_bytes())
    return src


def test_a_planted_symlink_is_never_written_through(stream, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.ferry"
    # where vmferry used to write its partial output, and a dangling link beside it
    os.symlink(victim, f"{out}.vmferry-partial")
    os.symlink(tmp_path / "nowhere", tmp_path / "out.ferry.tmp")
    assert run("convert", "-q", str(stream), str(out), "--to", "ferry").returncode == 0
    assert victim.read_bytes() == b"precious"
    assert out.read_bytes()[:4] == b"\x89FRY" and not out.is_symlink()
    assert not [p for p in partials(tmp_path) if not p.is_symlink()]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_the_output_keeps_the_inputs_permission_bits(stream, tmp_path, mode):
    stream.chmod(mode)
    for cmd in (["convert", "-q", str(stream), str(tmp_path / "o.json"), "--to", "json"],
                ["transform", "-q", str(stream), str(tmp_path / "o.mig"), "--machine", "pc-i440fx-7.2"]):
        assert run(*cmd).returncode == 0
    assert stat.S_IMODE((tmp_path / "o.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "o.mig").stat().st_mode) == mode


def test_an_output_from_a_pipe_is_private(stream, tmp_path):
    out = tmp_path / "o.mig"
    with open(stream, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        done = subprocess.run([*CLI, "convert", "-q", "-", str(out), "--to", "legacy"], stdin=cat.stdout,
                              capture_output=True, timeout=120)
        cat.wait()
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes() == stream.read_bytes()


@pytest.mark.parametrize("link", ["symlink", "hardlink", "same-name"])
def test_an_output_that_is_the_input_is_refused(stream, tmp_path, link):
    data = stream.read_bytes()
    out = tmp_path / "out.mig"
    if link == "symlink":
        os.symlink(stream.name, out)
    elif link == "hardlink":
        os.link(stream, out)
    else:
        out = tmp_path / "sub" / ".." / "in.mig"
        (tmp_path / "sub").mkdir()
    for cmd in (["convert", "-q", str(stream), str(out), "--to", "legacy"],
                ["transform", "-q", str(stream), str(out), "--machine", "pc-i440fx-7.2"]):
        assert "same file" in one_line_error(run(*cmd))
    assert stream.read_bytes() == data and not partials(tmp_path)


def test_stdout_appending_to_the_input_is_refused(stream):
    data = stream.read_bytes()
    with open(stream, "ab") as f:
        out = subprocess.run([*CLI, "convert", "-q", str(stream), "-", "--to", "legacy"], stdout=f,
                             stderr=subprocess.PIPE, timeout=120)
    assert "stdout is the input file" in one_line_error(out)
    assert stream.read_bytes() == data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_removes_the_partial_output(stream, tmp_path, sig):
    out = tmp_path / "out.ferry"
    rc, err = signal_while_writing(["convert", "-q", "-", str(out), "--to", "ferry"], stream.read_bytes(),
                                   tmp_path, sig)
    # the orderly way (one line, exit 128 + N); or, should Python drop the exception in a finaliser, the
    # signal delivered again with its default action (vmferry.cli.common.TERMINATE_GRACE)
    assert rc == 128 + sig or rc == -sig, (rc, err)
    assert err.count("\n") <= 1 and "Traceback" not in err, err
    assert not partials(tmp_path) and not out.exists()


@pytest.mark.parametrize("args", [["inspect", "{s}"], ["inspect", "--json", "{s}"],
                                  ["convert", "-q", "{s}", "-", "--to", "jsonl"], ["formats"]])
def test_a_closed_stdout_is_exit_141_without_a_message(stream, args):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first byte: `vmferry ... | head -0`
    try:
        out = subprocess.run([*CLI, *(a.format(s=stream) for a in args)], stdout=w, stderr=subprocess.PIPE,
                             timeout=120)
    finally:
        os.close(w)
    assert out.returncode == 141 and out.stderr == b"", (out.returncode, out.stderr)


def test_inspect_piped_into_head(stream):
    shell = subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"{' '.join(CLI)} inspect {stream} | head -1; echo status ${{PIPESTATUS[0]}}"],
                           capture_output=True, timeout=120)
    lines = shell.stdout.decode().splitlines()
    assert lines[0].startswith(f"{stream}: legacy") and lines[-1] in ("status 0", "status 141")
    assert shell.stderr == b""
