"""A light start: `vlm-adapters --help` and `list` import no torch, importing the package
imports neither torchvision's models nor torch._dynamo, components are listed without
importing them, and a mismatched torch/torchvision pair is one line naming the fix."""

from __future__ import annotations

import argparse
import builtins
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import vlm_adapters
from vlm_adapters.cli import COMMANDS, build_parser
from vlm_adapters.errors import ComponentError, InstallError
from vlm_adapters.registry import ComponentSpec
from vlm_adapters.vision.base import CPU_INSTALL, ImageTransform, image_functional

SRC = Path(vlm_adapters.__file__).resolve().parents[1]
EXAMPLES = Path(__file__).resolve().parents[1] / "plugins"
TORCH = ("torch", "torchvision", "transformers")

LAZY_PLUGIN = """
import vlm_adapters


@vlm_adapters.hookimpl
def register_connectors():
    return [vlm_adapters.ComponentSpec(
        "connector", "lazy_double", "{module}_impl:Double", "{module}_impl:DoubleConfig", "Lazy."
    )]
"""
LAZY_IMPL = "import torch\n\nDouble = DoubleConfig = None\n"


MODULES_AT_EXIT = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print('MODULES', json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
)
CLI = "import runpy\nrunpy.run_module('vlm_adapters.cli', run_name='__main__')\n"


def _imported(code: str, *argv: str, paths: tuple[Path, ...] = ()) -> tuple[set[str], str]:
    """The modules a fresh Python running ``code`` with ``argv`` has imported when it exits
    (this checkout first on the path, then ``paths``), and its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (SRC, *paths)))}
    env.pop("VLM_ADAPTERS_DISABLE_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-c", MODULES_AT_EXIT + code, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stderr.splitlines()[-1]
    assert last.startswith("MODULES "), done.stderr[-2000:]
    return set(json.loads(last.removeprefix("MODULES "))), done.stdout


def test_help_imports_no_torch() -> None:
    modules, out = _imported(CLI, "--help")
    assert all(name in out for name in COMMANDS)
    assert not modules & set(TORCH), sorted(modules & set(TORCH))
    assert not {m for m in modules if m.startswith("vlm_adapters.cli.")}  # no subcommand


def test_list_imports_no_torch_and_lists_entry_point_plugins(tmp_path: Path) -> None:
    module = "lazy_double_plugin"
    (tmp_path / f"{module}.py").write_text(LAZY_PLUGIN.replace("{module}", module))
    (tmp_path / f"{module}_impl.py").write_text(LAZY_IMPL)
    info = tmp_path / "lazy_double-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lazy-double\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vlm_adapters]\nlazy = {module}\n")
    examples = sorted(EXAMPLES.glob("*/src"))  # this checkout's example plugins first
    modules, out = _imported(CLI, "list", "--json", paths=(*examples, tmp_path))
    rows = {(r["kind"], r["name"]): r["provider"] for r in json.loads(out)}
    assert rows[("connector", "lazy_double")] == "lazy-double"
    assert rows[("connector", "mlp")] == rows[("llm", "hf")] == "vlm-adapters"
    assert "vlm_adapters.cli.list" in modules and f"{module}_impl" not in modules
    assert not modules & set(TORCH), sorted(modules & set(TORCH))


def test_public_names_skip_torchvision_models_and_dynamo() -> None:
    # all but train: training imports accelerate and transformers' schedulers, which import
    # torch._dynamo (when train is first used, not with the package)
    names = "[getattr(v, n) for n in v.__all__ if n != 'train']"
    code = f"import vlm_adapters.model, vlm_adapters as v; {names}"
    modules, _ = _imported(code)
    assert {"vlm_adapters.model.core", "vlm_adapters.loading"} <= modules
    heavy = {m for m in modules if m.startswith(("torchvision", "torch._dynamo"))}
    assert not heavy, sorted(heavy)[:10]


def test_every_command_summary_matches_its_module() -> None:
    """``--help`` lists the summaries of COMMANDS; each must be its module's own help."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest: c.help for c in sub._choices_actions} == COMMANDS
    assert all(p.get_default("func") for p in sub.choices.values())


def test_spec_imports_its_factory_and_config_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lazy_spec_impl.py").write_text("def build(cfg): return cfg\n\nConfig = dict\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_spec_impl", raising=False)
    spec = ComponentSpec("llm", "x", "lazy_spec_impl:build", "lazy_spec_impl:Config", "lazy")
    named = spec.with_provider("pkg")
    assert (named.provider, named.name) == ("pkg", "x")
    assert "lazy_spec_impl" not in sys.modules
    assert named.config is dict and named.factory(3) == 3
    assert spec == named  # the provider is not compared


def test_spec_with_a_bad_import_path_names_it() -> None:
    with pytest.raises(ComponentError, match="'not-a-path' is not an import path"):
        ComponentSpec("llm", "x", "not-a-path", dict, "bad")
    spec = ComponentSpec("llm", "x", "vlm_adapters.errors:NoSuchFactory", dict, "bad")
    with pytest.raises(ComponentError, match="llm component 'x' .factory.: cannot import"):
        spec.factory  # noqa: B018


def test_torch_torchvision_mismatch_is_one_line_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def mismatched(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("torchvision"):
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    image_functional.cache_clear()
    monkeypatch.setattr(builtins, "__import__", mismatched)
    try:
        with pytest.raises(InstallError) as caught:
            ImageTransform(8)(Image.new("RGB", (16, 12)))
    finally:
        monkeypatch.undo()
        image_functional.cache_clear()
    message = str(caught.value)
    assert "\n" not in message
    assert "torchvision::nms does not exist" in message and CPU_INSTALL in message
