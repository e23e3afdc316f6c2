"""Any transformers vision model (CLIP, SigLIP/SigLIP2, DINOv2, ...) as a vision backbone."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from vlm_adapters._transformers import check_inline_config, inline_config, load_or_explain
from vlm_adapters.errors import ConfigError
from vlm_adapters.vision.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    VisionBackbone,
    VisionConfig,
    select_layers,
)

_DEFAULT_NORM = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
}


class HFVisionConfig(VisionConfig):
    """A transformers vision tower, from a hub id / local path or an inline config."""

    model: str | None = Field(None, description="Hub id or local directory of the checkpoint.")
    config: dict[str, Any] | None = Field(
        None, description="Inline transformers config (with `model_type`); random weights."
    )
    feature_layer: int | list[int] = Field(
        -2, description="Hidden-state index to use, or a list of indices to concatenate."
    )
    image_size: int | None = Field(None, description="Input resolution; default: the model's.")
    image_mean: tuple[float, float, float] | None = Field(
        None, description="Override normalisation."
    )
    image_std: tuple[float, float, float] | None = Field(
        None, description="Override normalisation."
    )
    revision: str | None = Field(None, description="Hub revision of `model`.")
    dtype: str | None = Field(None, description="e.g. float32, bfloat16; default: float32.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint.")

    _inline = field_validator("config")(check_inline_config)

    def sources(self) -> dict[str, Any]:
        """The hub id / path of the weights, when set."""
        return {"model": self.model} if self.model else {}

    @model_validator(mode="after")
    def _one_source(self) -> HFVisionConfig:
        if (self.model is None) == (self.config is None):
            raise ValueError("set exactly one of `model` (hub id or path) or `config` (inline)")
        return self

    def hf_config(self) -> Any:
        """The transformers config of the vision tower (the vision part of a CLIP/SigLIP)."""
        from transformers import AutoConfig

        if self.config is not None:
            config = inline_config(self.config, "vision.config")
        else:
            config = load_or_explain(
                "vision.model",
                self.model,
                lambda: AutoConfig.from_pretrained(
                    self.model, revision=self.revision, trust_remote_code=self.trust_remote_code
                ),
            )
        return getattr(config, "vision_config", config)

    def probe(self) -> tuple[int, int]:
        """``(num_patches, hidden_size)`` from the config alone, without building the model."""
        config = self.hf_config()
        check_feature_layers(self.feature_layer, config.num_hidden_layers + 1)
        size = self.image_size or _default_size(config)
        width = config.hidden_size * (
            1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        )
        return (size // config.patch_size) ** 2, width


class HFVisionBackbone(VisionBackbone):
    """Hidden states of a transformers vision model, prefix tokens dropped."""

    def __init__(self, cfg: HFVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        config = cfg.hf_config()
        check_feature_layers(cfg.feature_layer, config.num_hidden_layers + 1)
        self.tower = _build_tower(cfg, config)
        size = cfg.image_size or _default_size(config)
        self.grid = size // config.patch_size
        self.num_patches = self.grid**2
        self.num_prefix = num_prefix_tokens(self.tower)
        width = config.hidden_size
        self.hidden_size = width * (
            1 if isinstance(cfg.feature_layer, int) else len(cfg.feature_layer)
        )
        self.transform = _transform_for(cfg, config, size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        hidden = out.hidden_states  # tuple of [B, P + N, D]
        if hidden[0].shape[1] != self.num_prefix + self.num_patches:
            raise ConfigError(
                f"vision tower returned {hidden[0].shape[1]} tokens, expected {self.num_prefix} "
                f"prefix + {self.num_patches} patches; check `image_size`"
            )
        return select_layers(hidden, self.cfg.feature_layer, self.num_prefix)  # [B, N, D]

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (weights loaded separately)."""
        exclude = {"model", "revision", "trust_remote_code"}
        kwargs = self.cfg.model_dump(exclude=exclude, exclude_none=True)
        mean, std = list(self.transform.mean), list(self.transform.std)
        config = self.tower.config.to_dict()
        config.pop("dtype", None)
        return {**kwargs, "config": config, "image_mean": mean, "image_std": std}


def check_feature_layers(layers: int | list[int], count: int) -> None:
    """``feature_layer`` must index one of the ``count`` hidden states (embeddings + blocks)."""
    for layer in [layers] if isinstance(layers, int) else layers:
        if not -count <= layer < count:
            raise ConfigError(
                f"vision.feature_layer: {layer} is out of range; this tower has {count} hidden "
                f"states (embeddings + {count - 1} blocks), so use -{count}..{count - 1}"
            )


def _default_size(config: Any) -> int:
    return 224 if config.model_type.startswith("dinov2") else config.image_size


def _build_tower(cfg: HFVisionConfig, config: Any) -> nn.Module:
    from transformers import AutoModel

    dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
    if cfg.model is None:
        return AutoModel.from_config(config, dtype=dtype)
    return load_or_explain(
        "vision.model",
        cfg.model,
        lambda: AutoModel.from_pretrained(
            cfg.model,
            config=config,
            revision=cfg.revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        ),
    )


def num_prefix_tokens(tower: nn.Module) -> int:
    """How many non-patch tokens (CLS, registers) the tower puts before the patches."""
    embeddings = next(m for n, m in tower.named_modules() if n.endswith("embeddings"))
    count = int(any(hasattr(embeddings, a) for a in ("class_embedding", "cls_token")))
    registers = getattr(embeddings, "register_tokens", None)
    return count + (registers.shape[-2] if registers is not None else 0)


def _transform_for(cfg: HFVisionConfig, config: Any, size: int) -> ImageTransform:
    mean, std = _DEFAULT_NORM.get(config.model_type, (CLIP_MEAN, CLIP_STD))
    crop = not config.model_type.startswith("siglip")
    if cfg.model is not None:
        processor = _load_processor(cfg)
        if processor is not None:
            mean = tuple(processor.image_mean)
            std = tuple(processor.image_std)
    mean, std = cfg.image_mean or mean, cfg.image_std or std
    resize = int(size * 256 / 224) if config.model_type.startswith("dinov2") else size
    return ImageTransform(crop_size=size, resize=resize, mean=mean, std=std, crop=crop)


def _load_processor(cfg: HFVisionConfig) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(cfg.model, revision=cfg.revision)
    except (OSError, ValueError):
        return None
