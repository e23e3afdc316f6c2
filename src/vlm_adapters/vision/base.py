"""The vision backbone protocol and image preprocessing shared by every backbone."""

from __future__ import annotations

import functools
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from vlm_adapters.errors import ConfigError, InstallError
from vlm_adapters.geometry import AnyResLayout, Size
from vlm_adapters.registry import ComponentConfig

if TYPE_CHECKING:
    from vlm_adapters.vision.tiling import TilingConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CPU_INSTALL = (
    "pip install --force-reinstall torch torchvision --index-url "
    "https://download.pytorch.org/whl/cpu"
)
"""Torch and torchvision from the same CPU build (docs/getting-started.md)."""


@functools.cache
def image_functional() -> ModuleType:
    """``torchvision.transforms.functional``, imported when an image is first transformed:
    importing torchvision imports its models and ``torch._dynamo`` (seconds), which importing
    vlm_adapters never needs.

    Raises:
        InstallError: torchvision is missing or from another build than torch (the
            ``operator torchvision::nms does not exist`` of a CUDA torchvision beside a CPU
            torch), naming the command that installs a matching pair.
    """
    try:
        import torchvision.transforms.functional as functional
    except (ImportError, OSError, RuntimeError, AttributeError) as error:
        raise InstallError(_pair_problem(error)) from error
    return functional


def _pair_problem(error: BaseException) -> str:
    """Why torchvision cannot be imported beside this torch, with the fix."""
    try:
        found = f"torchvision {importlib.metadata.version('torchvision')}"
    except importlib.metadata.PackageNotFoundError:
        found = "torchvision (not installed)"
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return (
        f"{found} cannot be imported beside torch {torch.__version__} "
        f"({type(error).__name__}: {first}); torch and torchvision must come from the same "
        f"build: run `{CPU_INSTALL}` (CPU), or install both from your CUDA version's index"
    )


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised ``[3, H, W]`` tensor: resize, centre crop, scale, normalise.

    With ``crop=False`` the image is resized straight to ``crop_size`` (SigLIP style);
    otherwise its shortest side is resized to ``resize`` and the centre is cropped.
    Transformers towers use a subclass that runs the tower's own image processor instead
    (:class:`vlm_adapters.vision.hf_processor.ProcessorTransform`), with these fields describing it.
    """

    crop_size: int
    resize: int | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop: bool = True
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tvf = image_functional()
        image = image.convert("RGB")
        mode = tvf.InterpolationMode(self.interpolation)
        if self.crop:
            image = tvf.resize(image, self.resize or self.crop_size, interpolation=mode)
            image = tvf.center_crop(image, self.crop_size)
        else:
            image = tvf.resize(image, [self.crop_size, self.crop_size], interpolation=mode)
        return tvf.normalize(tvf.to_tensor(image), self.mean, self.std)  # [3, H, W]

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Stack several images into ``[B, 3, H, W]``."""
        return torch.stack([self(image) for image in images])

    def with_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
        """The same resizing and cropping, normalised with ``mean`` and ``std`` instead."""
        return replace(self, mean=tuple(mean), std=tuple(std))


