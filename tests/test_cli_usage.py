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
    (["ram", "inject", "a", "b"], "required: output"),  # a command of a command
    (["convert", "a.mig", "b.mig", "--from", "qcow2"], "invalid choice: 'qcow2'"),
    (["migrate", "--source", "unix:a", "--dest", "unix:b", "--to", "json"], "invalid choice: 'json'"),
])
def test_a_wrong_option_is_one_line(args, says):
    assert says in one_line_error(run(*args))


def test_diff_refuses_an_unknown_machine_type(qemu_corpus):
    s = str(qemu_corpus["pc-7.2-paused"])
    for option in ("--machine", "--from-machine"):
        assert "pc-foo-1.0" in one_line_error(run("diff", s, s, option, "pc-foo-1.0"))


# ---------------------------------------------------------------------------
# the same options everywhere, the docs, version, completion, progress bars
# ---------------------------------------------------------------------------

import argparse  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from vmferry.cli.main import build_parser  # noqa: E402

DOC = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
SHARED = {"--help", "--json", "--quiet", "--verbose"}


def commands() -> list[tuple[str, argparse.ArgumentParser]]:
    def walk(p: argparse.ArgumentParser, prefix: str):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    subs = [a for a in child._actions if isinstance(a, argparse._SubParsersAction)]
                    yield from walk(child, f"{prefix} {name}".strip()) if subs else [(f"{prefix} {name}".strip(), child)]
    return list(walk(build_parser(), ""))


def visible_long_options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")}


def doc_section(command: str) -> str:
    m = re.search(rf"^### `vmferry {re.escape(command)}\b.*?$(.*?)(?=^##)", DOC, re.M | re.S)
    assert m, f"docs/cli.md has no section for vmferry {command}"
    return m.group(1)


def test_every_command_takes_json_quiet_and_verbose():
    for name, p in commands():
        if name == "completion":
            continue
        opts = p._option_string_actions
        assert {"--json", "-q", "--quiet", "-v", "--verbose"} <= set(opts), name


def test_docs_cli_md_matches_help():
    documented = set(re.findall(r"^### `vmferry ([a-z]+(?: [a-z]+)?)", DOC, re.M))
    names = {name for name, _ in commands()}
    assert documented == names
    for name, p in commands():
        section = doc_section(name)
        listed: set[str] = set()
        for bullet in re.findall(r"^\* (`.*?)(?=^\S|\Z)", section, re.M | re.S):  # a bullet with its continuation
            listed |= set(re.findall(r"`(--[a-z][a-z-]*)", bullet.split("`:")[0]))
        assert listed == visible_long_options(p) - SHARED, (name, listed ^ (visible_long_options(p) - SHARED))
    for option in ("`--json`", "`-q`, `--quiet`", "`-v`, `--verbose`", "`vmferry -V`", "vmferry completion bash"):
        assert option in DOC


def test_version():
    out = run("-V")
    assert out.returncode == 0 and out.stdout.decode().startswith("vmferry ")
    assert run("--version").stdout == out.stdout


def test_shell_completion(tmp_path):
    def complete(line: str) -> list[str]:
        target = tmp_path / "out.txt"
        env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
               "_ARGCOMPLETE_STDOUT_FILENAME": str(target), "_ARGCOMPLETE_IFS": "\n"}
        subprocess.run(CLI, env=env, capture_output=True, timeout=60)
        return [w.strip() for w in target.read_text().splitlines()]

    assert complete("vmferry conv") == ["convert"]
    assert set(complete("vmferry convert a b --to js")) == {"json", "jsonl"}
    assert "--to-file" in complete("vmferry migrate --to")
    script = run("completion", "bash")
    assert script.returncode == 0 and "complete" in script.stdout.decode() and "vmferry" in script.stdout.decode()


def test_verbose_says_time_and_memory(qemu_corpus):
    out = run("inspect", "-v", str(qemu_corpus["pc-7.2-paused"]))
    assert out.returncode == 0 and re.search(r"vmferry inspect: done in [\d.]+ s, peak memory [\d,]+ MiB",
                                             out.stderr.decode())
    assert run("inspect", "-q", str(qemu_corpus["pc-7.2-paused"])).stderr == b""


def test_json_of_commands_that_write_streams(qemu_corpus, tmp_path):
    src = qemu_corpus["pc-7.2-paused"]
    out = run("convert", str(src), str(tmp_path / "o.ferry"), "--to", "ferry", "--json")
    doc = json_of(out)
    assert doc["bytes"] == (tmp_path / "o.ferry").stat().st_size and doc["input_format"] == "legacy"
    out = run("transform", str(src), str(tmp_path / "o.mig"), "--machine", "pc-i440fx-6.2", "--json")
    assert json_of(out)["bytes"] == (tmp_path / "o.mig").stat().st_size
    assert "--json prints on stdout" in one_line_error(run("convert", str(src), "-", "--to", "json", "--json"))


def json_of(out: subprocess.CompletedProcess):
    import json

    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)


def test_progress_bar_fits_80_columns_in_one_unit_and_names_the_file():
    from rich.console import Console

    from vmferry.cli.common import bar_label, make_progress

    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = make_progress(con, transient=False)  # drawn once, without the live display's cursor moves
    task = bar.add_task(bar_label("/srv/guests/a-guest-with-a-rather-long-name-2026-12-07.mig"), total=3 << 30)
    bar.advance(task, 1536 << 20)
    other = bar.add_task(bar_label("guest.mig"), total=None)
    bar.advance(other, 5 << 20)
    con.print(bar.make_tasks_table(bar.tasks))
    text = buf.getvalue()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert any(line.startswith("…") and "-name-2026-12-07.mig" in line and "1536.0/3072.0 MiB" in line
               for line in lines), lines
    assert any(line.startswith("guest.mig") and "5.0 MiB" in line for line in lines), lines
    units = set(re.findall(r"\b([KMGT]i?B)\b", text))
    assert units == {"MiB"}, units
