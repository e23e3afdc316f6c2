"""Stage recipes: what each stage trains and freezes, its optimizer groups, and whole runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vlm_adapters.config import ConfigError
from vlm_adapters.training.artifact import load_connector
from vlm_adapters.training.config import (
    STAGES,
    AlignStage,
    FinetuneStage,
    TrainConfig,
    load_train_config,
)
from vlm_adapters.training.config import train_config_from_dict as _from_dict
from vlm_adapters.training.lora import ensure_lora, unfreeze_last_vision_layers

logger = logging.getLogger("vlm_adapters.training")
PARTS = ("vision", "connector", "llm")


def configure_stage(model: Any, stage: str, settings: AlignStage | FinetuneStage) -> None:
    """Set `requires_grad` for `stage`: align trains the connector; finetune adds LLM/vision."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if stage == "align":
        return
    if settings.train_llm == "full":
        model.llm.requires_grad_(True)
    elif settings.train_llm == "lora":
        ensure_lora(model, settings.lora)  # applies LoRA, or re-enables a loaded adapter
    if settings.train_vision == "full":
        model.vision.requires_grad_(True)
    elif settings.train_vision == "last_n":
        unfreeze_last_vision_layers(model, settings.unfreeze_vision_layers)
    elif settings.train_vision == "lora":
        ensure_lora(model, settings.vision_lora, part="vision")


def param_groups(model: Any, settings: AlignStage | FinetuneStage) -> list[dict[str, Any]]:
    """AdamW groups per module (vision / connector / LLM lr), no decay on 1-d params."""
    lrs = {
        "vision": getattr(settings, "vision_lr", None) or settings.lr,
        "connector": getattr(settings, "connector_lr", None) or settings.lr,
        "llm": settings.lr,
    }
    groups = []
    for part, lr in lrs.items():
        params = [p for p in getattr(model, part).parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        flat = [p for p in params if p.ndim < 2]
        groups.append(
            {"name": part, "params": decay, "lr": lr, "weight_decay": settings.weight_decay}
        )
        groups.append({"name": f"{part}.no_decay", "params": flat, "lr": lr, "weight_decay": 0.0})
    return [group for group in groups if group["params"]]


def describe_trainable(model: Any, stage: str) -> str:
    """One line per part: trainable / total parameters (what the stage trains and freezes)."""
    lines = [f"stage {stage}: trainable / total parameters"]
    for part in PARTS:
        params = list(getattr(model, part).parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        state = "frozen" if trainable == 0 else "trains"
        lines.append(f"  {part:<9} {trainable:>13,} / {total:>13,}  {state}")
    return "\n".join(lines)


def carry_connector(model: Any, directory: Path) -> bool:
    """Load the stage-1 connector artifact (``OUT/align/connector``) if there is one."""
    if not (directory / "connector.json").is_file():
        return False
    load_connector(model, directory)
    return True


def resolve_config(
    config: TrainConfig | dict[str, Any] | str | Path, overrides: list[str] | None = None
) -> TrainConfig:
    """A TrainConfig from an object, a dict or a YAML path (with dotted overrides)."""
    if isinstance(config, (str, Path)):
        return load_train_config(config, overrides)
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    from vlm_adapters.config import apply_overrides

    return _from_dict(apply_overrides(config, overrides or []))


def stages_to_run(config: TrainConfig, stage: str) -> list[str]:
    """The recipe for ``all``, else the one named stage."""
    if stage == "all":
        return list(config.recipe)
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: unknown stage; choose all, {', '.join(STAGES)}")
    return [stage]
