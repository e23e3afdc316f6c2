"""A stage's streamed data (``data.<stage>.streaming``): the shards' plan, this process's
`StreamDataset` in a DataLoader, and the loader the training loop iterates.

The loader is kept out of accelerate's ``prepare``: the plan already gives each process its
own micro-batches, and accelerate would shard an iterable dataset again (or, by default,
read it on the main process only and dispatch the batches)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from vlm_adapters.data import ConversationDataset
from vlm_adapters.data.streaming import (
    StreamDataset,
    StreamPlan,
    find_shards,
    read_shards,
    stream_images,
)
from vlm_adapters.errors import ConfigError, DataError, TrainingError
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.training.checkpoint import Position
from vlm_adapters.training.config import TrainConfig
from vlm_adapters.training.data import fill_cache
from vlm_adapters.training.skips import SkipLog

logger = logging.getLogger("vlm_adapters.training")


class StreamLoader:
    """This process's micro-batches of a stream, on its device; `set_epoch` and
    `start_at` (micro-batches a resumed run already took, skipped undecoded) apply to the
    next iteration. ``world``: the processes the stream is cut for."""

    def __init__(self, stream: StreamDataset, num_workers: int, device: torch.device) -> None:
        self.stream, self.device, self.world = stream, device, stream.world
        self.loader = DataLoader(
            stream, batch_size=None, num_workers=num_workers, collate_fn=_as_is
        )

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def start_at(self, skip: int) -> None:
        self.stream.skip = skip

    def batches(self, epoch: int) -> int:
        """This process's micro-batches in ``epoch``."""
        return self.stream.batches(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if isinstance(batch, DataError):
                raise DataError(str(batch))  # one line, whichever worker met it
            yield send_to_device(batch, self.device)


def _as_is(batch: dict[str, Any] | DataError) -> dict[str, Any] | DataError:
    """The batch the stream collated (a module-level function: workers pickle it)."""
    return batch


def stream_loader(
    config: TrainConfig,
    stage: str,
    model: VisionLanguageModel,
    collate: Any,
    skips: SkipLog,
    accelerator: Accelerator,
) -> StreamLoader:
    """Stage ``stage``'s stream: its shards checked (metadata only), the skip limit counted
    on their rows, and this process's loader."""
    data, source = config.data, config.dataset(stage)
    shards = read_shards(find_shards(source.path))
    encoder = stream_encoder(config, stage, model)
    plan = StreamPlan(
        shards,
        seed=config.run.seed,
        shuffle_buffer=data.shuffle_buffer,
        batch_size=config.stage(stage).batch_size,
        max_tokens=data.max_tokens_per_batch,
        estimate=encoder.estimate,
    )
    if not plan.num_samples:
        raise TrainingError(f"{source.path}: no samples; stage {stage} has nothing to train")
    if config.stage(stage).feature_cache:
        images = stream_images(shards, encoder.images_of)
        encoder.feature_cache = fill_cache(config, stage, model, images, accelerator)
    skips.start(plan.num_samples)
    if accelerator.is_main_process:
        logger.info("%s: streaming %d samples from %d shards", stage, plan.num_samples, len(shards))
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = StreamDataset(plan, encoder, collate, rank, world)
    return StreamLoader(stream, data.num_workers, accelerator.device)


def stream_encoder(
    config: TrainConfig, stage: str, model: VisionLanguageModel
) -> ConversationDataset:
    """What encodes the stage's streamed samples for ``model`` (a dataset of no records)."""
    data, source = config.data, config.dataset(stage)
    return ConversationDataset.for_model(
        model,
        [],
        image_root=source.root(),
        video_root=source.video_root,
        template=source.template,
        max_length=data.max_length or model.llm.max_positions,
        on_bad_sample=data.on_bad_sample,
        max_image_pixels=data.max_image_pixels,
    )


def streamed_images(
    config: TrainConfig, stage: str, model: VisionLanguageModel
) -> Iterator[Path | bytes]:
    """Every image of the stage's shards, in file order (for ``cache-features``)."""
    shards = read_shards(find_shards(config.dataset(stage).path))
    return stream_images(shards, stream_encoder(config, stage, model).images_of)


def resume_stream(loader: StreamLoader, position: Position) -> None:
    """Check a resumed ``position`` against the stream and record the stream's process
    count in it: a position at an epoch's end moves to the next epoch's start (it resumes on
    any number of processes); one inside an epoch resumes on as many processes only."""
    world, taken = position.world or loader.world, position.batches_in_epoch
    if taken and taken >= loader.stream.batches(position.epoch, world):
        position.epoch, position.batches_in_epoch = position.epoch + 1, 0
    elif taken and world != loader.world:
        raise ConfigError(
            f"resume: this checkpoint is {taken} micro-batches into an epoch of data streamed "
            f"to {world} processes, and this run has {loader.world}; resume on {world} "
            "processes (a checkpoint at an epoch's end resumes on any number)"
        )
    position.world = loader.world
