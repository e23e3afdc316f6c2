"""ConvNeXt vision backbone for vlm-adapters (timm weights, optional multi-scale features).

The names are imported on first use, so loading the plugin to list it imports no torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["ConvNeXtBackbone", "ConvNeXtConfig", "build_convnext"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.backbone"), name)
