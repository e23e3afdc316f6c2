"""Built-in connectors, registered through the same hook as any plugin."""

from __future__ import annotations

from vlm_adapters.connectors.attention import (
    QFormerConfig,
    QFormerConnector,
    ResamplerConfig,
    ResamplerConnector,
)
from vlm_adapters.connectors.pool import PoolConfig, PoolConnector
from vlm_adapters.connectors.simple import LinearConfig, LinearConnector, MLPConfig, MLPConnector
from vlm_adapters.hookspecs import hookimpl
from vlm_adapters.registry import ComponentSpec


@hookimpl
def register_connectors() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "connector",
            "linear",
            LinearConnector,
            LinearConfig,
            "One linear projection per patch token (LLaVA).",
        ),
        ComponentSpec(
            "connector",
            "mlp",
            MLPConnector,
            MLPConfig,
            "Linear layers with activations per patch token (LLaVA-1.5: depth 2, GELU).",
        ),
        ComponentSpec(
            "connector",
            "qformer",
            QFormerConnector,
            QFormerConfig,
            "BLIP-2 style learned queries with cross-attention; fixed token count.",
        ),
        ComponentSpec(
            "connector",
            "resampler",
            ResamplerConnector,
            ResamplerConfig,
            "Perceiver resampler with learned latents; fixed token count.",
        ),
        ComponentSpec(
            "connector",
            "pool",
            PoolConnector,
            PoolConfig,
            "2-D average pooling or pixel shuffle, then an MLP; divides the token count.",
        ),
    ]