@dataclass(frozen=True)
class ImageBatch:
    """Images whose vision inputs differ in shape, as one batch.

    ``values`` ``[U, ...]`` holds every image's rows, image after image: its AnyRes overview
    and tiles ``[1 + T, 3, S, S]``, its NaFlex patch sequence ``[1, P, 3*p*p]``, or the vision
    features of those read from a feature cache. ``counts`` is how many rows each image has and
    ``sizes`` each image's original (height, width), from which its layout follows.
    """

    values: torch.Tensor
    sizes: tuple[Size, ...]
    counts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.counts)

    def to(self, *args: Any, **kwargs: Any) -> ImageBatch:
        """The same images with ``values`` moved or cast like ``Tensor.to``."""
        return replace(self, values=self.values.to(*args, **kwargs))

    def pin_memory(self) -> ImageBatch:
        return replace(self, values=self.values.pin_memory())

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``rows`` ``[U, ...]`` (aligned with ``values``) cut into one part per image."""
        return rows.split(list(self.counts))

    @classmethod
    def cat(cls, batches: Sequence[ImageBatch]) -> ImageBatch:
        """Several batches as one, in order."""
        return cls(
            torch.cat([b.values for b in batches]),
            tuple(size for b in batches for size in b.sizes),
            tuple(count for b in batches for count in b.counts),
        )


class VariableTransform(ABC):
    """Preprocessing whose output depends on each image's size (AnyRes tiles, NaFlex patches).

    It turns one PIL image into an :class:`ImageBatch`, and knows from an image's size alone
    how many visual tokens it becomes, so a prompt gets exactly that many placeholders before
    the model runs.
    """

    token_budget: int | None = None
    """The most visual tokens one sample (all its images) may have; None: no cap of its own."""

    @property
    @abstractmethod
    def max_tokens(self) -> int:
        """The most visual tokens one image can give."""

    @abstractmethod
    def num_tokens(self, size: Size) -> int:
        """Visual tokens of an image of ``size`` (height, width)."""

    @abstractmethod
    def __call__(self, image: Image.Image) -> ImageBatch:
        """One PIL image (any mode) -> its rows."""

    def batch(self, images: Sequence[Image.Image]) -> ImageBatch:
        """Several images as one :class:`ImageBatch`."""
        return ImageBatch.cat([self(image) for image in images])


def select_layers(
    hidden_states: Sequence[torch.Tensor], layers: int | Sequence[int], num_prefix: int
) -> torch.Tensor:
    """Pick one layer or concatenate several (channel-wise) and drop prefix tokens."""
    indices = [layers] if isinstance(layers, int) else list(layers)
    chosen = [hidden_states[i][:, num_prefix:] for i in indices]  # each [B, N, D]
    return chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)


class VisionConfig(ComponentConfig):
    """Base for vision backbone kwargs."""

    def probe(self) -> tuple[int, int] | None:
        """``(num_patches, hidden_size)`` from the config alone, without building the tower;
        None when that cannot be known before building (checked after building instead).

        The probe lets impossible combinations (a pool factor that does not divide the grid,
        visual tokens beyond the LLM's context) fail while the config is read, with the file
        and key in the message.
        """
        return None

    def native_resolution(self) -> bool:
        """Whether the tower encodes each image at its own size and aspect ratio (NaFlex): N
        from :meth:`probe` is then the most patches one image can give."""
        return False


class VisionBackbone(nn.Module, ABC):
    """Base class: ``forward(pixel_values [B,3,H,W]) -> features [B, N, D]``.

    Subclasses implement :meth:`features` and set ``hidden_size`` (D), ``num_patches`` (N)
    and ``transform`` (PIL image -> ``[3, H, W]``, the preprocessing that matches the
    weights). A backbone whose parameters are all frozen runs under ``torch.no_grad`` so no
    graph is built. The backbone owns feature selection: which layer(s), and dropping the
    prefix tokens (CLS, registers) its tower puts before the patches.

    A backbone whose images differ in shape (AnyRes tiling, a NaFlex tower) has a
    :class:`VariableTransform`, takes an :class:`ImageBatch` (``[U, N, D]`` out, one row per
    tile or image) and overrides :meth:`arrange` to turn the rows' visual tokens into each
    image's token sequence.
    """

    hidden_size: int
    """Feature width D."""
    num_patches: int
    """Feature tokens N per image (per tile with AnyRes, at most per image with NaFlex)."""
    transform: Callable[[Image.Image], torch.Tensor | ImageBatch]
    """PIL image (any mode) -> normalised ``[3, H, W]`` tensor (or an :class:`ImageBatch`)."""
    tiling: TilingConfig | None = None
    """The AnyRes tiling the backbone runs on (``vision.tiling``); None: whole images."""
    layout: AnyResLayout | None = None
    """Where a tiled backbone's tiles go and which tokens it keeps; None: whole images."""

    def untiled(self) -> VisionBackbone:
        """The backbone that runs the tower: this one, or the one a tiling runs on its tiles."""
        return self

    @abstractmethod
    def features(self, pixel_values: torch.Tensor | ImageBatch) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, N, D]``."""

    def arrange(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | ImageBatch,
        newline: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The connector's tokens per input row ``[U, M, H]`` -> every image's visual tokens,
        image after image ``[K, H]``; here: all of them, in order. ``newline`` ``[H]`` is the
        learned end-of-row token, for backbones that lay tokens out in rows (AnyRes)."""
        return tokens.flatten(0, 1)

    def forward(self, pixel_values: torch.Tensor | ImageBatch) -> torch.Tensor:
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.parameters()):
            with torch.no_grad():
                return self.features(pixel_values)
        return self.features(pixel_values)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the tower's activations in backward (when it trains). The default finds
        transformers' ``gradient_checkpointing_enable`` or timm/open_clip's
        ``set_grad_checkpointing`` on the modules below; override it for anything else."""
        for module in self.modules():
            if module is self:
                continue
            if callable(getattr(module, "gradient_checkpointing_enable", None)):
                module.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
                return
            if callable(getattr(module, "set_grad_checkpointing", None)):
                module.set_grad_checkpointing(True)
                return
        raise ConfigError(
            f"run.gradient_checkpointing: the {type(self).__name__} vision backbone does not "
            "support it; turn it off or keep the vision tower frozen"
        )

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor | ImageBatch:
        """PIL images (any mode) -> ``[B, 3, H, W]`` pixel values for this backbone (an
        :class:`ImageBatch` when its transform is a :class:`VariableTransform`)."""
        if isinstance(self.transform, VariableTransform):
            return self.transform.batch(images)
        return torch.stack([self.transform(image) for image in images])

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (weights loaded separately)."""
        return self.cfg.model_dump()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return f"num_patches={self.num_patches}, hidden_size={self.hidden_size}"
