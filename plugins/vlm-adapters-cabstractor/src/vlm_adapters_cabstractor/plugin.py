"""The plugin module named by the ``vlm_adapters`` entry point.

The factory and config are named by import path: `vlm-adapters list` then imports neither
this package's torch code nor torch."""

from __future__ import annotations

import vlm_adapters


@vlm_adapters.hookimpl
def register_connectors() -> list[vlm_adapters.ComponentSpec]:
    return [
        vlm_adapters.ComponentSpec(
            kind="connector",
            name="cabstractor",
            factory="vlm_adapters_cabstractor.connector:CAbstractor",
            config="vlm_adapters_cabstractor.connector:CAbstractorConfig",
            description="Honeybee C-Abstractor: conv blocks, adaptive pooling to a square grid.",
        )
    ]
