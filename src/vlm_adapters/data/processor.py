"""The one processor: conversations, prompts and images -> model inputs.

Training (the dataset), generation and evaluation all go through :class:`VLMProcessor`, so the
ids a model sees when it answers are exactly a prefix of the ids it was trained on, and its
pixels are the same tensors. Every ``<image>`` marker becomes ``num_image_tokens`` placeholder
ids, so lengths are known before the model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from vlm_adapters.chat.templates import (
    DEFAULT_TEMPLATE,
    IMAGE_MARKER,
    ChatTemplate,
    Encoded,
    encode_conversation,
    encode_prompt,
    with_image_markers,
)
from vlm_adapters.errors import DataError

Turns = Sequence[Mapping[str, Any]]
ImageInput = Image.Image | Sequence[Image.Image] | None
"""One entry per sample: an image, a list of images, or None."""


class VLMProcessor:
    """Turns conversations (or raw text) and images into ids, labels and pixel values.

    ``template`` renders conversations (default: vicuna_v1, LLaVA-1.5's); ``transform`` is the
    vision backbone's preprocessing (PIL image in any mode -> ``[3, H, W]``).
    """

    def __init__(
        self,
        tokenizer: Any,
        transform: Callable[[Image.Image], torch.Tensor],
        num_image_tokens: int,
        image_token_id: int,
        template: str | ChatTemplate = DEFAULT_TEMPLATE,
    ) -> None:
        self.tokenizer = tokenizer
        self.transform = transform
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.template = template

    # one sample

    def encode(self, turns: Turns, num_images: int) -> Encoded:
        """Training ids and labels (answers and their end of turn supervised).

        A single image without a marker gets ``<image>\\n`` before the first human turn.
        """
        return encode_conversation(
            self.tokenizer,
            self.template,
            with_image_markers(turns, num_images),
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
        )

    def prompt(self, turns: Turns, num_images: int) -> list[int]:
        """Generation ids: ``turns`` (ending with a human turn) then the assistant prefix; a
        prefix of :meth:`encode`'s ids for the same conversation with its answer."""
        turns = with_image_markers(turns, num_images)
        markers = sum(str(turn["value"]).count(IMAGE_MARKER) for turn in turns)
        if markers != num_images:
            raise DataError(
                f"{markers} {IMAGE_MARKER} marker(s) but {num_images} image(s); put one "
                f"{IMAGE_MARKER} in the text for each image"
            )
        return encode_prompt(
            self.tokenizer,
            self.template,
            turns,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
        )

    def text(self, text: str) -> list[int]:
        """Raw text (no chat template) with each marker expanded; BOS when the tokenizer adds
        one by itself."""
        bos = self.tokenizer.bos_token_id
        ids = [bos] if bos is not None and self.tokenizer("a").input_ids[:1] == [bos] else []
        for i, piece in enumerate(text.split(IMAGE_MARKER)):
            if i:
                ids += [self.image_token_id] * self.num_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        """PIL images (any mode) -> ``[I, 3, H, W]`` float32, or None for no images."""
        if not images:
            return None
        return torch.stack([self.transform(image) for image in images]).float()

    # batches

    def prompt_batch(
        self, conversations: Sequence[Turns], images: Sequence[ImageInput] | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Left-padded generation inputs: ``input_ids``/``attention_mask`` ``[B, T]`` and
        ``pixel_values`` ``[I, 3, H, W]`` (every image, in sample order)."""
        per_sample = images_per_sample(len(conversations), images)
        rows = []
        for index, (turns, imgs) in enumerate(zip(conversations, per_sample)):
            try:
                rows.append(self.prompt(turns, len(imgs)))
            except DataError as error:
                raise DataError(f"conversation {index}: {error}") from None
        flat = [image for imgs in per_sample for image in imgs]
        return {**pad_batch(rows, self.tokenizer.pad_token_id), "pixel_values": self.images(flat)}

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
        batch = pad_batch([self.text(t) for t in texts], self.tokenizer.pad_token_id, padding_side)
        flat = [image for imgs in per_sample for image in imgs]
        return {**batch, "pixel_values": self.images(flat)}


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
