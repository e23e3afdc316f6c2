"""The one processor: conversations, prompts and images -> model inputs.

Training (the dataset), generation and evaluation all go through :class:`VLMProcessor`, so the
ids a model sees when it answers are exactly a prefix of the ids it was trained on, and its
pixels are the same tensors. Every ``<image>`` marker becomes as many placeholder ids as the
image gives visual tokens: ``num_image_tokens`` for a fixed-size tower, or the count its
size gives with variable-size vision (AnyRes tiling, a NaFlex tower), so lengths are known
before the model runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm_adapters.chat.templates import (
    DEFAULT_TEMPLATE,
    IMAGE_MARKER,
    VIDEO_MARKER,
    ChatTemplate,
    Encoded,
    encode_conversation,
    encode_prompt,
    with_image_markers,
)
from vlm_adapters.data.video import time_prompt
from vlm_adapters.errors import DataError
from vlm_adapters.geometry import Size
from vlm_adapters.vision.base import ImageBatch, VariableTransform
from vlm_adapters.vision.video import VideoSpec

Turns = Sequence[Mapping[str, Any]]
ImageInput = Image.Image | Sequence[Image.Image] | None
"""One entry per sample: an image, a list of images, or None."""
SampleImages = int | Sequence[Image.Image | Size]
"""A sample's images (or their (height, width) sizes); their number is enough for a
fixed-size tower."""
VideoInput = np.ndarray | Sequence[np.ndarray] | None
"""One entry per sample: a video's frames ``[F, H, W, 3]`` uint8, a list of them, or None."""
_MARKERS = re.compile(f"{re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)}")


class TokenBudgetError(DataError):
    """A sample's images give more visual tokens than the per-sample budget allows."""


