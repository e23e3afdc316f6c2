"""What a stage minimises: the loss of a micro-batch, normalised over the whole global batch.

The loop sums each micro-batch's loss and divides by the `Objective.weight` of every
micro-batch of the optimizer step on every process, so any split of a global batch trains the
same. A new kind of training (preference pairs, ...) is a new `Objective`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from vlm_adapters.chat.templates import IGNORE_INDEX

Batch = dict[str, Any]
"""A collated micro-batch."""

_OPTIONAL_INPUTS = ("position_ids", "image_features", "video_values", "video_features")


class Objective(ABC):
    """The loss of one micro-batch and the count the step's loss is averaged over."""

    @abstractmethod
    def weight(self, batch: Batch) -> int:
        """What ``batch`` adds to the step's normaliser (e.g. its supervised tokens)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, denominator: float) -> torch.Tensor:
        """The summed loss of ``batch`` under ``model`` (the model as the engine runs it)
        divided by ``denominator``."""


class SupervisedObjective(Objective):
    """Next-token cross-entropy on the labelled (assistant) tokens."""

    def weight(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: Batch, denominator: float) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            num_items_in_batch=denominator,
            **{key: batch[key] for key in _OPTIONAL_INPUTS if key in batch},
        )
        return out.loss
