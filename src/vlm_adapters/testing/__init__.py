"""Helpers for testing vlm-adapters and its plugins: tiny offline configs, conformance checks."""

from vlm_adapters.testing.checks import (
    ConformanceWarning,
    check_connector,
    check_llm_backend,
    check_vision_backbone,
    check_vlm,
    registered,
)
from vlm_adapters.testing.tiny import (
    IMAGE_SIZE,
    LLM_FAMILIES,
    NUM_PATCHES,
    VISION_VARIANTS,
    SectionLike,
    tiny_connector_config,
    tiny_llm_config,
    tiny_model_config,
    tiny_section,
    tiny_tokenizer,
    tiny_vision_config,
)

__all__ = [
    "IMAGE_SIZE",
    "LLM_FAMILIES",
    "NUM_PATCHES",
    "VISION_VARIANTS",
    "ConformanceWarning",
    "SectionLike",
    "check_connector",
    "check_llm_backend",
    "check_vision_backbone",
    "check_vlm",
    "registered",
    "tiny_connector_config",
    "tiny_llm_config",
    "tiny_model_config",
    "tiny_section",
    "tiny_tokenizer",
    "tiny_vision_config",
]
