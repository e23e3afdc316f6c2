"""Typed training configs: the model sections plus `data`, `recipe`, `stages` and `run`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vlm_adapters.chat.templates import TEMPLATES
from vlm_adapters.config import (
    SECTIONS,
    ConfigError,
    ModelConfig,
    apply_overrides,
    llm_context,
    model_config_from_dict,
    read_yaml,
)
from vlm_adapters.data.images import MAX_IMAGE_PIXELS
from vlm_adapters.model.lora import LoraSettings
from vlm_adapters.registry import format_errors

STAGES = ("align", "finetune", "preference")
DEFAULT_RECIPE = ("align", "finetune")
"""The recipe of a config that names none (a preference stage is added by listing it)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Format = Literal["auto", "llava", "datasets", "parquet", "arrow", "webdataset", "hub"]


class SourceConfig(_Strict):
    """One source of a mixture (``data.<stage>.sources``)."""

    path: str = Field(description="As data.<stage>.path.")
    format: Format = Field("auto", description="As data.<stage>.format.")
    split: str = Field("train", description="As data.<stage>.split.")
    weight: float = Field(
        1.0, ge=0, description="Times each sample is used per epoch (0.5: a seeded half)."
    )


class DatasetConfig(_Strict):
    """A stage's samples (one source, or a weighted mixture) and the chat template they are
    rendered with (see docs/data.md)."""

    path: str | None = Field(
        None,
        description="LLaVA JSON/JSONL file, a save_to_disk folder, Parquet/Arrow files (a "
        "file, glob or folder), WebDataset .tar shards, or a hub dataset id; with streaming, "
        "Parquet or WebDataset tar shards (files or globs, separated by commas).",
    )
    format: Format = Field("auto", description="auto: detected from path.")
    split: str = Field("train", description="Split of a saved DatasetDict or a hub dataset.")
    sources: list[SourceConfig] | None = Field(
        None, min_length=1, description="A weighted mixture of sources, instead of path."
    )
    image_root: str | None = Field(
        None, description="Image paths are relative to, and must stay inside, this folder."
    )
    template: str = Field("plain", description="Chat template name (see templates.py).")
    streaming: bool = Field(
        False,
        description="Read path's shards in order as a stream (never the whole sample list): "
        "see docs/training.md, Streaming.",
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, name: str) -> str:
        if name not in TEMPLATES:
            raise ValueError(
                f"unknown chat template {name!r}; available: {', '.join(sorted(TEMPLATES))}"
            )
        return name

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        if (self.path is None) == (self.sources is None):
            raise ValueError(
                "set path (one source) or sources (a mixture), not both"
                if self.path is not None
                else "no data: set path (a data file, folder or hub id) or sources"
            )
        return self

    def label(self) -> str:
        """How messages name the data: the path, or the mixture's paths."""
        if self.path is not None:
            return self.path
        return "mixture of " + ", ".join(source.path for source in self.sources or ())

    def root(self) -> Path:
        """Where relative image paths start (default: the data file's folder)."""
        if self.image_root:
            return Path(self.image_root)
        first = self.path if self.path is not None else (self.sources or [])[0].path
        return Path(first).parent


class LmmsTasks(_Strict):
    """lmms-eval tasks evaluated during training (``pip install vlm-adapters[eval]``)."""

    tasks: list[str] = Field(min_length=1, description="lmms-eval task names.")
    include_path: str | None = Field(
        None, description="Folder of one's own task YAML files (lmms-eval's --include_path)."
    )
    limit: int | None = Field(None, gt=0, description="Most docs per task; null = all.")
    batch_size: int = Field(8, gt=0, description="Prompts or option rows run together.")


