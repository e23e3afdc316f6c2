"""Stage recipes: what each stage trains and freezes, its optimizer groups, and whole runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_adapters.errors import ConfigError
from vlm_adapters.model.lora import LoraSettings, Part, apply_lora, lora_settings, slot
from vlm_adapters.registry import KINDS
from vlm_adapters.training.artifact import load_connector
from vlm_adapters.training.config import (
    STAGES,
    AlignStage,
    FinetuneStage,
    TrainConfig,
    load_train_config,
)
from vlm_adapters.training.config import train_config_from_dict as _from_dict
from vlm_adapters.vision import VisionBackbone

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

logger = logging.getLogger("vlm_adapters.training")
PARTS = KINDS


def configure_stage(
    model: VisionLanguageModel, stage: str, settings: AlignStage | FinetuneStage
) -> None:
    """Set `requires_grad` for `stage`: align trains the connector; finetune adds LLM/vision;
    a preference stage trains like finetune, its connector only with ``train_connector``."""
    model.requires_grad_(False)
    model.connector.requires_grad_(getattr(settings, "train_connector", True))
    if stage == "align":
        return
    if settings.train_llm == "full":
        if getattr(model.llm, "is_quantized", False):
            raise ConfigError(
                "stages.finetune.train_llm: full cannot train a 4-/8-bit LLM "
                "(llm.quantization); use train_llm: lora (QLoRA) or frozen"
            )
        model.llm.requires_grad_(True)
    elif settings.train_llm == "lora":
        ensure_lora(model, settings.lora)  # applies LoRA, or re-enables a loaded adapter
    if settings.train_vision == "full":
        model.vision.requires_grad_(True)
    elif settings.train_vision == "last_n":
        unfreeze_last_vision_layers(model, settings.unfreeze_vision_layers)
    elif settings.train_vision == "lora":
        ensure_lora(model, settings.vision_lora, part="vision")
    if any(p.requires_grad for p in model.vision.parameters()):
        freeze_unreached(model.vision)


def freeze_unreached(vision: nn.Module) -> list[str]:
    """Freeze the trainable tower parameters its features never depend on (blocks after the
    feature layer, a pooling head): they would get no gradient, which DDP reports as an error.
    Found with one backward pass on a blank image; returns their names."""
    from PIL import Image

    trainable = {name: p for name, p in vision.named_parameters() if p.requires_grad}
    device = next(iter(trainable.values())).device
    pixels = vision.preprocess([Image.new("RGB", (8, 8))]).to(device)
    vision(pixels).float().sum().backward()
    unreached = [name for name, p in trainable.items() if p.grad is None]
    for name, param in trainable.items():
        param.grad = None
        if name in unreached:
            param.requires_grad_(False)
    return unreached


def param_groups(
    model: VisionLanguageModel, settings: AlignStage | FinetuneStage
) -> list[dict[str, Any]]:
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


def describe_trainable(model: VisionLanguageModel, stage: str) -> str:
    """One line per part: trainable / total parameters (what the stage trains and freezes)."""
    lines = [f"stage {stage}: trainable / total parameters"]
    for part in PARTS:
        params = list(getattr(model, part).parameters())
        total = sum(_numel(p) for p in params)
        trainable = sum(_numel(p) for p in params if p.requires_grad)
        state = "frozen" if trainable == 0 else "trains"
        lines.append(f"  {part:<9} {trainable:>13,} / {total:>13,}  {state}")
    return "\n".join(lines)


def _numel(parameter: torch.nn.Parameter) -> int:
    """Weights a parameter stands for: a 4-bit one stores two per byte (its quant state
    keeps the real shape)."""
    state = getattr(parameter, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()


def carry_connector(model: VisionLanguageModel, directory: Path) -> bool:
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


def ensure_lora(model: VisionLanguageModel, settings: LoraSettings, part: Part = "llm") -> None:
    """Apply LoRA to ``part``, or, when a loaded checkpoint already has it, make it trainable.

    A checkpoint adapted with other settings is an error (resume with the settings it used).
    """
    current = lora_settings(model, part)
    if current is None:
        apply_lora(model, settings, part)
        return
    if current != settings:
        raise ConfigError(
            f"the checkpoint's {part} LoRA uses {current.model_dump()} but the config asks for "
            f"{settings.model_dump()}; resume with the checkpoint's settings"
        )
    for name, param in getattr(*slot(model, part)).named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)


def unfreeze_last_vision_layers(model: VisionLanguageModel, n: int) -> list[nn.Parameter]:
    """Make the last ``n`` transformer blocks of each vision tower trainable; return their params.

    Blocks after the backbone's feature layer receive no gradient (e.g. the last block when
    ``feature_layer`` is -2).
    """
    params: list[nn.Parameter] = []
    for blocks in _vision_block_lists(model.vision):
        if not 1 <= n <= len(blocks):
            raise ConfigError(
                f"unfreeze_vision_layers={n} but the vision tower has {len(blocks)} blocks; "
                f"choose 1..{len(blocks)}"
            )
        for block in list(blocks)[-n:]:
            params.extend(block.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


def _vision_block_lists(vision: nn.Module) -> list[nn.Module]:
    """The transformer block list of every tower in ``vision`` (one per fused member)."""
    towers = [
        m.tower for m in vision.modules() if isinstance(m, VisionBackbone) and hasattr(m, "tower")
    ]
    if not towers:
        raise ConfigError("partial unfreezing needs a vision backbone with a `tower` module")
    return [_longest_block_list(tower) for tower in towers]


def _longest_block_list(tower: nn.Module) -> nn.Module:
    """The longest ModuleList/Sequential whose children are all blocks of one class."""
    best: nn.Module | None = None
    for module in tower.modules():
        children = list(module.children())
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or not children:
            continue
        blocks = len({type(c) for c in children}) == 1 and any(
            True for _ in children[0].parameters()
        )
        if blocks and (best is None or len(children) > len(list(best.children()))):
            best = module
    if best is None:
        raise ConfigError(f"found no block list in vision tower {type(tower).__name__}")
    return best
