"""Collation: dataset items -> padded batches, or packed rows (several samples to a row)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.data.packing import pack_rows
from vlm_adapters.data.processor import join_images, pad_batch, pad_rows
from vlm_adapters.data.records import Skipped
from vlm_adapters.errors import DataError


@dataclass
class DataCollator:
    """Pad a list of dataset items into a batch; `Skipped` items are dropped and listed.

    Returns `input_ids`, `attention_mask` and `labels` (padded with -100) as [B, T] tensors,
    `pixel_values` (every image of the batch, in sample order, [num_images, 3, H, W], or one
    `ImageBatch` for variable-size vision) or None, `video_values` (every video's frames, one
    `ImageBatch` entry per video; `video_features` from a feature cache) when any item has a
    video, and `skipped` (the dropped items). When
    every item was skipped, B is 0: the tensors have shape [0, 0]; count the skips and do not
    step on such a batch.
    """

    pad_token_id: int
    padding_side: Literal["left", "right"] = "right"

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise DataError(
                "pad_token_id is None: the tokenizer has no pad token; "
                "set tokenizer.pad_token (e.g. to its eos token) first"
            )
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, items: Sequence[Mapping[str, Any] | Skipped]) -> dict[str, Any]:
        kept = [item for item in items if not isinstance(item, Skipped)]
        skipped = [item for item in items if isinstance(item, Skipped)]
        side = self.padding_side
        ids = [item["input_ids"] for item in kept]
        images = [item["pixel_values"] for item in kept if item.get("pixel_values") is not None]
        features = [f for item in kept if (f := item.get("image_features")) is not None]
        return {
            **({"image_features": join_images(features)} if features else {}),
            **_videos(kept),
            **pad_batch(ids, self.pad_token_id, side),
            "labels": pad_rows([item["labels"] for item in kept], IGNORE_INDEX, side),
            "pixel_values": join_images(images),
            "skipped": skipped,
        }


@dataclass
class PackingCollator:
    """Pack dataset items into rows: ``input_ids``, ``labels`` and ``position_ids`` ``[R, L]``,
    ``attention_mask`` None (the mask comes from the position ids), ``pixel_values`` in the
    order of the placeholder runs (an ``ImageBatch`` for variable-size vision, whose images
    keep their own token counts), ``skipped`` items listed, ``num_samples`` packed and
    their ``num_tokens``.

    Trailing padding gets position ids from 0 (a block of its own) and labels -100.
    """

    pad_token_id: int
    max_length: int

    def __call__(self, items: Sequence[Mapping[str, Any] | Skipped]) -> dict[str, Any]:
        kept = [item for item in items if not isinstance(item, Skipped)]
        rows = pack_rows([len(item["input_ids"]) for item in kept], self.max_length)
        ids, labels, positions, images, features = [], [], [], [], []
        for row in rows:
            samples = [kept[i] for i in row]
            ids.append(torch.cat([s["input_ids"] for s in samples]))
            labels.append(torch.cat([_own_labels(s["labels"]) for s in samples]))
            positions.append(torch.cat([torch.arange(len(s["input_ids"])) for s in samples]))
            images += [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
            features += [f for s in samples if (f := s.get("image_features")) is not None]
        width = max((len(row) for row in ids), default=0)
        return {
            "input_ids": pad_rows(ids, self.pad_token_id),
            "attention_mask": None,
            "labels": pad_rows(labels, IGNORE_INDEX),
            "position_ids": _pad_positions(positions, width),
            "pixel_values": join_images(images),
            **({"image_features": join_images(features)} if features else {}),
            **_videos([kept[i] for row in rows for i in row]),
            "skipped": [item for item in items if isinstance(item, Skipped)],
            "num_samples": len(kept),
            "num_tokens": sum(len(item["input_ids"]) for item in kept),
        }


def _videos(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``video_values`` (or cached ``video_features``): the items' videos in order (one
    ``ImageBatch``), when any has one."""
    out = {}
    for key in ("video_values", "video_features"):
        videos = [v for item in items if (v := item.get(key)) is not None]
        if videos:
            out[key] = join_images(videos)
    return out


def _own_labels(labels: torch.Tensor) -> torch.Tensor:
    """A sample's labels with its first position unsupervised, so the token before it (the
    previous sample's last) is never trained to predict it."""
    labels = labels.clone()
    labels[0] = IGNORE_INDEX
    return labels


def _pad_positions(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
        out[index, len(row) :] = torch.arange(width - len(row))
    return out
