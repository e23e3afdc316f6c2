"""The connector protocol: ``forward(features [B, N, Dv]) -> visual tokens [B, M, Dllm]``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vlm_adapters.registry import ComponentConfig


class ConnectorConfig(ComponentConfig):
    """Base for connector kwargs; knows the output token count without building anything."""

    per_token: ClassVar[bool] = False
    """Each feature becomes one token on its own (linear, mlp): tokens keep the patch grid, and
    a padded or variable-length feature sequence (a NaFlex tower) is safe."""

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """M for N input tokens (N by default: linear and MLP keep every token)."""
        return num_input_tokens

    def output_grid(self, rows: int, cols: int) -> tuple[int, int] | None:
        """The token grid of a ``rows x cols`` patch grid; None when the tokens have no place
        on the image (learned queries). AnyRes lays tile tokens out on this grid."""
        return (rows, cols) if self.per_token else None


class Connector(nn.Module, ABC):
    """Base class: ``forward(features [B, N, in_dim]) -> visual tokens [B, M, out_dim]``.

    The factory receives the validated config plus ``in_dim`` (the backbone's width),
    ``out_dim`` (the LLM's width) and ``num_input_tokens`` (N); subclasses call
    ``super().__init__(cfg, in_dim, out_dim, num_input_tokens)`` and implement :meth:`forward`.
    M comes from the config alone (:meth:`ConnectorConfig.num_output_tokens`).
    """

    def __init__(
        self, cfg: ConnectorConfig, in_dim: int, out_dim: int, num_input_tokens: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_input_tokens = num_input_tokens

    def num_output_tokens(self, num_input_tokens: int | None = None) -> int:
        """Visual tokens produced for ``num_input_tokens`` features (default: the built N)."""
        return self.cfg.num_output_tokens(num_input_tokens or self.num_input_tokens)

    def add_image_newline(self) -> None:
        """Learn ``image_newline`` ``[out_dim]``: the token AnyRes puts after every row of tile
        tokens (LLaVA-NeXT's); it lives here so that it trains and is saved with the
        connector."""
        std = self.out_dim**-0.5
        self.image_newline = nn.Parameter(torch.randn(self.out_dim) * std)

    def end_of_row(self) -> torch.Tensor | None:
        """The end-of-row token ``[out_dim]`` once :meth:`add_image_newline` has added it,
        else None. Any connector whose config keeps the patch grid
        (:meth:`ConnectorConfig.output_grid`) can learn one."""
        return self._parameters.get("image_newline")

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, N, in_dim] -> [B, M, out_dim]``."""

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this connector."""
        return self.cfg.model_dump()


Activation = Literal["gelu", "relu", "silu", "tanh"]
"""The activations an MLP connector may use (LLaVA's projector supports the same)."""
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def mlp(
    in_dim: int, out_dim: int, depth: int, activation: str, hidden_dim: int | None = None
) -> nn.Sequential:
    """``depth`` linear layers with ``activation`` between them (depth 1 is a single Linear)."""
    hidden = hidden_dim or out_dim
    dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)
