"""LoRA through peft, scoped to one part of the model (the LLM, optionally the vision tower).

peft wraps only the chosen module (the LLM backend's ``ADAPTABLE`` module, or
``model.vision``) and receives the full names of the layers to adapt inside it, so a name
shared with another part (``q_proj`` exists in CLIP too) can never put LoRA layers on the
vision tower or the connector.

Checkpoints stay complete: ``model.safetensors`` holds every non-LoRA weight under the names
the plain model uses, and each adapter lives in peft's own layout (``adapter/`` for the LLM,
``vision_adapter/`` for the vision tower).

QLoRA: when the LLM's linear layers are bitsandbytes 4-/8-bit layers (``llm.quantization``),
peft's k-bit preparation runs before the adapters are attached, ``model.safetensors`` stores
those layers as bitsandbytes serializes them (packed weights plus their quantization
statistics, under the plain names), loading checks every stored statistic against what the
recorded settings produce before handing it to bitsandbytes, and merging dequantizes (that
bitsandbytes side is :mod:`vlm_adapters.model.lora_bnb`).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from vlm_adapters._io import safetensors_problem
from vlm_adapters.errors import CheckpointError, ConfigError
from vlm_adapters.model.files import WEIGHTS_NAME
from vlm_adapters.model.lora_bnb import load_quantized, merge_into_dequantized, stored_layer
from vlm_adapters.quantization import quantized_layers, warn_dequantizing

if TYPE_CHECKING:
    from vlm_adapters.model.core import VisionLanguageModel

Part = Literal["llm", "vision"]
PARTS: tuple[Part, ...] = ("llm", "vision")
ADAPTER_DIRS: dict[Part, str] = {"llm": "adapter", "vision": "vision_adapter"}
CONFIG_KEYS: dict[Part, str] = {"llm": "lora", "vision": "vision_lora"}
_SETTINGS_ATTR = "vlm_lora_settings"


class LoraSettings(BaseModel):
    """LoRA hyper-parameters (LLaVA-1.5 defaults: r 128, alpha 256, dropout 0.05)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(128, ge=1, description="Rank of the low-rank update.")
    alpha: int = Field(256, ge=1, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="`all-linear` (every linear layer except the output head) or module names "
        "such as [q_proj, v_proj], matched against the end of each module's path inside the part.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases train: none, all (of the adapted part), lora_only."
    )

    def peft_config(self, targets: list[str]) -> Any:
        """A peft config for the resolved full module names ``targets``."""
        from peft import LoraConfig  # peft (and accelerate) load only when LoRA is used

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=self.bias,
        )


