"""Config errors name the key and the YAML file; dotted overrides; the `type` switch."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import vlm_adapters
from vlm_adapters import ConfigError, load_config
from vlm_adapters.config import apply_overrides, model_config_from_dict
from vlm_adapters.testing import tiny_model_config

WriteYaml = Callable[[dict[str, Any]], str]


@pytest.fixture
def write_yaml(tmp_path: Path, tokenizer_dir: str) -> WriteYaml:
    """Write the tiny model config, with ``changes`` merged into its sections, to a YAML file."""

    def write(changes: dict[str, Any]) -> str:
        config = tiny_model_config(tokenizer_dir)
        for section, value in changes.items():
            if value is None:
                config.pop(section)
            else:
                config[section] = {**config[section], **value}
        path = tmp_path / "model.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return write


def _raises(path: str, *patterns: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_valid_yaml_loads(write_yaml: WriteYaml) -> None:
    config = load_config(write_yaml({"connector": {"depth": 3}}))
    assert config.connector.type == "mlp" and config.connector.params.depth == 3
    assert config.llm.params.config["model_type"] == "llama"


def test_unknown_key(write_yaml: WriteYaml) -> None:
    _raises(write_yaml({"connector": {"depht": 3}}), r"connector\.depht: unknown key")


def test_wrong_type(write_yaml: WriteYaml) -> None:
    path = write_yaml({"connector": {"depth": "two"}})
    _raises(path, r"connector\.depth: .*integer.*\(got 'two'\)")
    _raises(write_yaml({"connector": {"depth": 0}}), r"connector\.depth: .*greater than")


def test_nested_key_of_a_section(write_yaml: WriteYaml) -> None:
    _raises(write_yaml({"vision": {"feature_layer": "last"}}), r"vision\.feature_layer")


def test_missing_section(write_yaml: WriteYaml) -> None:
    _raises(write_yaml({"llm": None}), r"missing section\(s\): llm")


def test_section_without_type(write_yaml: WriteYaml) -> None:
    path = Path(write_yaml({}))
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "connector": {"depth": 2}}))
    _raises(str(path), r"connector: expected a mapping with a `type` key")


def test_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("vision: {type: hf\nconnector: [")
    _raises(str(path), "invalid YAML")
    path.write_text("- a list\n- not a mapping\n")
    _raises(str(path), "expected a mapping at the top level")
    path.write_text("vision: &v {type: hf, inner: *v}\n")
    _raises(str(path), "invalid YAML: an alias refers to a value that contains it")


def test_missing_file(tmp_path: Path) -> None:
    _raises(str(tmp_path / "nope.yaml"), "config file not found")


def test_unknown_type_suggests_the_closest(write_yaml: WriteYaml) -> None:
    path = write_yaml({"connector": {"type": "resampeler"}})
    _raises(path, r"connector\.type: unknown connector component 'resampeler'", "'resampler'")
    _raises(write_yaml({"vision": {"type": "open-clip"}}), r"vision\.type: .*'open_clip'")


def test_pool_factor_must_divide_the_grid(write_yaml: WriteYaml) -> None:
    path = write_yaml({"connector": {"type": "pool", "factor": 3}})
    _raises(path, r"connector: pool factor 3 does not divide the 4x4 patch grid")


def test_visual_tokens_must_fit_the_llm_context(write_yaml: WriteYaml, tokenizer_dir: str) -> None:
    llm = tiny_model_config(tokenizer_dir)["llm"]
    llm["config"]["max_position_embeddings"] = 16
    path = write_yaml({"llm": llm})
    _raises(path, r"connector: 16 visual tokens per image do not fit the LLM context of 16")
    pooled = write_yaml({"llm": llm, "connector": {"type": "pool", "factor": 2}})
    assert load_config(pooled).connector.type == "pool"  # 4 tokens fit


def test_dotted_overrides(write_yaml: WriteYaml) -> None:
    path = write_yaml({})
    config = load_config(path, ["connector.depth=3", "llm.config.hidden_size=64"])
    assert config.connector.params.depth == 3
    assert config.llm.params.config["hidden_size"] == 64
    config = load_config(path, {"connector.activation": "relu"})
    assert config.connector.params.activation == "relu"
    with pytest.raises(ConfigError, match=r"connector\.depth"):
        load_config(path, ["connector.depth=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["connector.depth"])


def test_build_vlm_applies_overrides(tokenizer_dir: str) -> None:
    config = tiny_model_config(tokenizer_dir)
    model = vlm_adapters.build_vlm(config, ["connector.type=pool", "connector.factor=4"])
    assert model.num_image_tokens == 1
    assert config["connector"] == {"type": "mlp"}  # the caller's dict is not modified


def test_type_switch_drops_the_other_keys() -> None:
    data = {"connector": {"type": "mlp", "depth": 3, "activation": "relu"}}
    assert apply_overrides(data, ["connector.type=pool"]) == {"connector": {"type": "pool"}}
    kept = apply_overrides(data, ["connector.type=mlp"])
    assert kept == data
    assert data["connector"]["depth"] == 3  # input not modified


@pytest.mark.parametrize(
    "overrides",
    [
        ["connector.type=pool", "connector.factor=4"],
        ["connector.factor=4", "connector.type=pool"],
        {"connector.factor": 4, "connector.type": "pool"},
    ],
)
def test_type_switch_keeps_keys_overridden_with_it(overrides: Any) -> None:
    data = {"connector": {"type": "mlp", "depth": 3}}
    assert apply_overrides(data, overrides) == {"connector": {"type": "pool", "factor": 4}}


def test_override_through_a_non_mapping_fails() -> None:
    with pytest.raises(ConfigError, match="override connector.depth.x: depth is not a mapping"):
        apply_overrides({"connector": {"type": "mlp", "depth": 2}}, ["connector.depth.x=1"])


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[1", "expected ',' or ']'"),
        ("!!python/object/apply:os.system [echo hi]", "!!python/object/apply:os.system"),
        ("{depth: 2, depth: 3}", "duplicate key 'depth'"),
        ("&a [*a]", "refers to a value that contains it"),
        ("&m {x: *m}", "refers to a value that contains it"),
    ],
)
def test_an_override_value_that_is_not_plain_yaml_is_one_line(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"connector": {"type": "mlp"}}, [f"connector.depth={value}"])
    message = str(info.value)
    assert message.startswith(f"override 'connector.depth={value}': ") and "\n" not in message
    assert problem in message


def test_a_key_given_twice_is_refused_but_a_merged_key_may_be_overridden(
    tmp_path: Path, tokenizer_dir: str
) -> None:
    path = tmp_path / "model.yaml"
    sections = yaml.safe_dump(tiny_model_config(tokenizer_dir))
    path.write_text(
        "mlp: &mlp {type: mlp, depth: 2}\n"
        + sections.replace("connector:\n  type: mlp\n", "connector:\n  <<: *mlp\n  depth: 3\n")
    )
    assert load_config(path).connector.params.depth == 3  # `<<` gives defaults to override
    path.write_text(sections.replace("connector:\n", "connector:\n  depth: 2\n  depth: 3\n"))
    line = sections.splitlines().index("connector:") + 3
    with pytest.raises(ConfigError) as info:
        load_config(path)
    expected = f"{path}:{line}: duplicate key 'depth' (first on line {line - 1}); YAML would"
    assert str(info.value).startswith(expected)


def test_an_image_size_the_tower_cannot_take_is_refused_before_building(
    write_yaml: WriteYaml, tokenizer_dir: str
) -> None:
    _raises(
        write_yaml({"vision": {"image_size": 48}}),
        r"vision.image_size: gives 48-pixel images, but the 'clip_vision_model' tower's position "
        r"embeddings are for 32 pixels .*; set vision.image_size: 32",
    )
    dinov2 = tiny_model_config(tokenizer_dir, vision="hf_dinov2")
    dinov2["vision"]["image_size"] = 48  # DINOv2 resizes its position embeddings
    assert model_config_from_dict(dinov2).vision.params.probe() == ((48 // 8) ** 2, 32)


@pytest.mark.parametrize("hidden_size", [None, [32], "wide"])
def test_an_inline_config_value_transformers_refuses_is_one_line(hidden_size: Any) -> None:
    from vlm_adapters._transformers import inline_config
    from vlm_adapters.errors import ComponentError

    with pytest.raises(ComponentError) as info:
        inline_config({"model_type": "llama", "hidden_size": hidden_size}, "llm.config")
    message = str(info.value)
    assert message.startswith("llm.config: cannot build a 'llama' config: ") and "\n" not in message
    assert "hidden_size" in message


@pytest.mark.parametrize("dtype", ["1e309", "int8", "torch.float32"])
def test_a_dtype_that_is_not_a_float_type_is_refused(dtype: str, tokenizer_dir: str) -> None:
    config = tiny_model_config(tokenizer_dir)
    config["llm"]["dtype"] = dtype
    with pytest.raises(ConfigError, match=rf"llm.*unknown dtype '{re.escape(dtype)}'"):
        model_config_from_dict(config)
