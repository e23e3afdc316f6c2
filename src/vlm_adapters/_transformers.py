"""Shared by the transformers-based components: inline configs that cannot name code, and
loading errors turned into one line."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from vlm_adapters.errors import ComponentError

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention kernels a config may name (a hub kernel repo would download and run code)."""
_ATTN_KEYS = ("attn_implementation", "_attn_implementation")
_CODE_KEYS = ("auto_map", "trust_remote_code")
T = TypeVar("T")


_FLASH_PACKAGES = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn-3"}
"""The package each FlashAttention implementation needs (installed, with a CUDA GPU)."""


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
"""The ``dtype`` names a component's weights may take."""


def check_dtype(value: str | None) -> str | None:
    """A floating-point torch dtype name (``dtype`` of a component), or None."""
    if value is not None and value not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(FLOAT_DTYPES)}")
    return value


def check_attn_implementation(value: str | None) -> str | None:
    """A known attention implementation whose kernel this machine has (without one,
    transformers would fail at load, or fetch a kernel from the hub and run it)."""
    if value is not None and value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {value!r}; use one of {ATTN_IMPLEMENTATIONS}"
        )
    if value in _FLASH_PACKAGES and not flash_attention_available(value):
        package = _FLASH_PACKAGES[value]
        raise ValueError(
            f"{value} needs the {package} package and a CUDA GPU, and transformers finds no "
            f"usable {package} here; install {package} (on a CUDA machine), or use sdpa or eager"
        )
    return value


def flash_attention_available(value: str) -> bool:
    """Whether transformers can run FlashAttention ``value`` from its own package here."""
    from transformers.utils import import_utils

    version = value.removeprefix("flash_attention_")
    return bool(getattr(import_utils, f"is_flash_attn_{version}_available")())


def check_inline_config(config: dict[str, Any] | None, where: str = "config") -> Any:
    """Refuse an inline transformers config that names code (``auto_map``) or a kernel repo."""
    if config is None:
        return None
    for key, value in config.items():
        if key in _CODE_KEYS and value:
            raise ValueError(
                f"{where}.{key}: an inline config may not name code to run; remove the key"
            )
        if key in _ATTN_KEYS:
            check_attn_implementation(value)
        if isinstance(value, dict):
            check_inline_config(value, f"{where}.{key}")
    return config


def inline_config(config: dict[str, Any], what: str) -> Any:
    """``AutoConfig.for_model(**config)`` with a one-line error for an unknown ``model_type``
    or a value the config class refuses (its validators, strict field types)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    data = dict(config)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ComponentError(f"{what}: an inline config needs `model_type` (e.g. llama)")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ComponentError(f"{what}: cannot build a {model_type!r} config: {reason}") from None


def load_or_explain(what: str, source: str, load: Callable[[], T]) -> T:
    """Run a transformers loader; a missing path, an unknown hub id or an offline miss becomes
    a one-line ComponentError naming ``what`` and ``source``."""
    try:
        return load()
    except (OSError, ValueError) as error:
        raise ComponentError(f"{what}: cannot load {source!r}: {_reason(source, error)}") from None


def _reason(source: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "trust_remote_code" in str(error):
        return (
            "it ships its own code; vlm-adapters runs it only when you set "
            "trust_remote_code: true in your own config"
        )
    if os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source):
        if not os.path.exists(os.path.expanduser(source)):
            return "no such directory; check the path"
        return f"{first[:300]}; is it a complete transformers checkpoint directory?"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    hint = (
        "HF_HUB_OFFLINE is set and it is not in the local cache; download it first or point "
        "to a local directory"
        if offline
        else "check the hub id, your network and access rights"
    )
    return f"{first[:300]} ({hint})"
