"""How a run is distributed: the Accelerator, and one `Engine` per strategy (plain or DDP,
FSDP2, DeepSpeed), each owning how the model is prepared, gradient sync and clipping, the
whole trained model and its checkpoints (through one `Checkpointer` interface).

FSDP2 comes from ``accelerate launch`` (`Fsdp2Engine`) or, under ``torchrun`` with
:data:`~vlm_adapters.training.sharding.FULLY_SHARD_ENV`, from ``fully_shard`` applied here
(`FullyShardEngine`; how the CPU tests run FSDP2, which accelerate maps to DDP on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from vlm_adapters.errors import ConfigError
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.model.files import WEIGHTS_NAME
from vlm_adapters.model.lora import load_weights
from vlm_adapters.training.checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from vlm_adapters.training.config import TrainConfig, check_precision
from vlm_adapters.training.rundir import on_main
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
from vlm_adapters.training.streaming import StreamLoader

logger = logging.getLogger("vlm_adapters.training")


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


def cpu_only_launch() -> bool:
    """True for several processes on a machine without an accelerator (DDP over gloo on CPU)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several and not torch.accelerator.is_available()


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


def make_engine(accelerator: Accelerator, model: VisionLanguageModel) -> Engine:
    """The engine of the strategy the launch asked for, to train ``model``."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedEngine(accelerator, model)
    if accelerator.is_fsdp2:
        return Fsdp2Engine(accelerator, model)
    if wants_fully_shard() and accelerator.distributed_type != DistributedType.FSDP:
        return FullyShardEngine(accelerator, model)
    return Engine(accelerator, model)


# ---- checkpoints -----------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint holds besides the position: the model as the engine runs it, its
    optimizer and its scheduler."""

    model: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler


class Checkpointer(ABC):
    """A stage's checkpoints (``<stage>/checkpoints/step-N``): written atomically, the newest
    ``keep_last`` kept, read back on resume. Every process calls every method."""

    def __init__(
        self, accelerator: Accelerator, directory: Path, keep_last: int, state: TrainState
    ) -> None:
        self.accelerator, self.directory = accelerator, directory
        self.keep_last, self.state = keep_last, state

    def save(self, position: Position) -> None:
        """Write the checkpoint of ``position``, then drop the ones beyond ``keep_last``."""
        self.accelerator.wait_for_everyone()
        self._write(step_dir(self.directory, position.step), position)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.directory, self.keep_last)
        self.accelerator.wait_for_everyone()

    def load(self, path: Path) -> Position:
        """Restore the checkpoint at ``path``; return its position."""
        position = self._read(path)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.directory, self.keep_last)
        return position

    def latest(self) -> Path | None:
        """The newest complete checkpoint, as the main process sees it."""
        return on_main(self.accelerator.state, lambda: latest_checkpoint(self.directory))

    @abstractmethod
    def _write(self, where: Path, position: Position) -> None: ...

    @abstractmethod
    def _read(self, path: Path) -> Position: ...


class PlainCheckpointer(Checkpointer):
    """The whole model, written by the main process (`vlm_adapters.training.checkpoint`)."""

    def _write(self, where: Path, position: Position) -> None:
        if self.accelerator.is_main_process:
            s = self.state
            model = self.accelerator.unwrap_model(s.model)
            save_checkpoint(where, model, s.optimizer, s.scheduler, position)

    def _read(self, path: Path) -> Position:
        s = self.state
        model = self.accelerator.unwrap_model(s.model)
        return load_checkpoint(path, model, s.optimizer, s.scheduler)


class ShardedCheckpointer(Checkpointer):
    """Each process writes and reads its own shard
    (`vlm_adapters.training.sharded_checkpoint`)."""

    def _write(self, where: Path, position: Position) -> None:
        s, state = self.state, self.accelerator.state
        save_sharded_checkpoint(where, s.model, s.optimizer, s.scheduler, position, state)

    def _read(self, path: Path) -> Position:
        s, state = self.state, self.accelerator.state
        return load_sharded_checkpoint(path, s.model, s.optimizer, s.scheduler, state)


# ---- engines ---------------------------------------------------------------------------------