class DataConfig(_Strict):
    """Per-stage datasets and how samples are encoded, checked and batched."""

    align: DatasetConfig | None = None
    finetune: DatasetConfig | None = None
    preference: DatasetConfig | None = Field(
        None, description="Preference pairs (docs/preference.md), for a preference stage."
    )
    eval: DatasetConfig | None = Field(
        None,
        description="Evaluated after each stage (and every stages.<stage>.eval_every steps) "
        "on the live model: eval_loss (per answer token) and eval_task's metrics.",
    )
    eval_lmms: LmmsTasks | None = Field(
        None,
        description="lmms-eval tasks scored on the live model with data.eval's schedule "
        "(needs the eval extra).",
    )
    eval_task: Literal["loss", "exact", "vqa", "yesno", "choice"] = Field(
        "loss",
        description="What data.eval measures besides the loss: exact match, VQAv2 soft "
        "accuracy, POPE yes/no or multiple choice (as `vlm-adapters eval --task-type`).",
    )
    max_length: int | None = Field(
        None, gt=0, description="Longer samples are bad samples; null = the LLM's context."
    )
    on_bad_sample: Literal["skip", "error"] = Field(
        "skip", description="skip (counted, listed in skipped.jsonl) or error."
    )
    max_skip_fraction: float = Field(
        0.01, ge=0, le=1, description="A stage that skips more of its samples fails."
    )
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, gt=0, description="Larger images (width x height) are bad samples."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    group_by_length: bool = Field(True, description="Modality- and length-grouped batches.")
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="Streamed data: samples held in the seeded shuffle buffer (shard order is "
        "shuffled too); 0 = file order.",
    )
    packing: bool = Field(
        False,
        description="Pack each micro-batch's samples into rows of at most max_length tokens, "
        "each sample attending only to itself.",
    )
    max_tokens_per_batch: int | None = Field(
        None,
        gt=0,
        description="Micro-batches of samples whose token estimates sum to at most this "
        "(instead of batch_size samples); null = batch_size.",
    )


class StageConfig(_Strict):
    """Optimisation settings of one stage; `batch_size` is per device."""

    epochs: int = Field(1, gt=0)
    batch_size: int = Field(16, gt=0, description="Per device.")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0, description="null = no clipping.")
    feature_cache: str | None = Field(
        None,
        description="Folder of the frozen vision tower's features, computed once per image "
        "(see `vlm-adapters cache-features`); null = encode images every step.",
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate data.eval every N optimizer steps; 0 = after the stage only."
    )


class AlignStage(StageConfig):
    """Stage 1: only the connector trains; vision and LLM are frozen."""