class VLMProcessor:
    """Turns conversations (or raw text) and images into ids, labels and pixel values.

    ``template`` renders conversations (default: vicuna_v1, LLaVA-1.5's); ``transform`` is the
    vision backbone's preprocessing (PIL image in any mode -> ``[3, H, W]``, or an
    :class:`ImageBatch` with a :class:`VariableTransform`, which also counts each image's
    visual tokens from its size; ``num_image_tokens`` is then the most one image gives).
    """

    def __init__(
        self,
        tokenizer: Any,
        transform: Callable[[Image.Image], torch.Tensor],
        num_image_tokens: int,
        image_token_id: int,
        template: str | ChatTemplate = DEFAULT_TEMPLATE,
        video: VideoSpec | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.transform = transform
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.template = template
        self.video = video

    # visual tokens

    @property
    def variable(self) -> bool:
        """Whether images give different numbers of visual tokens (AnyRes, NaFlex)."""
        return isinstance(self.transform, VariableTransform)

    def image_tokens(self, image: Image.Image | Size) -> int:
        """Visual tokens (placeholders) of one image, from its size alone."""
        if not isinstance(self.transform, VariableTransform):
            return self.num_image_tokens
        size = (image.height, image.width) if isinstance(image, Image.Image) else image
        return self.transform.num_tokens((int(size[0]), int(size[1])))

    def token_counts(self, images: SampleImages) -> list[int]:
        """Visual tokens of each image of one sample; a TokenBudgetError when together they
        exceed the per-sample budget (``vision.tiling.max_visual_tokens``)."""
        if isinstance(images, int):
            if self.variable:
                raise DataError("pass a sample's images (or their sizes) to count their tokens")
            return [self.num_image_tokens] * images
        counts = [self.image_tokens(image) for image in images]
        budget = getattr(self.transform, "token_budget", None)
        if budget is not None and sum(counts) > budget:
            raise TokenBudgetError(
                f"{len(counts)} image(s) give {sum(counts)} visual tokens, over the budget of "
                f"{budget} per sample (vision.tiling.max_visual_tokens)"
            )
        return counts

    # videos

    def video_tokens(self, frames: int) -> int:
        """Visual tokens (placeholders) of a video of ``frames`` sampled frames."""
        return self._video_spec().tokens(frames)

    def _video_spec(self) -> VideoSpec:
        if self.video is None:
            raise DataError(
                "the sample holds a video but the model takes none; build it with a "
                "vision.video section"
            )
        return self.video

    def _visual_runs(
        self, turns: Turns, counts: list[int], frames: Sequence[int]
    ) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
        """``turns`` with every ``<video>`` written as ``<image>``, and each marker's
        placeholder id and run length in order; a DataError when markers and media differ."""
        kinds = [m for turn in turns for m in _MARKERS.findall(str(turn["value"]))]
        videos = kinds.count(VIDEO_MARKER)
        if videos != len(frames):
            raise DataError(
                f"{videos} {VIDEO_MARKER} marker(s) but {len(frames)} video(s); put one "
                f"{VIDEO_MARKER} in the text for each video"
            )
        spec = self._video_spec()
        images, clips = iter(counts), iter(frames)
        runs = [
            (self.image_token_id, next(images, 0))
            if kind == IMAGE_MARKER
            else (spec.token_id, spec.tokens(next(clips)))
            for kind in kinds
        ]
        plain = [
            {**turn, "value": str(turn["value"]).replace(VIDEO_MARKER, IMAGE_MARKER)}
            for turn in turns
        ]
        return plain, runs

    # one sample

    def encode(self, turns: Turns, images: SampleImages, videos: Sequence[int] = ()) -> Encoded:
        """Training ids and labels (answers and their end of turn supervised); ``videos``
        holds each video's number of sampled frames.

        A single image (video) without a marker gets ``<image>\\n`` (``<video>\\n``) before the
        first human turn.
        """
        counts = self.token_counts(images)
        turns = with_video_markers(with_image_markers(turns, len(counts)), len(videos))
        if videos or _has_video_marker(turns):
            plain, runs = self._visual_runs(turns, counts, videos)
            encoded = encode_conversation(
                self.tokenizer,
                self.template,
                plain,
                image_token_id=self.image_token_id,
                num_image_tokens=1,
            )
            return self._expanded_runs(encoded, runs)
        encoded = encode_conversation(
            self.tokenizer,
            self.template,
            turns,
            image_token_id=self.image_token_id,
            num_image_tokens=_run_length(counts, self.num_image_tokens),
        )
        return self._expanded(encoded, counts)

    def prompt(self, turns: Turns, images: SampleImages, videos: Sequence[int] = ()) -> list[int]:
        """Generation ids: ``turns`` (ending with a human turn) then the assistant prefix; a
        prefix of :meth:`encode`'s ids for the same conversation with its answer."""
        counts = self.token_counts(images)
        turns = with_video_markers(with_image_markers(turns, len(counts)), len(videos))
        markers = sum(str(turn["value"]).count(IMAGE_MARKER) for turn in turns)
        if markers != len(counts):
            raise DataError(
                f"{markers} {IMAGE_MARKER} marker(s) but {len(counts)} image(s); put one "
                f"{IMAGE_MARKER} in the text for each image"
            )
        if videos or _has_video_marker(turns):
            plain, runs = self._visual_runs(turns, counts, videos)
            ids = encode_prompt(
                self.tokenizer,
                self.template,
                plain,
                image_token_id=self.image_token_id,
                num_image_tokens=1,
            )
            placed = Encoded(input_ids=ids, labels=ids, num_images=len(runs))
            return self._expanded_runs(placed, runs).input_ids
        encoded = encode_prompt(
            self.tokenizer,
            self.template,
            turns,
            image_token_id=self.image_token_id,
            num_image_tokens=_run_length(counts, self.num_image_tokens),
        )
        placed = Encoded(input_ids=encoded, labels=encoded, num_images=len(counts))  # no labels
        return self._expanded(placed, counts).input_ids

    def text(self, text: str, images: SampleImages | None = None) -> list[int]:
        """Raw text (no chat template) with each marker expanded (for ``images``; a fixed-size
        tower needs none); BOS when the tokenizer adds one by itself. Special-token strings in
        ``text`` are plain text: they never become control tokens."""
        pieces = text.split(IMAGE_MARKER)
        counts = self.token_counts(len(pieces) - 1 if images is None else images)
        if len(counts) != len(pieces) - 1:
            raise DataError(f"{len(pieces) - 1} {IMAGE_MARKER} marker(s) but {len(counts)} images")
        bos = self.tokenizer.bos_token_id
        ids = [bos] if bos is not None and self.tokenizer("a").input_ids[:1] == [bos] else []
        for i, piece in enumerate(pieces):
            if i:
                ids += [self.image_token_id] * counts[i - 1]
            if piece:
                encoded = self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)
                ids += encoded.input_ids
        return ids

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor | ImageBatch | None:
        """PIL images (any mode) -> ``[I, 3, H, W]`` float32 (an :class:`ImageBatch` with a
        variable transform), or None for no images."""
        if not images:
            return None
        if isinstance(self.transform, VariableTransform):
            return self.transform.batch(images)
        return torch.stack([self.transform(image) for image in images]).float()

    def _expanded_runs(self, encoded: Encoded, runs: list[tuple[int, int]]) -> Encoded:
        """``encoded`` (one placeholder per marker) with marker i's placeholder made
        ``runs[i]`` = (id, length); ``num_images`` counts images and videos."""
        if encoded.input_ids.count(self.image_token_id) != len(runs):
            raise DataError("the text holds the image placeholder token itself; remove it")
        ids: list[int] = []
        labels: list[int] = []
        pending = iter(runs)
        for token, label in zip(encoded.input_ids, encoded.labels):
            token_id, repeat = next(pending) if token == self.image_token_id else (token, 1)
            ids += [token_id] * repeat
            labels += [label] * repeat
        return Encoded(input_ids=ids, labels=labels, num_images=encoded.num_images)

    def videos(self, clips: Sequence[np.ndarray]) -> ImageBatch | None:
        """Videos' sampled frames (each ``[F, H, W, 3]`` uint8) -> one :class:`ImageBatch`
        of the tower's pixels, one entry per video; None for none."""
        if not clips:
            return None
        return self._video_spec().transform.batch(clips)

    def _expanded(self, encoded: Encoded, counts: list[int]) -> Encoded:
        """``encoded`` with image i's placeholder run made ``counts[i]`` long (runs of one
        placeholder were encoded when the counts differ)."""
        if len(set(counts)) <= 1 or encoded.num_images != len(counts):
            return encoded  # one length for every run already (or a mismatch the caller sees)
        return self._expanded_runs(encoded, [(self.image_token_id, count) for count in counts])

    # batches

    def prompt_batch(
        self,
        conversations: Sequence[Turns],
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
    ) -> dict[str, Any]:
        """Left-padded generation inputs: ``input_ids``/``attention_mask`` ``[B, T]``,
        ``pixel_values`` ``[I, 3, H, W]`` (every image, in sample order) and, with ``videos``
        (one entry per conversation: frames ``[F, H, W, 3]``, a list of them or None),
        ``video_values``."""
        per_sample = images_per_sample(len(conversations), images)
        clips = videos_per_sample(len(conversations), videos)
        rows = []
        for index, (turns, imgs, vids) in enumerate(zip(conversations, per_sample, clips)):
            try:
                rows.append(self.prompt(turns, imgs, [len(v) for v in vids]))
            except DataError as error:
                raise DataError(f"conversation {index}: {error}") from None
        flat = [image for imgs in per_sample for image in imgs]
        batch = {**pad_batch(rows, self.tokenizer.pad_token_id), "pixel_values": self.images(flat)}
        flat_clips = [clip for vids in clips for clip in vids]
        return {**batch, "video_values": self.videos(flat_clips)} if flat_clips else batch

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence[ImageInput] | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor | None]:
        """Raw prompts (no chat template) -> ``input_ids``, ``attention_mask``, ``pixel_values``."""
        per_sample = images_per_sample(len(texts), images)
        for i, (text, imgs) in enumerate(zip(texts, per_sample)):
            markers = text.count(IMAGE_MARKER)
            if markers != len(imgs):
                raise DataError(
                    f"prompt {i}: {markers} {IMAGE_MARKER} marker(s) but {len(imgs)} image(s); "
                    f"put one {IMAGE_MARKER} in the text for each image"
                )
        rows = [self.text(text, imgs) for text, imgs in zip(texts, per_sample)]
        batch = pad_batch(rows, self.tokenizer.pad_token_id, padding_side)
        flat = [image for imgs in per_sample for image in imgs]
        return {**batch, "pixel_values": self.images(flat)}


