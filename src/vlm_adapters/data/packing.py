"""Exact multimodal packing: which samples share a row, none of them seeing another.

Samples are placed whole (a sample, with all its visual tokens, is never split) into rows of
at most ``max_length`` tokens, first-fit by decreasing length. Position ids restart at 0 for
every sample (:class:`~vlm_adapters.data.collate.PackingCollator` builds the rows); with
``attention_mask=None`` transformers derives a block-diagonal causal mask from them
(``masking_utils.find_packed_sequence_indices``), so attention never crosses a sample
boundary, and models with absolute position embeddings (GPT-2) see each sample at the
positions it would have alone. Whether an LLM honours that is checked by
:func:`~vlm_adapters.llm.packed_attention.check_packing`.
"""

from __future__ import annotations

from collections.abc import Sequence


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
