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
    """Indices grouped into rows whose lengths sum to at most ``max_length``: as few rows as
    first fit by decreasing length needs, the samples then spread over them so the rows are
    about equally long (a batch is as wide as its longest row); each row keeps its samples in
    the order they were given."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if order and lengths[order[0]] > max_length:
        raise ValueError(f"sample {order[0]} has {lengths[order[0]]} tokens > max_length")
    rows = _first_fit(order, lengths, max_length)
    balanced = _balanced(order, lengths, max_length, len(rows))
    return [sorted(row) for row in (balanced or rows)]


def _first_fit(order: list[int], lengths: Sequence[int], max_length: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        slot = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= lengths[index]
    return rows


def _balanced(
    order: list[int], lengths: Sequence[int], max_length: int, count: int
) -> list[list[int]] | None:
    """``count`` rows filled longest sample first, each into the shortest row; None when a
    sample would not fit there."""
    rows: list[list[int]] = [[] for _ in range(count)]
    used = [0] * count
    for index in order:
        slot = min(range(count), key=used.__getitem__)
        if used[slot] + lengths[index] > max_length:
            return None
        rows[slot].append(index)
        used[slot] += lengths[index]
    return rows


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
    """How much samples' hidden states change when packed two to a row, in a batch of two
    rows as training packs them, against each sample alone (largest difference over largest
    value; ~0 when packed samples are isolated), for an
    :class:`~vlm_adapters.llm.LLMBackend`."""
    generator = torch.Generator().manual_seed(0)
    high = min(llm.vocab_size, 1000)
    a, b = (torch.randint(3, high, (n,), generator=generator) for n in (7, 5))
    device, was_training = llm.device, llm.training
    llm.eval()
    try:
        alone = [llm.body(llm.embed(x[None].to(device)), None)[0] for x in (a, b)]
        rows = torch.stack([torch.cat([a, b]), torch.cat([b, a])]).to(device)  # [2, 12]
        positions = torch.stack(
            [
                torch.cat([torch.arange(7), torch.arange(5)]),
                torch.cat([torch.arange(5), torch.arange(7)]),
            ]
        ).to(device)
        packed = llm.body(llm.embed(rows), None, position_ids=positions)  # [2, 12, H]
    finally:
        llm.train(was_training)
    pairs = [
        (packed[0, :7], alone[0]),
        (packed[0, 7:], alone[1]),
        (packed[1, :5], alone[1]),
        (packed[1, 5:], alone[0]),
    ]
    scale = max(float(x.float().abs().max()) for x in alone) or 1e-6
    return max(float((p.float() - x.float()).abs().max()) for p, x in pairs) / scale


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
            "data.packing: false, or llm.attn_implementation: sdpa"
        )
