"""Inference: evaluation of a model on Q&A records (generation itself is in
:mod:`vlm_adapters.model.generation`)."""

from vlm_adapters.inference.evaluation import answer_loss, evaluate, normalize_answer

__all__ = ["answer_loss", "evaluate", "normalize_answer"]
