"""The connector protocol: ``forward(features [B, N, Dv]) -> visual tokens [B, M, Dllm]``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import nn

from vlm_adapters.registry import ComponentConfig


class ConnectorConfig(ComponentConfig):
    """Base for connector kwargs; knows the output token count without building anything."""

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """M for N input tokens (N by default: linear and MLP keep every token)."""
        return num_input_tokens


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
