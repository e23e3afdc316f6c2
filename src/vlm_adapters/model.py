"""VisionLanguageModel: vision backbone -> connector -> visual tokens spliced into the LLM."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from vlm_adapters._io import atomic_dir, package_versions, safetensors_problem
from vlm_adapters.chat.templates import IGNORE_INDEX, TEMPLATES
from vlm_adapters.components import build_connector, build_llm, build_vision
from vlm_adapters.config import ModelConfig, model_config_from_dict
from vlm_adapters.connectors import Connector
from vlm_adapters.data.processor import VLMProcessor
from vlm_adapters.errors import CheckpointError, ComponentError, ConfigError, TrustError
from vlm_adapters.llm import LLMBackend
from vlm_adapters.plugins import BUILTIN_PROVIDER, get_registry
from vlm_adapters.vision import VisionBackbone

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "vlm-adapters"


@dataclass
class VLMOutput:
    """``loss`` (mean over supervised tokens) and/or full ``logits`` ``[B, T, V]``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_tokens: int = 0


class VisionLanguageModel(nn.Module):
    """A LLaVA-style model composed of any registered vision backbone, connector and LLM."""

    def __init__(
        self,
        vision: VisionBackbone,
        connector: Connector,
        llm: LLMBackend,
        component_types: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.component_types = component_types or {}
        self.template: str | None = None  # chat template the model was trained with
        self.num_image_tokens = connector.num_output_tokens(vision.num_patches)

    @classmethod
    def from_config(cls, config: ModelConfig | dict[str, Any]) -> VisionLanguageModel:
        """Build (and, for hub ids or paths, load) every component named in ``config``."""
        if isinstance(config, dict):
            config = model_config_from_dict(config)
        vision = build_vision(config.vision)
        llm = build_llm(config.llm)
        connector = build_connector(
            config.connector,
            in_dim=vision.hidden_size,
            out_dim=llm.hidden_size,
            num_input_tokens=vision.num_patches,
        )
        types = {k: getattr(config, k).type for k in ("vision", "connector", "llm")}
        return cls(vision, connector, llm, types)

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.llm.image_token_id

    @property
    def processor(self) -> VLMProcessor:
        """Prompts and images -> model inputs for this model."""
        return VLMProcessor(
            self.tokenizer, self.vision.transform, self.num_image_tokens, self.llm.cfg.image_token
        )

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[I, 3, H, W]`` -> visual tokens ``[I, M, H_llm]``."""
        features = self.vision(pixel_values)  # [I, N, Dv]
        return self.connector(features.to(_dtype(self.connector, features.dtype)))  # [I, M, H]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with visual tokens written into the placeholder positions."""
        is_image = input_ids == self.image_token_id  # [B, T]
        embeds = self.llm.embed(input_ids.masked_fill(is_image, 0))  # [B, T, H]
        slots = int(is_image.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if slots:
                raise ValueError(f"input has {slots} image placeholder tokens but no pixel_values")
            return embeds
        visual = self.encode_images(pixel_values)  # [I, M, H]
        if slots != visual.shape[0] * visual.shape[1]:
            raise ValueError(
                f"image features and image tokens do not match: {slots} placeholder tokens for "
                f"{visual.shape[0]} images x {visual.shape[1]} tokens"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> VLMOutput:
        """Loss (head applied only at supervised positions) when ``labels`` are given, else logits.

        ``num_items_in_batch`` divides the summed loss instead of this batch's token count, so
        gradient accumulation and data parallelism weight every token equally.
        """
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.llm.body(embeds, attention_mask)  # [B, T, H]
        if labels is None:
            return VLMOutput(logits=self.llm.logits(hidden))
        targets = labels[:, 1:]  # [B, T-1]
        supervised = targets != IGNORE_INDEX
        logits = self.llm.logits(hidden[:, :-1][supervised]).float()  # [K, V]
        loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        count = int(supervised.sum())
        denom = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
        return VLMOutput(loss=loss / denom, num_tokens=count)

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids ``[B, new]`` for left-padded prompts (KV cache on by default)."""
        embeds = self.embed(input_ids, pixel_values)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.llm.model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )

    def generate(
        self, prompts: list[str], images: list[Any] | None = None, **generate_kwargs: Any
    ) -> list[str]:
        """Decoded answers for raw prompts (``<image>`` markers, one image entry per prompt)."""
        batch = self.processor(prompts, images, padding_side="left")
        device = self.llm.model.device
        batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
        ids = self.generate_ids(**batch, **generate_kwargs)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def save_pretrained(
        self, directory: str | Path, *, overwrite: bool = False, protect: tuple[Path, ...] = ()
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer, atomically.

        An earlier save to ``directory`` is replaced; other files there are kept. A non-empty
        directory we did not write is refused unless ``overwrite``, and ``protect`` (e.g. the
        checkpoint this model came from) is never written. With LoRA, ``model.safetensors``
        holds the base weights under their plain names and each adapter is written in peft's
        layout (``adapter/``, ``vision_adapter/``).
        """
        from vlm_adapters.training.lora import has_lora, save_lora

        with atomic_dir(directory, overwrite=overwrite, protect=protect) as tmp:
            self.llm.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
            (tmp / CONFIG_NAME).write_text(json.dumps(self.checkpoint_config(), indent=2))
            if has_lora(self):
                save_lora(self, tmp, WEIGHTS_NAME)
            else:
                save_model(self, str(tmp / WEIGHTS_NAME))
        return Path(directory)

    def checkpoint_config(self) -> dict[str, Any]:
        """Every component with the kwargs that rebuild it offline, plus package versions."""
        from vlm_adapters.training.lora import lora_checkpoint_config

        registry = get_registry()
        parts = {"vision": self.vision, "connector": self.connector, "llm": self.llm}
        sections = {
            k: {"type": self.component_types[k], **m.rebuild_kwargs()} for k, m in parts.items()
        }
        providers = {k: registry.get(k, self.component_types[k]).provider for k in parts}
        versions = package_versions(
            "vlm-adapters", "torch", "transformers", *set(providers.values())
        )
        lora = lora_checkpoint_config(self)
        template = {"template": self.template} if self.template else {}
        return {
            "format": FORMAT,
            **sections,
            **lora,
            **template,
            "providers": providers,
            "versions": versions,
        }

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, trust_remote_code: bool = False
    ) -> VisionLanguageModel:
        """Load a directory written by :meth:`save_pretrained` (no network access needed).

        Only JSON and safetensors are read. A checkpoint never enables code: one whose config
        asks for ``trust_remote_code`` is refused unless you pass ``trust_remote_code=True``,
        and one that names weights or files outside itself is refused.
        """
        directory = Path(directory)
        data = _read_checkpoint_config(directory)
        config = _checkpoint_model_config(data, directory, trust_remote_code)
        weights = directory / WEIGHTS_NAME
        problem = safetensors_problem(weights)
        if problem:
            raise CheckpointError(f"{problem}; the checkpoint is incomplete or corrupt")
        model = cls.from_config(config)
        try:
            if "lora" in data or "vision_lora" in data:
                from vlm_adapters.training.lora import load_lora

                load_lora(model, directory, data)
            else:
                load_model(model, str(weights), strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"{weights}: the weights do not fit the model its config.json describes "
                f"({str(error).strip().splitlines()[0][:200]})"
            ) from None
        model.template = data.get("template")
        return model


def _dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None else default


def _read_checkpoint_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a vlm-adapters checkpoint?")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{path}: not a vlm-adapters checkpoint (format={found!r})")
    return data


def _checkpoint_model_config(
    data: dict[str, Any], directory: Path, trust_remote_code: bool
) -> ModelConfig:
    """The checkpoint's sections, validated, with nothing in them that runs code or reads
    outside the checkpoint; the tokenizer is the checkpoint's own."""
    where = str(directory / CONFIG_NAME)
    for kind in ("vision", "connector", "llm"):
        if not isinstance(data.get(kind), dict) or "type" not in data[kind]:
            raise CheckpointError(f"{where}: no valid `{kind}` section; the file is corrupt")
    _require_components(data)
    asks = _asks_for_remote_code(data)
    if asks and not trust_remote_code:
        raise TrustError(
            f"{where} asks to run code shipped with the model ({asks}: true); vlm-adapters never "
            "takes that from a checkpoint: if you trust where it came from, pass "
            "--trust-remote-code (Python: trust_remote_code=True)"
        )
    if "tokenizer" in data["llm"]:
        raise TrustError(f"{where}: llm.tokenizer names a tokenizer outside the checkpoint")
    if data.get("template") is not None and data["template"] not in TEMPLATES:
        raise CheckpointError(f"{where}: unknown chat template {data['template']!r}")
    sections = {k: data[k] for k in ("vision", "connector", "llm")}
    sections["llm"] = {**sections["llm"], "tokenizer": str(directory / TOKENIZER_DIR)}
    try:
        config = model_config_from_dict(sections, where)
    except ConfigError as error:
        raise CheckpointError(f"{error}") from None
    for kind in ("vision", "connector", "llm"):
        outside = {
            k: v for k, v in getattr(config, kind).params.sources().items() if k != "tokenizer"
        }
        if outside:
            key, value = next(iter(outside.items()))
            raise TrustError(
                f"{where}: {kind}.{key} = {value!r} would load weights or files from outside "
                "the checkpoint, which carries its own; refusing to load it"
            )
    return config


def _asks_for_remote_code(value: Any, where: str = "") -> str | None:
    """The first ``trust_remote_code: true`` anywhere in ``value`` (its dotted key), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "trust_remote_code" and item:
                return here
            found = _asks_for_remote_code(item, here)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _asks_for_remote_code(item, f"{where}[{index}]")
            if found:
                return found
    return None


def _require_components(data: dict[str, Any]) -> None:
    """Name the plugin package to install when a checkpoint's component is missing."""
    registry = get_registry()
    for kind in ("vision", "connector", "llm"):
        name = data[kind]["type"]
        try:
            registry.get(kind, name)
        except ComponentError:
            provider = data.get("providers", {}).get(kind, "unknown")
            if provider == BUILTIN_PROVIDER:
                raise ComponentError(
                    f"this checkpoint needs the {kind} component {name!r}, which this version "
                    f"of vlm-adapters does not have; it may come from a newer version"
                ) from None
            raise ComponentError(
                f"this checkpoint needs the {kind} component {name!r}, which its config.json "
                f"says comes from the package {provider!r}; it is not installed: if you trust "
                f"it, run `pip install {provider}`"
            ) from None
