"""Token-preserving connectors: ``linear`` (LLaVA) and ``mlp`` (LLaVA-1.5: depth 2, GELU)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from vlm_adapters.connectors.base import Activation, Connector, ConnectorConfig, mlp


class LinearConfig(ConnectorConfig):
    """One linear projection from the vision width to the LLM width."""

    per_token: ClassVar[bool] = True


class MLPConfig(ConnectorConfig):
    """A stack of linear layers with an activation between them."""

    per_token: ClassVar[bool] = True

    depth: int = Field(2, ge=1, description="Number of linear layers (2 = LLaVA-1.5's mlp2x).")
    activation: Activation = Field("gelu", description="Activation between layers.")
    hidden_dim: int | None = Field(None, ge=1, description="Inner width; default: the LLM width.")


class LinearConnector(Connector):
    """``[B, N, Dv] -> [B, N, Dllm]`` with a single ``nn.Linear``."""

    def __init__(
        self, cfg: LinearConfig, *, in_dim: int, out_dim: int, num_input_tokens: int
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.proj = mlp(in_dim, out_dim, 1, "gelu")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # [B, N, Dllm]


class MLPConnector(Connector):
    """``[B, N, Dv] -> [B, N, Dllm]`` through ``depth`` linear layers."""

    def __init__(self, cfg: MLPConfig, *, in_dim: int, out_dim: int, num_input_tokens: int) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.proj = mlp(in_dim, out_dim, cfg.depth, cfg.activation, cfg.hidden_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # [B, N, Dllm]
