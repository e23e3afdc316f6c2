"""Built-in vision backbones, registered through the same hook as any plugin."""

from __future__ import annotations

from vlm_adapters.hookspecs import hookimpl
from vlm_adapters.registry import ComponentSpec
from vlm_adapters.vision.fused import FusedVisionConfig, build_fused
from vlm_adapters.vision.hf import HFVisionBackbone, HFVisionConfig
from vlm_adapters.vision.open_clip import OpenClipVisionConfig, build_open_clip
from vlm_adapters.vision.timm import TimmVisionConfig, build_timm


@hookimpl
def register_vision_backbones() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "vision",
            "hf",
            HFVisionBackbone,
            HFVisionConfig,
            "Any transformers vision model (CLIP, SigLIP, DINOv2...): hub id, path or config.",
        ),
        ComponentSpec(
            "vision",
            "timm",
            build_timm,
            TimmVisionConfig,
            "Any timm model; ViT patch tokens or flattened conv feature maps.",
        ),
        ComponentSpec(
            "vision",
            "open_clip",
            build_open_clip,
            OpenClipVisionConfig,
            "The visual tower of any open_clip model, patch tokens.",
        ),
        ComponentSpec(
            "vision",
            "fused",
            build_fused,
            FusedVisionConfig,
            "Several backbones on one patch grid, channels concatenated (e.g. DINOv2 + SigLIP).",
        ),
    ]
