"""Any transformers vision model (CLIP, SigLIP/SigLIP2, DINOv2, ...) as a vision backbone.

Its preprocessing is the tower's own transformers image processor (:class:`ProcessorTransform`):
the checkpoint's ``AutoImageProcessor`` for a hub id / local path, else the one transformers
would ship with the tower (CLIP: resize the shortest side and crop the centre; SigLIP: resize
to a square; DINOv2: resize to 256/224 of the size and crop). Export writes that processor, so
the pixels a transformers LLaVA sees are ours, bit for bit.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator
from torch import nn

from vlm_adapters._transformers import check_inline_config, inline_config, load_or_explain
from vlm_adapters.errors import ComponentError, ConfigError
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
    image_processor: dict[str, Any] | None = Field(
        None,
        description="Inline transformers image-processor config (a preprocessor_config.json, "
        "with `image_processor_type`); default: the checkpoint's own, else the tower's standard "
        "one. `image_size`, `image_mean` and `image_std` override it.",
    )
    revision: str | None = Field(None, description="Hub revision of `model`.")
    dtype: str | None = Field(None, description="e.g. float32, bfloat16; default: float32.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint.")

    _inline = field_validator("config")(check_inline_config)

    @field_validator("image_processor")
    @classmethod
    def _processor_type(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        check_inline_config(value, "image_processor")
        if value is not None and not isinstance(value.get("image_processor_type"), str):
            raise ValueError(
                "an inline image processor needs `image_processor_type` (e.g. CLIPImageProcessor)"
            )
        return value

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
        size = self.image_size or _inline_size(self.image_processor) or _default_size(config)
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
        self.transform = ProcessorTransform.of(_image_processor(cfg, config))
        size = self.transform.crop_size
        self.grid = size // config.patch_size
        self.num_patches = self.grid**2
        self.num_prefix = num_prefix_tokens(self.tower)
        width = config.hidden_size
        self.hidden_size = width * (
            1 if isinstance(cfg.feature_layer, int) else len(cfg.feature_layer)
        )

    @property
    def image_processor(self) -> Any:
        """The transformers image processor that preprocesses for this tower."""
        return self.transform.processor

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
        """Keyword arguments that rebuild this architecture offline (weights loaded separately).

        The image processor is written out in full (``image_processor``) unless it is the
        standard one for the tower, which ``image_size`` / ``image_mean`` / ``image_std`` rebuild.
        """
        exclude = {"model", "revision", "trust_remote_code", "image_processor"}
        kwargs = self.cfg.model_dump(exclude=exclude, exclude_none=True)
        config = self.tower.config.to_dict()
        config.pop("dtype", None)
        kwargs["config"] = config
        t = self.transform
        standard = _standard_processor(self.tower.config, t.crop_size, t.mean, t.std)
        if processor_config(processor_from_config(standard)) != t.processor_config():
            for key in ("image_size", "image_mean", "image_std"):
                kwargs.pop(key, None)
            return {**kwargs, "image_processor": t.processor_config()}
        if t.crop_size != _default_size(self.tower.config):
            kwargs["image_size"] = t.crop_size
        return {**kwargs, "image_mean": list(t.mean), "image_std": list(t.std)}


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


_RESAMPLING = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
"""PIL resampling codes (an image processor's ``resample``) -> torchvision interpolation names."""


@dataclass(frozen=True, eq=False)
class ProcessorTransform(ImageTransform):
    """A transformers image processor as an :class:`ImageTransform`: PIL image (any mode) ->
    exactly the processor's ``pixel_values`` for it.

    The inherited fields describe the processor (output size, shortest-side resize, centre
    crop, mean/std, resampling) for code that needs the geometry; the pixels come from
    ``processor`` alone. Two are equal when their processor configs are.
    """

    processor: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, processor: Any) -> ProcessorTransform:
        """Wrap ``processor``; a ConfigError when it does not give square images."""
        data = processor_config(processor)
        size, resize, crop = processor_geometry(data)
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if data.get("do_normalize"):
            mean, std = _triple(data.get("image_mean", 0.0)), _triple(data.get("image_std", 1.0))
        interpolation = _interpolation(data.get("resample"))
        return cls(size, resize, mean, std, crop, interpolation, processor=processor)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.batch([image])[0]  # [3, H, W]

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, H, W]``: the processor's ``pixel_values`` for ``images`` in one call."""
        images = list(images)
        if not getattr(self.processor, "do_convert_rgb", True):
            images = [image.convert("RGB") for image in images]  # the [3, H, W] contract
        out = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return out.float()

    def with_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
        data = {**self.processor_config(), "image_mean": list(mean), "image_std": list(std)}
        return ProcessorTransform.of(processor_from_config({**data, "do_normalize": True}))

    def processor_config(self) -> dict[str, Any]:
        """The processor's JSON config (``preprocessor_config.json``); rebuilds it offline."""
        return processor_config(self.processor)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProcessorTransform):
            return NotImplemented
        return self.processor_config() == other.processor_config()

    def __hash__(self) -> int:
        return hash(json.dumps(self.processor_config(), sort_keys=True))


