"""The training loop on accelerate: one stage (`Trainer`) or a whole recipe (`train`).

The same code runs single-process, DDP, FSDP2 or DeepSpeed (``accelerate launch``; FSDP2 also
with ``fully_shard`` applied here, see `vlm_adapters.training.sharding`). Every optimizer step
divides the summed token loss by the supervised tokens of the whole global batch (all
processes, all accumulated micro-batches), so any split of a global batch trains the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from vlm_adapters._io import remove_stale_temps, remove_tree
from vlm_adapters.chat.templates import IGNORE_INDEX, check_template
from vlm_adapters.data import (
    DataCollator,
    LengthGroupedSampler,
    LlavaDataset,
    SkipCounter,
    load_records,
)
from vlm_adapters.data.collate import PackingCollator
from vlm_adapters.data.feature_cache import FeatureCache
from vlm_adapters.data.records import Records, Skipped, sample_id
from vlm_adapters.data.samplers import TokenBudgetBatchSampler
from vlm_adapters.errors import (
    CheckpointError,
    ComponentError,
    ConfigError,
    OutputError,
    TrainingError,
)
from vlm_adapters.llm.packed_attention import PackedAttention, check_packing
from vlm_adapters.model.files import WEIGHTS_NAME
from vlm_adapters.training.artifact import CONFIG_NAME as CONNECTOR_CONFIG
from vlm_adapters.training.artifact import save_connector
from vlm_adapters.training.checkpoint import (
    Position,
    checkpoint_problem,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from vlm_adapters.training.config import (
    TrainConfig,
    check_max_length,
    check_precision,
    save_train_config,
)
from vlm_adapters.training.features import describe_fill, fill_feature_cache
from vlm_adapters.training.progress import Progress, plot_loss, read_metrics
from vlm_adapters.training.recipes import (
    carry_connector,
    configure_stage,
    describe_trainable,
    param_groups,
    resolve_config,
    stages_to_run,
)
from vlm_adapters.training.rundir import CONFIG_NAME, check_resume_config, locked_run_dir, on_main
from vlm_adapters.training.sharded_checkpoint import (
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from vlm_adapters.training.sharding import (
    block_modules,
    configure_fsdp_plugin,
    fill,
    full_state_dict,
    no_gradient_sync,
    shard_model,
    skeleton,
    wants_fully_shard,
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
    """Distinct samples left out (listed in ``skipped.jsonl``)."""
    final_dir: str


def make_accelerator(config: TrainConfig, out: str | Path) -> Accelerator:
    """The run's one Accelerator: its precision, trackers and launch (single, DDP, FSDP,
    DeepSpeed, from ``accelerate launch``); every stage of the run uses it.

    In a single process, accelerate's process-wide state is reset first, so several runs in
    one Python session may use different precisions (accelerate would refuse the change).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=cpu_only_launch(),
        mixed_precision=config.run.mixed_precision,
        log_with=config.run.trackers or None,
        project_dir=str(out),
    )
    check_precision(config, accelerator.device.type)
    _warn_if_engine_fell_back(accelerator)
    return accelerator


def _warn_if_engine_fell_back(accelerator: Accelerator) -> None:
    """One warning line when the launch asked for FSDP or DeepSpeed but got something else
    (not when this run shards with ``fully_shard`` itself: `wants_fully_shard`)."""
    asked = [
        name
        for name, variable in (
            ("FSDP", "ACCELERATE_USE_FSDP"),
            ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
        )
        if os.environ.get(variable, "").lower() in ("1", "true", "yes")
        and not (name == "FSDP" and wants_fully_shard())
    ]
    got = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    for name in asked:
        if name.upper() not in got.upper():
            logger.warning(
                "%s was asked for but this run uses %s (accelerate maps CPU runs to plain DDP); "
                "parameters are not sharded",
                name,
                got,
            )


