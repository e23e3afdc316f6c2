"""LLM backends: a causal LM with its tokenizer, split into embed / body / head."""

from vlm_adapters.llm.base import LLMBackend, LLMConfig

__all__ = ["LLMBackend", "LLMConfig"]
