"""The plugin module named by the ``vlm_adapters`` entry point.

The factory and config are named by import path: `vlm-adapters list` then imports neither
this package's torch code nor torch."""

from __future__ import annotations

import vlm_adapters


@vlm_adapters.hookimpl
def register_vision_backbones() -> list[vlm_adapters.ComponentSpec]:
    return [
        vlm_adapters.ComponentSpec(
            kind="vision",
            name="convnext",
            factory="vlm_adapters_convnext.backbone:build_convnext",
            config="vlm_adapters_convnext.backbone:ConvNeXtConfig",
            description="timm ConvNeXt; a stage's feature map as tokens, optional multi-scale.",
        )
    ]
