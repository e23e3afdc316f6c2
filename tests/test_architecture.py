"""The tree is the architecture: the layers of docs/architecture.md (read from its table), no
import of the package root from inside it, no import cycles (function-local imports included),
and the model does not depend on how it is trained."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import vlm_adapters

PACKAGE = Path(vlm_adapters.__file__).parent
ARCHITECTURE = Path(__file__).parents[1] / "docs" / "architecture.md"
ROOT = "vlm_adapters"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skipped = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", "")) == (
            "TYPE_CHECKING"
        ):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return skipped


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its body (functions included)."""
    tree = ast.parse(MODULES[name].read_text())
    skipped = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_even_through_function_local_imports() -> None:
    assert len(GRAPH) > 40 and GRAPH["vlm_adapters.model.core"]  # the walk sees the package
    assert _cycles(GRAPH) == []


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_model_does_not_depend_on_training() -> None:
    reached = _reachable("vlm_adapters.model")
    assert not [m for m in reached if m.startswith(("vlm_adapters.training", "vlm_adapters.cli"))]
    code = (
        "import sys, vlm_adapters.model; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'accelerate' "
        "or m.startswith('vlm_adapters.training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_components_never_import_each_other() -> None:
    families = ("vlm_adapters.vision", "vlm_adapters.connectors", "vlm_adapters.llm")
    for family in families:
        others = tuple(f for f in families if f != family)
        for name, targets in GRAPH.items():
            if name.startswith(family):
                assert not [t for t in targets if t.startswith(others)], name


def _layer_table(text: str) -> dict[str, int]:
    """``{package or top-level module: layer}`` from the markdown table headed ``| Layer |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Layer |"))
    layers: dict[str, int] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        layer, names = (cell.strip() for cell in line.strip("|").split("|")[:2])
        for name in re.findall(r"`([\w.]+)`", names):
            assert name not in layers, f"{ARCHITECTURE.name}: {name} is in two layers"
            layers[name] = int(layer)
    return layers


LAYERS = _layer_table(ARCHITECTURE.read_text())


def _unit(module: str) -> str:
    """The table entry ``module`` belongs to: its package or top-level module, or the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _climbs(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports from a package into its own layer or one above (within a package is free)."""
    return {
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if _unit(name) != _unit(target) and LAYERS[_unit(target)] >= LAYERS[_unit(name)]
    }


def test_the_layer_table_places_every_package_once() -> None:
    assert LAYERS[ROOT] == max(LAYERS.values()) and LAYERS["errors"] == 0
    assert {_unit(name) for name in MODULES} == set(LAYERS)


def test_the_layer_check_finds_a_climb_and_a_sideways_import() -> None:
    graph = {
        "vlm_adapters.model.core": {"vlm_adapters.training.trainer", "vlm_adapters.data"},
        "vlm_adapters.vision.hf": {"vlm_adapters.llm.base", "vlm_adapters.vision.base"},
        "vlm_adapters.cli": {ROOT},
    }
    assert _climbs(graph) == {
        ("vlm_adapters.model.core", "vlm_adapters.training.trainer"),
        ("vlm_adapters.vision.hf", "vlm_adapters.llm.base"),
        ("vlm_adapters.cli", ROOT),
    }


def test_no_import_climbs_the_layers_of_docs_architecture() -> None:
    assert _climbs(GRAPH) == set()


def _root_imports(name: str) -> list[int]:
    """Lines where module ``name`` imports the package root (``import vlm_adapters``, ``from
    vlm_adapters import ...``; a submodule named that way included), outside TYPE_CHECKING."""
    tree = ast.parse(MODULES[name].read_text())
    skipped = _type_checking_nodes(tree)
    return [
        node.lineno
        for node in ast.walk(tree)
        if id(node) not in skipped
        and (
            (isinstance(node, ast.Import) and any(a.name == ROOT for a in node.names))
            or (isinstance(node, ast.ImportFrom) and node.module == ROOT and node.level == 0)
        )
    ]


def test_nothing_inside_the_package_imports_the_package_root() -> None:
    found = {name: lines for name in MODULES if name != ROOT and (lines := _root_imports(name))}
    assert found == {}


def test_the_model_uses_components_only_through_their_base_module() -> None:
    families = {"vision", "connectors", "llm"}
    found = {
        (name, target)
        for name, targets in GRAPH.items()
        if _unit(name) == "model"
        for target in targets
        if _unit(target) in families and not target.endswith(".base")
    }
    assert found == set()
