"""The plugin module named by the ``vlm_adapters`` entry point."""

from __future__ import annotations

import vlm_adapters

from .connector import CAbstractor, CAbstractorConfig


@vlm_adapters.hookimpl
def register_connectors() -> list[vlm_adapters.ComponentSpec]:
    return [
        vlm_adapters.ComponentSpec(
            kind="connector",
            name="cabstractor",
            factory=CAbstractor,
            config=CAbstractorConfig,
            description="Honeybee C-Abstractor: conv blocks, adaptive pooling to a square grid.",
        )
    ]
