"""`vlm-adapters new-plugin`: the generated packages install and pass their own tests."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import vlm_adapters
from vlm_adapters import ComponentSpec
from vlm_adapters.cli import main
from vlm_adapters.config import ConfigError
from vlm_adapters.scaffold import KINDS, new_plugin
from vlm_adapters.testing import (
    check_connector,
    check_llm_backend,
    check_vlm,
    registered,
    tiny_model_config,
)
from vlm_adapters.vision import VisionConfig


@pytest.mark.parametrize(
    ("name", "kind", "match"),
    [
        ("Bad Name", "connector", "lower-case letters"),
        ("ok", "tokenizer", "unknown kind 'tokenizer'"),
        ("mlp", "connector", "a connector named 'mlp' already exists"),
    ],
)
def test_bad_requests_are_clear(tmp_path: Path, name: str, kind: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        new_plugin(name, kind, tmp_path)


def test_cli_writes_the_package_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new-plugin", "my-proj", "--kind", "connector", "--out", str(tmp_path)]) == 0
    root = tmp_path / "vlm-adapters-my-proj"
    assert "wrote" in capsys.readouterr().out
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.vlm_adapters]\nmy_proj = "vlm_adapters_my_proj.plugin"' in (
        pyproject
    )
    assert (root / "src/vlm_adapters_my_proj/component.py").is_file()
    assert main(["new-plugin", "my-proj", "--kind", "vision", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generated_packages_install_and_pass_their_own_tests(tmp_path: Path) -> None:
    """A real pip install (into a --target dir, so the venv is untouched) of all three kinds,
    one package each, and of one package holding two kinds."""
    roots = [new_plugin(f"scaffolded-{kind}", kind, tmp_path) for kind in KINDS]
    roots.append(
        new_plugin("scaffolded", ["vision", "connector"], tmp_path, components=["sv", "sc"])
    )
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), *map(str, roots)], check=True, timeout=300)
    assert len(list(site.glob("vlm_adapters_scaffolded*.dist-info"))) == 4
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    tests = [str(root / "tests") for root in roots]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "15 passed" in result.stdout
    light = (  # the entry point's module registers by path: loading it imports no torch
        "import sys, vlm_adapters_scaffolded.plugin as p; "
        "assert not {'torch', 'vlm_adapters_scaffolded.vision'} & set(sys.modules); "
        "print(p.register_vision_backbones()[0].factory.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", light], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "SvVision", done.stderr[-2000:]


def test_several_kinds_in_one_package_with_their_own_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["new-plugin", "acme", "--kind", "connector", "--name", "window-mlp"]
    assert main([*argv, "--kind", "llm", "--name", "tiny_lm", "--out", str(tmp_path)]) == 0
    root, package = tmp_path / "vlm-adapters-acme", "src/vlm_adapters_acme"
    assert "wrote" in capsys.readouterr().out
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.vlm_adapters]\nacme = "vlm_adapters_acme.plugin"\n' in pyproject
    for rel in ("connector.py", "llm.py", "plugin.py"):
        assert (root / package / rel).is_file()
    assert {p.name for p in (root / "tests").iterdir()} == {"test_connector.py", "test_llm.py"}
    plugin = (root / package / "plugin.py").read_text()
    assert 'name="window_mlp"' in plugin and 'name="tiny_lm"' in plugin
    assert "def register_connectors()" in plugin and "def register_llm_backends()" in plugin
    assert main([*argv, "--kind", "llm", "--out", str(tmp_path / "b")]) == 2
    assert "1 component names for 2 kinds; give one --name per --kind" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kinds", "names", "match"),
    [
        (["llm", "llm"], None, r"kinds \['llm', 'llm'\]: give each kind once"),
        (["connector"], ["Bad"], "component name 'Bad': use lower-case letters"),
        (["vision", "connector"], ["mine", "mlp"], "a connector named 'mlp' already exists"),
    ],
)
def test_bad_multi_kind_requests_are_clear(
    tmp_path: Path, kinds: list[str], names: list[str] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        new_plugin("pkg", kinds, tmp_path, components=names)
    assert not (tmp_path / "vlm-adapters-pkg").exists()


def test_generated_components_show_the_optional_members_commented(tmp_path: Path) -> None:
    root = new_plugin("opt", list(KINDS), tmp_path)
    source = {kind: (root / f"src/vlm_adapters_opt/{kind}.py").read_text() for kind in KINDS}
    for member in ("def output_grid(", "def num_output_tokens(", "per_token: ClassVar"):
        assert f"    # {member}" in source["connector"]
    for member in ("def native_resolution(", "def enable_gradient_checkpointing("):
        assert f"    # {member}" in source["vision"]
    for member in ("def hidden_size(", "def vocab_size(", "def max_positions(", "def embed(",
                   "def body(", "def logits(", "def full_logits(", "def generate("):  # fmt: skip
        assert f"    # {member}" in source["llm"], member
    assert "streamer.put" in source["llm"] and "position_ids" in source["llm"]


def test_a_multi_kind_package_passes_the_kit_from_its_source_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer_dir: str
) -> None:
    """Not installed: imported from its src/ with PYTHONPATH, registered for the block."""
    root = new_plugin("duo", ["connector", "llm"], tmp_path, components=["duo_mlp", "duo_lm"])
    monkeypatch.syspath_prepend(str(root / "src"))
    try:
        plugin = importlib.import_module("vlm_adapters_duo.plugin")
        specs = [*plugin.register_connectors(), *plugin.register_llm_backends()]
        assert [(s.kind, s.name) for s in specs] == [("connector", "duo_mlp"), ("llm", "duo_lm")]
        with registered(*specs, provider="vlm-adapters-duo"):
            assert check_connector("duo_mlp").num_output_tokens(9) == 9
            llm = check_llm_backend("duo_lm", {"tokenizer": tokenizer_dir})
            assert type(llm).__name__ == "DuoLmLLM"
            config = tiny_model_config(
                tokenizer_dir,
                connector={"type": "duo_mlp"},
                llm={"type": "duo_lm", "tokenizer": tokenizer_dir},
            )
            model = check_vlm(config)
        assert type(model.connector).__name__ == "DuoMlpConnector"
    finally:
        for name in [m for m in sys.modules if m.startswith("vlm_adapters_duo")]:
            del sys.modules[name]


# ----------------------- a vision plugin from the scaffold fails early, like the built-ins


@pytest.fixture
def scaffolded_vision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ComponentSpec]:
    """The spec of a vision plugin generated by new-plugin, imported from its source tree and
    registered (its factory refuses to build: the errors below must come before building)."""
    root = new_plugin("probe-vision", "vision", tmp_path)
    monkeypatch.syspath_prepend(str(root / "src"))
    plugin = importlib.import_module("vlm_adapters_probe_vision.plugin")
    (spec,) = plugin.register_vision_backbones()

    def never_built(cfg: Any) -> Any:
        raise AssertionError("the model was built; the config error should have come first")

    unbuildable = ComponentSpec("vision", spec.name, never_built, spec.config, spec.description)
    with registered(unbuildable, provider="vlm-adapters-probe-vision"):
        yield spec
    for name in [m for m in sys.modules if m.startswith("vlm_adapters_probe_vision")]:
        del sys.modules[name]


def test_scaffolded_vision_config_is_a_vision_config_with_a_true_probe(
    scaffolded_vision: ComponentSpec,
) -> None:
    assert issubclass(scaffolded_vision.config, VisionConfig)
    cfg = scaffolded_vision.config(image_size=48, patch_size=8, hidden_size=24)
    backbone = scaffolded_vision.factory(cfg)  # the package's own tests run the whole kit
    assert cfg.probe() == (backbone.num_patches, backbone.hidden_size) == (36, 24)
    with pytest.raises(ValueError, match="patch_size 5 must divide image_size 32"):
        scaffolded_vision.config(patch_size=5)


def _config_error(path: Path, config: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as info:
        vlm_adapters.build_vlm(str(path))
    return str(info.value)


@pytest.mark.parametrize(
    ("connector", "positions", "says"),
    [
        ({"type": "pool", "factor": 3}, 256, "connector: pool factor 3 does not divide the 4x4"),
        ({"type": "mlp"}, 16, "connector: 16 visual tokens per image do not fit the LLM context"),
    ],
    ids=["pool-factor", "llm-context"],
)
def test_scaffolded_vision_gets_the_builtins_pre_build_config_errors(
    scaffolded_vision: ComponentSpec,
    tokenizer_dir: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    connector: dict[str, Any],
    positions: int,
    says: str,
) -> None:
    config = tiny_model_config(tokenizer_dir, "hf", connector, "llama")  # hf: 16 patches, 32 wide
    config["llm"]["config"]["max_position_embeddings"] = positions
    builtin = _config_error(tmp_path / "builtin.yaml", config)
    plugin_path = tmp_path / "plugin.yaml"
    plugin = _config_error(plugin_path, {**config, "vision": {"type": scaffolded_vision.name}})
    assert builtin.startswith(f"{tmp_path / 'builtin.yaml'}: {says}")
    assert plugin == builtin.replace("builtin.yaml", "plugin.yaml")
    assert main(["train", str(plugin_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"vlm-adapters train: error: {plugin}\n"  # one line, file and key
