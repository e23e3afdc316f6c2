"""Vision backbones: ``forward(pixel_values [B,3,H,W]) -> features [B, N, D]``."""

from vlm_adapters.vision.base import ImageTransform, VisionBackbone, VisionConfig
from vlm_adapters.vision.timm import TIMM_MODEL_KWARGS, check_timm_model_kwargs

__all__ = [
    "TIMM_MODEL_KWARGS",
    "ImageTransform",
    "VisionBackbone",
    "VisionConfig",
    "check_timm_model_kwargs",
]
