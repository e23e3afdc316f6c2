"""Any transformers vision model (CLIP, SigLIP/SigLIP2, DINOv2, ...) as a vision backbone.

Its preprocessing is the tower's own transformers image processor (:class:`ProcessorTransform`):
the checkpoint's ``AutoImageProcessor`` for a hub id / local path, else the one transformers
would ship with the tower (CLIP: resize the shortest side and crop the centre; SigLIP: resize
to a square; DINOv2: resize to 256/224 of the size and crop). Export writes that processor, so
the pixels a transformers LLaVA sees are ours, bit for bit.

A SigLIP2 NaFlex tower (``siglip2_vision_model``) encodes each image at its own aspect ratio:
its processor resizes the image to at most ``max_num_patches`` patches and pads the patch
sequence (:class:`NaFlexTransform`); the tower gets the patch mask and each image's patch grid,
and every image gives as many visual tokens as it has patches.
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

from vlm_adapters._transformers import (
    check_dtype,
    check_inline_config,
    inline_config,
    load_or_explain,
)
from vlm_adapters.errors import ComponentError, ConfigError
from vlm_adapters.vision.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBatch,
    ImageTransform,
    Size,
    VariableTransform,
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
    image_size: int | None = Field(
        None,
        description="Input resolution; default: the model's. Only a tower that resizes its "
        "position embeddings (DINOv2) takes another size than its config's image_size.",
    )
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
    max_num_patches: int | None = Field(
        None,
        ge=1,
        description="NaFlex towers (SigLIP2): most patches per image, each image resized to "
        "fit with its aspect ratio kept; default: the checkpoint's processor's, else 256.",
    )
    revision: str | None = Field(None, description="Hub revision of `model`.")
    dtype: str | None = Field(None, description="e.g. float32, bfloat16; default: float32.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint.")

    _inline = field_validator("config")(check_inline_config)
    _dtype = field_validator("dtype")(check_dtype)

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
        """``(num_patches, hidden_size)`` from the config alone, without building the model
        (for a NaFlex tower: the most patches per image)."""
        config = self.hf_config()
        check_feature_layers(self.feature_layer, config.num_hidden_layers + 1)
        check_resolution_options(self, config)
        width = config.hidden_size * (
            1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        )
        if is_naflex(config):
            inline = (self.image_processor or {}).get("max_num_patches")
            return self.max_num_patches or inline or NAFLEX_PATCHES, width
        size = self.image_size or _inline_size(self.image_processor) or _default_size(config)
        return (size // config.patch_size) ** 2, width

    def native_resolution(self) -> bool:
        return is_naflex(self.hf_config())


class HFVisionBackbone(VisionBackbone):
    """Hidden states of a transformers vision model, prefix tokens dropped."""

    def __init__(self, cfg: HFVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        config = cfg.hf_config()
        check_feature_layers(cfg.feature_layer, config.num_hidden_layers + 1)
        check_resolution_options(cfg, config)
        self.tower = _build_tower(cfg, config)
        processor = _image_processor(cfg, config)
        self.transform: ProcessorTransform | NaFlexTransform
        if is_naflex(config):
            self.transform = NaFlexTransform.of(processor, config.patch_size)
            self.num_patches = self.transform.max_num_patches
        else:
            self.transform = ProcessorTransform.of(processor)
            self.num_patches = (self.transform.crop_size // config.patch_size) ** 2
        self.num_prefix = num_prefix_tokens(self.tower)
        width = config.hidden_size
        self.hidden_size = width * (
            1 if isinstance(cfg.feature_layer, int) else len(cfg.feature_layer)
        )

    @property
    def image_processor(self) -> Any:
        """The transformers image processor that preprocesses for this tower."""
        return self.transform.processor

    def features(self, pixel_values: torch.Tensor | ImageBatch) -> torch.Tensor:
        if isinstance(self.transform, NaFlexTransform):
            return self._naflex_features(pixel_values)
        if isinstance(pixel_values, ImageBatch):
            raise TypeError(f"a {self.tower.config.model_type!r} tower takes [B, 3, H, W] pixels")
        out = self.tower(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        hidden = out.hidden_states  # tuple of [B, P + N, D]
        if hidden[0].shape[1] != self.num_prefix + self.num_patches:
            raise ConfigError(
                f"vision tower returned {hidden[0].shape[1]} tokens, expected {self.num_prefix} "
                f"prefix + {self.num_patches} patches; check `image_size`"
            )
        return select_layers(hidden, self.cfg.feature_layer, self.num_prefix)  # [B, N, D]

    def _naflex_features(self, images: torch.Tensor | ImageBatch) -> torch.Tensor:
        """Padded patch sequences ``[I, P, 3*p*p]`` -> ``[I, P, D]``, the padding masked."""
        if not isinstance(images, ImageBatch):
            raise TypeError("a NaFlex tower takes the ImageBatch its transform makes")
        values = images.values.to(self.dtype)
        grids = [self.transform.patch_grid(size) for size in images.sizes]
        shapes = torch.tensor(grids, dtype=torch.long, device=values.device)  # [I, 2]
        positions = torch.arange(values.shape[1], device=values.device)
        mask = (positions[None] < shapes.prod(-1)[:, None]).to(torch.int32)  # [I, P]
        out = self.tower(
            pixel_values=values,
            pixel_attention_mask=mask,
            spatial_shapes=shapes,
            output_hidden_states=True,
        )
        return select_layers(out.hidden_states, self.cfg.feature_layer, self.num_prefix)

    def arrange(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | ImageBatch,
        newline: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each image's patch tokens without the padding (NaFlex), image after image."""
        if not isinstance(images, ImageBatch):
            return super().arrange(tokens, images, newline)
        counts = [self.transform.num_tokens(size) for size in images.sizes]
        return torch.cat([row[:count] for row, count in zip(tokens, counts)])  # [K, H]

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (weights loaded separately).

        The image processor is written out in full (``image_processor``) unless it is the
        standard one for the tower, which ``image_size`` / ``image_mean`` / ``image_std`` rebuild.
        """
        exclude = {"model", "revision", "trust_remote_code", "image_processor", "max_num_patches"}
        kwargs = self.cfg.model_dump(exclude=exclude, exclude_none=True)
        config = self.tower.config.to_dict()
        config.pop("dtype", None)
        kwargs["config"] = config
        t = self.transform
        if isinstance(t, NaFlexTransform):  # the processor holds max_num_patches and the rest
            kwargs = {k: v for k, v in kwargs.items() if k not in ("image_mean", "image_std")}
            return {**kwargs, "image_processor": t.processor_config()}
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


NAFLEX_PATCHES = 256
"""transformers' default ``max_num_patches`` for SigLIP2 NaFlex."""


