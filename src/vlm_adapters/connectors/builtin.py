"""Built-in connectors, registered through the same hook as any plugin.

Factories and configs are named by import path, so listing them imports no torch."""

from __future__ import annotations

from vlm_adapters.hookspecs import hookimpl
from vlm_adapters.registry import ComponentSpec


@hookimpl
def register_connectors() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "connector",
            "linear",
            "vlm_adapters.connectors.simple:LinearConnector",
            "vlm_adapters.connectors.simple:LinearConfig",
            "One linear projection per patch token (LLaVA).",
        ),
        ComponentSpec(
            "connector",
            "mlp",
            "vlm_adapters.connectors.simple:MLPConnector",
            "vlm_adapters.connectors.simple:MLPConfig",
            "Linear layers with activations per patch token (LLaVA-1.5: depth 2, GELU).",
        ),
        ComponentSpec(
            "connector",
            "qformer",
            "vlm_adapters.connectors.attention:QFormerConnector",
            "vlm_adapters.connectors.attention:QFormerConfig",
            "BLIP-2 style learned queries with cross-attention; fixed token count.",
        ),
        ComponentSpec(
            "connector",
            "resampler",
            "vlm_adapters.connectors.attention:ResamplerConnector",
            "vlm_adapters.connectors.attention:ResamplerConfig",
            "Perceiver resampler with learned latents; fixed token count.",
        ),
        ComponentSpec(
            "connector",
            "pool",
            "vlm_adapters.connectors.pool:PoolConnector",
            "vlm_adapters.connectors.pool:PoolConfig",
            "2-D average pooling or pixel shuffle, then an MLP; divides the token count.",
        ),
    ]
