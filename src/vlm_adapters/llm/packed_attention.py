"""Attention over packed rows that costs what the samples cost, not what the row costs, and
the check that an LLM keeps the samples of a packed row apart.

A packed row (see :mod:`vlm_adapters.data.packing`) holds several samples whose position ids
restart at 0. With SDPA, transformers turns those position ids into a block-diagonal causal
mask, and the kernel still scores every query of the row against every key: a row of 1,024
tokens holding three samples pays for 1,024² scores where its samples need the sum of their
own squares. `packed_sdpa` calls SDPA once per sample instead (causal, no mask), which gives
the same result for less work and lets SDPA use its causal kernels.

It runs only where `PackedAttention` switched a model to it, and only for the plain call:
position ids for every row, no KV cache, no sliding window, soft-capping, attention sinks or
position bias. Any other call, and every call inside ``torch.compile`` (``run.compile``: the
spans come from the position ids' values), goes to transformers' own SDPA with the mask. The
trainer checks a packed row against the same samples alone before the first step
(`check_packing`) and goes back to the masked path if they differ.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlm_adapters.errors import ConfigError
from vlm_adapters.llm.base import LLMBackend

NAME = "vlm_adapters_packed_sdpa"
_SPECIAL = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")
"""Keyword arguments that change attention in ways a per-sample call would not honour."""


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[B, H, T, D]`` attending over ``key``/``value`` ``[B, Hkv, T, D]``, one
    causal SDPA call per run of position ids that starts at 0; returns ``[B, T, H, D]``."""
    positions = kwargs.get("position_ids")
    batch, _, length, _ = query.shape
    plain = (
        not torch.compiler.is_compiling()  # its spans are data: compiled code takes the mask
        and positions is not None
        and tuple(positions.shape) == (batch, length)
        and key.shape[2] == length  # no KV cache
        and all(kwargs.get(name) is None for name in _SPECIAL)
    )
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in ("position_ids", "is_causal")}
    rows = []
    for row, spans in enumerate(_samples(positions)):
        pieces = [
            sdpa_attention_forward(
                module,
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                None,
                is_causal=True,
                **rest,
            )[0]
            for start, end in spans
        ]
        rows.append(torch.cat(pieces, dim=1))  # [1, T, H, D]
    return torch.cat(rows, dim=0), None


_last: list[Any] = [None, None]
"""The position ids seen last and their spans: every layer of a forward (and its recomputation
under gradient checkpointing) gets the same tensor, read from the device once."""


def _samples(positions: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of every run of positions that starts at 0 (the first run
    starts at the row's beginning whatever its first position)."""
    if _last[0] is positions:
        return _last[1]
    length = positions.shape[1]
    spans = []
    for row in positions.tolist():
        starts = [0] + [i for i, position in enumerate(row) if position == 0 and i > 0]
        spans.append(list(zip(starts, starts[1:] + [length])))
    _last[:] = [positions, spans]
    return spans


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the mask of the calls it passes on


class PackedAttention:
    """Every part of ``model`` that uses SDPA uses `packed_sdpa` until `restore`. Saved
    configs are unaffected: transformers does not serialize the attention setting."""

    def __init__(self, model: torch.nn.Module) -> None:
        configs = {
            id(config): config
            for module in model.modules()
            if (config := getattr(module, "config", None)) is not None
            and getattr(config, "_attn_implementation", None) == "sdpa"
        }
        self.configs = list(configs.values())
        for config in self.configs:
            config._attn_implementation = NAME

    @property
    def active(self) -> bool:
        return bool(self.configs)

    def restore(self) -> None:
        for config in self.configs:
            config._attn_implementation = "sdpa"
        self.configs = []


@torch.no_grad()
def packing_leak(llm: LLMBackend) -> float:
    """How much samples' hidden states change when packed two to a row, in a batch of two
    rows as training packs them, against each sample alone (largest difference over largest
    value; ~0 when packed samples are isolated)."""
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


def check_packing(llm: LLMBackend) -> None:
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
