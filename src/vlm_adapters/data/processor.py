"""Images -> pixel tensors; text with ``<image>`` markers -> ids with exact placeholder runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vlm_adapters.errors import DataError
from vlm_adapters.vision import ImageTransform


class VLMProcessor:
    """Turns prompts and images into model inputs.

    Every ``<image>`` marker in a text becomes ``num_image_tokens`` copies of the image
    placeholder id, so sequence lengths are known before the model runs.
    """

    def __init__(
        self,
        tokenizer: Any,
        transform: ImageTransform,
        num_image_tokens: int,
        image_token: str = "<image>",
    ) -> None:
        self.tokenizer = tokenizer
        self.transform = transform
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` with each marker expanded to the placeholder run."""
        ids = [self.tokenizer.bos_token_id] if add_bos and self._wants_bos() else []
        for i, piece in enumerate(text.split(self.image_token)):
            if i:
                ids += [self.image_token_id] * self.num_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids

    def _wants_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and self.tokenizer("a").input_ids[:1] == [bos]

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        """PIL images (any mode) -> ``[I, 3, H, W]``, or None for no images."""
        return self.transform.batch(images) if images else None

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence[Image.Image | Sequence[Image.Image] | None] | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor | None]:
        """Batch of prompts -> ``input_ids``, ``attention_mask`` (padded), ``pixel_values``."""
        per_sample = _per_sample_images(texts, images)
        flat: list[Image.Image] = []
        for i, (text, imgs) in enumerate(zip(texts, per_sample)):
            markers = text.count(self.image_token)
            if markers != len(imgs):
                raise DataError(
                    f"prompt {i}: {markers} {self.image_token} marker(s) but {len(imgs)} image(s); "
                    f"put one {self.image_token} in the text for each image"
                )
            flat += imgs
        ids = [self.encode(t) for t in texts]
        batch = pad_batch(ids, self.tokenizer.pad_token_id, padding_side)
        return {**batch, "pixel_values": self.images(flat)}


def _per_sample_images(texts: Sequence[str], images: Any) -> list[list[Image.Image]]:
    if images is None:
        return [[] for _ in texts]
    if len(images) != len(texts):
        raise DataError(
            f"got {len(texts)} prompts but {len(images)} image entries; pass one per prompt"
        )
    return [
        [] if im is None else [im] if isinstance(im, Image.Image) else list(im) for im in images
    ]


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> dict[str, torch.Tensor]:
    """Pad id lists to one length; returns ``input_ids`` and ``attention_mask`` ``[B, T]``."""
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, seq in enumerate(ids):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
