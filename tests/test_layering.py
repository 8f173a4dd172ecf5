"""The house keeps its layers: pure layers below, the live package above them, the CLI on top, and no circle.

* ``serialize/``, ``compat/``, ``encode/``, ``events.py``, ``errors.py`` and
  ``caps.py`` import no module that does I/O, processes, sockets or clocks,
  and nothing of ``vmferry.live`` or ``vmferry.cli``.
* They also call no ``open``/``print``/``input``.
* Nothing below the CLI imports ``vmferry.cli``.
* No command module of ``vmferry.cli`` imports another: they share
  ``cli.common`` (and ``cli.files``, ``cli.images``, ``cli.summary``).
* The import graph has no cycle, counting imports inside functions too.
* The top level of ``src/vmferry`` holds the packages and only the package
  face and the shared vocabulary (errors, events, capabilities).
"""

from __future__ import annotations

import ast
from pathlib import Path

import vmferry

PACKAGE = Path(vmferry.__file__).parent

#: Standard modules that mean I/O, processes, sockets or clocks (``io`` is not one: the codecs hand
#: in-memory ``io.BytesIO`` buffers to cbor2).
IO_MODULES = {"os", "sys", "socket", "subprocess", "pathlib", "shutil", "tempfile", "time", "mmap",
              "threading", "asyncio", "select", "signal", "ssl", "selectors", "multiprocessing", "ctypes"}
PURE = ("vmferry.serialize", "vmferry.compat", "vmferry.encode", "vmferry.events", "vmferry.errors", "vmferry.caps")
#: Modules of vmferry.cli that are commands (they may import only the shared ones).
CLI_SHARED = {"vmferry.cli.common", "vmferry.cli.copyout", "vmferry.cli.files", "vmferry.cli.images",
              "vmferry.cli.summary"}
TOP_LEVEL_MODULES = {"__init__.py", "errors.py", "events.py", "caps.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every import in module ``name``, nested ones included."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else (node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


def _under(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read() -> None:
    assert len(MODULES) > 60
    assert ("vmferry.live.transport", 0) not in _imports("vmferry.live.proxy")
    assert any(m == "vmferry.live.transport" for m, _ in _imports("vmferry.live.proxy"))


def test_pure_layers_import_no_io_and_nothing_above_them() -> None:
    checked = [m for m in MODULES if _under(m, PURE)]
    assert len(checked) >= 30
    for name in checked:
        for imported, line in _imports(name):
            where = f"{name}:{line}"
            assert imported.split(".")[0] not in IO_MODULES, f"{where} imports {imported}"
            assert not _under(imported, ("vmferry.live", "vmferry.cli")), f"{where} imports {imported}"


def test_pure_layers_call_no_io() -> None:
    for name in (m for m in MODULES if _under(m, PURE)):
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"open", "print", "input"}, f"{name}:{node.lineno} calls {node.func.id}()"


def test_nothing_below_the_cli_imports_it() -> None:
    for name in (m for m in MODULES if not _under(m, "vmferry.cli")):
        for imported, line in _imports(name):
            assert not _under(imported, "vmferry.cli"), f"{name}:{line} imports {imported}"


def test_no_cli_command_imports_another() -> None:
    commands = [m for m in MODULES if _under(m, "vmferry.cli") and m not in CLI_SHARED
                and m not in ("vmferry.cli", "vmferry.cli.main", "vmferry.cli.__main__")]
    assert {"vmferry.cli.stream", "vmferry.cli.compat", "vmferry.cli.live", "vmferry.cli.proxy"} <= set(commands)
    for name in commands:
        for imported, line in _imports(name):
            if _under(imported, "vmferry.cli"):
                assert imported in CLI_SHARED, f"{name}:{line} imports the command module {imported}"


def test_no_import_cycle() -> None:
    graph = {name: {m for m, _ in _imports(name) if m in MODULES and m != name} for name in MODULES}
    # a package's __init__ importing its own submodules is how a package shows its face, not a layer going up
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (_under(name, d) and MODULES[d].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_top_level_holds_packages_and_the_shared_vocabulary() -> None:
    modules = {p.name for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert modules <= TOP_LEVEL_MODULES, f"modules at the top level: {sorted(modules - TOP_LEVEL_MODULES)}"
    assert {"serialize", "compat", "encode", "live", "cli"} <= packages
