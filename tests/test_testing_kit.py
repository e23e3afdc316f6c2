"""vlm_adapters.testing: conformance checks pass built-ins, catch broken plugins, and the pytest
fixtures are available to any test suite."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
import torch
from torch import nn

import vlm_adapters
from vlm_adapters import ComponentConfig, ComponentSpec, hookimpl
from vlm_adapters.connectors import Connector, ConnectorConfig
from vlm_adapters.plugins import collect_registry, new_plugin_manager, register
from vlm_adapters.testing import (
    check_connector,
    check_llm_backend,
    check_vision_backbone,
    registered,
    tiny_llm_config,
    tiny_vision_config,
)
from vlm_adapters.vision import ImageTransform, VisionBackbone


def _section(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    config = dict(config)
    return config.pop("type"), config


def test_builtins_pass(tokenizer_dir: str) -> None:
    pool = check_connector("pool", {"factor": 2}, num_input_tokens=16)
    assert pool.num_output_tokens() == 4
    vision = check_vision_backbone(*_section(tiny_vision_config("hf")))
    assert (vision.num_patches, vision.hidden_size) == (16, 32)
    llm = check_llm_backend(*_section(tiny_llm_config("llama", tokenizer_dir)))
    assert llm.hidden_size == 32


# --------------------------------------------------------------------- broken connectors


class WidthConfig(ConnectorConfig):
    tokens: int | None = None


class GoodConnector(Connector):
    def __init__(self, cfg: WidthConfig, *, in_dim: int, out_dim: int, num_input_tokens: int):
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class WrongCount(GoodConnector):
    def num_output_tokens(self, num_input_tokens: int | None = None) -> int:
        return 3


class UnusedParam(GoodConnector):
    def __init__(self, cfg: WidthConfig, **sizes: int) -> None:
        super().__init__(cfg, **sizes)
        self.unused = nn.Linear(2, 2)


class HiddenState(GoodConnector):
    """Its width depends on a module-level switch that rebuild_kwargs() does not record."""

    width = 8

    def __init__(self, cfg: WidthConfig, *, in_dim: int, out_dim: int, num_input_tokens: int):
        super().__init__(cfg, in_dim=in_dim, out_dim=out_dim, num_input_tokens=num_input_tokens)
        self.proj = nn.Sequential(nn.Linear(in_dim, HiddenState.width), nn.Linear(8, out_dim))
        HiddenState.width = 9


def _spec(factory: Any, name: str = "probe") -> ComponentSpec:
    return ComponentSpec("connector", name, factory, WidthConfig, "test connector")


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (WrongCount, "num_output_tokens"),
        (UnusedParam, "never used in forward"),
        (HiddenState, "does not load|rebuilding"),
    ],
)
def test_broken_connectors_fail_clearly(factory: Any, match: str) -> None:
    spec = _spec(factory)
    with registered(spec), pytest.raises(AssertionError, match=match):
        check_connector(spec)


def test_unregistered_and_unknown_names_fail_clearly() -> None:
    with pytest.raises(AssertionError, match="not registered by name"):
        check_connector(_spec(GoodConnector))
    with pytest.raises(AssertionError, match="no connector component named 'nope'"):
        check_connector("nope")


def test_registered_is_temporary(tokenizer_dir: str) -> None:
    spec = _spec(GoodConnector, "temporary")
    with registered(spec):
        assert check_connector("temporary").num_output_tokens() == 16
        names = [r["name"] for r in vlm_adapters.list_components("connector")]
        assert "temporary" in names
    assert "temporary" not in [r["name"] for r in vlm_adapters.list_components("connector")]


# ------------------------------------------------------------------------ broken vision


class PatchConfig(ComponentConfig):
    cast: bool = True


class Patches(VisionBackbone):
    def __init__(self, cfg: PatchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_size, self.num_patches = 8, 16
        self.transform = ImageTransform(crop_size=16)
        self.patch = nn.Conv2d(3, 8, 4, stride=4)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.dtype) if self.cfg.cast else pixel_values
        return self.patch(x).flatten(2).transpose(1, 2)  # [B, 16, 8]


class AlwaysGraph(Patches):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values)


def test_broken_vision_fails_clearly() -> None:
    spec = ComponentSpec("vision", "patches", Patches, PatchConfig, "test backbone")
    graph = ComponentSpec("vision", "graph", AlwaysGraph, PatchConfig, "test backbone")
    with registered(spec, graph):
        assert check_vision_backbone(spec).num_patches == 16
        with pytest.raises(AssertionError, match="forward failed with bfloat16"):
            check_vision_backbone(spec, {"cast": False})
        with pytest.raises(AssertionError, match="must not build an autograd graph"):
            check_vision_backbone(graph)


def test_broken_llm_fails_clearly(tokenizer_dir: str) -> None:
    name, options = _section(tiny_llm_config("llama", tokenizer_dir))
    spec = vlm_adapters.plugins.get_registry().get("llm", name)

    def bad_factory(cfg: Any) -> Any:
        llm = spec.factory(cfg)
        llm.image_token_id = 10_000
        return llm

    broken = ComponentSpec("llm", "broken", bad_factory, spec.config, "test llm")
    with pytest.raises(AssertionError, match="image_token_id 10000 is not a row"):
        check_llm_backend(broken, options)


# ------------------------------------------------------------------- hooks and fixtures


class ThreeHookPlugin:
    """Implements every register_* hook, like a third-party plugin object."""

    @hookimpl
    def register_vision_backbones(self) -> list[ComponentSpec]:
        return [ComponentSpec("vision", "hook_vision", Patches, PatchConfig, "v")]

    @hookimpl
    def register_connectors(self) -> list[ComponentSpec]:
        return [_spec(GoodConnector, "hook_connector")]

    @hookimpl
    def register_llm_backends(self) -> list[ComponentSpec]:
        return [ComponentSpec("llm", "hook_llm", object, ComponentConfig, "l")]


def test_every_register_hook_reaches_the_registry_with_its_provider() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    register(pm, ThreeHookPlugin(), "my-dist")
    registry = collect_registry(pm)
    for kind, name in [("vision", "hook_vision"), ("connector", "hook_connector"),
                       ("llm", "hook_llm")]:  # fmt: skip
        assert registry.get(kind, name).provider == "my-dist"
    assert registry.get("connector", "mlp").provider == "vlm-adapters"


def test_pytest_plugin_is_registered_and_its_fixtures_work(
    vlm_tiny_model_config: Any, vlm_check_connector: Any
) -> None:
    eps = importlib.metadata.entry_points(group="pytest11")
    assert "vlm_adapters.testing.pytest_plugin" in [ep.value for ep in eps]
    config = vlm_tiny_model_config(connector={"type": "pool", "factor": 4})
    assert config["connector"] == {"type": "pool", "factor": 4}
    assert config["llm"]["type"] == "hf" and config["vision"]["type"] == "hf"
    assert vlm_check_connector("linear").num_output_tokens(9) == 9
