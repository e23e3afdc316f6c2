"""LLM backends: a causal LM with its tokenizer, split into embed / body / head.

Names are imported on first use, so listing the built-in backend imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlm_adapters._lazy import lazy_exports

if TYPE_CHECKING:
    from vlm_adapters.llm.base import LLMBackend, LLMConfig

__all__ = ["LLMBackend", "LLMConfig"]

__getattr__, __dir__ = lazy_exports(
    __name__, {"LLMBackend": "vlm_adapters.llm.base", "LLMConfig": "vlm_adapters.llm.base"}
)
