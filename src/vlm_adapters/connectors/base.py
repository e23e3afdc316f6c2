"""The connector protocol: ``forward(features [B, N, Dv]) -> visual tokens [B, M, Dllm]``."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm_adapters.registry import ComponentConfig


class ConnectorConfig(ComponentConfig):
    """Base for connector kwargs; knows the output token count without building anything."""

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """M for N input tokens (N by default: linear and MLP keep every token)."""
        return num_input_tokens


class Connector(nn.Module):
    """Base class for connectors. Subclasses call ``super().__init__(cfg, in_dim, out_dim, n)``."""

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

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this connector."""
        return self.cfg.model_dump()


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
