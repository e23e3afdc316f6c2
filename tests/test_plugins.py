"""Entry-point plugins, faked as installed distributions in a temp dir on sys.path."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

import vlm_adapters
from vlm_adapters import plugins
from vlm_adapters.config import ConfigError, parse_section
from vlm_adapters.plugins import PluginLoadWarning, get_registry
from vlm_adapters.registry import ComponentError
from vlm_adapters.testing import tiny_model_config

PLUGIN_SOURCE = """
import torch
from torch import nn

import vlm_adapters
from vlm_adapters.connectors import Connector, ConnectorConfig
from vlm_adapters.registry import ComponentSpec


class DoubleConfig(ConnectorConfig):
    scale: float = 2.0


class DoubleConnector(Connector):
    def __init__(self, cfg, *, in_dim, out_dim, num_input_tokens):
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features):
        return self.proj(features) * self.cfg.scale


@vlm_adapters.hookimpl
def register_connectors():
    return [ComponentSpec("connector", "{name}", DoubleConnector, DoubleConfig, "Test double.")]
"""

Install = Callable[..., str]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Fake ``pip install`` of a plugin package; undone (and the registry reset) afterwards."""
    modules: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(package: str, connector: str = "double", source: str | None = None) -> str:
        module = f"{package}_plugin"
        code = PLUGIN_SOURCE.replace("{name}", connector) if source is None else source
        (tmp_path / f"{module}.py").write_text(code)
        info = tmp_path / f"{package}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[vlm_adapters]\n{package} = {module}\n")
        modules.append(module)
        plugins.reset()
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)
    plugins.reset()


def _row(name: str) -> dict[str, str] | None:
    return next((r for r in vlm_adapters.list_components("connector") if r["name"] == name), None)


def test_installed_plugin_is_listed_with_its_package(install_plugin: Install) -> None:
    assert _row("double") is None
    install_plugin("fakeplug")
    assert _row("double") == {
        "kind": "connector",
        "name": "double",
        "provider": "fakeplug",
        "description": "Test double.",
    }


def test_plugin_component_is_usable_from_yaml(
    install_plugin: Install, tokenizer_dir: str, tmp_path: Path
) -> None:
    install_plugin("fakeplug")
    config = tiny_model_config(tokenizer_dir)
    config["connector"] = {"type": "double", "scale": 3.0}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    assert vlm_adapters.load_config(str(path)).connector.params.scale == 3.0
    model = vlm_adapters.build_vlm(str(path))
    assert type(model.connector).__name__ == "DoubleConnector"
    features = torch.randn(1, 16, model.vision.hidden_size)
    plain = model.connector.proj(features)
    torch.testing.assert_close(model.connector(features), 3.0 * plain)
    model.save_pretrained(tmp_path / "ckpt")
    assert model.checkpoint_config()["providers"]["connector"] == "fakeplug"
    loaded = vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.connector.cfg.scale == 3.0


def test_duplicate_name_names_both_providers(install_plugin: Install) -> None:
    install_plugin("fakeplug", connector="mlp")
    with pytest.raises(ComponentError, match="'vlm-adapters' and 'fakeplug'"):
        vlm_adapters.list_components()


def test_unknown_name_lists_names_and_closest_match() -> None:
    with pytest.raises(ComponentError, match="did you mean 'resampler'") as info:
        get_registry().get("connector", "resampeler")
    available = str(info.value).split("available: ")[1].split(", ")
    assert {"linear", "mlp", "pool", "qformer", "resampler"} <= set(available)
    assert available == sorted(available)
    with pytest.raises(ComponentError, match="unknown llm component 'xyz'; available: .*hf"):
        get_registry().get("llm", "xyz")


def test_broken_plugin_warns_and_others_still_load(install_plugin: Install) -> None:
    install_plugin("fakeplug")
    install_plugin("brokenplug", source="raise ImportError('needs libfoo')\n")
    with pytest.warns(PluginLoadWarning, match=r"'brokenplug' failed to load: ImportError"):
        rows = vlm_adapters.list_components()
    names = {(r["kind"], r["name"]) for r in rows}
    assert {("connector", "double"), ("connector", "mlp"), ("vision", "hf")} <= names


def test_disable_env_skips_entry_points(
    install_plugin: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugin("fakeplug")
    monkeypatch.setenv(plugins.DISABLE_ENV, "1")
    plugins.reset()
    assert _row("double") is None
    assert _row("mlp") is not None
    with pytest.raises(ConfigError, match="connector.type: unknown connector component 'double'"):
        parse_section("connector", {"type": "double"})
