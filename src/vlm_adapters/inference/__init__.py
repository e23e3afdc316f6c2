"""Inference: batched generation that stops at the template's end of turn, and evaluation."""

from vlm_adapters.inference.evaluation import answer_loss, evaluate, normalize_answer
from vlm_adapters.inference.generation import generate, generate_ids, resolve_template

__all__ = [
    "answer_loss",
    "evaluate",
    "generate",
    "generate_ids",
    "normalize_answer",
    "resolve_template",
]
