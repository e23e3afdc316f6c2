"""A stage's data: its records (a file, or given in memory), the checked dataset, the feature
cache fill, the collator (packing) and the loader, in an order fixed by the seed, the epoch and
the global batch."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch.utils.data import DataLoader

from vlm_adapters.data import ConversationDataset, DataCollator, LengthGroupedSampler
from vlm_adapters.data.collate import PackingCollator
from vlm_adapters.data.feature_cache import FeatureCache
from vlm_adapters.data.pairs import PairCollator, PreferenceDataset
from vlm_adapters.data.records import (
    IN_MEMORY,
    RecordSource,
    Skipped,
    describe_memory,
    memory_records,
    sample_id,
)
from vlm_adapters.data.samplers import TokenBudgetBatchSampler
from vlm_adapters.data.sources import Mixture, RowList, RowRecords, open_source
from vlm_adapters.data.streaming import find_shards
from vlm_adapters.errors import ConfigError, DataError, TrainingError
from vlm_adapters.llm import LLMBackend
from vlm_adapters.llm.packed_attention import PackedAttention, check_packing
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.training.config import STAGES, DatasetConfig, TrainConfig
from vlm_adapters.training.features import describe_fill, fill_feature_cache, fill_stream_cache
from vlm_adapters.training.skips import SkipLog

logger = logging.getLogger("vlm_adapters.training")

Sampler = LengthGroupedSampler | TokenBudgetBatchSampler
Collator = DataCollator | PackingCollator | PairCollator


DataSources = Any
"""Data given in Python (``train(data=...)``): one source for every stage that runs, or a
mapping of stage names (``align``, ``finetune``, ``preference``, ``eval``) to sources; a
source is a data path (any of ``data.<stage>.path``), a list of LLaVA records (``image`` may
hold PIL images), a list of TRL preference rows (``prompt`` / ``chosen`` / ``rejected`` +
``images``) or a `datasets.Dataset` (LLaVA's ``conversations`` + ``image``, TRL's
``messages`` + ``images`` or TRL's preference columns)."""


def with_given_data(
    raw: dict[str, Any], data: DataSources, stages: list[str]
) -> tuple[dict[str, Any], dict[str, RecordSource]]:
    """The raw config with the data given in Python in ``data.<stage>.path`` (in-memory
    records named by `describe_memory`), and the in-memory records by stage. One source
    serves every stage of ``stages``."""
    if isinstance(data, Mapping):
        unknown = sorted(set(map(str, data)) - {*STAGES, "eval"})
        if unknown or not data:
            raise ConfigError(
                f"data: {', '.join(map(repr, unknown)) or 'an empty mapping'} is not a stage; "
                f"map {', '.join(STAGES)} or eval to their data, or give one source for all"
            )
    sources = dict(data) if isinstance(data, Mapping) else dict.fromkeys(stages, data)
    sections = dict(raw.get("data") or {})
    memory: dict[str, RecordSource] = {}
    for name, source in sources.items():
        section = dict(sections.get(name) or {})
        if isinstance(source, (str, Path)):
            section["path"] = str(source)
        else:
            memory[name] = given_records(source, f"data[{name!r}]")
            section["path"] = describe_memory(memory[name])
        section.pop("sources", None)
        sections[name] = section
    return {**raw, "data": sections}, memory


def given_records(data: Any, where: str) -> RecordSource:
    """Records given in Python: a `datasets.Dataset` (TRL's ``messages`` + ``images``, TRL's
    ``prompt`` / ``chosen`` / ``rejected`` or LLaVA's columns) or a list of TRL preference rows,
    read row by row through `to_record`, else `memory_records`."""
    columns = getattr(data, "column_names", None)
    if isinstance(columns, list) and ("messages" in columns or "prompt" in columns):
        return RowRecords(data, where)
    rows = isinstance(data, (list, tuple)) and data and isinstance(data[0], Mapping)
    if rows and "prompt" in data[0]:  # TRL preference rows
        return RowList(data, where)
    return memory_records(data, where)


def read_stage_records(
    stage: str, source: DatasetConfig, memory: RecordSource | None = None, seed: int = 0
) -> RecordSource | None:
    """The stage's records: ``memory`` when given, else its source's or mixture's (opened, not
    read: a LLaVA file is parsed, a dataset memory-mapped, shards indexed), before any stage
    runs, so errors name the file and line before anything trains. A mixture's fractional
    weights draw their samples with ``seed``. Streamed data is not read here (None), only
    its shards found."""
    if (source.image_root or source.format == "llava") and not source.root().is_dir():
        raise ConfigError(f"data.{stage}.image_root: {source.root()} is not a directory")
    if memory is not None:
        if source.streaming:
            raise ConfigError(
                f"data.{stage}.streaming: the stage's data is given in Python; set streaming: "
                "false or give shard files"
            )
        return memory
    if source.streaming:
        if source.sources is not None:
            raise ConfigError(
                f"data.{stage}.sources: a mixture is read map-style; stream one path of shards, "
                "or set streaming: false"
            )
        try:
            find_shards(source.path or "")
        except DataError as error:
            raise ConfigError(f"data.{stage}.path: {error}") from None
        return None
    if source.sources is None:
        assert source.path is not None
        return _open_source(f"data.{stage}.path", source.path, source.format, source.split)
    parts = [
        (_open_source(f"data.{stage}.sources[{i}]", s.path, s.format, s.split), s.weight, s.path)
        for i, s in enumerate(source.sources)
    ]
    return Mixture(parts, seed)


def _open_source(key: str, path: str, format: str, split: str) -> RecordSource:
    """One source's records; its errors name the config key."""
    if path.startswith(IN_MEMORY):
        raise ConfigError(
            f"{key}: {path} stands for records given in Python; pass the same records again "
            "(train(..., data=...)) to resume, or set a data file"
        )
    llava = format in ("auto", "llava") and Path(path).suffix in (".json", ".jsonl")
    if llava and not Path(path).is_file():
        raise ConfigError(f"{key}: {path} not found")
    try:
        return open_source(path, format, split)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None


def check_memory_cache(config: TrainConfig, memory: Mapping[str, RecordSource]) -> None:
    """In-memory records train without a feature cache, which keys on image files."""
    for stage in STAGES:
        if stage in memory and config.stage(stage).feature_cache:
            raise ConfigError(
                f"stages.{stage}.feature_cache: the stage's data is given in memory, and the "
                "feature cache keys on image files; remove feature_cache or give a data file"
            )


def checked_dataset(
    config: TrainConfig,
    stage: str,
    model: VisionLanguageModel,
    records: RecordSource | None = None,
) -> tuple[ConversationDataset, list[Skipped], int]:
    """Stage ``stage``'s dataset for ``model`` after the up-front check of every sample
    (`ConversationDataset.precheck`): the dataset of the samples that pass, the skipped ones,
    and the number of records in the file. ``records``: the data file, when already read, or the
    stage's in-memory records."""
    data, source = config.data, config.dataset(stage)
    if records is None:
        records = read_stage_records(stage, source, seed=config.run.seed)
    if not records:
        raise TrainingError(f"{source.label()}: no samples; stage {stage} has nothing to train")
    kind = PreferenceDataset if stage == "preference" else ConversationDataset
    dataset = kind.for_model(
        model,
        records,
        image_root=source.root(),
        template=source.template,
        max_length=data.max_length or model.llm.max_positions,
        on_bad_sample=data.on_bad_sample,
        max_image_pixels=data.max_image_pixels,
        source=source.label(),
    )
    kept, skipped = dataset.precheck()
    return kept, skipped, len(records)


def check_token_budget(dataset: ConversationDataset, budget: int, where: str) -> None:
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


def stage_dataset(
    config: TrainConfig,
    stage: str,
    model: VisionLanguageModel,
    records: RecordSource | None,
    skips: SkipLog,
    accelerator: Accelerator,
) -> ConversationDataset:
    """The stage's dataset after the up-front check (its skips recorded in ``skips``),
    reading the stage's feature cache (filled first) when it has one."""
    dataset, skipped, num_samples = checked_dataset(config, stage, model, records)
    skips.start(num_samples)  # a resumed run keeps its list
    skips.record(skipped, "the up-front check")
    budget = config.data.max_tokens_per_batch
    if budget:
        check_token_budget(dataset, budget, config.where)
    if config.stage(stage).feature_cache:
        try:
            images = dataset.image_files()
        except DataError as error:  # embedded images: the cache keys on files
            raise ConfigError(f"stages.{stage}.feature_cache: {error}") from None
        dataset.feature_cache = fill_cache(config, stage, model, images, accelerator)
    return dataset


def fill_cache(
    config: TrainConfig,
    stage: str,
    model: VisionLanguageModel,
    images: list[Path] | Iterable[Path | bytes],
    accelerator: Accelerator,
) -> FeatureCache:
    """The stage's feature cache, its missing entries computed by every process (a share
    each) before any step. ``images``: the image files, or a stream's images (files or
    embedded bytes), which every process reads whole and shares by key."""
    settings = config.stage(stage)
    if any(p.requires_grad for p in model.vision.parameters()):
        raise ConfigError(
            f"stages.{stage}.feature_cache: the vision tower trains in this stage; "
            "remove feature_cache or freeze the tower"
        )
    fill = fill_feature_cache if isinstance(images, list) else fill_stream_cache
    cache, report = fill(
        model.vision,
        settings.feature_cache,
        images,  # type: ignore[arg-type]
        max_pixels=config.data.max_image_pixels,
        batch_size=settings.batch_size,
        device=accelerator.device,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        progress=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        count = len(images) if isinstance(images, list) else report.computed + report.reused
        share = "" if isinstance(images, list) else " (this process's share)"
        logger.info("%s: %s%s", stage, describe_fill(cache, report, count), share)
    return cache


def packed_attention(llm: LLMBackend, stage: str) -> PackedAttention:
    """Packed rows attend per sample (`PackedAttention`) where that gives what the samples
    give alone, else through the masked path; refused if neither does."""
    attention = PackedAttention(llm)
    try:
        check_packing(llm)
    except ConfigError:
        was_active = attention.active
        attention.restore()
        if not was_active:
            raise
        check_packing(llm)
        logger.warning("%s: packed rows use the masked attention path", stage)
    return attention


def make_collator(
    config: TrainConfig, stage: str, model: VisionLanguageModel
) -> tuple[Collator, PackedAttention | None]:
    """The stage's collator and, when it packs rows, the per-sample attention it installed
    (the caller restores it when the stage ends)."""
    pad = model.tokenizer.pad_token_id
    if stage == "preference":
        return PairCollator(pad), None
    if not config.data.packing:
        return DataCollator(pad_token_id=pad), None
    max_length = config.data.max_length or model.llm.max_positions
    if max_length is None:
        raise ConfigError("data.packing: the LLM has no context length; set data.max_length")
    return PackingCollator(pad, max_length), packed_attention(model.llm, stage)


def make_loader(
    dataset: ConversationDataset,
    collator: Collator,
    config: TrainConfig,
    stage: str,
    global_batch: int,
) -> tuple[DataLoader, Sampler]:
    """The stage's loader and its sampler: batches of ``batch_size`` samples grouped by
    length (of ``global_batch``), or of ``data.max_tokens_per_batch`` tokens."""
    data, settings, seed = config.data, config.stage(stage), config.run.seed
    if data.max_tokens_per_batch:
        budget = TokenBudgetBatchSampler(dataset.lengths, data.max_tokens_per_batch, seed=seed)
        loader = DataLoader(
            dataset, batch_sampler=budget, collate_fn=collator, num_workers=data.num_workers
        )
        return loader, budget
    lengths = dataset.lengths if data.group_by_length else [0] * len(dataset)
    # equal lengths = a plain per-epoch shuffle
    grouped = LengthGroupedSampler(
        lengths, global_batch, seed=seed, group_by_modality=data.group_by_length
    )
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=grouped,
        collate_fn=collator,
        num_workers=data.num_workers,
    )
    return loader, grouped
