"""Built-in vision backbones, registered through the same hook as any plugin.

Factories and configs are named by import path, so listing them imports no torch."""

from __future__ import annotations

from vlm_adapters.hookspecs import hookimpl
from vlm_adapters.registry import ComponentSpec


@hookimpl
def register_vision_backbones() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "vision",
            "hf",
            "vlm_adapters.vision.hf:HFVisionBackbone",
            "vlm_adapters.vision.hf:HFVisionConfig",
            "Any transformers vision model (CLIP, SigLIP, DINOv2...): hub id, path or config.",
        ),
        ComponentSpec(
            "vision",
            "timm",
            "vlm_adapters.vision.timm:build_timm",
            "vlm_adapters.vision.timm:TimmVisionConfig",
            "Any timm model; ViT patch tokens or flattened conv feature maps.",
        ),
        ComponentSpec(
            "vision",
            "open_clip",
            "vlm_adapters.vision.open_clip:build_open_clip",
            "vlm_adapters.vision.open_clip:OpenClipVisionConfig",
            "The visual tower of any open_clip model, patch tokens.",
        ),
        ComponentSpec(
            "vision",
            "fused",
            "vlm_adapters.vision.fused:build_fused",
            "vlm_adapters.vision.fused:FusedVisionConfig",
            "Several backbones on one patch grid, channels concatenated (e.g. DINOv2 + SigLIP).",
        ),
    ]
