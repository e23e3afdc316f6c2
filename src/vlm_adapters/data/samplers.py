"""Samplers: length-grouped batches, and micro-batches within a token budget."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which every `batch_size` run holds samples of similar length.

    Indices are shuffled, cut into megabatches of `megabatch_size` batches, sorted by length
    inside each megabatch and cut into batches; the full batches are shuffled. With
    `group_by_modality`, image (length >= 0) and text-only (length < 0) samples share no batch
    but (at most) one of the last two, which hold the leftovers of both. Deterministic given
    `seed` and the epoch (`set_epoch`).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        group_by_modality: bool = True,
        megabatch_size: int = 16,
    ) -> None:
        if batch_size < 1 or megabatch_size < 1:
            raise ValueError("batch_size and megabatch_size must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.megabatch_size = megabatch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` (so every epoch is shuffled differently)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        full: list[list[int]] = []
        leftovers: list[int] = []
        for group in self._groups():
            batches = self._group_batches(group, generator)
            if batches and len(batches[-1]) < self.batch_size:
                leftovers += batches.pop()
            full += batches
        order = torch.randperm(len(full), generator=generator).tolist()
        for position in order:
            yield from full[position]
        yield from leftovers

    def _groups(self) -> list[list[int]]:
        indices = range(len(self.lengths))
        if not self.group_by_modality:
            return [list(indices)]
        return [
            [i for i in indices if self.lengths[i] >= 0],
            [i for i in indices if self.lengths[i] < 0],
        ]

    def _group_batches(self, group: list[int], generator: torch.Generator) -> list[list[int]]:
        """Batches of one group: shuffled, then sorted by length inside each megabatch."""
        shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        mega = self.batch_size * self.megabatch_size
        batches = []
        for start in range(0, len(shuffled), mega):
            chunk = sorted(shuffled[start : start + mega], key=lambda i: -abs(self.lengths[i]))
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        return batches


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
