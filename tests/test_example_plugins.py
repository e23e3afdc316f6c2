"""The example plugins under plugins/: public API only, installed, listed, composable from YAML."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import shlex
from pathlib import Path

import pytest
import yaml

import vlm_adapters
from vlm_adapters import plugins
from vlm_adapters.cli import main
from vlm_adapters.testing import check_vlm, tiny_llm_config

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
DISTS = {"vlm-adapters-cabstractor": ("connector", "cabstractor"),
         "vlm-adapters-convnext": ("vision", "convnext")}  # fmt: skip
PUBLIC = {"vlm_adapters", "vlm_adapters.connectors", "vlm_adapters.vision", "vlm_adapters.llm",
          "vlm_adapters.testing"}  # fmt: skip
INSTALL = "pip install ./plugins/vlm-adapters-cabstractor ./plugins/vlm-adapters-convnext"


def _installed() -> bool:
    try:
        return all(importlib.metadata.distribution(d) for d in DISTS)
    except importlib.metadata.PackageNotFoundError:
        return False


needs_plugins = pytest.mark.skipif(
    not _installed(), reason=f"example plugins not installed; run `{INSTALL}`"
)


@pytest.mark.parametrize("dist", sorted(DISTS))
def test_plugins_import_only_the_public_api(dist: str) -> None:
    sources = list((PLUGINS / dist).rglob("*.py"))
    assert sources, f"{dist} has no sources"
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            private = [n for n in names if n.startswith("vlm_adapters.") and n not in PUBLIC]
            assert not private, f"{path} imports non-public {private}"
    pyproject = (PLUGINS / dist / "pyproject.toml").read_text()
    assert "[project.entry-points.vlm_adapters]" in pyproject


@needs_plugins
def test_listed_with_their_packages_as_providers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    rows = {(r["kind"], r["name"]): r["provider"] for r in json.loads(capsys.readouterr().out)}
    for dist, key in DISTS.items():
        assert rows[key] == dist
    listed = {(r["kind"], r["name"]): r["provider"] for r in vlm_adapters.list_components()}
    assert all(listed[key] == dist for dist, key in DISTS.items())


@needs_plugins
def test_both_plugins_compose_with_a_builtin_llm_from_yaml(tmp_path: Path, tokenizer_dir: str):
    config = {
        "vision": {
            "type": "convnext",
            "model": "convnext_atto",
            "pretrained": False,
            "image_size": 64,
            "stage": -2,
            "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
        },
        "connector": {"type": "cabstractor", "num_queries": 4, "depth": 1},
        "llm": tiny_llm_config("llama", tokenizer_dir),
    }
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    model = check_vlm(str(path))  # build, forward, backward, save/load round trip
    assert model.num_image_tokens == 4
    saved = model.checkpoint_config()["providers"]
    assert saved == {"vision": "vlm-adapters-convnext", "connector": "vlm-adapters-cabstractor",
                     "llm": "vlm-adapters"}  # fmt: skip


@needs_plugins
def test_loaded_as_compatible_plugin_packages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--plugins", "--json"]) == 0
    rows = {r["package"]: r for r in json.loads(capsys.readouterr().out)}
    for dist, (kind, name) in DISTS.items():
        assert rows[dist]["status"] == "loaded", rows[dist]["reason"]
        assert rows[dist]["version"] == importlib.metadata.version(dist)
        assert rows[dist]["components"] == [f"{kind}:{name}"]
        assert plugins.incompatibility(importlib.metadata.distribution(dist)) == ""


@needs_plugins
def test_smoke_run_trains_both_plugins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_convnext = [
        "vision.model=convnext_atto",
        "vision.pretrained=false",
        "vision.image_size=64",
        "vision.stage=-2",  # a 4x4 grid
        "vision.model_kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 24, 32]}",
    ]
    out = tmp_path / "smoke"
    args = ["--vision", "convnext", "--connector", "cabstractor", "connector.num_queries=4"]
    assert main(["smoke", str(out), *args, *tiny_convnext]) == 0
    command = shlex.split(capsys.readouterr().out.splitlines()[-1].split(": ", 1)[1])
    assert command[:2] == ["vlm-adapters", "train"]
    assert main(command[1:]) == 0
    saved = json.loads((out / "run" / "finetune" / "final" / "config.json").read_text())
    providers = {k: saved["providers"][k] for k in ("vision", "connector")}
    assert providers == {"vision": "vlm-adapters-convnext", "connector": "vlm-adapters-cabstractor"}
