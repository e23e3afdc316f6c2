"""Connectors: ``forward(features [B, N, Dv]) -> visual tokens [B, M, Dllm]``."""

from vlm_adapters.connectors.base import Connector, ConnectorConfig

__all__ = ["Connector", "ConnectorConfig"]
