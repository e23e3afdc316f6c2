"""What a stage minimises: the loss of a micro-batch, normalised over the whole global batch.

The loop sums each micro-batch's loss and divides by the `Objective.weight` of every
micro-batch of the optimizer step on every process, so any split of a global batch trains the
same. A new kind of training (preference pairs, ...) is a new `Objective`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.errors import ConfigError, TrainingError
from vlm_adapters.inference.preference import pair_forward
from vlm_adapters.model.lora import is_quantized, lora_parts, merge_lora
from vlm_adapters.training.preference import (
    METRICS,
    PairLogps,
    PreferenceSettings,
    PreferenceTerms,
    metric_sums,
    preference_terms,
)
from vlm_adapters.training.reference import (
    LiveReference,
    Precompute,
    check_reference,
    precomputed_reference,
    resolve_reference,
)

logger = logging.getLogger("vlm_adapters.training")

Batch = dict[str, Any]
"""A collated micro-batch."""

_OPTIONAL_INPUTS = ("position_ids", "image_features")  # packed rows; a feature cache


class Objective(ABC):
    """The loss of one micro-batch and the count the step's loss is averaged over.

    An objective may report more per step: `metric_names`, whose sums over the last `loss`
    call's samples `metric_sums` gives; the loop reports them divided by the step's weight.
    `adapt`, `setup` and `start` let it prepare the model and the data before training.
    """

    metric_names: tuple[str, ...] = ()

    @abstractmethod
    def weight(self, batch: Batch) -> int:
        """What ``batch`` adds to the step's normaliser (e.g. its supervised tokens)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, denominator: float) -> torch.Tensor:
        """The summed loss of ``batch`` under ``model`` (the model as the engine runs it)
        divided by ``denominator``."""

    def metric_sums(self) -> torch.Tensor | None:
        """Sums of `metric_names` over the samples of the last `loss` call ``[M]``."""
        return None

    def adapt(self, model: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Before the stage sets what trains (e.g. fold an earlier stage's adapters in)."""

    def setup(self, model: nn.Module, stage: str) -> None:  # noqa: B027 (optional hook)
        """After the stage set what trains, before the model is placed or sharded."""

    def start(self, run: Any) -> None:  # noqa: B027 (optional hook)
        """After the model, optimizer and data are prepared, before the first step
        (``run``: the `Trainer`)."""


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


class PreferenceObjective(Objective):
    """A preference loss (DPO, IPO, SimPO: `preference_terms`) on pair batches
    (`PairCollator`); the weight is the number of pairs.

    One forward pass of the policy scores the chosen and rejected rows together, the
    sample's images encoded once for both; the reference's log-probabilities come from the
    batch (``precomputed``) or from a pass of the reference model (`LiveReference`), which
    reuses the policy pass's tower features when the tower is frozen.
    """

    metric_names = METRICS

    def __init__(self, settings: PreferenceSettings, reference: str = "auto") -> None:
        self.settings = settings
        self.reference_kind = reference
        self.reference: LiveReference | None = None
        self._sums: torch.Tensor | None = None
        self._kept_adapter = False  # a 4-/8-bit LLM's adapter from an earlier stage
        self.last: PreferenceTerms | None = None
        """The terms of the last `loss` call (per-pair losses and rewards)."""

    @classmethod
    def of(cls, stage: Any) -> PreferenceObjective:
        """The objective of a ``stages.preference`` section (`PreferenceStage`)."""
        settings = PreferenceSettings(
            stage.objective, stage.beta, stage.label_smoothing, stage.simpo_gamma
        )
        return cls(settings, stage.reference)

    def weight(self, batch: Batch) -> int:
        return int(batch["pairs"])

    def adapt(self, model: nn.Module) -> None:
        """An LLM adapted by an earlier stage (LoRA finetune) is folded into its weights, so
        the stage's reference (adapters off) is that stage's model and a fresh adapter
        learns the preference; a 4-/8-bit LLM keeps its adapter (reference: precomputed)."""
        self._kept_adapter = "llm" in lora_parts(model) and is_quantized(model)
        if "llm" in lora_parts(model) and not self._kept_adapter:
            merge_lora(model)
            logger.info("preference: the earlier stage's LoRA adapter folded into the weights")

    def setup(self, model: nn.Module, stage: str) -> None:
        if not self.settings.needs_reference:
            self.reference_kind = "none"
            return
        kind = resolve_reference(self.reference_kind, model)
        if self._kept_adapter and kind == "adapters":  # off, it would be the pre-finetune model
            if self.reference_kind != "auto":
                raise ConfigError(
                    f"stages.{stage}.reference: adapters would switch off the finetune stage's "
                    "adapter, which a 4-/8-bit LLM keeps; use precomputed (or auto)"
                )
            kind = "precomputed"
        check_reference(kind, model, stage)
        self.reference_kind = kind
        self.reference = None if kind == "precomputed" else LiveReference(kind, model)
        logger.info("%s: %s loss, reference: %s", stage, self.settings.loss, kind)

    def start(self, run: Any) -> None:
        if self.reference is not None:
            self.reference.to(run.accelerator.device)
        if self.reference_kind != "precomputed":
            return
        if run.dataset is None:
            raise TrainingError("reference: precomputed needs map-style data (not streamed)")
        facts = f"{run.dataset.processor.template} {run.dataset.max_length} "
        facts += str(run.config.run.mixed_precision)
        job = Precompute(
            run.model,
            run.dataset,
            run.collator,
            run.accelerator,
            run.dir,
            run.settings.batch_size,
            run.engine.autocast,
            facts,
        )
        run.dataset.reference = precomputed_reference(job)

    def loss(self, model: nn.Module, batch: Batch, denominator: float) -> torch.Tensor:
        frozen_tower = self._frozen_tower(model)
        out = pair_forward(model, batch, return_image_features=frozen_tower)
        pairs = int(batch["pairs"])
        logps, tokens = out.sequence_logps, out.sequence_tokens
        assert logps is not None and tokens is not None
        policy = PairLogps(logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:])
        reference = self._reference(batch, out.image_features if frozen_tower else None, pairs)
        terms = preference_terms(self.settings, policy, reference)
        self.last = terms
        self._sums = metric_sums(terms, policy)
        return terms.losses.sum() / denominator

    def _reference(
        self, batch: Batch, features: Any, pairs: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.settings.needs_reference:
            return None
        if "reference_logps" in batch:
            table = batch["reference_logps"]  # [P, 2]
            return table[:, 0], table[:, 1]
        if self.reference is None:
            raise TrainingError("the preference batch has no reference log-probabilities")
        logps = self.reference.logps(batch, features)  # [2P]
        return logps[:pairs], logps[pairs:]

    @staticmethod
    def _frozen_tower(model: nn.Module) -> bool:
        vision = getattr(model, "module", model).vision
        return not any(p.requires_grad for p in vision.parameters())

    def metric_sums(self) -> torch.Tensor | None:
        return self._sums


def objective_for(stage: str, settings: Any) -> Objective:
    """The objective a stage minimises: the preference loss of a preference stage, else
    the supervised loss."""
    if stage == "preference":
        return PreferenceObjective.of(settings)
    return SupervisedObjective()
