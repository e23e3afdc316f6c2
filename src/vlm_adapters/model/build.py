"""A model from a config: a YAML path, a dict or a ModelConfig, with dotted overrides."""

from __future__ import annotations

from typing import Any

from vlm_adapters.config import ModelConfig, apply_overrides, model_config_from_dict, read_yaml
from vlm_adapters.model.core import VisionLanguageModel


def load_config(path: str, overrides: list[str] | dict[str, Any] | None = None) -> ModelConfig:
    """Read a YAML config, apply dotted overrides, and validate the model sections."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return model_config_from_dict(data, where=str(path))


def build_vlm(
    config: ModelConfig | dict[str, Any] | str, overrides: list[str] | None = None
) -> VisionLanguageModel:
    """A :class:`VisionLanguageModel` from a config object, a dict, or a YAML path."""
    if isinstance(config, str):
        config = load_config(config, overrides)
    elif overrides:
        config = model_config_from_dict(apply_overrides(_as_dict(config), overrides))
    return VisionLanguageModel.from_config(config)


def _as_dict(config: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    return config.to_dict() if isinstance(config, ModelConfig) else config
