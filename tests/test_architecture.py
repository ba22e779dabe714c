"""The layout's rules, read from the source with ``ast`` so that a new violation fails CI:

* nothing under ``sb3_warmstart`` imports the simulator (``llm_cluster_env.sim``);
* ``llm_cluster_env.config`` reaches no simulator module, directly or through what it imports;
* ``llm_cluster_env.deploy`` imports neither the simulator nor the training side;
* no import circle among the modules of either package.

Every import statement counts (module level and inside functions, where a lazy import would
hide a circle) except those under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llm_cluster_env", "sb3_warmstart")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, known: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (a ``from pkg import sub`` of a submodule counts as
    importing the submodule; a name from a package counts as importing the package)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = module.split(".")
                    if not is_package:
                        anchor = anchor[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {name for name in found if name.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for imported in _imports(path, name, known):
            # `import a.b.c` of a module we know; otherwise the longest known prefix
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def test_the_walker_sees_the_packages(graph):
    assert "llm_cluster_env.sim.replica" in graph
    assert "sb3_warmstart.pipeline.runner" in graph
    assert "llm_cluster_env.sim.replica" in graph["llm_cluster_env.env.observation"] or any(
        t.startswith("llm_cluster_env.sim") for t in graph["llm_cluster_env.env.cluster_env"])


def test_training_side_never_imports_the_simulator(graph):
    offending = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("sb3_warmstart")
                       for t in ts if t.startswith("llm_cluster_env.sim"))
    assert offending == []


def test_env_config_reaches_no_simulator_module(graph):
    seen, todo = set(), ["llm_cluster_env.config"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph.get(name, ()))
    assert sorted(n for n in seen if n.startswith("llm_cluster_env.sim")) == []


def test_deployment_code_needs_neither_simulator_nor_training(graph):
    offending = sorted(f"{m} -> {t}" for m, ts in graph.items()
                       if m.startswith("llm_cluster_env.deploy")
                       for t in ts if t.startswith(("llm_cluster_env.sim", "sb3_warmstart")))
    assert offending == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(graph, package):
    # A package's __init__ that re-exports its own submodules is not a circle of the design:
    # drop edges from a package to the modules inside it.
    sub = {m: {t for t in ts if not t.startswith(m + ".")}
           for m, ts in graph.items() if m.startswith(package)}
    assert _cycles(sub) == []


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
