"""Vision backbones: ``forward(pixel_values [B,3,H,W]) -> features [B, N, D]``."""

from .base import ImageTransform, VisionBackbone

__all__ = ["ImageTransform", "VisionBackbone"]