def _run_length(counts: list[int], default: int) -> int:
    """One placeholder run length for every image when they all have it, else 1 (to expand)."""
    if not counts:
        return default
    return counts[0] if len(set(counts)) == 1 else 1


def join_images(
    parts: Sequence[torch.Tensor | ImageBatch],
) -> torch.Tensor | ImageBatch | None:
    """Samples' images as one batch, in order: ``[I, ...]`` tensors concatenated, or one
    :class:`ImageBatch`; None for none."""
    if not parts:
        return None
    if all(isinstance(part, ImageBatch) for part in parts):
        return ImageBatch.cat(parts)  # type: ignore[arg-type]
    if any(isinstance(part, ImageBatch) for part in parts):
        raise DataError("cannot batch fixed-size pixels with variable-size images")
    return torch.cat(parts)  # type: ignore[arg-type]


def images_per_sample(count: int, images: Sequence[ImageInput] | None) -> list[list[Image.Image]]:
    """One list of images per sample from ``None``, or one entry (image, list or None) each."""
    if images is None:
        return [[] for _ in range(count)]
    if len(images) != count:
        raise DataError(
            f"got {count} prompts but {len(images)} image entries; pass one entry (an image, a "
            "list of images or None) per prompt"
        )
    return [[] if i is None else [i] if isinstance(i, Image.Image) else list(i) for i in images]


