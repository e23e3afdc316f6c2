"""Evaluation of the live model on ``data.eval`` and ``data.eval_lmms`` (lmms-eval tasks):
every ``stages.<stage>.eval_every`` steps during a stage and once after it, with no second
copy of the model. Every process runs it (a
sharded model needs them all; each gets the same numbers) and the main one reports. A failing
evaluation, or an eval file that cannot be read, is one error line in the log: training goes
on."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from vlm_adapters.data.records import RecordSource
from vlm_adapters.errors import VLMError
from vlm_adapters.inference.evaluation import answer_loss
from vlm_adapters.inference.tasks import score
from vlm_adapters.model.core import VisionLanguageModel, evaluating
from vlm_adapters.training.config import LmmsTasks, TrainConfig
from vlm_adapters.training.data import read_stage_records

logger = logging.getLogger("vlm_adapters.training")


class Evaluator:
    """``data.eval`` scored as ``data.eval_task`` (always with the answer loss)."""

    def __init__(
        self,
        config: TrainConfig,
        records: RecordSource | None,
        lmms: LmmsTasks | None,
        is_main: bool,
    ) -> None:
        self.config, self.records, self.lmms, self.is_main = config, records, lmms, is_main

    @classmethod
    def of_run(
        cls, config: TrainConfig, memory: RecordSource | None, is_main: bool
    ) -> Evaluator | None:
        """The run's evaluator (None without ``data.eval`` or ``data.eval_lmms``); its records
        read now."""
        data = config.data
        if data.eval is None and data.eval_lmms is None:
            return None
        records = None
        try:
            if data.eval is not None:
                records = read_stage_records("eval", data.eval, memory)
        except VLMError as error:
            if is_main:
                logger.error("data.eval: %s; training goes on without it", _line(error))
        lmms = data.eval_lmms
        if lmms is not None and importlib.util.find_spec("lmms_eval") is None:
            lmms = None
            if is_main:
                logger.error(
                    "data.eval_lmms: lmms-eval is not installed (pip install "
                    "'vlm-adapters[eval]'); training goes on without it"
                )
        return cls(config, records, lmms, is_main)

    def due(self, stage: str, step: int, total: int) -> bool:
        """Whether step ``step`` of ``total`` evaluates (the last one: after the stage)."""
        every = self.config.stage(stage).eval_every
        return every > 0 and step % every == 0 and step < total

    def run(self, model: VisionLanguageModel, stage: str, step: int | str) -> dict[str, Any]:
        """The metrics of ``model`` as it is now (``eval_loss``, ``eval_samples`` and the
        task's ``eval_<metric>``); {} when there is nothing to evaluate or it failed."""
        if self.records is None and self.lmms is None:
            return {}
        try:
            with evaluating(model), torch.no_grad():
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
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "eval_samples")
            logger.info("%s: eval at step %s: %s", stage, step, shown)
        return metrics

    def _metrics(self, model: VisionLanguageModel, stage: str) -> dict[str, Any]:
        metrics = self._file_metrics(model, stage) if self.records is not None else {}
        lmms = self.lmms
        if lmms is not None:
            from vlm_adapters.inference.lmms_eval import evaluate_tasks

            scores = evaluate_tasks(
                model, lmms.tasks, lmms.include_path, lmms.limit, lmms.batch_size
            )
            metrics |= {f"eval_lmms/{name}": value for name, value in scores.items()}
        return metrics

    def _file_metrics(self, model: VisionLanguageModel, stage: str) -> dict[str, Any]:
        source, task, records = self.config.data.eval, self.config.data.eval_task, self.records
        assert source is not None and records is not None
        root, template = source.root(), source.template
        batch = self.config.stage(stage).batch_size
        loss = answer_loss(model, records, root, template, batch, source=source.label())
        metrics: dict[str, Any] = {"eval_loss": loss, "eval_samples": len(records)}
        if task != "loss":
            scored = score(model, records, root, task, template, batch, source=source.label())
            metrics |= {
                f"eval_{name}": value
                for name, value in scored.summary.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "n"
            }
        return metrics


def _line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
