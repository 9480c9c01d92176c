"""No import loops in the four packages (issue 21).

Two checks over the sources of ``packages/*/src`` (this checkout, whatever is installed):

* the graph of each package's imports of its own modules -- every ``import`` / ``from ... import``
  statement, at module level or inside a function (a function-level import hides a loop until the
  function runs), except those under ``if TYPE_CHECKING:`` -- has no cycle;
* every module imports on its own: in a fresh interpreter, each module of the package is imported
  with none of the package's modules loaded before it (a loop that only bites when one of its
  modules is imported first shows up here).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parents[2]
SOURCES = {
    "minference_kernels": PACKAGES / "minference-kernels" / "src" / "minference_kernels",
    "minference_patterns": PACKAGES / "minference-patterns" / "src" / "minference_patterns",
    "minference_hf": PACKAGES / "minference-hf" / "src" / "minference_hf",
    "minference_vllm": PACKAGES / "minference-vllm" / "src" / "minference_vllm",
}


def package_modules(pkg: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``pkg`` (``__init__`` files are the
    packages themselves)."""
    root = SOURCES[pkg]
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (pkg, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
            if name == "TYPE_CHECKING":
                for inner in node.body:
                    skip.update(id(n) for n in ast.walk(inner))
    return skip


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``name``'s own package that ``name`` imports, at any depth of its code.

    ``from .x import y`` imports ``x`` (and ``x.y`` where that is a module); importing a submodule
    also runs the ``__init__`` of each package above it, except the packages ``name`` itself lives
    in (already being imported when ``name`` runs)."""
    pkg = name.split(".")[0]
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    inside = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if is_package:
        inside.add(name)
    out = set()
    for t in targets:
        if t != pkg and not t.startswith(pkg + "."):
            continue
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in known and mod not in inside and mod != name:
                out.add(mod)
    return out


def import_graph(pkg: str) -> dict[str, set[str]]:
    mods = package_modules(pkg)
    return {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing
    itself), each as a sorted list: every import loop lies in one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:  # Tarjan; the graphs are small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_loops():
    """The checker itself: a loop through a function-level import is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"a"}}) == [["a"]]


def test_function_level_imports_are_in_the_graph(tmp_path, monkeypatch):
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from .y import f\n")
    (pkg / "y.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import z\n"
        "def f():\n    from . import x\n"
    )
    (pkg / "z.py").write_text("from .y import f\n")
    monkeypatch.setitem(SOURCES, "loopy", pkg)
    graph = import_graph("loopy")
    assert graph["loopy.y"] == {"loopy.x"}  # the TYPE_CHECKING import does not run
    assert cycles(graph) == [["loopy.x", "loopy.y"]]


#: Loops kept on purpose, each with its reason. The test fails when another loop appears, and
#: when one of these is gone (then delete it here). None are left: minference_patterns' config
#: <-> convert loop went when the format readers moved into config (beside PatternConfig.load).
KNOWN_LOOPS: dict[str, list[list[str]]] = {}


@pytest.mark.parametrize("pkg", sorted(SOURCES))
def test_no_import_loops(pkg):
    graph = import_graph(pkg)
    assert len(graph) > 3, f"no modules found for {pkg} under {SOURCES[pkg]}"
    loops = cycles(graph)
    assert loops == KNOWN_LOOPS.get(pkg, []), f"import loops in {pkg}: " + "; ".join(
        " <-> ".join(c) for c in loops
    )


_IMPORT_EACH = """
import importlib, json, sys
pkg, names = sys.argv[1], json.loads(sys.argv[2])
failed = []
for name in names:
    for m in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print(json.dumps(failed))
"""


def import_each(pkg: str) -> list[str]:
    """Import every module of ``pkg`` (but ``__main__``, which runs the CLI) in one fresh
    interpreter (this one's environment: the installed packages), each with none of ``pkg``'s
    modules loaded; the failures."""
    names = [n for n in package_modules(pkg) if not n.endswith(".__main__")]
    res = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, pkg, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("pkg", sorted(SOURCES))
def test_every_module_imports_on_its_own(pkg):
    """Without vLLM installed, minference_vllm's modules that import it (through ``_compat``) can
    only fail for that reason; minference-vllm's own tests import every module with vLLM."""
    failed = import_each(pkg)
    if pkg == "minference_vllm" and importlib.util.find_spec("vllm") is None:
        failed = [
            f for f in failed if not f.endswith("ModuleNotFoundError: No module named 'vllm'")
        ]
    assert not failed, "\n".join(failed)
