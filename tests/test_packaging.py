"""Packaging: the license as an SPDX expression with its file, classifiers, URLs, py.typed, and a build that
warns about nothing; the README's first lines."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vmferry

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_its_file():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    # PEP 639: no License :: classifier beside an expression (setuptools refuses the pair)
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    requires = PYPROJECT["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in requires), requires


def test_metadata_has_classifiers_urls_and_typing():
    project = PYPROJECT["project"]
    assert "Typing :: Typed" in project["classifiers"]
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in project["classifiers"])
    assert all(u.startswith("https://") for u in project["urls"].values()) and project["urls"]
    assert (Path(vmferry.__file__).parent / "py.typed").is_file()
    meta = importlib.metadata.metadata("vmferry")
    assert meta.get("License-Expression") == "MIT", "reinstall: make .venv/.installed"
    assert "Typing :: Typed" in meta.get_all("Classifier")


@pytest.mark.slow
def test_a_wheel_builds_without_warnings_and_ships_py_typed(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(tmp_path),
                          str(ROOT)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "No matching distribution" in out.stderr + out.stdout:
        pytest.skip("no package index reachable for the build requirements")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "deprecated" not in text.lower() and "BuildBackendWarning" not in text, text[-3000:]
    import zipfile

    wheel = next(tmp_path.glob("vmferry-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "vmferry/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names


def test_readme_opens_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "# vmferry" and lines[2] == "```sh"
    assert lines[3].startswith("make demo ") and lines[4].startswith("make test ") and lines[5] == "```"


def test_readme_says_where_the_command_is_and_how_to_get_a_first_stream():
    text = (ROOT / "README.md").read_text()
    assert ".venv/bin/vmferry" in text
    assert "vmferry migrate --source unix:qemu.qmp --to-file guest.mig" in text