def processor_config(processor: Any) -> dict[str, Any]:
    """An image processor's config as plain JSON, without the processor it belonged to."""
    data = json.loads(processor.to_json_string())
    data.pop("processor_class", None)
    return data


def processor_from_config(data: dict[str, Any]) -> Any:
    """The image processor transformers' ``AutoImageProcessor`` loads from ``data`` (so the
    class, and its backend, are the ones ``AutoProcessor`` picks for an export)."""
    from transformers import AutoImageProcessor

    check_inline_config(data, "image_processor")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(data))
        try:
            return AutoImageProcessor.from_pretrained(tmp)
        except (OSError, ValueError, TypeError) as error:
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            raise ComponentError(
                f"vision.image_processor: transformers cannot build "
                f"{data.get('image_processor_type')!r}: {first or type(error).__name__}"
            ) from None


def processor_geometry(data: dict[str, Any]) -> tuple[int, int | None, bool]:
    """``(output size, shortest-side resize or None, centre crop)`` of an image processor
    config; a ConfigError unless every image comes out square."""
    size = _size_dict(data.get("size"))
    crop = bool(data.get("do_center_crop"))
    out = _size_dict(data.get("crop_size")) if crop else size
    height, width = out.get("height"), out.get("width")
    resized = data.get("do_resize", True) or crop
    if not resized or not isinstance(height, int) or height != width:
        kind = data.get("image_processor_type", "image processor")
        shape = out or "the input size"
        raise ConfigError(
            f"vision: the {kind} gives {shape} images, not a fixed square; set `image_size` or "
            "an inline `image_processor` with a square `size` (or `crop_size` with centre crop)"
        )
    resize = size.get("shortest_edge")
    if resize is None and size.get("height") == size.get("width"):
        resize = size.get("height")
    return height, (resize if crop else None), crop


def _size_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, int):  # legacy configs: one number for a square
        return {"height": value, "width": value}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if v is not None}


def _interpolation(resample: Any) -> str:
    """Torchvision's name for a processor's ``resample`` (PIL code or interpolation mode)."""
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value
    return _RESAMPLING.get(value, "bilinear")  # transformers' default for a missing one


def _triple(value: Any) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    return (values[0], values[1], values[2])


def _inline_size(data: dict[str, Any] | None) -> int | None:
    """Output size of an inline image processor config, when it gives squares."""
    if data is None:
        return None
    try:
        return processor_geometry(data)[0]
    except ConfigError:
        return None


def _image_processor(cfg: HFVisionConfig, config: Any) -> Any:
    """The tower's image processor (inline config, else the checkpoint's, else the standard one
    for its model type) with the ``image_size`` / ``image_mean`` / ``image_std`` overrides."""
    data = None
    if cfg.image_processor is not None:  # as transformers reads it (legacy keys, int sizes)
        data = processor_config(processor_from_config(cfg.image_processor))
    elif cfg.model is not None:
        loaded = _load_processor(cfg)
        data = processor_config(loaded) if loaded is not None else None
    if data is None:
        data = _standard_processor(config, cfg.image_size or _default_size(config))
    if cfg.image_size is not None:
        data = _resized(data, cfg.image_size)
    if cfg.image_mean is not None or cfg.image_std is not None:
        mean = cfg.image_mean or _triple(data.get("image_mean", 0.0))
        std = cfg.image_std or _triple(data.get("image_std", 1.0))
        data = {**data, "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}
    return processor_from_config(data)


def _standard_processor(
    config: Any,
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The image processor config transformers ships with such a tower, at ``size``."""
    default_mean, default_std = _DEFAULT_NORM.get(config.model_type, (CLIP_MEAN, CLIP_STD))
    mean, std = mean or default_mean, std or default_std
    square = {"height": size, "width": size}
    common = {
        "image_mean": list(mean),
        "image_std": list(std),
        "resample": 3,  # bicubic
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    if config.model_type.startswith("siglip"):
        return {"image_processor_type": "SiglipImageProcessor", "size": square, **common}
    kind, resize = "CLIPImageProcessor", size
    if config.model_type.startswith("dinov2"):
        kind, resize = "BitImageProcessor", int(size * 256 / 224)
    return {
        "image_processor_type": kind,
        "size": {"shortest_edge": resize},
        "do_center_crop": True,
        "crop_size": square,
        **common,
    }


def _resized(data: dict[str, Any], size: int) -> dict[str, Any]:
    """``data`` giving ``size`` x ``size`` images; a resize before a crop keeps its ratio."""
    try:
        current, _, crop = processor_geometry(data)
    except ConfigError:
        current, crop = None, bool(data.get("do_center_crop"))
    if current == size:
        return data
    square = {"height": size, "width": size}
    if not crop:
        return {**data, "do_resize": True, "size": square}
    old = _size_dict(data.get("size"))
    ratio = size / current if current else 1.0
    resized = {k: int(v * ratio) for k, v in old.items() if isinstance(v, int)}
    return {**data, "crop_size": square, "size": resized or {"shortest_edge": size}}


def _load_processor(cfg: HFVisionConfig) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(cfg.model, revision=cfg.revision)
    except (OSError, ValueError):
        return None
