"""LLM backends: a causal LM with its tokenizer, split into embed / body / head."""

from vlm_adapters.llm.base import LLMBackend

__all__ = ["LLMBackend"]
