"""vmferry.compat does no I/O: no file, process, socket or clock in any of its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import vmferry.compat

#: Standard modules that would mean I/O, processes or clocks.
FORBIDDEN_MODULES = {"os", "sys", "io", "socket", "subprocess", "pathlib", "shutil", "tempfile", "time", "mmap",
                     "threading", "asyncio", "select", "signal"}
#: vmferry's own modules that do I/O (the orchestration layer).
FORBIDDEN_VMFERRY = {"files", "cli", "cli_compat", "qemu_process", "qemu_recipes", "transport", "migrate", "proxy",
                     "machine", "qmp", "demo"}
FORBIDDEN_CALLS = {"open", "print", "input"}


def test_compat_modules_do_no_io() -> None:
    root = Path(vmferry.compat.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in FORBIDDEN_CALLS, f"{where} calls {node.func.id}()"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in FORBIDDEN_MODULES, f"{where} imports {alias.name}"
            elif isinstance(node, ast.ImportFrom):
                top = (node.module or "").split(".")[0]
                banned = FORBIDDEN_VMFERRY if node.level else FORBIDDEN_MODULES
                assert top not in banned, f"{where} imports {node.module}"
