"""bitsandbytes 4-/8-bit linear layers, whichever module holds them: find them, read their
float weight, replace them by plain linear layers, and warn that dequantizing changes the maths."""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn


def quantized_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes 4-/8-bit linear layers inside ``module``, by name (none when
    bitsandbytes was never imported)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return {}

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: m for name, m in module.named_modules() if isinstance(m, kinds)}


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight ``[out, in]`` a bitsandbytes layer computes with (4-bit: in the dtype
    it was quantized from; 8-bit: float32)."""
    from peft.utils.integrations import dequantize_bnb_weight

    state = getattr(layer.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        layer.state_dict()  # bitsandbytes restores its portable layout while saving
    return dequantize_bnb_weight(layer.weight, getattr(layer, "state", None))


def plain_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` and ``layer``'s bias, on ``weight``'s device."""
    out_features, in_features = weight.shape
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


def warn_dequantizing(what: str) -> None:
    """The one warning dequantizing gives: the result is not the quantized model's maths."""
    warnings.warn(
        f"{what}: dequantizing the bitsandbytes layers; the result holds the float weights the "
        "quantized layers computed with (plus any merged adapters), in the LLM's dtype",
        UserWarning,
        stacklevel=3,
    )
