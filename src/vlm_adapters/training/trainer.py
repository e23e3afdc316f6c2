"""The training loop on accelerate: one stage (`Trainer`) or a whole recipe (`train`).

The same code runs single-process, DDP, FSDP or DeepSpeed (``accelerate launch``). Every
optimizer step divides the summed token loss by the supervised tokens of the whole global batch
(all processes, all accumulated micro-batches), so any split of a global batch trains the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ..config import ConfigError
from ..data import DataCollator, LengthGroupedSampler, LlavaDataset, SkipCounter, load_records
from ..model import IGNORE_INDEX
from .artifact import save_connector
from .checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from .config import TrainConfig
from .progress import Progress, plot_loss, read_metrics
from .recipes import (
    carry_connector,
    configure_stage,
    describe_trainable,
    param_groups,
    resolve_config,
    stages_to_run,
)

logger = logging.getLogger("vlm_adapters.training")


@dataclass
class StageSummary:
    """What one stage did."""

    stage: str
    steps: int
    """Optimizer steps taken (windows whose samples were all skipped take none)."""
    final_loss: float | None
    seconds: float
    skipped: int
    final_dir: str


class Trainer:
    """Trains one stage of an already built `VisionLanguageModel` and writes ``out/<stage>/``."""

    def __init__(self, model: Any, config: TrainConfig, stage: str, out: str | Path) -> None:
        self.model = model
        self.config = config
        self.stage = stage
        self.settings = config.stage(stage)
        self.dir = Path(out) / stage
        self.accelerator = Accelerator(
            cpu=cpu_only_launch(),
            gradient_accumulation_steps=self.settings.grad_accum,
            mixed_precision=config.run.mixed_precision,
            log_with=config.run.trackers or None,
            project_dir=str(out),
        )
        self.skips = SkipCounter()
        self._fallback: dict[str, Any] | None = None  # last non-empty micro-batch
        self.skipped_total = 0

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Run the stage (from `resume`, a checkpoint dir or "auto"); return its summary."""
        start = time.perf_counter()
        set_seed(self.config.run.seed)
        self._setup_model()
        loader = self._loader()
        # micro-batches per process and epoch, as accelerate shards them (even batches)
        batches = math.ceil(len(loader) / self.accelerator.num_processes)
        steps_per_epoch = math.ceil(batches / self.settings.grad_accum)
        total = steps_per_epoch * self.settings.epochs
        optimizer = torch.optim.AdamW(param_groups(self.model, self.settings))
        scheduler = get_scheduler(
            self.settings.scheduler,
            optimizer,
            num_warmup_steps=round(self.settings.warmup_ratio * total),
            num_training_steps=total,
        )
        position = self._resume(resume, optimizer, scheduler)
        self.wrapped, self.optimizer, loader = self.accelerator.prepare(
            self.model, optimizer, loader
        )
        self.scheduler = scheduler
        loss = self._epochs(loader, position, total)
        self._finish()
        seconds = time.perf_counter() - start
        summary = StageSummary(
            self.stage,
            position.step,
            loss,
            round(seconds, 3),
            self.skipped_total,
            str(self.dir / "final"),
        )
        return asdict(summary)

    def _setup_model(self) -> None:
        configure_stage(self.model, self.stage, self.settings)
        self.model.template = self.config.dataset(self.stage).template  # saved for inference
        if self.config.run.gradient_checkpointing:
            self.model.llm.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.model.train()
        if not any(p.requires_grad for p in self.model.vision.parameters()):
            self.model.vision.eval()
        if self.is_main:
            logger.info(describe_trainable(self.model, self.stage))

    def _loader(self) -> DataLoader:
        """Batches in an order fixed by (seed, epoch) and by the global batch size only."""
        data = self.config.data
        source = self.config.dataset(self.stage)
        model = self.model
        dataset = LlavaDataset(
            load_records(source.path),
            image_root=source.root(),
            tokenizer=model.tokenizer,
            template=source.template,
            image_transform=model.vision.transform,
            image_token_id=model.image_token_id,
            num_image_tokens=model.num_image_tokens,
            max_length=data.max_length,
            on_bad_sample=data.on_bad_sample,
        )
        # equal lengths = a plain per-epoch shuffle
        lengths = dataset.lengths if data.group_by_length else [0] * len(dataset)
        sampler = LengthGroupedSampler(
            lengths,
            self.global_batch,
            seed=self.config.run.seed,
            group_by_modality=data.group_by_length,
        )
        collator = DataCollator(pad_token_id=model.tokenizer.pad_token_id)
        return DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            sampler=sampler,
            collate_fn=collator,
            num_workers=data.num_workers,
        )

    @property
    def global_batch(self) -> int:
        s = self.settings
        return s.batch_size * s.grad_accum * self.accelerator.num_processes

    def _resume(self, resume: str | Path | None, optimizer: Any, scheduler: Any) -> Position:
        """Load a checkpoint (path or "auto" = newest complete one) or start fresh."""
        path = latest_checkpoint(self.dir / "checkpoints") if resume == "auto" else resume
        metrics = self.dir / "metrics.jsonl"
        if path is None:
            if self.is_main and metrics.exists():
                metrics.unlink()
            return Position(seed=self.config.run.seed)
        position = load_checkpoint(Path(path), self.model, optimizer, scheduler)
        if self.is_main:
            logger.info("%s: resumed from %s (step %d)", self.stage, path, position.step)
            kept = [r for r in read_metrics(metrics) if r["step"] <= position.step]
            metrics.write_text("".join(_json_line(r) for r in kept))
        return position

    def _epochs(self, loader: DataLoader, position: Position, total: int) -> float | None:
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
        loss = None
        for epoch in range(position.epoch, self.settings.epochs):
            loss = self._epoch(loader, position, epoch, progress, total) or loss
        progress.close()
        return loss

    def _epoch(
        self, loader: DataLoader, position: Position, epoch: int, progress: Progress, total: int
    ) -> float | None:
        """One epoch from `position` (skipping batches a resumed run already consumed)."""
        loader.set_epoch(epoch)
        skip = position.batches_in_epoch if position.epoch == epoch else 0
        batches = self.accelerator.skip_first_batches(loader, skip) if skip else loader
        position.epoch, position.batches_in_epoch = epoch, skip
        self.skips.reset()
        loss = None
        for window in _windows(iter(batches), self.settings.grad_accum):
            record = self._step(window)
            position.batches_in_epoch += len(window)
            if record is None:
                continue
            position.step += 1
            loss = record["loss"]
            progress.step({"step": position.step, "epoch": epoch, **record})
            self._maybe_save(position, total)
        position.epoch, position.batches_in_epoch = epoch + 1, 0
        self._report_skips(epoch)
        return loss

    def _step(self, window: list[dict[str, Any]]) -> dict[str, float] | None:
        """One optimizer step over `window` micro-batches; None when every sample was skipped."""
        started = time.perf_counter()
        for batch in window:
            self.skips.update(batch)
        counts = torch.tensor(
            [
                sum(_supervised(b) for b in window),
                sum(int(b["attention_mask"].sum()) for b in window),
            ],
            device=self.accelerator.device,
        )
        supervised, tokens = self.accelerator.reduce(counts, "sum").tolist()
        if supervised == 0:
            return None
        # backward divides by grad_accum and DDP averages over processes: undo both
        denom = supervised / (self.settings.grad_accum * self.accelerator.num_processes)
        loss_sum = sum(
            self._micro_step(batch, i == len(window) - 1, denom) for i, batch in enumerate(window)
        )
        self.accelerator.sync_gradients = True
        norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = self.accelerator.reduce(
            torch.tensor(loss_sum, device=self.accelerator.device), "sum"
        )
        seconds = time.perf_counter() - started
        return {
            "loss": float(total_loss) / supervised,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "grad_norm": norm,
        }

    def _micro_step(self, batch: dict[str, Any], last: bool, denom: float) -> float:
        """Forward + backward of one micro-batch; returns its summed token loss."""
        scale = 1.0
        if batch["input_ids"].numel() == 0:  # every sample skipped
            if self.accelerator.num_processes == 1 or self._fallback is None:
                return 0.0
            batch, scale = self._fallback, 0.0  # keep collective ops in step with other ranks
        self._fallback = batch
        self.accelerator.sync_gradients = last
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)
        with sync:
            out = self.wrapped(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                labels=batch["labels"],
                num_items_in_batch=denom,
            )
            self.accelerator.backward(out.loss * scale)
        return float(out.loss.detach()) * denom * scale

    def _clip(self) -> float:
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        max_norm = self.settings.max_grad_norm or math.inf
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def _maybe_save(self, position: Position, total: int) -> None:
        every = self.config.run.save_every
        if not every or position.step % every or position.step == total:
            return
        self.accelerator.wait_for_everyone()
        if self.is_main:
            checkpoints = self.dir / "checkpoints"
            model = self.accelerator.unwrap_model(self.wrapped)
            save_checkpoint(
                step_dir(checkpoints, position.step),
                model,
                self.optimizer,
                self.scheduler,
                position,
            )
            prune_checkpoints(checkpoints, self.config.run.keep_last)
        self.accelerator.wait_for_everyone()

    def _report_skips(self, epoch: int) -> None:
        counters = gather_object([self.skips])
        merged = SkipCounter()
        for counter in counters:
            merged.seen += counter.seen
            merged.reasons.update(counter.reasons)
        self.skipped_total += sum(merged.reasons.values())
        if self.is_main:
            logger.info("%s epoch %d: %s", self.stage, epoch, merged.report())

    def _finish(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            model = self.accelerator.unwrap_model(self.wrapped)
            model.save_pretrained(self.dir / "final")
            if self.stage == "align":
                save_connector(model, self.dir / "connector")
            plot_loss(self.dir / "metrics.jsonl", self.dir / "loss.png", f"{self.stage} loss")
            logger.info("%s: saved %s", self.stage, self.dir / "final")
        if self.config.run.trackers:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()


def cpu_only_launch() -> bool:
    """True for several processes on a machine without an accelerator (DDP over gloo on CPU)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several and not torch.accelerator.is_available()


def _windows(batches: Any, size: int) -> Any:
    """Consecutive lists of `size` micro-batches (the last may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _supervised(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


def train(
    config: TrainConfig | dict[str, Any] | str | Path,
    stage: str = "all",
    out: str | Path = "runs/vlm",
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
    model: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run `stage` ("all" = the recipe, in order) and return a summary per stage.

    `resume`: "auto" continues from the newest complete checkpoints (finished stages are
    skipped), a checkpoint path continues from there. `model` defaults to one built from the
    config; the same model object carries each stage's weights into the next.
    """
    from .. import build_vlm
    from .config import save_train_config

    config = resolve_config(config, overrides)
    out = Path(out)
    names = stages_to_run(config, stage)
    if model is None:
        set_seed(config.run.seed)  # same initial weights on every process and every run
        model = build_vlm(config.model)
    if Accelerator(cpu=cpu_only_launch()).is_main_process:
        save_train_config(config, out / "config.yaml")
    plan = _resume_plan(names, out, resume)
    if "align" not in names:
        _carry_connector(model, out)
    summaries = {}
    for name in names:
        if plan[name] == "done":
            _load_final(model, out / name / "final", needed=name != names[-1])
            continue
        summaries[name] = Trainer(model, config, name, out).fit(resume=plan[name])
    return summaries


def _resume_plan(names: list[str], out: Path, resume: str | Path | None) -> dict[str, Any]:
    """Per stage: "done" (skip), a checkpoint to resume from, "auto" or None (fresh)."""
    if resume is None:
        return dict.fromkeys(names)
    if resume == "auto":
        plan: dict[str, Any] = {}
        for name in names:
            finished = (out / name / "final" / "model.safetensors").is_file()
            earlier_done = all(value == "done" for value in plan.values())
            plan[name] = "done" if finished and earlier_done else "auto"
        return plan
    path = Path(resume)
    owner = path.parent.parent.name
    if owner not in names:
        raise ConfigError(f"--resume {path}: expected OUT/<stage>/checkpoints/step-N of {names}")
    index = names.index(owner)
    return {n: ("done" if i < index else path if i == index else None) for i, n in enumerate(names)}


def _carry_connector(model: Any, out: Path) -> None:
    artifact = out / "align" / "connector"
    if carry_connector(model, artifact):
        logger.info("finetune: connector loaded from %s", artifact)
    else:
        logger.warning("finetune: no %s; starting from an untrained connector", artifact)


def _load_final(model: Any, final: Path, needed: bool) -> None:
    logger.info("%s already finished; skipping it", final.parent.name)
    if needed:
        from safetensors.torch import load_model

        load_model(model, str(final / "model.safetensors"), strict=True)
