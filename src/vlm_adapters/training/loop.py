"""One stage's training loop (`Trainer`): epochs, optimizer steps over accumulated
micro-batches, logging, checkpoints every ``run.save_every`` steps, and the stage's outputs.

The strategy (one process, DDP, FSDP2, DeepSpeed) is the `Engine`'s; what is minimised is
the `Objective`'s. Every optimizer step divides the summed loss by the objective's weight
(supervised tokens) of the whole global batch (all processes, all accumulated micro-batches),
so any split of a global batch trains the same.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from vlm_adapters._io import remove_stale_temps
from vlm_adapters.data import ConversationDataset
from vlm_adapters.data.records import RecordSource
from vlm_adapters.errors import TrainingError
from vlm_adapters.llm.packed_attention import PackedAttention
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.training.artifact import save_connector
from vlm_adapters.training.callbacks import CallbackHandler
from vlm_adapters.training.checkpoint import Position, step_dir
from vlm_adapters.training.compiling import compile_blocks
from vlm_adapters.training.config import TrainConfig
from vlm_adapters.training.data import Sampler, make_collator, make_loader, stage_dataset
from vlm_adapters.training.engine import Checkpointer, make_accelerator, make_engine
from vlm_adapters.training.evaluation import Evaluator
from vlm_adapters.training.objectives import Batch, Objective, objective_for
from vlm_adapters.training.progress import (
    Progress,
    plot_loss,
    throughput_text,
    truncate_metrics,
)
from vlm_adapters.training.recipes import configure_stage, describe_trainable, param_groups
from vlm_adapters.training.skips import SkipLog
from vlm_adapters.training.streaming import StreamLoader, resume_stream, stream_loader
from vlm_adapters.training.throughput import (
    COUNTS,
    FlopModel,
    Meter,
    TimedIterator,
    peak_flops,
    step_counts,
)

logger = logging.getLogger("vlm_adapters.training")


@dataclass
class StageSummary:
    """What one stage did; `Trainer.fit` adds its throughput (`Meter.summary`)."""

    stage: str
    steps: int
    """Optimizer steps taken (windows whose samples were all skipped take none)."""
    final_loss: float | None
    seconds: float
    skipped: int
    """Distinct samples left out (listed in ``skipped.jsonl``)."""
    final_dir: str | None
    """The stage's final model; None when a callback stopped the stage."""
    stopped_at: str | None = None
    """When a callback stopped the stage: its checkpoint, which ``resume="auto"`` continues."""


