"""Connectors: ``forward(features [B, N, Dv]) -> visual tokens [B, M, Dllm]``.

Names are imported on first use, so listing the built-in connectors imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_adapters._lazy import lazy_exports

if TYPE_CHECKING:
    from vlm_adapters.connectors.base import Connector, ConnectorConfig

__all__ = ["Connector", "ConnectorConfig"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Connector": "vlm_adapters.connectors.base",
        "ConnectorConfig": "vlm_adapters.connectors.base",
    },
)
