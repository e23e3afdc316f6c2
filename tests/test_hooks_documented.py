"""Every hook has a documented section and a test; the generated reference covers the registry."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from vlm_adapters import hookspecs
from vlm_adapters.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n, f in vars(hookspecs).items() if hasattr(f, f"{hookspecs.PROJECT}_spec"))


def undocumented(hooks: list[str], docs: Path) -> list[str]:
    """Hooks that no markdown heading under ``docs`` names."""
    headings = [
        line
        for page in docs.rglob("*.md")
        for line in page.read_text().splitlines()
        if line.startswith("#")
    ]
    return [h for h in hooks if not any(h in line for line in headings)]


def function_names_of_tests(tests: Path) -> list[str]:
    """The names of the test functions in the test files under ``tests`` (but this one)."""
    names = []
    for path in tests.rglob("test_*.py"):
        if path.name != Path(__file__).name:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    names += [node.name] if node.name.startswith("test") else []
    return names


def untested(hooks: list[str], tests: Path) -> list[str]:
    """Hooks that no test is named after: a test function whose name contains the hook's name
    (as datasette checks), not merely a file that mentions it."""
    names = function_names_of_tests(tests)
    return [h for h in hooks if not any(h in name for name in names)]


def test_hookspecs_found() -> None:
    assert HOOKS == ["register_connectors", "register_llm_backends", "register_vision_backbones"]


def test_every_hook_has_a_documented_section() -> None:
    assert undocumented(HOOKS, ROOT / "docs") == []


def test_every_hook_has_a_test() -> None:
    assert untested(HOOKS, ROOT / "tests") == []


def test_checks_report_a_hook_lacking_docs_or_tests(tmp_path: Path) -> None:
    (tmp_path / "page.md").write_text("# Hooks\n\n### `register_things`\n\nregister_other\n")
    (tmp_path / "test_x.py").write_text(
        "def test_register_things_reach_the_registry(): ...\n\n\n"
        "def helper_register_stuff(): ...\n\n\n"
        "def test_mentions():\n    assert 'register_other' and register_stuff\n"
    )
    hooks = ["register_things", "register_other", "register_stuff"]
    assert undocumented(hooks, tmp_path) == ["register_other", "register_stuff"]
    assert untested(hooks, tmp_path) == ["register_other", "register_stuff"]


@pytest.fixture(scope="module")
def gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs/gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_reference_covers_every_component(gen_reference) -> None:
    """Each component in the catalog and the CLI page (every option: tests/test_reference.py)."""
    config_page = gen_reference.config_page()
    catalog = gen_reference.components_page()
    for spec in get_registry().specs():
        assert f"### `type: {spec.name}`" in config_page
        assert f"| `{spec.name}` | `{spec.provider}` |" in catalog
    assert "## `new-plugin`" in gen_reference.cli_page()
