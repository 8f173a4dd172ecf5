"""The command line's surface (issue 17): one-line usage errors, refused unknown machine types, the options
every command shares, version, completion, and docs/cli.md matching ``--help``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "vmferry.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, timeout=120, **kw)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode()
    assert out.returncode == 2, (out.returncode, err)
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err, err
    return err


@pytest.mark.parametrize("args,says", [
    (["convert", "a.mig", "b.mig", "--to", "nope"], "invalid choice: 'nope'"),
    (["transform", "a.mig", "b.mig"], "required: --machine"),
    (["inspect"], "required: stream"),
    (["nope"], "invalid choice: 'nope'"),
    (["libvirt", "transform", "a", "b"], "required: --machine"),
    (["migrate", "--source", "unix:a", "--dest", "unix:b", "--to", "json"], "invalid choice: 'json'"),
])
def test_a_wrong_option_is_one_line(args, says):
    assert says in one_line_error(run(*args))


def test_diff_refuses_an_unknown_machine_type(qemu_corpus):
    s = str(qemu_corpus["pc-7.2-paused"])
    for option in ("--machine", "--from-machine"):
        assert "pc-foo-1.0" in one_line_error(run("diff", s, s, option, "pc-foo-1.0"))
