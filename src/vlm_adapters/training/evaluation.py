"""Evaluation of the live model on ``data.eval``: every ``stages.<stage>.eval_every`` steps
during a stage and once after it, with no second copy of the model. Every process runs it (a
sharded model needs them all; each gets the same numbers) and the main one reports. A failing
evaluation, or an eval file that cannot be read, is one error line in the log: training goes
on."""

from __future__ import annotations

import logging
from typing import Any

import torch

from vlm_adapters.data.records import RecordSource
from vlm_adapters.errors import VLMError
from vlm_adapters.inference.evaluation import answer_loss
from vlm_adapters.inference.tasks import score
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.training.config import TrainConfig
from vlm_adapters.training.data import read_stage_records

logger = logging.getLogger("vlm_adapters.training")


class Evaluator:
    """``data.eval`` scored as ``data.eval_task`` (always with the answer loss)."""

    def __init__(self, config: TrainConfig, records: RecordSource | None, is_main: bool) -> None:
        self.config, self.records, self.is_main = config, records, is_main

    @classmethod
    def of_run(
        cls, config: TrainConfig, memory: RecordSource | None, is_main: bool
    ) -> Evaluator | None:
        """The run's evaluator (None without ``data.eval``); its records read now."""
        if config.data.eval is None:
            return None
        try:
            records = read_stage_records("eval", config.data.eval, memory)
        except VLMError as error:
            records = None
            if is_main:
                logger.error("data.eval: %s; training goes on without evaluation", _line(error))
        return cls(config, records, is_main)

    def due(self, stage: str, step: int, total: int) -> bool:
        """Whether step ``step`` of ``total`` evaluates (the last one: after the stage)."""
        every = self.config.stage(stage).eval_every
        return every > 0 and step % every == 0 and step < total

    def run(self, model: VisionLanguageModel, stage: str, step: int | str) -> dict[str, Any]:
        """The metrics of ``model`` as it is now (``eval_loss``, ``eval_samples`` and the
        task's ``eval_<metric>``); {} when there is nothing to evaluate or it failed."""
        if self.records is None:
            return {}
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                metrics = self._metrics(model, stage)
        except Exception as error:  # an evaluation never ends the training run
            if self.is_main:
                logger.error(
                    "%s: evaluation at step %s failed, training goes on: %s",
                    stage,
                    step,
                    _line(error),
                )
            return {}
        finally:
            for module, training in modes.items():
                module.training = training
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "eval_samples")
            count = len(self.records)
            logger.info("%s: eval at step %s on %d samples: %s", stage, step, count, shown)
        return metrics

    def _metrics(self, model: VisionLanguageModel, stage: str) -> dict[str, Any]:
        source, task, records = self.config.data.eval, self.config.data.eval_task, self.records
        assert source is not None and records is not None
        root, template = source.root(), source.template
        batch = self.config.stage(stage).batch_size
        loss = answer_loss(model, records, root, template, batch, source=source.path)
        metrics: dict[str, Any] = {"eval_loss": loss, "eval_samples": len(records)}
        if task != "loss":
            scored = score(model, records, root, task, template, batch, source=source.path)
            metrics |= {
                f"eval_{name}": value
                for name, value in scored.summary.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "n"
            }
        return metrics


def _line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
