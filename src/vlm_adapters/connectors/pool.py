"""``pool``: shrink the patch grid (2-D average pooling or pixel shuffle), then an MLP."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vlm_adapters.connectors.base import Activation, Connector, ConnectorConfig, mlp
from vlm_adapters.geometry import pool_grid_side, pooled_grid, pooled_tokens


class PoolConfig(ConnectorConfig):
    """Divides the token count by ``factor**2`` on the square patch grid."""

    mode: Literal["avg", "pixel_shuffle"] = Field("avg", description="How neighbours are merged.")
    factor: int = Field(2, ge=1, description="Grid stride: N tokens become N / factor**2.")
    depth: int = Field(2, ge=1, description="Depth of the projection MLP.")
    activation: Activation = Field("gelu", description="MLP activation.")

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return pooled_tokens(num_input_tokens, self.factor)

    def output_grid(self, rows: int, cols: int) -> tuple[int, int]:
        return pooled_grid(rows, cols, self.factor)


class PoolConnector(Connector):
    """``[B, N, Dv] -> [B, N / f**2, Dllm]``."""

    def __init__(
        self, cfg: PoolConfig, *, in_dim: int, out_dim: int, num_input_tokens: int
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        cfg.num_output_tokens(num_input_tokens)  # validates the grid
        width = in_dim * cfg.factor**2 if cfg.mode == "pixel_shuffle" else in_dim
        self.proj = mlp(width, out_dim, cfg.depth, cfg.activation)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        side, f = pool_grid_side(n), self.cfg.factor
        grid = features.transpose(1, 2).reshape(b, d, side, side)  # [B, D, S, S]
        if self.cfg.mode == "avg":
            grid = F.avg_pool2d(grid, f)  # [B, D, S/f, S/f]
        else:
            grid = F.pixel_unshuffle(grid, f)  # [B, D*f*f, S/f, S/f]
        return self.proj(grid.flatten(2).transpose(1, 2))  # [B, N/f^2, Dllm]