def is_naflex(config: Any) -> bool:
    """Whether the transformers vision config is a NaFlex tower (SigLIP2's native resolution)."""
    return config.model_type == "siglip2_vision_model"


def check_resolution_options(cfg: HFVisionConfig, config: Any) -> None:
    """``image_size`` only for fixed-size towers, ``max_num_patches`` only for NaFlex ones."""
    kind = config.model_type
    if is_naflex(config) and cfg.image_size is not None:
        raise ConfigError(
            f"vision.image_size: the {kind!r} tower (NaFlex) has no fixed input size; it keeps "
            "each image's aspect ratio: bound it with vision.max_num_patches instead"
        )
    if not is_naflex(config) and cfg.max_num_patches is not None:
        raise ConfigError(
            f"vision.max_num_patches: only NaFlex towers (siglip2_vision_model) take it; the "
            f"{kind!r} tower has a fixed input size (vision.image_size)"
        )
    check_input_size(cfg, config)


def check_input_size(cfg: HFVisionConfig, config: Any) -> None:
    """A tower whose position embeddings are for one image size (CLIP, SigLIP, ViT...)
    refuses any other at its first forward: ``image_size`` (else an inline image processor)
    must give that size. DINOv2 interpolates its embeddings to any size."""
    fixed = getattr(config, "image_size", None)
    if is_naflex(config) or config.model_type.startswith("dinov2") or not isinstance(fixed, int):
        return
    key, size = "image_size", cfg.image_size
    if size is None:
        key, size = "image_processor", _inline_size(cfg.image_processor)
    if size is not None and size != fixed:
        raise ConfigError(
            f"vision.{key}: gives {size}-pixel images, but the {config.model_type!r} tower's "
            f"position embeddings are for {fixed} pixels (its config's image_size); set "
            f"vision.image_size: {fixed}, or leave it unset for the tower's own size"
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


@dataclass(frozen=True, eq=False)
class NaFlexTransform(VariableTransform):
    """A SigLIP2 NaFlex image processor: each image resized, its aspect ratio kept, to at most
    ``max_num_patches`` patches of ``patch_size`` pixels, as one patch sequence padded to
    ``[1, max_num_patches, 3 * patch_size**2]``. An image gives one token per patch."""

    processor: Any = field(repr=False)
    patch_size: int
    max_num_patches: int

    @classmethod
    def of(cls, processor: Any, patch_size: int) -> NaFlexTransform:
        """Wrap ``processor``; a ConfigError when its patches are not the tower's."""
        data = processor_config(processor)
        patches = data.get("patch_size", patch_size)
        if patches != patch_size:
            raise ConfigError(
                f"vision.image_processor: patch_size {patches} but the tower's patches are "
                f"{patch_size} pixels; make them equal"
            )
        return cls(processor, patch_size, int(data.get("max_num_patches", NAFLEX_PATCHES)))

    @property
    def max_tokens(self) -> int:
        return self.max_num_patches

    def patch_grid(self, size: Size) -> tuple[int, int]:
        """The patch grid (rows, cols) an image of ``size`` (height, width) is resized to."""
        from transformers.models.siglip2.image_processing_siglip2 import (
            get_image_size_for_max_num_patches,
        )

        height, width = get_image_size_for_max_num_patches(
            size[0], size[1], self.patch_size, self.max_num_patches
        )
        return height // self.patch_size, width // self.patch_size

    def num_tokens(self, size: Size) -> int:
        rows, cols = self.patch_grid(size)
        return rows * cols

    def __call__(self, image: Image.Image) -> ImageBatch:
        if not getattr(self.processor, "do_convert_rgb", True):
            image = image.convert("RGB")
        out = self.processor(images=[image], return_tensors="pt")
        size = (image.height, image.width)
        grid = tuple(out["spatial_shapes"][0].tolist())
        if grid != self.patch_grid(size):
            raise ComponentError(
                f"the NaFlex processor cut a {image.width}x{image.height} image into {grid} "
                f"patches, not the {self.patch_grid(size)} counted for its placeholders"
            )
        return ImageBatch(out["pixel_values"].float(), (size,), (1,))  # [1, P, 3*p*p]

    def processor_config(self) -> dict[str, Any]:
        return processor_config(self.processor)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NaFlexTransform):
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
    if data is None and is_naflex(config):
        data = _naflex_processor(config)
    if data is None:
        data = _standard_processor(config, cfg.image_size or _default_size(config))
    if cfg.image_size is not None:
        data = _resized(data, cfg.image_size)
    if cfg.max_num_patches is not None:
        data = {**data, "max_num_patches": cfg.max_num_patches}
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


def _naflex_processor(config: Any) -> dict[str, Any]:
    """The image processor config transformers ships with a SigLIP2 NaFlex tower."""
    return {
        "image_processor_type": "Siglip2ImageProcessor",
        "patch_size": config.patch_size,
        "max_num_patches": NAFLEX_PATCHES,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,  # bilinear
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
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