class FinetuneStage(StageConfig):
    """Stage 2: connector + LLM (full or LoRA); vision frozen or partly unfrozen."""

    lr: float = Field(2e-5, gt=0, description="LLM lr (and default for the rest).")
    connector_lr: float | None = Field(None, gt=0, description="null = lr.")
    vision_lr: float | None = Field(None, gt=0, description="null = lr.")
    train_llm: Literal["full", "lora", "frozen"] = Field(
        "full", description="How the LLM trains: all weights, LoRA adapters, or not at all."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LLM LoRA settings.")
    train_vision: Literal["frozen", "full", "last_n", "lora"] = Field(
        "frozen", description="How the vision tower trains (last_n: the last N blocks only)."
    )
    unfreeze_vision_layers: int = Field(0, ge=0, description="N for train_vision: last_n.")
    vision_lora: LoraSettings = Field(
        default_factory=lambda: LoraSettings(r=16, alpha=32),
        description="Vision LoRA settings, for train_vision: lora.",
    )


class PreferenceStage(FinetuneStage):
    """Stage 3 (optional): preference optimisation on chosen / rejected answer pairs
    (docs/preference.md); trains like finetune (full, LoRA or QLoRA; the tower frozen or not)."""

    lr: float = Field(5e-7, gt=0, description="LLM lr (and default for the rest).")
    objective: Literal["dpo", "ipo", "simpo"] = Field(
        "dpo",
        description="dpo: DPO's sigmoid loss; ipo: IPO's squared loss (per-token average "
        "log-probs); simpo: reference-free, length-normalised.",
    )
    beta: float = Field(0.1, gt=0, description="Strength of the preference (all losses).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo, simpo: the share of preferences taken as flipped."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the reward margin.")
    train_connector: bool = Field(
        True,
        description="Whether the connector trains (false: only the LLM / tower settings "
        "train, e.g. LoRA adapters alone, as TRL's DPO with peft).",
    )
    reference: Literal["auto", "adapters", "copy", "precomputed"] = Field(
        "auto",
        description="The reference model (dpo, ipo): adapters (LoRA: the model with its "
        "adapters off), copy (a frozen copy), precomputed (its log-probs computed once before "
        "training, kept in the run folder); auto: adapters with LoRA, else copy.",
    )


class Stages(_Strict):
    align: AlignStage = Field(default_factory=AlignStage)
    finetune: FinetuneStage = Field(default_factory=FinetuneStage)
    preference: PreferenceStage = Field(default_factory=PreferenceStage)


class RunConfig(_Strict):
    """Seed, precision, checkpointing and logging."""

    seed: int = Field(0, ge=0, lt=2**32, description="Seeds torch, numpy and the samplers.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast precision (master weights stay in their dtype)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (LLM, and the tower if it trains)."
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer and vision block: slower first steps, "
        "faster ones after; the same losses as eager.",
    )
    save_every: int = Field(0, ge=0, description="Optimizer steps; 0 = end of stage only.")
    keep_last: int = Field(2, gt=0, description="Intermediate checkpoints kept per stage.")
    log_every: int = Field(10, gt=0)
    trackers: list[str] = Field(default_factory=list, description="accelerate trackers.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false


class TrainConfig(BaseModel):
    """A whole training run: model sections, data, recipe, stages and run settings."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    recipe: list[str] = Field(default_factory=lambda: list(DEFAULT_RECIPE))
    stages: Stages = Field(default_factory=Stages)
    run: RunConfig = Field(default_factory=RunConfig)
    where: str = ""

    @field_validator("recipe")
    @classmethod
    def _known_stages(cls, recipe: list[str]) -> list[str]:
        for name in recipe:
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        if not recipe:
            raise ValueError("empty recipe; list stages to run, e.g. [align, finetune]")
        order = [STAGES.index(name) for name in recipe]
        if order != sorted(set(order)):
            raise ValueError(
                f"recipe {recipe}: list each stage once, in the order {', '.join(STAGES)}"
            )
        return recipe

    def stage(self, name: str) -> AlignStage | FinetuneStage | PreferenceStage:
        """The settings of stage `name`."""
        return getattr(self.stages, name)

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset of stage `name`, or a ConfigError saying it is missing."""
        dataset = getattr(self.data, name)
        if dataset is None:
            raise ConfigError(f"{self.where}: data.{name}: missing; set data.{name}.path")
        return dataset

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what `config.yaml` in a run directory holds)."""
        rest = self.model_dump(mode="json", exclude={"model", "where"})
        return {**self.model.to_dict(), **rest}


def train_config_from_dict(data: dict[str, Any], where: str = "") -> TrainConfig:
    """Validate a whole training config; errors name the key and `where` (the YAML file)."""
    model = model_config_from_dict(data, where)
    rest = {k: v for k, v in data.items() if k not in SECTIONS}
    try:
        config = TrainConfig(model=model, where=where, **rest)
    except ValidationError as exc:
        raise ConfigError(
            f"{where}: {format_errors(exc)}" if where else format_errors(exc)
        ) from None
    context = llm_context(model)
    if context is not None:
        check_max_length(config, context)
    check_quantized_llm(config)
    check_feature_caches(config)
    check_streaming_eval(config)
    check_preference(config)
    return config


def check_preference(config: TrainConfig) -> None:
    """A preference stage reads whole pairs: neither streamed nor packed; its reference
    fits its training (adapters need LoRA; a reference-free loss takes none)."""
    if "preference" not in config.recipe and config.data.preference is None:
        return
    prefix = f"{config.where}: " if config.where else ""
    stage, data = config.stages.preference, config.data.preference
    if data is not None and data.streaming:
        raise ConfigError(
            f"{prefix}data.preference.streaming: preference pairs are read map-style; set "
            "streaming: false"
        )
    if config.data.packing:
        raise ConfigError(
            f"{prefix}data.packing: a preference stage does not pack its pairs; set packing: "
            "false (or run the preference stage with its own config)"
        )
    if stage.reference == "adapters" and "lora" not in (stage.train_llm, stage.train_vision):
        raise ConfigError(
            f"{prefix}stages.preference.reference: adapters needs LoRA (train_llm: lora); use "
            "copy, precomputed or auto"
        )


def check_streaming_eval(config: TrainConfig) -> None:
    """Evaluation data is read whole, not streamed."""
    prefix = f"{config.where}: " if config.where else ""
    if config.data.eval is not None and config.data.eval.streaming:
        raise ConfigError(
            f"{prefix}data.eval.streaming: evaluation data is read whole; set streaming: false "
            "and give a LLaVA JSON/JSONL file"
        )


def check_feature_caches(config: TrainConfig) -> None:
    """A feature cache holds a frozen tower's features (a stage that trains the tower has
    none), in a folder we can write to or create."""
    prefix = f"{config.where}: " if config.where else ""
    for name in ("finetune", "preference"):
        settings = config.stage(name)
        if settings.feature_cache and settings.train_vision != "frozen":  # type: ignore[union-attr]
            raise ConfigError(
                f"{prefix}stages.{name}.feature_cache: the vision tower trains in this stage "
                f"(train_vision: {settings.train_vision}), so its features change every "  # type: ignore[union-attr]
                "step; remove feature_cache or set train_vision: frozen"
            )
    for stage in STAGES:
        folder = config.stage(stage).feature_cache
        problem = folder and cache_folder_problem(Path(folder))
        if problem:
            raise ConfigError(f"{prefix}stages.{stage}.feature_cache: {problem}")


def cache_folder_problem(folder: Path) -> str | None:
    """Why the feature cache ``folder`` cannot be filled (a file where a folder must be, or
    no write permission where its entries go), or None."""
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        kind = "a file, not a folder" if existing.is_file() else "not a folder"
        then = "" if existing == folder else f", so {folder} cannot be created"
        return (
            f"{existing} is {kind}{then}; set it to a folder for the cached features (a "
            "missing one is created)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"{existing} is not writable, so {folder} cannot hold the cached features; choose "
            "a folder you can write to, or give yourself write permission on it"
        )
    return None


def check_quantized_llm(config: TrainConfig) -> None:
    """A 4-/8-bit LLM (``llm.quantization``) trains through LoRA only: its weights are
    frozen integers."""
    quantization = getattr(config.model.llm.params, "quantization", None)
    if quantization is None:
        return
    for name in ("finetune", "preference"):
        if name in config.recipe and config.stage(name).train_llm == "full":  # type: ignore[union-attr]
            prefix = f"{config.where}: " if config.where else ""
            raise ConfigError(
                f"{prefix}stages.{name}.train_llm: full cannot train a {quantization.bits}-bit "
                "LLM (llm.quantization); use lora (QLoRA) or frozen, or remove llm.quantization"
            )


def check_precision(config: TrainConfig, device_type: str) -> None:
    """fp16 autocast runs on accelerators only: on a CPU accelerate trains in fp32 instead,
    without a word; bf16 autocasts on CPUs too."""
    if config.run.mixed_precision == "fp16" and device_type == "cpu":
        prefix = f"{config.where}: " if config.where else ""
        raise ConfigError(
            f"{prefix}run.mixed_precision: fp16 needs a GPU, and this run is on the CPU, where "
            "it would silently train in fp32; use bf16 (CPUs autocast to it) or no"
        )


def check_max_length(config: TrainConfig, context: int) -> None:
    """``data.max_length`` must fit the LLM's context (longer sequences crash or train junk)."""
    length = config.data.max_length
    if length is not None and length > context:
        prefix = f"{config.where}: " if config.where else ""
        raise ConfigError(
            f"{prefix}data.max_length: {length} is longer than the LLM's context of {context} "
            f"positions; set it to {context} or less (or leave it unset to use the context)"
        )


def load_train_config(
    path: str | Path, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Read a training YAML, apply dotted `key=value` overrides and validate it."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return train_config_from_dict(data, where=str(path))


def save_train_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
