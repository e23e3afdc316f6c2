"""ConvNeXt vision backbone for vlm-adapters (timm weights, optional multi-scale features)."""

from .backbone import ConvNeXtBackbone, ConvNeXtConfig, build_convnext

__all__ = ["ConvNeXtBackbone", "ConvNeXtConfig", "build_convnext"]
