"""Connectors: ``forward(features [B, N, Dv]) -> visual tokens [B, M, Dllm]``."""

from .base import Connector, ConnectorConfig

__all__ = ["Connector", "ConnectorConfig"]
