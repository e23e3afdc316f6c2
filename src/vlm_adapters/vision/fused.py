"""Two or more backbones on the same patch grid, channels concatenated (DINOv2 + SigLIP)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from vlm_adapters.plugins import get_registry
from vlm_adapters.vision.base import VisionBackbone, VisionConfig


class FusedVisionConfig(VisionConfig):
    """Backbones run on the same image; their patch features are concatenated channel-wise."""

    backbones: list[dict[str, Any]] = Field(
        description="Vision sections (each with `type`), e.g. [{type: hf, ...}, {type: timm, ...}]."
    )

    @field_validator("backbones")
    @classmethod
    def _at_least_two(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(value) < 2:
            raise ValueError("a fused backbone needs at least two backbones")
        if any("type" not in b for b in value):
            raise ValueError("every fused backbone needs a `type`")
        return value

    def sources(self) -> dict[str, Any]:
        """Every member's external sources, keyed ``backbones[i].field``."""
        found = {}
        for index, spec in enumerate(self.backbones):
            for key, value in get_registry().parse("vision", spec).params.sources().items():
                found[f"backbones[{index}].{key}"] = value
        return found


class FusedBackbone(VisionBackbone):
    """Runs every member on the raw image with its own normalisation, then concatenates."""

    def __init__(self, members: list[VisionBackbone], specs: list[dict[str, Any]]) -> None:
        super().__init__()
        first = members[0].transform
        for member in members[1:]:
            if member.num_patches != members[0].num_patches:
                raise ValueError(
                    f"fused backbones must share a patch grid: got {members[0].num_patches} and "
                    f"{member.num_patches} patches; pick matching image and patch sizes"
                )
            if member.transform.crop_size != first.crop_size:
                raise ValueError("fused backbones must use the same input resolution")
        self.members = nn.ModuleList(members)
        self.specs = specs
        self.num_patches = members[0].num_patches
        self.hidden_size = sum(m.hidden_size for m in members)
        self.transform = first.with_normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # [0, 1]
        for i, member in enumerate(members):
            t = member.transform
            self.register_buffer(
                f"mean{i}", torch.tensor(t.mean).view(1, 3, 1, 1), persistent=False
            )
            self.register_buffer(f"std{i}", torch.tensor(t.std).view(1, 3, 1, 1), persistent=False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, member in enumerate(self.members):
            normed = (pixel_values - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            outs.append(member(normed))  # [B, N, D_i]
        return torch.cat(outs, dim=-1)  # [B, N, sum D_i]

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline."""
        rebuilt = [
            {"type": spec["type"], **m.rebuild_kwargs()}
            for spec, m in zip(self.specs, self.members)
        ]
        return {"backbones": rebuilt}


def build_fused(cfg: FusedVisionConfig) -> FusedBackbone:
    registry = get_registry()
    members = [registry.create("vision", dict(spec)) for spec in cfg.backbones]
    return FusedBackbone(members, cfg.backbones)
