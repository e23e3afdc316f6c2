"""Connectors with a fixed number of learned queries: ``qformer`` and ``resampler``."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vlm_adapters.connectors.base import Connector, ConnectorConfig


class QueryConfig(ConnectorConfig):
    """Learned queries that attend to the image features; M = ``num_queries``."""

    num_queries: int = Field(32, ge=1, description="Number of output visual tokens M.")
    num_layers: int = Field(2, ge=1, description="Number of attention blocks.")
    num_heads: int = Field(8, ge=1, description="Attention heads (must divide hidden_dim).")
    hidden_dim: int | None = Field(
        None, ge=1, description="Query width; default: the vision width."
    )

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.num_queries


class QFormerConfig(QueryConfig):
    """BLIP-2 style Q-Former: self-attention among queries, cross-attention to the image."""


class ResamplerConfig(QueryConfig):
    """Perceiver resampler: latents attend to [image features; latents]."""


class _QueryConnector(Connector):
    def __init__(self, cfg: QueryConfig, in_dim: int, out_dim: int, num_input_tokens: int) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.width = cfg.hidden_dim or in_dim
        if self.width % cfg.num_heads:
            raise ValueError(
                f"num_heads={cfg.num_heads} must divide the query width {self.width}; "
                "set connector.num_heads or connector.hidden_dim"
            )
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, self.width) * 0.02)  # [M, W]
        self.pos = nn.Parameter(torch.zeros(num_input_tokens, self.width))  # [N, W]
        self.inp = nn.Linear(in_dim, self.width)
        self.norm = nn.LayerNorm(self.width)
        self.out = nn.Linear(self.width, out_dim)

    def embed(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.inp(features) + self.pos  # [B, N, W]
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)  # [B, M, W]
        return queries, memory


class QFormerConnector(_QueryConnector):
    """``[B, N, Dv] -> [B, M, Dllm]`` via transformer decoder layers over learned queries."""

    def __init__(
        self, cfg: QFormerConfig, *, in_dim: int, out_dim: int, num_input_tokens: int
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                self.width,
                cfg.num_heads,
                4 * self.width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.num_layers)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries, memory = self.embed(features)
        for layer in self.layers:
            queries = layer(queries, memory)  # [B, M, W]
        return self.out(self.norm(queries))  # [B, M, Dllm]


class _PerceiverBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, latents: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(latents)
        kv = self.norm_kv(torch.cat([memory, latents], dim=1))  # [B, N + M, W]
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)  # [B, M, W]


class ResamplerConnector(_QueryConnector):
    """``[B, N, Dv] -> [B, M, Dllm]`` via perceiver blocks over learned latents."""

    def __init__(
        self, cfg: ResamplerConfig, *, in_dim: int, out_dim: int, num_input_tokens: int
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.layers = nn.ModuleList(
            _PerceiverBlock(self.width, cfg.num_heads) for _ in range(cfg.num_layers)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents, memory = self.embed(features)
        for layer in self.layers:
            latents = layer(latents, memory)
        return self.out(self.norm(latents))  # [B, M, Dllm]
