"""timm and open_clip models as vision backbones, through timm's ``forward_intermediates``."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..registry import ComponentConfig
from .base import ImageTransform, VisionBackbone


class TimmVisionConfig(ComponentConfig):
    """Any timm model (ViT, ConvNeXt, ...); conv feature maps are flattened to tokens."""

    model: str = Field(description="timm model name, e.g. vit_base_patch16_224 or hf-hub:org/name.")
    pretrained: bool = Field(True, description="Load timm's pretrained weights.")
    feature_layer: int | list[int] = Field(
        -2, description="Block/stage index (negative from the end), or a list to concatenate."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for timm.create_model."
    )


class OpenClipVisionConfig(ComponentConfig):
    """The visual tower of any open_clip model; patch tokens, not the pooled vector."""

    model: str = Field(description="open_clip model name, e.g. ViT-B-16 or hf-hub:org/name.")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or file path.")
    feature_layer: int | list[int] = Field(
        -2, description="Block index (negative from the end), or a list to concatenate."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for open_clip.create_model."
    )


class IntermediatesBackbone(VisionBackbone):
    """Wraps a module with timm's ``forward_intermediates`` API (timm and open_clip towers)."""

    def __init__(self, cfg: Any, tower: nn.Module, transform: ImageTransform) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = tower
        self.transform = transform
        layers = cfg.feature_layer
        self.indices = [layers] if isinstance(layers, int) else list(layers)
        size = transform.crop_size
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, size, size))  # [1, N, D]
        self.num_patches, self.hidden_size = probe.shape[1], probe.shape[2]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.tower.forward_intermediates(
            pixel_values.to(self.dtype), indices=self.indices, intermediates_only=True
        )
        if isinstance(maps, dict):  # open_clip returns a dict
            maps = maps["image_intermediates"]
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]  # each [B, H*W, C]
        return tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=-1)

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (no pretrained download)."""
        off = (
            {"pretrained": False}
            if isinstance(self.cfg, TimmVisionConfig)
            else {"pretrained": None}
        )
        return {**self.cfg.model_dump(), **off}


def build_timm(cfg: TimmVisionConfig) -> IntermediatesBackbone:
    import timm

    tower = timm.create_model(
        cfg.model, pretrained=cfg.pretrained, num_classes=0, **cfg.model_kwargs
    )
    data = timm.data.resolve_model_data_config(tower)
    # a ViT built with a non-default `img_size` accepts only that size
    fixed = getattr(getattr(tower, "patch_embed", None), "img_size", None)
    size = fixed[-1] if fixed else data["input_size"][-1]
    transform = ImageTransform(
        crop_size=size,
        resize=int(size / data.get("crop_pct", 1.0)),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=data.get("interpolation", "bicubic"),
    )
    return IntermediatesBackbone(cfg, tower, transform)


def build_open_clip(cfg: OpenClipVisionConfig) -> IntermediatesBackbone:
    import open_clip

    model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_kwargs)
    tower = model.visual
    pre = tower.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][-1]
    transform = ImageTransform(
        crop_size=size,
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        crop=pre.get("resize_mode", "shortest") == "shortest",
        interpolation=pre.get("interpolation", "bicubic"),
    )
    return IntermediatesBackbone(cfg, tower, transform)