class Trainer:
    """Trains one stage of an already built `VisionLanguageModel` and writes ``out/<stage>/``.

    ``accelerator`` is the run's (see :func:`make_accelerator`); one is made when not given.
    ``records``: the stage's data file (`load_records`), when already read.
    Under FSDP2 and DeepSpeed the model is sharded in place; after `fit`, `trained_model`
    gives it back as a plain module.
    """

    def __init__(
        self,
        model: Any,
        config: TrainConfig,
        stage: str,
        out: str | Path,
        accelerator: Accelerator | None = None,
        records: Records | None = None,
    ) -> None:
        self.model = model
        self.records = records  # the stage's data file, when already read
        self.config = config
        self.stage = stage
        self.settings = config.stage(stage)
        self.dir = Path(out) / stage
        self.accelerator = accelerator or make_accelerator(config, out)
        self.accelerator.gradient_accumulation_steps = self.settings.grad_accum
        self.skips = SkipCounter()
        self._fallback: dict[str, Any] | None = None  # last non-empty micro-batch
        self.skipped: dict[int, Skipped] = {}  # every distinct sample skipped so far
        self.num_samples = 0
        self._steps_done = 0  # optimizer steps before the one being taken
        kind = self.accelerator.distributed_type
        self.deepspeed = kind == DistributedType.DEEPSPEED
        engines = (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.shard_here = wants_fully_shard() and kind not in engines
        """Shard with `shard_model` (``fully_shard``) instead of DDP (accelerate maps FSDP on
        CPU to DDP; this is how the CPU tests run FSDP2)."""
        self.sharded = self.shard_here or self.accelerator.is_fsdp2
        """Parameters are DTensors: checkpoints are sharded, the final model is gathered."""
        self._skeleton: Any = None  # plain copy (meta weights) of a model the engine changes
        self.attention: PackedAttention | None = None  # per-sample attention while packing

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Run the stage (from `resume`, a checkpoint dir or "auto"); return its summary."""
        try:
            return self._fit(resume)
        finally:
            if self.attention is not None:
                self.attention.restore()

    def _fit(self, resume: str | Path | None) -> dict[str, Any]:
        start = time.perf_counter()
        set_seed(self.config.run.seed)
        self._setup_model()
        if self.is_main:
            remove_stale_temps(self.dir / "checkpoints")
        loader = self._loader()
        # micro-batches per process and epoch, as accelerate shards them (even batches)
        batches = math.ceil(len(loader) / self.accelerator.num_processes)
        steps_per_epoch = math.ceil(batches / self.settings.grad_accum)
        total = steps_per_epoch * self.settings.epochs
        model = self._engine_model()
        optimizer = torch.optim.AdamW(param_groups(model, self.settings))
        self.scheduler = get_scheduler(
            self.settings.scheduler,
            optimizer,
            num_warmup_steps=round(self.settings.warmup_ratio * total),
            num_training_steps=total,
        )
        if self.shard_here:  # accelerate would wrap it in DDP
            self.wrapped = model
            self.optimizer, loader = self.accelerator.prepare(optimizer, loader)
        else:
            self.wrapped, self.optimizer, loader = self.accelerator.prepare(
                model, optimizer, loader
            )
        position = self._resume(resume)
        loss = self._epochs(loader, position, total)
        if position.step == 0:
            raise TrainingError(
                f"stage {self.stage} took no optimizer step: every sample it saw was skipped; "
                f"see {self.dir / 'skipped.jsonl'}"
            )
        self._finish()
        seconds = time.perf_counter() - start
        summary = StageSummary(
            self.stage,
            position.step,
            loss,
            round(seconds, 3),
            len(self.skipped),
            str(self.dir / "final"),
        )
        return asdict(summary)

    def _setup_model(self) -> None:
        configure_stage(self.model, self.stage, self.settings)
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

    def _engine_model(self) -> Any:
        """The model to build the optimizer on: sharded here (`shard_model`) when this run
        shards it itself; a plain copy is kept first when an engine changes it in place."""
        if self.deepspeed and self.config.run.save_every:
            raise ConfigError(
                "run.save_every: intermediate checkpoints are not written under DeepSpeed (its "
                "optimizer state is partitioned); set run.save_every=0, or use FSDP2"
            )
        if self.sharded or self.deepspeed:
            self._skeleton = skeleton(self.model)
        if self.accelerator.is_fsdp2:
            configure_fsdp_plugin(self.accelerator, self.model)
        if self.deepspeed:
            plugin = self.accelerator.state.deepspeed_plugin
            plugin.deepspeed_config["gradient_clipping"] = self.settings.max_grad_norm or 0.0
        if self.is_main and self.sharded:
            blocks = sorted({type(m).__name__ for m in block_modules(self.model)})
            units = ", ".join(f"every {name}" for name in blocks)
            logger.info("%s: FSDP2 units: %s, and the root (the rest)", self.stage, units)
        if not self.shard_here:
            return self.model
        return shard_model(self.model.to(self.accelerator.device))

    def _loader(self) -> DataLoader:
        """Batches in an order fixed by (seed, epoch) and by the global batch size (or the
        token budget) only."""
        data, pad = self.config.data, self.model.tokenizer.pad_token_id
        dataset = self._checked_dataset()
        if data.packing:
            max_length = data.max_length or self.model.llm.max_positions
            if max_length is None:
                raise ConfigError(
                    "data.packing: the LLM has no context length; set data.max_length"
                )
            self._packed_attention(self.model.llm)
            collator: Any = PackingCollator(pad, max_length)
        else:
            collator = DataCollator(pad_token_id=pad)
        if data.max_tokens_per_batch:
            self.sampler: Any = TokenBudgetBatchSampler(
                dataset.lengths, data.max_tokens_per_batch, seed=self.config.run.seed
            )
            return DataLoader(
                dataset,
                batch_sampler=self.sampler,
                collate_fn=collator,
                num_workers=data.num_workers,
            )
        lengths = dataset.lengths if data.group_by_length else [0] * len(dataset)
        # equal lengths = a plain per-epoch shuffle
        self.sampler = LengthGroupedSampler(
            lengths,
            self.global_batch,
            seed=self.config.run.seed,
            group_by_modality=data.group_by_length,
        )
        return DataLoader(
            dataset,
            batch_size=self.settings.batch_size,
            sampler=self.sampler,
            collate_fn=collator,
            num_workers=data.num_workers,
        )

    def _packed_attention(self, llm: Any) -> None:
        """Packed rows attend per sample (`PackedAttention`) where that gives what the
        samples give alone, else through the masked path; refused if neither does."""
        self.attention = PackedAttention(llm)
        try:
            check_packing(llm)
        except ConfigError:
            if not self.attention.active:
                raise
            self.attention.restore()
            check_packing(llm)
            logger.warning("%s: packed rows use the masked attention path", self.stage)

    def _checked_dataset(self) -> LlavaDataset:
        """The stage's dataset after the up-front check of every sample (see `precheck`),
        reading the stage's feature cache (filled first) when it has one."""
        dataset, skipped, self.num_samples = checked_dataset(
            self.config, self.stage, self.model, self.records
        )
        self.records = None  # the dataset holds them
        self.skipped = _read_skipped(self._skipped_log())  # a resumed run keeps its list
        self._record_skips(skipped, "the up-front check")
        budget = self.config.data.max_tokens_per_batch
        if budget:
            check_token_budget(dataset, budget, self.config.where)
        if self.settings.feature_cache:
            dataset.feature_cache = self._fill_cache(dataset.image_files())
        return dataset

    def _fill_cache(self, images: list[Path]) -> FeatureCache:
        """The stage's feature cache, its missing entries computed by every process (a share
        each) before any step."""
        vision, accelerator = self.model.vision, self.accelerator
        if any(p.requires_grad for p in vision.parameters()):
            raise ConfigError(
                f"stages.{self.stage}.feature_cache: the vision tower trains in this stage; "
                "remove feature_cache or freeze the tower"
            )
        cache, report = fill_feature_cache(
            vision,
            self.settings.feature_cache,
            images,
            max_pixels=self.config.data.max_image_pixels,
            batch_size=self.settings.batch_size,
            device=accelerator.device,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            progress=self.is_main,
        )
        accelerator.wait_for_everyone()
        if self.is_main:
            logger.info("%s: %s", self.stage, describe_fill(cache, report, len(images)))
        return cache

    def _skipped_log(self) -> Path:
        return self.dir / "skipped.jsonl"

    def _record_skips(self, skipped: list[Skipped], when: str) -> None:
        """Append newly skipped samples to ``skipped.jsonl``; fail past `max_skip_fraction`."""
        new = [item for item in skipped if item.index not in self.skipped]
        for item in new:
            self.skipped[item.index] = item
        if self.is_main and new:
            self.dir.mkdir(parents=True, exist_ok=True)
            _append_lines(self._skipped_log(), [_json_line(item.to_json()) for item in new])
        limit = self.config.data.max_skip_fraction
        count, total = len(self.skipped), self.num_samples
        if count > limit * total or count == total:
            raise TrainingError(
                f"stage {self.stage}: {count} of {total} samples were skipped by {when}, more "
                f"than data.max_skip_fraction={limit}; the samples and reasons are in "
                f"{self._skipped_log()}; fix them or raise the limit"
            )

    @property
    def global_batch(self) -> int:
        s = self.settings
        return s.batch_size * s.grad_accum * self.accelerator.num_processes

    def _resume(self, resume: str | Path | None) -> Position:
        """Load a checkpoint (path or "auto" = newest complete one, as the main process sees
        it) or start fresh."""
        checkpoints, state = self.dir / "checkpoints", self.accelerator.state
        path = resume
        if resume == "auto":
            path = on_main(state, lambda: latest_checkpoint(checkpoints))
        metrics = self.dir / "metrics.jsonl"
        if path is None:
            if self.is_main and metrics.exists():
                metrics.unlink()
            return Position(seed=self.config.run.seed)
        if self.sharded:
            position = load_sharded_checkpoint(
                Path(path), self.wrapped, self.optimizer, self.scheduler, state
            )
        else:
            position = load_checkpoint(Path(path), self.model, self.optimizer, self.scheduler)
        if self.is_main:
            prune_checkpoints(self.dir / "checkpoints", self.config.run.keep_last)
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
        self.sampler.set_epoch(epoch)  # accelerate does not reach a batch sampler under DDP
        skip = position.batches_in_epoch if position.epoch == epoch else 0
        batches = self.accelerator.skip_first_batches(loader, skip) if skip else loader
        position.epoch, position.batches_in_epoch = epoch, skip
        self.skips.reset()
        loss = None
        for window in _windows(iter(batches), self.settings.grad_accum):
            self._steps_done = position.step
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
        # dropout depends on (seed, step, process) only, so a resumed run draws the same masks
        torch.manual_seed(_step_seed(self.config.run.seed, self._steps_done, self.accelerator))
        for batch in window:
            self.skips.update(batch)
        counts = torch.tensor(
            [
                sum(_supervised(b) for b in window),
                sum(_tokens(b) for b in window),
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
        with self._sync(last), self._autocast():
            out = self.wrapped(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                labels=batch["labels"],
                num_items_in_batch=denom,
                **{key: batch[key] for key in _OPTIONAL_INPUTS if key in batch},
            )
            self.accelerator.backward(out.loss * scale)
        return float(out.loss.detach()) * denom * scale

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Gradients are reduced across processes on the window's last micro-batch only."""
        if last:
            return contextlib.nullcontext()
        if self.shard_here:
            return no_gradient_sync(self.wrapped)
        return self.accelerator.no_sync(self.wrapped)

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision for a model accelerate did not prepare (it patches the others)."""
        return self.accelerator.autocast() if self.shard_here else contextlib.nullcontext()

    def _clip(self) -> float:
        """Clip to `max_grad_norm`; returns the norm of all processes' gradients together
        (under FSDP2 the shards' norms are combined; DeepSpeed clips in its own step)."""
        from torch.distributed.tensor import DTensor

        max_norm = self.settings.max_grad_norm or math.inf
        norm = self.accelerator.clip_grad_norm_(list(self.wrapped.parameters()), max_norm)
        if norm is None:  # DeepSpeed before its first step
            return math.nan
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _maybe_save(self, position: Position, total: int) -> None:
        every = self.config.run.save_every
        if not every or position.step % every or position.step == total:
            return
        self.accelerator.wait_for_everyone()
        checkpoints = self.dir / "checkpoints"
        where = step_dir(checkpoints, position.step)
        if self.sharded:  # every process writes its part
            state = self.accelerator.state
            save_sharded_checkpoint(
                where, self.wrapped, self.optimizer, self.scheduler, position, state
            )
        elif self.is_main:
            model = self.accelerator.unwrap_model(self.wrapped)
            save_checkpoint(where, model, self.optimizer, self.scheduler, position)
        if self.is_main:
            prune_checkpoints(checkpoints, self.config.run.keep_last)
        self.accelerator.wait_for_everyone()

    def _report_skips(self, epoch: int) -> None:
        """Record the epoch's skips (every process's), then log every sample skipped so far,
        up front included: the count is the number of rows in ``skipped.jsonl``."""
        merged = SkipCounter()
        for counter in gather_object([self.skips]):
            merged.merge(counter)
        self._record_skips(list(merged.samples.values()), f"epoch {epoch}")
        if self.is_main:
            every = SkipCounter(seen=self.num_samples)
            every.add(list(self.skipped.values()))
            where = f"; listed in {self._skipped_log()}" if self.skipped else ""
            logger.info("%s epoch %d: %s%s", self.stage, epoch, every.report(), where)

    def _finish(self) -> None:
        self.accelerator.wait_for_everyone()
        model = self._full_model()
        if self.is_main:
            if self.stage == "align":  # before final/, which marks the stage as done
                save_connector(model, self.dir / "connector")
            model.save_pretrained(self.dir / "final")
            plot_loss(self.dir / "metrics.jsonl", self.dir / "loss.png", f"{self.stage} loss")
            logger.info("%s: saved %s", self.stage, self.dir / "final")
        if self.config.run.trackers:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()

    def _full_model(self) -> Any:
        """The trained model, whole, on the main process (gathered from the shards into the
        plain copy under FSDP2 and DeepSpeed: every process must call this)."""
        if self._skeleton is None:
            return self.accelerator.unwrap_model(self.wrapped)
        if self.sharded:
            state = full_state_dict(self.wrapped)
        else:
            state = self.accelerator.get_state_dict(self.wrapped)
        return fill(self._skeleton, state) if self.is_main else None

    def trained_model(self) -> Any:
        """After `fit`: the stage's model as a plain module on every process (for the next
        stage). An engine that changed the model in place leaves it sharded; then this is the
        plain copy with the stage's final weights (read from ``final/`` off the main process)."""
        if self._skeleton is None:
            return self.model
        if not self.is_main:
            from vlm_adapters.model.lora import load_weights

            load_weights(fill(self._skeleton), self.dir / "final", WEIGHTS_NAME)
        return self._skeleton


def cpu_only_launch() -> bool:
    """True for several processes on a machine without an accelerator (DDP over gloo on CPU)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several and not torch.accelerator.is_available()


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append to a JSONL file, first ending a last line that a kill cut short."""
    with open(path, "a+b") as handle:
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(lines).encode())


def _read_skipped(path: Path) -> dict[int, Skipped]:
    """The samples an earlier (interrupted) run of the stage listed in ``skipped.jsonl``."""
    found: dict[int, Skipped] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            item = Skipped(**json.loads(line))
        except (TypeError, ValueError):
            continue  # a line cut by a kill
        found[item.index] = item
    return found


def _step_seed(seed: int, step: int, accelerator: Any) -> int:
    return (seed * 1_000_003 + step) * 1_009 + accelerator.process_index


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


_OPTIONAL_INPUTS = ("position_ids", "image_features")  # packed rows; a feature cache


def _tokens(batch: dict[str, Any]) -> int:
    """Tokens in a batch, padding excluded (packed rows count them in the collator)."""
    mask = batch["attention_mask"]
    return int(mask.sum()) if mask is not None else int(batch["num_tokens"])


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
    *,
    overwrite: bool = False,
    allow_config_change: bool = False,
    fresh_connector: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run `stage` ("all" = the recipe, in order) and return a summary per stage.

    `resume`: "auto" continues from the newest complete checkpoints (finished stages are
    skipped), a checkpoint path continues from there; a changed config is refused unless
    `allow_config_change`. A stage that already has results in `out` is trained again only
    with `overwrite`, which also allows a non-empty `out` that is not a run directory (its
    files are kept). `--stage finetune` needs the stage-1 connector in `out/align/connector`
    unless `fresh_connector` (or a `model` is passed). `model` defaults to one built from the
    config; the same model object carries each stage's weights into the next.
    """

    from vlm_adapters import build_vlm

    config = resolve_config(config, overrides)
    out = Path(out)
    names = stages_to_run(config, stage)
    datasets = {name: config.dataset(name) for name in names}  # every stage, before any runs
    with naming_file(config.where):
        records = {name: _check_dataset(name, source) for name, source in datasets.items()}
    accelerator = make_accelerator(config, out)
    with locked_run_dir(out, overwrite=overwrite, state=accelerator.state):
        plan = on_main(
            accelerator.state,
            lambda: _prepare_run(out, config, names, resume, overwrite, allow_config_change),
        )
        built_here = model is None
        if built_here:
            set_seed(config.run.seed)  # same initial weights on every process and every run
            with naming_file(config.where):
                model = build_vlm(config.model)
        _check_model_fits(config, model, datasets)
        if "align" not in names:
            _carry_connector(model, out, required=built_here and not fresh_connector)
        summaries = {}
        for name in names:
            if plan[name] == "done":
                _load_final(model, out / name / "final", needed=name != names[-1])
                continue
            trainer = Trainer(model, config, name, out, accelerator, records.pop(name))
            summaries[name] = trainer.fit(resume=plan[name])
            if name != names[-1]:
                model = trainer.trained_model()
    return summaries


@contextlib.contextmanager
def naming_file(where: str) -> Iterator[None]:
    """Prefix config and component errors raised inside with the config file's name."""
    try:
        yield
    except (ConfigError, ComponentError) as error:
        if not where or str(error).startswith(where):
            raise
        raise type(error)(f"{where}: {error}") from None


def _check_dataset(stage: str, source: Any) -> Records:
    """The stage's data file and image folder exist; its records (read before any stage
    runs, so parse errors name the file and line before anything trains)."""
    if not Path(source.path).is_file():
        raise ConfigError(f"data.{stage}.path: {source.path} not found")
    if not source.root().is_dir():
        raise ConfigError(f"data.{stage}.image_root: {source.root()} is not a directory")
    return load_records(source.path)


def checked_dataset(
    config: TrainConfig, stage: str, model: Any, records: Records | None = None
) -> tuple[LlavaDataset, list[Skipped], int]:
    """Stage ``stage``'s dataset for ``model`` after the up-front check of every sample
    (`LlavaDataset.precheck`): the dataset of the samples that pass, the skipped ones, and the
    number of records in the file. ``records``: the data file, when already read."""
    data, source = config.data, config.dataset(stage)
    records = load_records(source.path) if records is None else records
    if not records:
        raise TrainingError(f"{source.path}: no samples; stage {stage} has nothing to train")
    dataset = LlavaDataset.for_model(
        model,
        records,
        image_root=source.root(),
        template=source.template,
        max_length=data.max_length or model.llm.max_positions,
        on_bad_sample=data.on_bad_sample,
        max_image_pixels=data.max_image_pixels,
        source=source.path,
    )
    kept, skipped = dataset.precheck()
    return kept, skipped, len(records)


def check_token_budget(dataset: LlavaDataset, budget: int, where: str) -> None:
    """A micro-batch of ``budget`` tokens must hold the longest sample alone: a smaller
    budget cannot be honoured (each such sample would make an over-budget batch)."""
    lengths = [abs(length) for length in dataset.lengths]
    longest = max(lengths, default=0)
    if longest <= budget:
        return
    position = dataset.positions[lengths.index(longest)]
    name = sample_id(dataset.records[position], position)
    prefix = f"{where}: " if where else ""
    raise ConfigError(
        f"{prefix}data.max_tokens_per_batch: {budget} tokens cannot hold sample {name!r} of "
        f"{dataset.source} ({longest} tokens estimated, visual tokens included: the longest); "
        f"raise it to at least {longest}"
    )


def _check_model_fits(config: TrainConfig, model: Any, datasets: dict[str, Any]) -> None:
    """What needs the built model: the context length and each stage's template tokens."""
    context = model.llm.max_positions
    if context is not None:
        check_max_length(config, context)
    for source in datasets.values():
        check_template(model.tokenizer, source.template)


def _prepare_run(
    out: Path,
    config: TrainConfig,
    names: list[str],
    resume: str | Path | None,
    overwrite: bool,
    allow_config_change: bool,
) -> dict[str, Any]:
    """On the main process: check the resume config, protect finished stages, save the config."""
    if resume is not None:
        check_resume_config(out, config.to_dict(), allow_config_change)
    plan = _resume_plan(names, out, resume)
    for name, step in plan.items():
        if step is None:
            _clear_stage(out / name, overwrite)
    if resume is None or allow_config_change or not (out / CONFIG_NAME).is_file():
        save_train_config(config, out / CONFIG_NAME)
    return plan


_STAGE_OUTPUTS = (
    "final",
    "checkpoints",
    "connector",
    "metrics.jsonl",
    "skipped.jsonl",
    "loss.png",
)


def _clear_stage(directory: Path, overwrite: bool) -> None:
    """A stage about to start fresh: refuse to replace its results unless `overwrite`."""
    found = [name for name in _STAGE_OUTPUTS if (directory / name).exists()]
    if not found:
        return
    if not overwrite:
        what = "a finished stage" if "final" in found else "checkpoints of an unfinished run"
        raise OutputError(
            f"{directory} already holds {what} ({', '.join(found)}); pass --resume auto to "
            "continue it, --overwrite to train it again, or choose another --out"
        )
    for name in found:
        remove_tree(directory / name)


def _resume_plan(names: list[str], out: Path, resume: str | Path | None) -> dict[str, Any]:
    """Per stage: "done" (skip), a checkpoint to resume from, "auto" or None (fresh)."""
    if resume is None:
        return dict.fromkeys(names)
    if resume == "auto":
        plan: dict[str, Any] = {}
        for name in names:
            finished = _finished(out / name)
            earlier_done = all(value == "done" for value in plan.values())
            plan[name] = "done" if finished and earlier_done else "auto"
        return plan
    path = Path(resume)
    owner = path.parent.parent.name
    if owner not in names:
        raise ConfigError(f"--resume {path}: expected OUT/<stage>/checkpoints/step-N of {names}")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"--resume {path}: {problem}; use another one or --resume auto")
    index = names.index(owner)
    return {n: ("done" if i < index else path if i == index else None) for i, n in enumerate(names)}


def _finished(stage_dir: Path) -> bool:
    """A stage is done when its final model (and, for align, the connector) is complete."""
    from vlm_adapters._io import safetensors_problem

    done = safetensors_problem(stage_dir / "final" / WEIGHTS_NAME) is None
    if stage_dir.name == "align":
        done = done and (stage_dir / "connector" / CONNECTOR_CONFIG).is_file()
    return done


def _carry_connector(model: Any, out: Path, required: bool) -> None:
    artifact = out / "align" / "connector"
    if carry_connector(model, artifact):
        logger.info("finetune: connector loaded from %s", artifact)
    elif required:
        raise ConfigError(
            f"{artifact}: no stage-1 connector; run `--stage align` into this --out first, or "
            "pass --fresh-connector to fine-tune from an untrained connector"
        )
    else:
        logger.warning("finetune: no %s; the connector trains from its current weights", artifact)


def _load_final(model: Any, final: Path, needed: bool) -> None:
    logger.info("%s already finished; skipping it", final.parent.name)
    if needed:
        from vlm_adapters.model.lora import load_weights

        load_weights(model, final, WEIGHTS_NAME)
