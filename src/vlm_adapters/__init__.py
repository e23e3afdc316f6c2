"""vlm-adapters: turn any causal LLM into a LLaVA-style vision-language model.

The public names are imported when first used, so importing a light module of the package
(``vlm_adapters.geometry``, ``vlm_adapters.errors``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_adapters._lazy import lazy_exports

if TYPE_CHECKING:
    from vlm_adapters.config import ModelConfig
    from vlm_adapters.errors import ConfigError, VLMError
    from vlm_adapters.hookspecs import hookimpl
    from vlm_adapters.loading import load
    from vlm_adapters.model import VisionLanguageModel, VLMOutput
    from vlm_adapters.model.build import build_vlm, load_config
    from vlm_adapters.model.lora import merge_lora
    from vlm_adapters.plugins import list_components
    from vlm_adapters.registry import ComponentConfig, ComponentSpec
    from vlm_adapters.training.callbacks import TrainerCallback
    from vlm_adapters.training.run import train

__version__ = "0.1.0"

_SOURCES = {
    "ComponentConfig": "vlm_adapters.registry",
    "ComponentSpec": "vlm_adapters.registry",
    "ConfigError": "vlm_adapters.errors",
    "ModelConfig": "vlm_adapters.config",
    "TrainerCallback": "vlm_adapters.training.callbacks",
    "VLMError": "vlm_adapters.errors",
    "VLMOutput": "vlm_adapters.model",
    "VisionLanguageModel": "vlm_adapters.model",
    "build_vlm": "vlm_adapters.model.build",
    "export": "vlm_adapters.export",
    "hookimpl": "vlm_adapters.hookspecs",
    "list_components": "vlm_adapters.plugins",
    "load": "vlm_adapters.loading",
    "load_config": "vlm_adapters.model.build",
    "merge_lora": "vlm_adapters.model.lora",
    "train": "vlm_adapters.training.run",
}
"""Each public name and the module that defines it (``export`` is the callable package
``vlm_adapters.export`` itself: ``vlm_adapters.export(model, out_dir, format="hf-llava")``)."""

__all__ = [
    "ComponentConfig",
    "ComponentSpec",
    "ConfigError",
    "ModelConfig",
    "TrainerCallback",
    "VLMError",
    "VLMOutput",
    "VisionLanguageModel",
    "build_vlm",
    "export",
    "hookimpl",
    "list_components",
    "load",
    "load_config",
    "merge_lora",
    "train",
]


__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
