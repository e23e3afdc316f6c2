"""transformers image processors as image transforms: a tower's own preprocessing.

:class:`ProcessorTransform` gives exactly a transformers image processor's ``pixel_values``
(fixed-size towers); :class:`NaFlexTransform` a SigLIP2 NaFlex processor's padded patch
sequences (each image at its own aspect ratio). The rest builds processors from their JSON
configs, reads their geometry, and writes the processor config transformers ships with a
tower (CLIP: resize the shortest side and crop the centre; SigLIP: resize to a square;
DINOv2: resize to 256/224 of the size and crop).
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

from vlm_adapters._transformers import check_inline_config
from vlm_adapters.errors import ComponentError, ConfigError
from vlm_adapters.geometry import Size, naflex_patch_grid
from vlm_adapters.vision.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBatch,
    ImageTransform,
    VariableTransform,
    image_functional,
)

_DEFAULT_NORM = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
}


NAFLEX_PATCHES = 256
"""transformers' default ``max_num_patches`` for SigLIP2 NaFlex."""


_RESAMPLING = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
"""PIL resampling codes (an image processor's ``resample``) -> torchvision interpolation names."""


class ByProcessorConfig:
    """Equality and hashing of a transform that wraps a transformers image processor: two are
    equal when they are of one class and their processor configs are."""

    processor: Any

    def processor_config(self) -> dict[str, Any]:
        """The processor's JSON config (``preprocessor_config.json``); rebuilds it offline."""
        return processor_config(self.processor)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.processor_config() == other.processor_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(json.dumps(self.processor_config(), sort_keys=True))


@dataclass(frozen=True, eq=False)
class ProcessorTransform(ByProcessorConfig, ImageTransform):
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
            mean, std = (
                as_triple(data.get("image_mean", 0.0)),
                as_triple(data.get("image_std", 1.0)),
            )
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


@dataclass(frozen=True, eq=False)
class NaFlexTransform(ByProcessorConfig, VariableTransform):
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
        return naflex_patch_grid(size, self.patch_size, self.max_num_patches)

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


def processor_config(processor: Any) -> dict[str, Any]:
    """An image processor's config as plain JSON, without the processor it belonged to."""
    data = json.loads(processor.to_json_string())
    data.pop("processor_class", None)
    return data


def processor_from_config(data: dict[str, Any]) -> Any:
    """The image processor transformers' ``AutoImageProcessor`` loads from ``data`` (so the
    class, and its backend, are the ones ``AutoProcessor`` picks for an export)."""
    from transformers import AutoImageProcessor

    image_functional()  # its fast processors import torchvision: check the pair first
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


def as_triple(value: Any) -> tuple[float, float, float]:
    """A mean / std as three floats (a processor config may give one number for all)."""
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    return (values[0], values[1], values[2])


def inline_size(data: dict[str, Any] | None) -> int | None:
    """Output size of an inline image processor config, when it gives squares."""
    if data is None:
        return None
    try:
        return processor_geometry(data)[0]
    except ConfigError:
        return None


def standard_processor(
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


def naflex_processor(config: Any) -> dict[str, Any]:
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


def resized_processor(data: dict[str, Any], size: int) -> dict[str, Any]:
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


def checkpoint_processor(model: str, revision: str | None) -> Any:
    """The image processor a checkpoint (hub id or directory) ships, or None without one."""
    from transformers import AutoImageProcessor

    image_functional()  # its fast processors import torchvision: check the pair first
    try:
        return AutoImageProcessor.from_pretrained(model, revision=revision)
    except (OSError, ValueError):
        return None
