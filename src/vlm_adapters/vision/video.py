"""Video through an image tower (``vision.video``): every sampled frame is encoded by the tower
at its input size, mapped by the connector, pooled on its token grid (bilinear, as
LLaVA-OneVision's 2x2) and laid out frame after frame, with one learned end token after the
video (the connector's ``image_newline``, as OneVision). The arithmetic is in
:mod:`vlm_adapters.geometry`, so a sample's visual tokens are known before the model runs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from vlm_adapters.geometry import (
    Sampling,
    frames_within_budget,
    video_frame_tokens,
    video_tokens,
)
from vlm_adapters.vision.base import ImageBatch, ImageTransform


class VideoConfig(BaseModel):
    """``vision.video``: how videos are sampled, pooled and budgeted."""

    model_config = ConfigDict(extra="forbid")

    num_frames: PositiveInt | None = Field(
        8, description="Frames sampled uniformly from each video (null: sample by `fps`)."
    )
    fps: PositiveFloat | None = Field(
        None, description="Frames sampled per second of video instead of `num_frames`."
    )
    max_frames: PositiveInt = Field(64, description="Most frames sampled from one video.")
    pool: PositiveInt = Field(
        2,
        description="Each frame's token grid is pooled to ceil(side / pool) per side "
        "(bilinear; 2 is LLaVA-OneVision's 2x2; 1: no pooling).",
    )
    newline: bool = Field(
        True, description="One learned end token after each video (LLaVA-OneVision's)."
    )
    max_visual_tokens: PositiveInt | None = Field(
        None,
        description="Most visual tokens per sample (images and videos): videos get fewer "
        "frames to fit; a sample that cannot fit even one frame per video is skipped.",
    )
    timestamps: bool = Field(
        False,
        description="Write the video's length and the sampled frames' times after each "
        "<video> marker (LLaVA-Video / OneVision's sentence).",
    )

    @model_validator(mode="after")
    def _one_way_to_sample(self) -> VideoConfig:
        if self.num_frames is not None and self.fps is not None:
            raise ValueError("give num_frames or fps, not both (set the other to null)")
        if self.num_frames is None and self.fps is None:
            raise ValueError("give num_frames or fps")
        return self

    def spec(self, token_id: int, side: int, transform: ImageTransform) -> VideoSpec:
        """What the processor and the model need: these settings, the ``<video>`` placeholder
        ``token_id``, frames of ``side`` x ``side`` connector tokens, the tower's
        ``transform``."""
        return VideoSpec(self, token_id, side, FrameTransform(transform))

    def sampling(self, num_frames: int | None = None) -> Sampling:
        """The frame sampling; ``num_frames`` (a budget's) overrides the settings."""
        if num_frames is not None:
            return Sampling(num_frames=num_frames, max_frames=self.max_frames)
        return Sampling(self.num_frames, self.fps, self.max_frames)


class FrameTransform:
    """Sampled frames ``[F, H, W, 3]`` uint8 -> the tower's pixels ``[F, 3, S, S]``, through
    the tower's own preprocessing (a transformers image processor takes the arrays as they
    are; other towers' transforms take PIL images)."""

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        processor = getattr(self.transform, "processor", None)
        if processor is not None:
            options = {"disable_grouping": False} if _groups(processor) else {}
            out = processor(images=list(frames), return_tensors="pt", **options)
            return out["pixel_values"].float()
        images = [Image.fromarray(frame) for frame in frames]
        return torch.stack([self.transform(image) for image in images]).float()

    def batch(self, clips: Sequence[np.ndarray]) -> ImageBatch:
        """Several videos' frames as one :class:`ImageBatch` (one entry per video)."""
        values = [self(frames) for frames in clips]
        sizes = tuple((int(c.shape[1]), int(c.shape[2])) for c in clips)
        return ImageBatch(torch.cat(values), sizes, tuple(len(v) for v in values))


def _groups(processor: Any) -> bool:
    """Whether a transformers image processor can process same-size images as one batch
    (its torchvision backend; on the CPU it does one at a time unless told otherwise): a
    video's frames then take one batched pass, with the same pixels."""
    preprocess = getattr(processor, "_preprocess", None)
    return preprocess is not None and "disable_grouping" in inspect.signature(preprocess).parameters


def pool_frames(tokens: torch.Tensor, side: int, pool: int) -> torch.Tensor:
    """Frames' tokens ``[F, side*side, H]`` on their square grid -> ``[F, m*m, H]`` with
    ``m = ceil(side / pool)``, bilinear (transformers' OneVision ``apply_pooling`` for 2)."""
    if pool == 1:
        return tokens
    frames, _, width = tokens.shape
    grid = tokens.reshape(frames, side, side, width).permute(0, 3, 1, 2)  # [F, H, s, s]
    out = math.ceil(side / pool)
    pooled = F.interpolate(grid, size=[out, out], mode="bilinear")  # [F, H, m, m]
    return pooled.permute(0, 2, 3, 1).reshape(frames, out * out, width)


def arrange_videos(
    tokens: torch.Tensor, videos: ImageBatch, newline: torch.Tensor | None
) -> torch.Tensor:
    """Pooled frame tokens ``[F, m, H]`` of every video -> their visual tokens ``[K, H]``:
    each video's frames in order, then ``newline`` ``[H]`` when given."""
    parts = []
    for frames in videos.split(tokens):
        parts.append(frames.flatten(0, 1))
        if newline is not None:
            parts.append(newline.to(tokens.dtype)[None])
    return torch.cat(parts)


def frame_tokens(side: int, config: VideoConfig) -> int:
    """Visual tokens of one frame whose connector tokens lie on a ``side`` grid."""
    return video_frame_tokens(side, config.pool)


class VideoSpec:
    """What the processor needs to lay videos out: the settings, the placeholder id, the
    tokens per frame and the frames' preprocessing."""

    def __init__(
        self, config: VideoConfig, token_id: int, side: int, transform: FrameTransform
    ) -> None:
        self.config, self.token_id, self.transform = config, token_id, transform
        self.side = side
        self.per_frame = frame_tokens(side, config)

    def tokens(self, frames: int) -> int:
        """Visual tokens of a video of ``frames`` sampled frames."""
        return video_tokens(frames, self.per_frame, self.config.newline)

    def arrange(
        self, rows: torch.Tensor, videos: ImageBatch, newline: torch.Tensor | None
    ) -> torch.Tensor:
        """The connector's tokens of every frame ``[F, side*side, H]`` -> every video's visual
        tokens ``[K, H]``: pooled per frame, frame after frame, ``newline`` after each video
        (when the settings ask for it)."""
        pooled = pool_frames(rows, self.side, self.config.pool)  # [F, m, H]
        return arrange_videos(pooled, videos, newline if self.config.newline else None)

    def fit(self, frames: list[int], fixed: int = 0) -> list[int] | None:
        """Frames per video within ``max_visual_tokens`` beside ``fixed`` image tokens (None:
        they cannot fit); unchanged without a budget."""
        budget = self.config.max_visual_tokens
        if budget is None:
            return list(frames)
        return frames_within_budget(frames, self.per_frame, self.config.newline, budget, fixed)