def target_module_names(module: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names, inside ``module``, of the layers ``settings`` selects (never the output head)."""
    head = _output_head(module)
    wanted = settings.target_modules
    skipped = _direct_weight_readers(module)
    names = []
    for name, sub in module.named_modules():
        if not name or sub is head or name in skipped:
            continue
        if wanted == "all-linear":
            hit = isinstance(sub, _linear_types())
        else:
            hit = any(name == t or name.endswith(f".{t}") for t in wanted)
        if hit:
            names.append(name)
    if not names:
        raise ConfigError(
            f"LoRA target_modules {wanted!r} matched no layer; linear layers here are named e.g. "
            f"{sorted(_leaf_linear_names(module))[:8]}"
        )
    return names


def _direct_weight_readers(module: nn.Module) -> set[str]:
    """Layers whose weight their parent reads directly, so a LoRA on them would be ignored
    (or is refused by peft): nn.MultiheadAttention's ``out_proj``, and a Mamba mixer's
    ``out_proj`` and ``conv1d`` (a mixer is a module with both ``in_proj`` and ``conv1d``)."""
    found = set()
    for name, sub in module.named_modules():
        children = dict(sub.named_children())
        prefix = f"{name}." if name else ""
        if isinstance(sub, nn.MultiheadAttention):
            found |= {prefix + child for child in children}
        elif "in_proj" in children and "conv1d" in children:
            found |= {prefix + child for child in ("out_proj", "conv1d") if child in children}
    return found


def apply_lora(model: VisionLanguageModel, settings: LoraSettings, part: Part = "llm") -> None:
    """Wrap ``part`` (default: the LLM) with LoRA adapters.

    Freezes the base weights of that part only and makes its LoRA parameters trainable; the
    connector and the other part keep their ``requires_grad`` (the training stage decides).
    """
    owner, attr = slot(model, part)
    inner = getattr(owner, attr)
    from peft import PeftModel, get_peft_model

    if isinstance(inner, PeftModel):
        raise ValueError(f"LoRA is already applied to the {part}; apply it once per model")
    if quantized_layers(inner):  # QLoRA: freeze, upcast the unquantized weights to float32
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(inner, use_gradient_checkpointing=False)
    wrapped = get_peft_model(inner, settings.peft_config(target_module_names(inner, settings)))
    setattr(wrapped, _SETTINGS_ATTR, settings)
    setattr(owner, attr, wrapped)


def lora_parts(model: VisionLanguageModel) -> list[Part]:
    """The parts of ``model`` that carry LoRA adapters."""
    return [part for part in PARTS if _is_peft(getattr(*slot(model, part)))]


def has_lora(model: VisionLanguageModel) -> bool:
    return bool(lora_parts(model))


@contextlib.contextmanager
def adapters_disabled(model: VisionLanguageModel) -> Iterator[None]:
    """Inside, every LoRA adapter of ``model`` is switched off (peft's ``disable_adapter``):
    the model computes as its base weights."""
    with contextlib.ExitStack() as stack:
        for part in lora_parts(model):
            stack.enter_context(getattr(*slot(model, part)).disable_adapter())
        yield


def is_quantized(model: VisionLanguageModel) -> bool:
    """Whether bitsandbytes 4-/8-bit layers hold some of ``model``'s weights (QLoRA)."""
    return bool(quantized_layers(model))


def lora_settings(model: VisionLanguageModel, part: Part = "llm") -> LoraSettings | None:
    """The settings ``part`` was adapted with, or None."""
    return getattr(getattr(*slot(model, part)), _SETTINGS_ATTR, None)


def lora_checkpoint_config(model: VisionLanguageModel) -> dict[str, Any]:
    """``{"lora": {...}, "vision_lora": {...}}`` entries for the parts that carry LoRA."""
    return {CONFIG_KEYS[p]: lora_settings(model, p).model_dump() for p in lora_parts(model)}


def mark_lora_trainable(model: VisionLanguageModel) -> list[nn.Parameter]:
    """Set ``requires_grad`` on every LoRA parameter (e.g. after loading to resume); return them."""
    params = [p for name, p in model.named_parameters() if ".lora_" in name]
    for param in params:
        param.requires_grad_(True)
    return params


def base_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor under the name it has without LoRA; tied duplicates dropped."""
    prefixes = [_prefix(model, part) for part in lora_parts(model)]
    quantized = _quantized_prefixes(model, prefixes)
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        if ".lora_" in key:
            continue
        clean = _clean_key(key, prefixes)
        if stored_layer(clean, quantized) is not None:  # own copies: statistics may share memory
            state[clean] = tensor.detach().clone()
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:  # tied weights: the loader restores the tie
            continue
        seen.add(ident)
        state[clean] = tensor.detach().contiguous()
    return state


def save_lora(model: VisionLanguageModel, directory: Path, weights_name: str) -> None:
    """Write the base weights to ``weights_name`` and each adapter in peft's layout."""
    save_file(base_state_dict(model), str(directory / weights_name), metadata={"format": "pt"})
    for part in lora_parts(model):
        wrapped = getattr(*slot(model, part))
        wrapped.save_pretrained(str(directory / ADAPTER_DIRS[part]), save_embedding_layers=False)


def load_lora(model: VisionLanguageModel, directory: Path, config: dict[str, Any]) -> None:
    """Attach the adapters a checkpoint's ``config.json`` lists and load every weight.

    The adapters are built from the validated settings in ``config.json`` (peft never reads
    the checkpoint's own files) and filled from safetensors only; they load frozen.
    """
    for part in PARTS:
        if CONFIG_KEYS[part] not in config:
            continue
        try:
            settings = LoraSettings(**config[CONFIG_KEYS[part]])
        except (TypeError, ValidationError) as error:
            raise CheckpointError(
                f"{directory}/config.json: invalid {CONFIG_KEYS[part]} settings ({error})"
            ) from None
        apply_lora(model, settings, part)
    load_weights(model, directory, WEIGHTS_NAME)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(False)


def load_weights(model: VisionLanguageModel, directory: Path, weights_name: str) -> None:
    """Load a saved directory's weights into a live model that carries the same adapters.

    The base weights come from ``weights_name`` under their plain names, each adapter from its
    peft-layout folder. A missing, unknown or truncated piece is a CheckpointError.
    """
    prefixes = [_prefix(model, part) for part in lora_parts(model)]
    live = {_clean_key(k, prefixes): k for k in model.state_dict() if ".lora_" not in k}
    base = _load_safetensors(Path(directory) / weights_name)
    unknown = sorted(set(base) - set(live))
    if unknown:
        raise CheckpointError(f"{directory}: weights do not fit this model, e.g. {unknown[0]!r}")
    absent = sorted(set(base_state_dict(model)) - set(base))
    if absent:
        raise CheckpointError(f"{directory}/{weights_name} lacks weights, e.g. {absent[0]!r}")
    load_quantized(_quantized_prefixes(model, prefixes), base, Path(directory) / weights_name)
    model.load_state_dict({live[k]: v for k, v in base.items()}, strict=False)
    for part in lora_parts(model):
        path = Path(directory) / ADAPTER_DIRS[part] / "adapter_model.safetensors"
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(getattr(*slot(model, part)), _load_safetensors(path))
        if result.unexpected_keys:
            raise CheckpointError(
                f"{path}: adapter does not fit, e.g. {result.unexpected_keys[0]!r}"
            )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    problem = safetensors_problem(path)
    if problem:
        raise CheckpointError(f"{problem}; the checkpoint is incomplete or corrupt")
    return load_file(str(path))


def merge_lora(model: VisionLanguageModel) -> VisionLanguageModel:
    """Fold every adapter into its base weights; the parts become plain modules again.

    A quantized LLM is dequantized (with a warning): each adapted layer becomes a plain
    linear layer holding its dequantized weight plus the adapter's update, computed in
    float32, then the LLM is cast back to its ``dtype``; a quantized model without adapters
    is only dequantized.
    """
    parts = lora_parts(model)
    quantized = is_quantized(model)
    if not parts and not quantized:
        raise ValueError("nothing to merge: this model has no LoRA adapters")
    if quantized:
        warn_dequantizing("merge")
    for part in parts:
        owner, attr = slot(model, part)
        wrapped = getattr(owner, attr)
        merge_into_dequantized(wrapped)
        setattr(owner, attr, wrapped.merge_and_unload())
    if quantized:
        model.llm.dequantize()
    return model


def _quantized_prefixes(model: nn.Module, prefixes: list[str]) -> dict[str, nn.Module]:
    """Each bitsandbytes layer under its plain name (``llm.model.x.q_proj``)."""
    return {
        _clean_key(f"{name}.weight", prefixes)[: -len(".weight")]: layer
        for name, layer in quantized_layers(model).items()
    }


def slot(model: VisionLanguageModel, part: Part) -> tuple[nn.Module, str]:
    """The (owner, attribute) that holds the module LoRA wraps for ``part``."""
    if part == "llm":
        return model.llm, model.llm.ADAPTABLE
    if part == "vision":
        return model, "vision"
    raise ValueError(f"unknown LoRA part {part!r}; choose one of {PARTS}")


def _prefix(model: VisionLanguageModel, part: Part) -> str:
    return f"llm.{model.llm.ADAPTABLE}." if part == "llm" else "vision."


def _clean_key(key: str, prefixes: list[str]) -> str:
    """``llm.model.base_model.model.x.q_proj.base_layer.weight`` -> ``llm.model.x.q_proj.weight``"""
    for prefix in prefixes:
        if key.startswith(prefix + "base_model.model."):
            rest = key[len(prefix + "base_model.model.") :]
            return prefix + re.sub(r"(^|\.)base_layer\.", r"\1", rest)
    return key


def _output_head(module: nn.Module) -> nn.Module | None:
    getter = getattr(module, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _leaf_linear_names(module: nn.Module) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, sub in module.named_modules()
        if isinstance(sub, _linear_types())
    }


def _is_peft(module: nn.Module) -> bool:
    """Whether ``module`` is a peft wrapper (checked without importing peft when it is not)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(module, PeftModel)


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)
