"""Tiny, offline, fast component configs: for the test suite and for plugin authors.

Every config builds random weights from an inline config (no hub access): images of
``IMAGE_SIZE`` pixels cut into ``PATCH_SIZE`` patches give ``NUM_PATCHES`` tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16
WIDTH = 32
VOCAB_SIZE = 128  # larger than the tiny tokenizer, so adding `<image>` needs no resize

LLM_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")

_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # the tiny tokenizer's
_DECODER = {
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 256,
    **_SPECIAL_IDS,
}
_LLM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_DECODER},
    "qwen2": {"model_type": "qwen2", **_DECODER},
    "mistral": {"model_type": "mistral", **_DECODER, "sliding_window": None},
    "gemma": {"model_type": "gemma", **_DECODER, "head_dim": 8},
    "phi3": {"model_type": "phi3", **_DECODER},
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": WIDTH,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "vocab_size": VOCAB_SIZE,
        **_SPECIAL_IDS,
    },
}

_VIT = {
    "hidden_size": WIDTH,
    "intermediate_size": 2 * WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
_OPEN_CLIP_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "width": WIDTH,
        "layers": 2,
        "head_width": 16,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "hf": {"type": "hf", "config": {"model_type": "clip_vision_model", **_VIT}},
    "hf_siglip": {"type": "hf", "config": {"model_type": "siglip_vision_model", **_VIT}},
    "hf_dinov2": {
        "type": "hf",
        "image_size": IMAGE_SIZE,
        "config": {"model_type": "dinov2", **_VIT},
    },
    "hf_dinov2_registers": {
        "type": "hf",
        "image_size": IMAGE_SIZE,
        "config": {"model_type": "dinov2_with_registers", **_VIT, "num_register_tokens": 4},
    },
    "timm": {
        "type": "timm",
        "model": "vit_tiny_patch16_224",
        "pretrained": False,
        "model_kwargs": {
            "img_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "embed_dim": WIDTH,
            "depth": 2,
            "num_heads": 4,
        },
    },
    "open_clip": {"type": "open_clip", "model": "ViT-B-32", "model_kwargs": _OPEN_CLIP_MODEL},
}
VISION_VARIANTS: tuple[str, ...] = (*_VISION_CONFIGS, "fused")
"""Names accepted by :func:`tiny_vision_config` (``hf*`` variants all use vision type ``hf``)."""

TINY_TILING: dict[str, Any] = {"max_tiles": 4}
"""A ``vision.tiling`` section for the tiny towers: every grid of up to 4 tiles of
``IMAGE_SIZE`` pixels; with a token-keeping connector an image gives at most 96 visual tokens
(the 4x1 grid: 16 for the overview, 16 rows of 4 + 1)."""
NAFLEX_PATCHES = 24
"""``max_num_patches`` of :func:`tiny_naflex_config`."""

_CONNECTOR_CONFIGS: dict[str, dict[str, Any]] = {
    "linear": {"type": "linear"},
    "mlp": {"type": "mlp"},
    "qformer": {"type": "qformer", "num_queries": 4, "num_layers": 1, "num_heads": 4},
    "resampler": {"type": "resampler", "num_queries": 4, "num_layers": 1, "num_heads": 4},
    "pool": {"type": "pool", "factor": 2},
}


def tiny_tokenizer(directory: str | Path) -> str:
    """Save a word tokenizer (shapes + template vocabulary and specials) to ``directory``."""
    from vlm_adapters.chat.templates import template_vocabulary
    from vlm_adapters.demo import TEMPLATE_SPECIAL_TOKENS, build_word_tokenizer, shapes_vocabulary

    words = [*shapes_vocabulary(), *template_vocabulary()]
    build_word_tokenizer(words, TEMPLATE_SPECIAL_TOKENS, out_dir=directory)
    return str(directory)


SectionLike = str | dict[str, Any]
"""A built-in tiny name, or a whole section dict (any component's, e.g. a plugin's)."""


def tiny_llm_config(family: SectionLike, tokenizer_dir: str) -> dict[str, Any]:
    """An ``llm`` section: a 2-layer, 32-wide causal LM of ``family`` (one of
    :data:`LLM_FAMILIES`, or ``hf``, the built-in type, for llama) with random weights; a dict
    is taken as the section itself and returned as a copy."""
    if isinstance(family, dict):
        return copy.deepcopy(family)
    family = "llama" if family == "hf" else family
    if family not in _LLM_CONFIGS:
        raise KeyError(f"no tiny LLM config for {family!r}; choose one of {LLM_FAMILIES} or hf")
    return {"type": "hf", "tokenizer": tokenizer_dir, "config": dict(_LLM_CONFIGS[family])}


def tiny_vision_config(name: SectionLike) -> dict[str, Any]:
    """A ``vision`` section for a built-in type or variant (see :data:`VISION_VARIANTS`); a
    dict is taken as the section itself and returned as a copy."""
    if isinstance(name, dict):
        return copy.deepcopy(name)
    if name == "fused":
        members = [tiny_vision_config("hf_siglip"), tiny_vision_config("hf_dinov2")]
        return {"type": "fused", "backbones": members}
    if name not in _VISION_CONFIGS:
        raise KeyError(f"no tiny vision config for {name!r}; choose one of {VISION_VARIANTS}")
    return copy.deepcopy(_VISION_CONFIGS[name])


def tiny_tiled_config(name: SectionLike = "hf", **tiling: Any) -> dict[str, Any]:
    """A ``vision`` section (see :func:`tiny_vision_config`) with AnyRes ``tiling``
    (:data:`TINY_TILING`, updated with ``tiling``)."""
    return {**tiny_vision_config(name), "tiling": {**TINY_TILING, **tiling}}


def tiny_naflex_config(max_num_patches: int = NAFLEX_PATCHES) -> dict[str, Any]:
    """A ``vision`` section: a 2-layer, 32-wide SigLIP2 NaFlex tower (``PATCH_SIZE`` patches,
    at most ``max_num_patches`` per image) with random weights."""
    config = {k: v for k, v in _VIT.items() if k != "image_size"}
    config = {"model_type": "siglip2_vision_model", **config, "num_patches": NUM_PATCHES}
    return {"type": "hf", "max_num_patches": max_num_patches, "config": config}


def tiny_connector_config(name: SectionLike) -> dict[str, Any]:
    """A ``connector`` section for a built-in connector, sized for :data:`NUM_PATCHES` tokens; a
    dict is taken as the section itself and returned as a copy."""
    if isinstance(name, dict):
        return copy.deepcopy(name)
    if name not in _CONNECTOR_CONFIGS:
        choices = tuple(_CONNECTOR_CONFIGS)
        raise KeyError(f"no tiny connector config for {name!r}; choose one of {choices}")
    return dict(_CONNECTOR_CONFIGS[name])


def tiny_section(kind: str, name: SectionLike, tokenizer_dir: str) -> dict[str, Any]:
    """The tiny section of ``kind`` (``vision``, ``connector`` or ``llm``) for ``name``."""
    if kind == "llm":
        return tiny_llm_config(name, tokenizer_dir)
    return {"vision": tiny_vision_config, "connector": tiny_connector_config}[kind](name)


def tiny_model_config(
    tokenizer_dir: str,
    vision: SectionLike = "hf",
    connector: SectionLike = "mlp",
    llm: SectionLike = "llama",
) -> dict[str, Any]:
    """A whole model config: each section a built-in tiny name or a section dict (a plugin's
    component, say), exactly like the ``vlm_tiny_model_config`` fixture."""
    return {
        "vision": tiny_vision_config(vision),
        "connector": tiny_connector_config(connector),
        "llm": tiny_llm_config(llm, tokenizer_dir),
    }
