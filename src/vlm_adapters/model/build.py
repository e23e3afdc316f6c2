"""A model from a config: a YAML path, a dict or a ModelConfig, with dotted overrides."""

from __future__ import annotations

import os
from typing import Any

from vlm_adapters.config import ModelConfig, apply_overrides, model_config_from_dict, read_yaml
from vlm_adapters.errors import ConfigError
from vlm_adapters.model.core import VisionLanguageModel

ConfigLike = ModelConfig | dict[str, Any] | str | os.PathLike[str]
"""A model config: typed, the YAML shape as a dict, or the path of a YAML file."""


def load_config(
    config: ConfigLike, overrides: list[str] | dict[str, Any] | None = None
) -> ModelConfig:
    """The typed, validated model config, without building anything.

    ``config`` is a YAML path, a dict of the same shape (``vision`` / ``connector`` / ``llm``
    sections; other keys, such as a training config's, are ignored) or a :class:`ModelConfig`.
    ``overrides`` are dotted ``key=value`` strings or a ``{key: value}`` dict. Unknown keys,
    wrong types, unknown component names and impossible combinations are one-line
    :class:`~vlm_adapters.errors.ConfigError` messages naming the key (and the file).
    """
    if isinstance(config, ModelConfig):
        if not overrides:
            return config
        config = config.to_dict()
    if isinstance(config, dict):
        return model_config_from_dict(apply_overrides(config, overrides or []))
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(
            f"config: expected a YAML path, a dict or a ModelConfig, got {type(config).__name__}"
        )
    data = apply_overrides(read_yaml(config), overrides or [])
    return model_config_from_dict(data, where=os.fspath(config))


def build_vlm(
    config: ConfigLike, overrides: list[str] | dict[str, Any] | None = None
) -> VisionLanguageModel:
    """A :class:`VisionLanguageModel` from a YAML path, a dict or a :class:`ModelConfig`
    (see :func:`load_config`), with dotted ``overrides``."""
    return VisionLanguageModel.from_config(load_config(config, overrides))
