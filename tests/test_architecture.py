"""The layering of docs/architecture.md, checked: no import cycles inside the package, nothing under
vitspec/ imports a backend module, and importing the core loads no deep-learning framework."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where each import name lives in the source tree (pyproject's package-dir).
ROOTS = {
    "vitspec": REPO / "vitspec",
    "vitspec.backends": REPO / "backends",
    "vitspec.conformance": REPO / "conformance",
    "vitspec.cli": REPO / "cli",
}
FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "jaxlib")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "vitspec" and parts and parts[0] in ("backends", "conformance", "cli"):
                continue
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (function-level imports count too)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):  # imports for type checkers only are not run
        if (
            isinstance(block, ast.If)
            and isinstance(block.test, ast.Name)
            and block.test.id == "TYPE_CHECKING"
        ):
            block.body = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def test_the_package_has_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # A package importing its own submodules (a registry) is not a cycle of layers.
    graph = {
        n: {m for m in deps if not m.startswith(n + ".") or n == "vitspec"}
        for n, deps in graph.items()
    }
    graph["vitspec"] = set()  # vitspec/__init__ re-exports lazily (PEP 562 __getattr__)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_nothing_under_vitspec_imports_a_backend_module() -> None:
    modules = _modules()
    backend_modules = {n for n in modules if n.startswith("vitspec.backends.")}
    for name, path in modules.items():
        if not name.startswith(("vitspec.backends", "vitspec.conformance", "vitspec.cli")):
            hits = _imports(name, path, set(modules)) & backend_modules
            assert not hits, f"{path.relative_to(REPO)} imports {sorted(hits)}"


def test_importing_the_core_and_every_backend_module_loads_no_framework() -> None:
    core = sorted(
        n for n in _modules() if not n.startswith(("vitspec.cli", "vitspec.conformance.plugin"))
    )
    code = (
        "import importlib, json, sys\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
