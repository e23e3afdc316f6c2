"""The plugin module named by the ``vlm_adapters`` entry point."""

from __future__ import annotations

import vlm_adapters

from .backbone import ConvNeXtConfig, build_convnext


@vlm_adapters.hookimpl
def register_vision_backbones() -> list[vlm_adapters.ComponentSpec]:
    return [
        vlm_adapters.ComponentSpec(
            kind="vision",
            name="convnext",
            factory=build_convnext,
            config=ConvNeXtConfig,
            description="timm ConvNeXt; a stage's feature map as tokens, optional multi-scale.",
        )
    ]