class Trainer:
    """Trains one stage of an already built `VisionLanguageModel` and writes ``out/<stage>/``.

    ``accelerator`` is the run's (see `make_accelerator`); one is made when not given.
    ``records``: the stage's data file (`load_records`), when already read, or its in-memory
    records. ``objective``: what the stage minimises (the supervised loss by default).
    ``callbacks``: the run's (`CallbackHandler`). ``evaluator``: ``data.eval``, run on the live
    model every ``stages.<stage>.eval_every`` steps (`Evaluator`). Under FSDP2 and DeepSpeed the
    model is sharded in place; after `fit`, `trained_model` gives it back as a plain module.
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        config: TrainConfig,
        stage: str,
        out: str | Path,
        accelerator: Accelerator | None = None,
        records: RecordSource | None = None,
        objective: Objective | None = None,
        callbacks: CallbackHandler | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.model = model
        self.evaluator = evaluator  # data.eval, every stages.<stage>.eval_every steps
        self.records = records  # the stage's data file, when already read
        self.config = config
        self.stage = stage
        self.settings = config.stage(stage)
        self.dir = Path(out) / stage
        self.accelerator = accelerator or make_accelerator(config, out)
        self.accelerator.gradient_accumulation_steps = self.settings.grad_accum
        self.engine = make_engine(self.accelerator, model)
        self.objective = objective or objective_for(stage, self.settings)
        self.callbacks = callbacks or CallbackHandler([], Path(out))
        if self.accelerator.num_processes > 1:
            self.callbacks.agree = self._anyone
        self.skips = SkipLog(stage, self.dir, self.accelerator, config.data.max_skip_fraction)
        self._fallback: Batch | None = None  # last non-empty micro-batch
        self._steps_done = 0  # optimizer steps before the one being taken
        self.attention: PackedAttention | None = None  # per-sample attention while packing
        self.dataset: ConversationDataset | None = None  # map-style data (None: streamed)
        self.metrics: dict[str, float] = {}  # the objective's metrics of the last step
        self._uncompile: Callable[[], None] = lambda: None  # takes run.compile off again

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_batch(self) -> int:
        s = self.settings
        return s.batch_size * s.grad_accum * self.accelerator.num_processes

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Run the stage (from `resume`, a checkpoint dir or "auto"); return its summary."""
        try:
            return self._fit(resume)
        finally:
            if self.attention is not None:
                self.attention.restore()
            self._uncompile()

    def _fit(self, resume: str | Path | None) -> dict[str, Any]:
        start = time.perf_counter()
        set_seed(self.config.run.seed)
        self._setup_model()
        if self.is_main:
            remove_stale_temps(self.dir / "checkpoints")
        loader = self._loader()
        total = self._total_steps(loader)
        loader = self._prepare(loader, total)
        self.objective.start(self)
        position = self._resume(resume)
        if isinstance(loader, StreamLoader):
            resume_stream(loader, position)
        loss = self._epochs(loader, position, total)
        if position.step == 0:
            raise TrainingError(
                f"stage {self.stage} took no optimizer step: every sample it saw was skipped; "
                f"see {self.skips.path}"
            )
        stopped = self.callbacks.control.should_stop and position.step < total
        checkpoint = self._stop(position) if stopped else None
        if not stopped:
            self._finish()
        seconds = round(time.perf_counter() - start, 3)
        final = None if stopped else str(self.dir / "final")
        summary = StageSummary(
            self.stage, position.step, loss, seconds, len(self.skips.samples), final, checkpoint
        )
        throughput = self.meter.summary()
        if self.is_main and throughput:
            logger.info("%s: %d steps, %s", self.stage, position.step, throughput_text(throughput))
        return asdict(summary) | throughput | self.metrics

    def _setup_model(self) -> None:
        self.objective.adapt(self.model)
        configure_stage(self.model, self.stage, self.settings)
        self.objective.setup(self.model, self.stage)
        self.model.template = self.config.dataset(self.stage).template  # saved for inference
        vision_trains = any(p.requires_grad for p in self.model.vision.parameters())
        if self.config.run.gradient_checkpointing:
            self.model.llm.enable_gradient_checkpointing()
            if vision_trains:
                self.model.vision.enable_gradient_checkpointing()
        self.model.train()
        if not vision_trains:
            self.model.vision.eval()
        if self.is_main:
            logger.info(describe_trainable(self.model, self.stage))
        peak = peak_flops(self.accelerator.device, self.config.run.mixed_precision)
        self.meter = Meter(FlopModel.of(self.model), peak, self.accelerator.num_processes)

    def _loader(self) -> DataLoader | StreamLoader:
        """Batches in an order fixed by (seed, epoch) and by the global batch size (or the
        token budget) only; a stream's for streamed data."""
        config, stage, model = self.config, self.stage, self.model
        collator, self.attention = make_collator(config, stage, model)
        self.collator = collator
        self.sampler: Sampler | None = None
        model.use_cached_blank(bool(config.stage(stage).feature_cache))
        if config.dataset(stage).streaming:
            return stream_loader(config, stage, model, collator, self.skips, self.accelerator)
        dataset = stage_dataset(config, stage, model, self.records, self.skips, self.accelerator)
        self.records = None  # the dataset holds them
        self.dataset = dataset
        loader, self.sampler = make_loader(dataset, collator, config, stage, self.global_batch)
        return loader

    def _total_steps(self, loader: DataLoader | StreamLoader) -> int:
        """Optimizer steps of the stage (``loader`` not yet prepared; micro-batches per
        process as accelerate shards them: even batches; a stream's as it cuts them)."""
        accum, epochs = self.settings.grad_accum, range(self.settings.epochs)
        if isinstance(loader, StreamLoader):
            return sum(math.ceil(loader.batches(epoch) / accum) for epoch in epochs)
        batches = math.ceil(len(loader) / self.accelerator.num_processes)
        return math.ceil(batches / accum) * len(epochs)

    def _prepare(self, loader: DataLoader | StreamLoader, total: int) -> DataLoader | StreamLoader:
        """The optimizer and scheduler (over ``total`` steps) made, handed to the engine with
        the model and ``loader``, and the stage's checkpoints; returns the prepared loader."""
        module = self.engine.place(self.config, self.stage)
        if self.config.run.compile:
            self._uncompile = compile_blocks(module)
        optimizer = torch.optim.AdamW(param_groups(module, self.settings))
        self.scheduler = get_scheduler(
            self.settings.scheduler,
            optimizer,
            num_warmup_steps=round(self.settings.warmup_ratio * total),
            num_training_steps=total,
        )
        self.optimizer, loader = self.engine.prepare(module, optimizer, loader)
        run = self.config.run
        self.checkpoints: Checkpointer = self.engine.checkpointer(
            self.dir / "checkpoints", run.keep_last, self.optimizer, self.scheduler
        )
        return loader

    def _resume(self, resume: str | Path | None) -> Position:
        """Load a checkpoint (path or "auto" = newest complete one) or start fresh."""
        path = self.checkpoints.latest() if resume == "auto" else resume
        metrics = self.dir / "metrics.jsonl"
        if path is None:
            if self.is_main and metrics.exists():
                metrics.unlink()
            return Position(seed=self.config.run.seed)
        position = self.checkpoints.load(Path(path))
        if self.is_main:
            logger.info("%s: resumed from %s (step %d)", self.stage, path, position.step)
            truncate_metrics(metrics, position.step)
        return position

    def _epochs(
        self, loader: DataLoader | StreamLoader, position: Position, total: int
    ) -> float | None:
        progress = Progress(
            self.stage,
            total,
            self.dir / "metrics.jsonl",
            log_every=self.config.run.log_every,
            enabled=self.is_main,
            initial=position.step,
            tracker=self.accelerator if self.config.run.trackers else None,
        )
        if self.config.run.trackers:
            self.accelerator.init_trackers(f"vlm-adapters-{self.stage}", self.config.to_dict())
        state = self.callbacks.state
        state.stage, state.total_steps, state.is_main = self.stage, total, self.is_main
        loss = None
        for epoch in range(position.epoch, self.settings.epochs):
            loss = self._epoch(loader, position, epoch, progress, total) or loss
            if self.callbacks.control.should_stop:
                break
        progress.close()
        return loss

    def _epoch(
        self,
        loader: DataLoader | StreamLoader,
        position: Position,
        epoch: int,
        progress: Progress,
        total: int,
    ) -> float | None:
        """One epoch from `position` (skipping batches a resumed run already consumed)."""
        loader.set_epoch(epoch)
        skip = position.batches_in_epoch if position.epoch == epoch else 0
        if isinstance(loader, StreamLoader):
            loader.start_at(skip)  # the plan skips them undecoded
            batches: Iterable[Batch] = loader
        else:
            if self.sampler is not None:  # accelerate does not reach a batch sampler under DDP
                self.sampler.set_epoch(epoch)
            batches = self.accelerator.skip_first_batches(loader, skip) if skip else loader
        position.epoch, position.batches_in_epoch = epoch, skip
        self.skips.epoch.reset()
        loss = None
        timed = TimedIterator(iter(batches))
        for window in _windows(timed, self.settings.grad_accum):
            self._steps_done = position.step
            record = self._step(window, timed.take())
            position.batches_in_epoch += len(window)
            if record is None:
                continue
            position.step += 1
            loss = record["loss"]
            logs = {"step": position.step, "epoch": epoch, **record}
            logs |= self._evaluate(position.step, total)
            progress.step(logs)
            stop = self._event("on_log", position, logs=logs)
            self._maybe_save(position, total)
            if stop:
                return loss  # the position stays inside this epoch
        position.epoch, position.batches_in_epoch = epoch + 1, 0
        self.skips.report(epoch)
        return loss

    def _step(self, window: list[Batch], wait: float) -> dict[str, float] | None:
        """One optimizer step over `window` micro-batches, which took `wait` seconds to load;
        None when every sample was skipped."""
        started = time.perf_counter()
        # dropout depends on (seed, step, process) only, so a resumed run draws the same masks
        torch.manual_seed(_step_seed(self.config.run.seed, self._steps_done, self.accelerator))
        for batch in window:
            self.skips.epoch.update(batch)
        device = self.accelerator.device
        weight = torch.tensor([sum(self.objective.weight(b) for b in window)], device=device)
        counted = step_counts(window, self.model.image_token_id, device)
        counts = torch.cat([weight, counted])
        weight, *summed = self.accelerator.reduce(counts, "sum").tolist()
        if weight == 0:
            return None
        # backward divides by grad_accum and DDP averages over processes: undo both
        denom = weight / (self.settings.grad_accum * self.accelerator.num_processes)
        last = len(window) - 1
        self._metric_sums = torch.zeros(len(self.objective.metric_names), device=device)
        loss_sum = sum(self._micro_step(b, i == last, denom) for i, b in enumerate(window))
        norm = self._update()
        total_loss = self.accelerator.reduce(torch.tensor(loss_sum, device=device), "sum")
        loss = float(total_loss) / weight  # waits for the step's work
        seconds = wait + time.perf_counter() - started
        record = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": norm}
        record |= self._objective_metrics(weight)
        return record | self.meter.step(dict(zip(COUNTS, summed)), seconds, wait)

    def _objective_metrics(self, weight: float) -> dict[str, float]:
        """The objective's metrics of the step (all processes), each divided by ``weight``."""
        if not self.objective.metric_names:
            return {}
        sums = self.accelerator.reduce(self._metric_sums, "sum").tolist()
        self.metrics = {k: v / weight for k, v in zip(self.objective.metric_names, sums)}
        return self.metrics

    def _micro_step(self, batch: Batch, last: bool, denom: float) -> float:
        """Forward + backward of one micro-batch; returns its summed loss. Gradients are
        reduced across processes on the window's last micro-batch only."""
        scale = 1.0
        if batch["input_ids"].numel() == 0:  # every sample skipped
            if self.accelerator.num_processes == 1 or self._fallback is None:
                return 0.0
            batch, scale = self._fallback, 0.0  # keep collective ops in step with other ranks
        self._fallback = batch
        self.accelerator.sync_gradients = last
        sync = contextlib.nullcontext() if last else self.engine.no_sync()
        with sync, self.engine.autocast():
            loss = self.objective.loss(self.engine.wrapped, batch, denom)
            self.accelerator.backward(loss * scale)
        sums = self.objective.metric_sums()
        if sums is not None:
            self._metric_sums += sums.detach().to(self._metric_sums.device) * scale
        return float(loss.detach()) * denom * scale

    def _update(self) -> float:
        """Clip to ``max_grad_norm``, step the optimizer and the scheduler; returns the
        gradient norm of all processes together (NaN before DeepSpeed's first step)."""
        self.accelerator.sync_gradients = True
        norm = self.engine.clip(self.settings.max_grad_norm or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _evaluate(self, step: int, total: int) -> dict[str, Any]:
        """``data.eval``'s metrics when ``stages.<stage>.eval_every`` makes ``step`` due."""
        if self.evaluator is None or not self.evaluator.due(self.stage, step, total):
            return {}
        metrics = self.evaluator.run(self.model, self.stage, step)
        self.callbacks.event("on_evaluate", metrics=metrics)
        return metrics

    def _maybe_save(self, position: Position, total: int) -> None:
        every = self.config.run.save_every
        if every and position.step % every == 0 and position.step != total:
            self.checkpoints.save(position)
            path = step_dir(self.checkpoints.directory, position.step)
            self._event("on_save", position, path=path)

    def _stop(self, position: Position) -> str:
        """A callback stopped the stage: its checkpoint at this step (written unless
        ``run.save_every`` just wrote it), which a resume continues from."""
        path = step_dir(self.checkpoints.directory, position.step)
        every = self.config.run.save_every
        if not (every and position.step % every == 0):
            self.checkpoints.save(position)
            self._event("on_save", position, path=path)
        if self.config.run.trackers:
            self.accelerator.end_training()
        if self.is_main:
            logger.info(
                "%s: stopped by a callback at step %d of %d; resume=\"auto\" continues from %s",
                self.stage, position.step, self.callbacks.state.total_steps, path,
            )  # fmt: skip
        return str(path)

    def _event(self, name: str, position: Position | None, **data: Any) -> bool:
        """Call the callbacks' ``name`` event (at ``position``, when given); returns whether
        the run should stop."""
        if position is not None:
            self.callbacks.state.step, self.callbacks.state.epoch = position.step, position.epoch
        return self.callbacks.event(name, **data)

    def _anyone(self, stop: bool) -> bool:
        """Whether any process asks to stop."""
        flag = torch.tensor(int(stop), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum"))

    def _finish(self) -> None:
        self.accelerator.wait_for_everyone()
        model = self.engine.full_model()
        if self.is_main and model is not None:
            if self.stage == "align":  # before final/, which marks the stage as done
                save_connector(model, self.dir / "connector")
            model.save_pretrained(self.dir / "final")
            plot_loss(self.dir / "metrics.jsonl", self.dir / "loss.png", f"{self.stage} loss")
            logger.info("%s: saved %s", self.stage, self.dir / "final")
        if self.config.run.trackers:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        self._event("on_save", None, path=self.dir / "final")
        self.accelerator.free_memory()

    def trained_model(self) -> VisionLanguageModel:
        """After `fit`: the stage's model as a plain module on every process (for the next
        stage), with the stage's final weights."""
        return self.engine.trained_model(self.dir / "final")


def _step_seed(seed: int, step: int, accelerator: Accelerator) -> int:
    return (seed * 1_000_003 + step) * 1_009 + accelerator.process_index


def _windows(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive lists of `size` micro-batches (the last may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