def videos_per_sample(count: int, videos: Sequence[VideoInput] | None) -> list[list[np.ndarray]]:
    """One list of videos' frames per sample from ``None``, or one entry (frames, list or
    None) each."""
    if videos is None:
        return [[] for _ in range(count)]
    if len(videos) != count:
        raise DataError(
            f"got {count} prompts but {len(videos)} video entries; pass one entry (a video's "
            "frames, a list of them or None) per prompt"
        )
    return [[] if v is None else [v] if isinstance(v, np.ndarray) else list(v) for v in videos]


def with_video_markers(turns: Sequence[Mapping[str, Any]], num_videos: int) -> list[dict[str, Any]]:
    """Turns with ``<video>\\n`` opening the first human turn when one video has no marker."""
    return with_image_markers(turns, num_videos, marker=VIDEO_MARKER)


def with_video_times(turns: Sequence[Mapping[str, Any]], clips: Sequence[Any]) -> list[dict]:
    """``turns`` (a marker added for one video without one) with each ``<video>`` followed by
    its clip's length and frame times (``clips``: each with ``times`` and ``duration``, such as
    :class:`~vlm_adapters.data.video.Clip`), OneVision's sentence."""
    pending = iter(clips)
    out = []
    for turn in with_video_markers(turns, len(clips)):
        pieces = str(turn["value"]).split(VIDEO_MARKER)
        text = pieces[0]
        for piece in pieces[1:]:
            clip = next(pending)
            text += f"{VIDEO_MARKER}\n{time_prompt(clip.times, clip.duration)}{piece}"
        out.append({**turn, "value": text})
    return out


def _has_video_marker(turns: Sequence[Mapping[str, Any]]) -> bool:
    return any(VIDEO_MARKER in str(turn.get("value", "")) for turn in turns)


def pad_rows(
    rows: Sequence[Sequence[int] | torch.Tensor], value: int, side: str = "right"
) -> torch.Tensor:
    """Rows of ids padded with ``value`` to one length: ``[B, T]`` (``[0, 0]`` for none)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max((len(row) for row in rows), default=0)
    batch = torch.full((len(rows), width), value, dtype=torch.long)
    for index, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.long)
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        batch[index, span] = row
    return batch


def pad_batch(
    ids: Sequence[Sequence[int] | torch.Tensor], pad_id: int, side: str = "left"
) -> dict[str, torch.Tensor]:
    """Pad id lists to one length; returns ``input_ids`` and ``attention_mask`` ``[B, T]``."""
    return {
        "input_ids": pad_rows(ids, pad_id, side),
        "attention_mask": pad_rows([[1] * len(row) for row in ids], 0, side),
    }
