"""vlm-adapters: turn any causal LLM into a LLaVA-style vision-language model."""

from __future__ import annotations

from vlm_adapters.config import ConfigError, ModelConfig
from vlm_adapters.errors import VLMError
from vlm_adapters.hookspecs import hookimpl
from vlm_adapters.model import VisionLanguageModel, VLMOutput, load
from vlm_adapters.model.build import build_vlm, load_config
from vlm_adapters.plugins import list_components
from vlm_adapters.registry import ComponentConfig, ComponentSpec

__version__ = "0.1.0"


__all__ = [
    "ComponentConfig",
    "ComponentSpec",
    "ConfigError",
    "ModelConfig",
    "VLMError",
    "VLMOutput",
    "VisionLanguageModel",
    "build_vlm",
    "hookimpl",
    "list_components",
    "load",
    "load_config",
]
