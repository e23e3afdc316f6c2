"""vlm_adapters.testing: conformance checks pass built-ins, catch broken plugins, and the pytest
fixtures are available to any test suite."""

from __future__ import annotations

import importlib.metadata
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import vlm_adapters
from vlm_adapters import ComponentConfig, ComponentSpec, hookimpl
from vlm_adapters.connectors import Connector, ConnectorConfig
from vlm_adapters.plugins import (
    BUILTIN_PROVIDER,
    collect_registry,
    get_registry,
    new_plugin_manager,
    register,
)
from vlm_adapters.testing import (
    ConformanceWarning,
    check_connector,
    check_llm_backend,
    check_vision_backbone,
    registered,
    tiny_connector_config,
    tiny_llm_config,
    tiny_model_config,
    tiny_section,
    tiny_vision_config,
)
from vlm_adapters.vision import ImageTransform, VisionBackbone, VisionConfig


def _section(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    config = dict(config)
    return config.pop("type"), config


BUILTINS = [(s.kind, s.name) for s in get_registry().specs() if s.provider == BUILTIN_PROVIDER]
CHECKS = {"vision": check_vision_backbone, "connector": check_connector, "llm": check_llm_backend}


def test_the_builtins_are_found_in_the_registry() -> None:
    assert {("vision", "hf"), ("connector", "pool"), ("llm", "hf")} <= set(BUILTINS)
    assert len(BUILTINS) >= 10


@pytest.mark.parametrize(("kind", "name"), BUILTINS, ids=[f"{k}-{n}" for k, n in BUILTINS])
def test_every_builtin_passes_its_conformance_check(kind: str, name: str, tokenizer_dir: str):
    """Parametrized from the registry: a new built-in fails here until it has a tiny config
    (in vlm_adapters/testing/tiny.py) and passes the checks plugins must pass."""
    try:
        section = tiny_section(kind, name, tokenizer_dir)
    except KeyError as exc:
        pytest.fail(f"built-in {kind} {name!r} has no tiny config in vlm_adapters.testing: {exc}")
    assert section["type"] == name
    CHECKS[kind](*_section(section))


def test_a_component_without_a_tiny_config_is_named(tokenizer_dir: str) -> None:
    with pytest.raises(KeyError, match="no tiny connector config for 'brand_new'; choose one"):
        tiny_section("connector", "brand_new", tokenizer_dir)
    with pytest.raises(KeyError, match="no tiny vision config for 'brand_new'"):
        tiny_section("vision", "brand_new", tokenizer_dir)
    with pytest.raises(KeyError, match="no tiny LLM config for 'brand_new'"):
        tiny_section("llm", "brand_new", tokenizer_dir)


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


class WrongGridConfig(WidthConfig):
    def output_grid(self, rows: int, cols: int) -> tuple[int, int]:
        return rows // 2, cols // 2  # but every token is kept


class PerTokenConfig(WidthConfig):
    per_token: ClassVar[bool] = True


class FixedCount(GoodConnector):
    """Claims per_token, yet always gives the built number of tokens."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features[:, :1]).expand(-1, self.num_input_tokens, -1)


def _spec(factory: Any, name: str = "probe", config: type = WidthConfig) -> ComponentSpec:
    return ComponentSpec("connector", name, factory, config, "test connector")


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (WrongCount, "num_output_tokens"),
        (UnusedParam, "never used in forward"),
        (HiddenState, "does not load|rebuilding"),
        ((GoodConnector, WrongGridConfig), r"config.output_grid\(4, 4\) = \(2, 2\) but num_out"),
        ((FixedCount, PerTokenConfig), r"per_token is set, but 15 features gave \(1, 16, 32\)"),
    ],
)
def test_broken_connectors_fail_clearly(factory: Any, match: str) -> None:
    factory, config = factory if isinstance(factory, tuple) else (factory, WidthConfig)
    spec = _spec(factory, config=config)
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


class PatchConfig(VisionConfig):
    cast: bool = True
    probed: tuple[int, int] | None = (16, 8)

    def probe(self) -> tuple[int, int] | None:
        return self.probed


class PlainConfig(ComponentConfig):
    """Not a VisionConfig: no pre-build probe."""

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


def test_vision_probe_must_predict_the_built_sizes() -> None:
    spec = ComponentSpec("vision", "patches", Patches, PatchConfig, "test backbone")
    with registered(spec):
        assert check_vision_backbone(spec, {"probed": None}).num_patches == 16  # cannot tell
        with pytest.raises(AssertionError, match=r"config.probe\(\) = \(9, 8\) but the built "
                           r"backbone has \(num_patches, hidden_size\) = \(16, 8\)"):  # fmt: skip
            check_vision_backbone(spec, {"probed": (9, 8)})


def test_a_vision_config_that_is_not_a_vision_config_is_told_so() -> None:
    spec = ComponentSpec("vision", "plain", Patches, PlainConfig, "test backbone")
    with registered(spec), pytest.warns(ConformanceWarning) as record:
        check_vision_backbone(spec)
    message = str(record[0].message)
    assert message.startswith("vision 'plain': its config class PlainConfig is not a ")
    assert "vlm_adapters.vision.VisionConfig; subclass it and implement probe()" in message


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


def test_plain_helpers_accept_what_their_fixture_accepts(
    vlm_tiny_model_config: Any, vlm_tiny_tokenizer: str
) -> None:
    pool = {"type": "pool", "factor": 4}
    vision = {"type": "hf", "config": {"model_type": "clip_vision_model", "hidden_size": 8}}
    llm = {"type": "mine", "tokenizer": vlm_tiny_tokenizer}
    for sections in [{}, {"connector": pool}, {"vision": vision, "llm": llm},
                     {"vision": "hf_siglip", "connector": "qformer", "llm": "qwen2"}]:  # fmt: skip
        assert tiny_model_config(vlm_tiny_tokenizer, **sections) == vlm_tiny_model_config(
            **sections
        )
    assert tiny_model_config(vlm_tiny_tokenizer, connector=pool)["connector"] == pool
    assert tiny_connector_config(pool) == pool and tiny_connector_config(pool) is not pool
    assert tiny_vision_config(vision) == vision and tiny_llm_config(llm, "ignored") == llm
    assert tiny_llm_config("hf", vlm_tiny_tokenizer) == tiny_llm_config("llama", vlm_tiny_tokenizer)


def test_pytest_plugin_is_registered_and_its_fixtures_work(
    vlm_tiny_model_config: Any, vlm_check_connector: Any
) -> None:
    eps = importlib.metadata.entry_points(group="pytest11")
    assert "vlm_adapters.testing.pytest_plugin" in [ep.value for ep in eps]
    config = vlm_tiny_model_config(connector={"type": "pool", "factor": 4})
    assert config["connector"] == {"type": "pool", "factor": 4}
    assert config["llm"]["type"] == "hf" and config["vision"]["type"] == "hf"
    assert vlm_check_connector("linear").num_output_tokens(9) == 9