class Engine:
    """One process or DDP: accelerate prepares the model; checkpoints hold the whole model."""

    def __init__(self, accelerator: Accelerator, model: VisionLanguageModel) -> None:
        self.accelerator = accelerator
        self.model = model
        self.wrapped: nn.Module = model
        """The model as this engine runs it (after `prepare`)."""

    def place(self, config: TrainConfig, stage: str) -> VisionLanguageModel:
        """The model to build the optimizer on (sharded in place where this engine shards it)."""
        return self.model

    def prepare(
        self, module: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[Optimizer, DataLoader]:
        """Hand ``module`` (from `place`), the optimizer and the loader to accelerate (a
        `StreamLoader` stays as it is: it is cut for each process already)."""
        if isinstance(loader, StreamLoader):
            self.wrapped, optimizer = self.accelerator.prepare(module, optimizer)
            return optimizer, loader
        self.wrapped, optimizer, loader = self.accelerator.prepare(module, optimizer, loader)
        return optimizer, loader

    def checkpointer(
        self, directory: Path, keep_last: int, optimizer: Optimizer, scheduler: LRScheduler
    ) -> Checkpointer:
        """The stage's checkpoints in ``directory`` (after `prepare`)."""
        state = TrainState(self.wrapped, optimizer, scheduler)
        return PlainCheckpointer(self.accelerator, directory, keep_last, state)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Gradients accumulate locally inside (not reduced across processes)."""
        return self.accelerator.no_sync(self.wrapped)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision for a model accelerate did not prepare (it patches the others)."""
        return contextlib.nullcontext()

    def clip(self, max_norm: float) -> float:
        """Clip to ``max_norm``; return the norm of all processes' gradients together."""
        return float(self._clip_grad_norm(max_norm))

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        parameters = list(self.wrapped.parameters())
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def full_model(self) -> VisionLanguageModel | None:
        """The trained model, whole, on the main process (elsewhere None, or the model);
        every process must call this."""
        return cast(VisionLanguageModel, self.accelerator.unwrap_model(self.wrapped))

    def trained_model(self, final: Path) -> VisionLanguageModel:
        """After the stage (whose final model is in ``final``): its model as a plain module on
        every process, for the next stage."""
        return self.model


class InPlaceEngine(Engine, ABC):
    """An engine that changes the model in place: a plain copy (meta weights) is kept first
    and filled with the gathered weights at the end."""

    def place(self, config: TrainConfig, stage: str) -> VisionLanguageModel:
        self._skeleton = cast(VisionLanguageModel, skeleton(self.model))
        return self.model

    @abstractmethod
    def _full_state(self) -> dict[str, torch.Tensor]:
        """The full weights on the main process (a collective)."""

    def full_model(self) -> VisionLanguageModel | None:
        state = self._full_state()
        return cast(VisionLanguageModel, fill(self._skeleton, state)) if self._is_main else None

    def trained_model(self, final: Path) -> VisionLanguageModel:
        """The plain copy with the stage's final weights (read from ``final`` off the main
        process, where `full_model` did not fill it)."""
        if not self._is_main:
            load_weights(fill(self._skeleton), final, WEIGHTS_NAME)
        return self._skeleton

    @property
    def _is_main(self) -> bool:
        return self.accelerator.is_main_process


class DeepSpeedEngine(InPlaceEngine):
    """DeepSpeed (ZeRO): it clips in its own step; no intermediate checkpoints (its optimizer
    state is partitioned)."""

    def place(self, config: TrainConfig, stage: str) -> VisionLanguageModel:
        if config.run.save_every:
            raise ConfigError(
                "run.save_every: intermediate checkpoints are not written under DeepSpeed (its "
                "optimizer state is partitioned); set run.save_every=0, or use FSDP2"
            )
        if config.dataset(stage).streaming:
            raise ConfigError(
                f"data.{stage}.streaming: streamed data is not trained under DeepSpeed (which "
                "sizes its batches from a map-style loader); use DDP or FSDP2, or a data file"
            )
        module = super().place(config, stage)
        plugin = self.accelerator.state.deepspeed_plugin
        plugin.deepspeed_config["gradient_clipping"] = config.stage(stage).max_grad_norm or 0.0
        return module

    def clip(self, max_norm: float) -> float:
        norm = self._clip_grad_norm(max_norm)
        return math.nan if norm is None else float(norm)  # None: before its first step

    def _full_state(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.wrapped)


class ShardedEngine(InPlaceEngine, ABC):
    """FSDP2: parameters are DTensors; every decoder layer and vision block is a unit
    (`vlm_adapters.training.sharding`); checkpoints are sharded."""

    def place(self, config: TrainConfig, stage: str) -> VisionLanguageModel:
        module = super().place(config, stage)
        if self._is_main:
            blocks = sorted({type(m).__name__ for m in block_modules(self.model)})
            units = ", ".join(f"every {name}" for name in blocks)
            logger.info("%s: FSDP2 units: %s, and the root (the rest)", stage, units)
        return module

    def checkpointer(
        self, directory: Path, keep_last: int, optimizer: Optimizer, scheduler: LRScheduler
    ) -> Checkpointer:
        state = TrainState(self.wrapped, optimizer, scheduler)
        return ShardedCheckpointer(self.accelerator, directory, keep_last, state)

    def clip(self, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        norm = self._clip_grad_norm(max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _full_state(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.wrapped)


class Fsdp2Engine(ShardedEngine):
    """FSDP2 from ``accelerate launch`` (``fsdp_version: 2``): accelerate shards the model,
    its plugin given our units."""

    def place(self, config: TrainConfig, stage: str) -> VisionLanguageModel:
        configure_fsdp_plugin(self.accelerator, self.model)
        return super().place(config, stage)


class FullyShardEngine(ShardedEngine):
    """FSDP2 applied here with ``fully_shard`` (`shard_model`) instead of accelerate's DDP."""

    def place(self, config: TrainConfig, stage: str) -> VisionLanguageModel:
        super().place(config, stage)
        shard_model(self.model.to(self.accelerator.device))
        return self.model

    def prepare(
        self, module: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[Optimizer, DataLoader]:
        self.wrapped = module  # accelerate would wrap it in DDP
        if isinstance(loader, StreamLoader):
            return self.accelerator.prepare(optimizer), loader
        optimizer, loader = self.accelerator.prepare(optimizer, loader)
        return optimizer, loader

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return no_gradient_sync(self.wrapped)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return self.accelerator.autocast()
