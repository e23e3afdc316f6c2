"""C-Abstractor: residual conv blocks on the patch grid, adaptive pooling, more blocks, MLP.

Following the Honeybee paper's description: convolution keeps local structure while
adaptive average pooling sets the number of visual tokens independently of the input grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlm_adapters.connectors import Connector, ConnectorConfig


class CAbstractorConfig(ConnectorConfig):
    """Options of the ``cabstractor`` connector."""

    num_queries: int = Field(
        64, ge=1, description="Visual tokens per image; a perfect square (the pooled grid)."
    )
    depth: int = Field(3, ge=0, description="Residual conv blocks before and after pooling.")
    hidden_dim: int | None = Field(
        None, ge=1, description="Channel width of the conv blocks; default: the LLM width."
    )
    mlp_depth: int = Field(2, ge=1, description="Linear layers of the output projection.")
    pos_emb: bool = Field(True, description="Add a learned position embedding to the patches.")

    @field_validator("num_queries")
    @classmethod
    def _square(cls, value: int) -> int:
        if math.isqrt(value) ** 2 != value:
            raise ValueError(f"num_queries must be a perfect square (e.g. 64, 144), got {value}")
        return value

    def num_output_tokens(self, num_input_tokens: int) -> int:
        _grid_side(num_input_tokens)  # the input must be a square grid
        return self.num_queries


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with normalisation and a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm1 = ChannelNorm(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = ChannelNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(x + self.norm2(self.conv2(h)))  # [B, C, H, W]


class CAbstractor(Connector):
    """``[B, N, Dv] -> [B, num_queries, Dllm]`` on a square patch grid."""

    def __init__(
        self, cfg: CAbstractorConfig, *, in_dim: int, out_dim: int, num_input_tokens: int
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.side = _grid_side(num_input_tokens)
        self.out_side = math.isqrt(cfg.num_queries)
        hidden = cfg.hidden_dim or out_dim
        self.pos_emb = (
            nn.Parameter(torch.randn(1, num_input_tokens, in_dim) * 0.02) if cfg.pos_emb else None
        )
        self.input = nn.Linear(in_dim, hidden)
        self.before = nn.Sequential(*[ResBlock(hidden) for _ in range(cfg.depth)])
        self.after = nn.Sequential(*[ResBlock(hidden) for _ in range(cfg.depth)])
        dims = [hidden] * cfg.mlp_depth + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.GELU()] if i else []
            layers.append(nn.Linear(a, b))
        self.proj = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pos_emb is not None:
            features = features + self.pos_emb  # [B, N, Dv]
        x = self.input(features)  # [B, N, C]
        b, _, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, self.side, self.side)  # [B, C, S, S]
        grid = self.before(grid)
        grid = F.adaptive_avg_pool2d(grid, self.out_side)  # [B, C, Q, Q]
        grid = self.after(grid)
        return self.proj(grid.flatten(2).transpose(1, 2))  # [B, Q*Q, Dllm]


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"cabstractor needs a square patch grid, got {num_tokens} patch tokens; "
            "use a backbone whose patches form a square"
        )
    return side
