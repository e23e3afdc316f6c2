"""Vision backbones: ``forward(pixel_values [B,3,H,W]) -> features [B, N, D]``.

Names are imported on first use, so listing the built-in backbones imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_adapters._lazy import lazy_exports

if TYPE_CHECKING:
    from vlm_adapters.vision.base import ImageTransform, VisionBackbone, VisionConfig
    from vlm_adapters.vision.timm import TIMM_MODEL_KWARGS, check_timm_model_kwargs

__all__ = [
    "TIMM_MODEL_KWARGS",
    "ImageTransform",
    "VisionBackbone",
    "VisionConfig",
    "check_timm_model_kwargs",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ImageTransform": "vlm_adapters.vision.base",
        "VisionBackbone": "vlm_adapters.vision.base",
        "VisionConfig": "vlm_adapters.vision.base",
        "TIMM_MODEL_KWARGS": "vlm_adapters.vision.timm",
        "check_timm_model_kwargs": "vlm_adapters.vision.timm",
    },
)
