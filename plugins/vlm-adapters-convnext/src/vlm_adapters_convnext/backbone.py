"""A timm ConvNeXt as a vision backbone: one stage's feature map, flattened to tokens.

With ``extra_stages`` the maps of earlier (higher-resolution) stages are average-pooled to
the chosen stage's grid and concatenated after its channels: multi-scale features at no extra
token cost.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlm_adapters.vision import (
    ImageTransform,
    VisionBackbone,
    VisionConfig,
    check_timm_model_kwargs,
)


class ConvNeXtConfig(VisionConfig):
    """Options of the ``convnext`` vision backbone.

    Its patch grid depends on the timm model's stage strides, known only once it is built, so
    ``probe()`` keeps the default (None): the token budget is checked after building.
    """

    model: str = Field(
        "convnext_base.fb_in22k_ft_in1k",
        description="timm ConvNeXt name (convnext_*, convnextv2_*), optionally with a weight tag.",
    )
    pretrained: bool = Field(True, description="Load timm's pretrained weights for `model`.")
    image_size: int | None = Field(
        None, ge=32, description="Input resolution; default: the weights' resolution."
    )
    stage: int = Field(-1, description="Stage whose feature map becomes the tokens (-1: last).")
    extra_stages: list[int] = Field(
        default_factory=list,
        description="Earlier stages pooled to the grid of `stage` and concatenated (multi-scale).",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra architecture options for timm.create_model."
    )

    _kwargs = field_validator("model_kwargs")(lambda v: check_timm_model_kwargs(v))

    def sources(self) -> dict[str, Any]:
        """timm's pretrained weights, when asked for (never from a checkpoint)."""
        return {"pretrained": True} if self.pretrained else {}


class ConvNeXtBackbone(VisionBackbone):
    """``[B, 3, S, S] -> [B, (S / stride)**2, sum of the chosen stages' channels]``."""

    def __init__(self, cfg: ConvNeXtConfig, tower: nn.Module, transform: ImageTransform) -> None:
        super().__init__()
        self.cfg = cfg
        self.transform = transform
        self.stage, extras = _stage_indices(cfg, len(tower.stages))
        self.indices = sorted({*extras, self.stage})
        info = tower.feature_info
        stride = info[self.stage]["reduction"]
        if transform.crop_size % stride:
            raise ValueError(
                f"convnext: image_size {transform.crop_size} is not a multiple of stage "
                f"{self.stage}'s stride {stride}; pick a multiple of {stride}"
            )
        self.num_patches = (transform.crop_size // stride) ** 2
        self.hidden_size = sum(info[i]["num_chs"] for i in self.indices)
        tower.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.tower = tower

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.tower.forward_intermediates(
            pixel_values.to(self.dtype), indices=self.indices, intermediates_only=True
        )  # each [B, C_i, H_i, W_i], the chosen stage last
        main, grid = maps[-1], maps[-1].shape[-2:]
        pooled = [F.adaptive_avg_pool2d(m, grid) for m in maps[:-1]]  # each [B, C_i, H, W]
        return torch.cat([main, *pooled], dim=1).flatten(2).transpose(1, 2)  # [B, H*W, sum C]

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Rebuilds the architecture offline (weights come from the checkpoint)."""
        size = self.transform.crop_size
        return {**self.cfg.model_dump(), "pretrained": False, "image_size": size}


def build_convnext(cfg: ConvNeXtConfig) -> ConvNeXtBackbone:
    """Create the timm model (downloading weights if ``pretrained``) and wrap it."""
    import timm
    from timm.models.convnext import ConvNeXt

    tower = timm.create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_kwargs)
    if not isinstance(tower, ConvNeXt):
        raise ValueError(
            f"convnext: timm model {cfg.model!r} is a {type(tower).__name__}, not a ConvNeXt; "
            "use the built-in `timm` backbone for other architectures"
        )
    data = timm.data.resolve_model_data_config(tower)
    size = cfg.image_size or data["input_size"][-1]
    transform = ImageTransform(
        crop_size=size,
        resize=int(size / data.get("crop_pct", 1.0)),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=data.get("interpolation", "bicubic"),
    )
    return ConvNeXtBackbone(cfg, tower, transform)


def _stage_indices(cfg: ConvNeXtConfig, num_stages: int) -> tuple[int, list[int]]:
    """Absolute stage indices, validated: the main stage and the earlier extra stages."""
    for value in (cfg.stage, *cfg.extra_stages):
        if not -num_stages <= value < num_stages:
            raise ValueError(
                f"convnext: stage {value} does not exist; the model has {num_stages} stages "
                f"(use 0..{num_stages - 1} or negative indices)"
            )
    stage = cfg.stage % num_stages
    extras = [s % num_stages for s in cfg.extra_stages]
    if any(s >= stage for s in extras):
        raise ValueError(
            f"convnext: extra_stages {cfg.extra_stages} must come before stage {cfg.stage} "
            "(they are pooled down to its grid)"
        )
    return stage, extras
