"""LLM backends: a causal LM with its tokenizer, split into embed / body / head."""

from .base import LLMBackend

__all__ = ["LLMBackend"]
