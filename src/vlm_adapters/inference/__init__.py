"""Inference: evaluation of a model on Q&A records and benchmark task files (generation itself
is in :mod:`vlm_adapters.model.generation`, the metrics in :mod:`vlm_adapters.scoring`)."""

from vlm_adapters.inference.evaluation import answer_loss, evaluate, normalize_answer
from vlm_adapters.inference.tasks import TASK_TYPES, Scored, option_logprobs, score

__all__ = [
    "TASK_TYPES",
    "Scored",
    "answer_loss",
    "evaluate",
    "normalize_answer",
    "option_logprobs",
    "score",
]
