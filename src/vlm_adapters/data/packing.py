"""Exact multimodal packing: several samples share one row, and none of them sees another.

Samples are placed whole (a sample, with all its visual tokens, is never split) into rows of
at most ``max_length`` tokens, first-fit by decreasing length. Position ids restart at 0 for
every sample; with ``attention_mask=None`` transformers derives a block-diagonal causal mask
from them (``masking_utils.find_packed_sequence_indices``), so attention never crosses a
sample boundary, and models with absolute position embeddings (GPT-2) see each sample at the
positions it would have alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.data.llava import Skipped
from vlm_adapters.data.processor import join_images, pad_rows
from vlm_adapters.errors import ConfigError


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices grouped into rows whose lengths sum to at most ``max_length`` (first fit,
    longest first); each row keeps its samples in the order they were given."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > max_length:
            raise ValueError(f"sample {index} has {lengths[index]} tokens > max_length")
        slot = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= lengths[index]
    return [sorted(row) for row in rows]


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
            "skipped": [item for item in items if isinstance(item, Skipped)],
            "num_samples": len(kept),
            "num_tokens": sum(len(item["input_ids"]) for item in kept),
        }


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


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices whose estimated token counts sum to at most ``max_tokens``.

    Lengths are the dataset's estimates (no tokenizing); the order is shuffled per
    ``(seed, epoch)``, so rows per batch follow the token budget and memory per step is
    stable. A sample longer than the budget gets a batch of its own.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, *, seed: int = 0) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be positive")
        self.lengths = [abs(length) for length in lengths]
        self.max_tokens = max_tokens
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches: list[list[int]] = []
        current: list[int] = []
        used = 0
        for index in torch.randperm(len(self.lengths), generator=generator).tolist():
            if current and used + self.lengths[index] > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(index)
            used += self.lengths[index]
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


@torch.no_grad()
def packing_leak(llm: Any) -> float:
    """How much a sample's hidden states change when another sample precedes it in a packed
    row (largest difference over largest value; ~0 when packed samples are isolated), for an
    :class:`~vlm_adapters.llm.LLMBackend`."""
    generator = torch.Generator().manual_seed(0)
    high = min(llm.vocab_size, 1000)
    first, second = (torch.randint(3, high, (1, n), generator=generator) for n in (7, 5))
    device, was_training = llm.device, llm.training
    llm.eval()
    try:
        alone = llm.body(llm.embed(second.to(device)), torch.ones_like(second).to(device))
        row = torch.cat([first, second], dim=1).to(device)
        positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
        packed = llm.body(llm.embed(row), None, position_ids=positions)[:, 7:]
    finally:
        llm.train(was_training)
    scale = alone.float().abs().max().clamp_min(1e-6)
    return float((packed.float() - alone.float()).abs().max() / scale)


def check_packing(llm: Any) -> None:
    """Refuse ``data.packing`` for an LLM whose packed samples would see each other (its
    attention ignores the position ids that mark where each sample starts)."""
    name = type(getattr(llm, "causal_lm", llm)).__name__
    try:
        leak = packing_leak(llm)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"data.packing: {name} cannot run packed rows ({error}); set data.packing: false"
        ) from None
    tolerance = 1e-4 if next(llm.parameters()).dtype == torch.float32 else 3e-2
    if leak > tolerance:
        raise ConfigError(
            f"data.packing: {name} lets samples packed into one row attend to each other "
            f"(a sample's hidden states change by {leak:.1%} of their scale); set "
            "data.packing: false"
        )
