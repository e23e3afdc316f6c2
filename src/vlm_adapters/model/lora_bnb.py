"""QLoRA's bitsandbytes side of LoRA checkpoints: the packed weights and quantization statistics
a checkpoint stores for each 4-/8-bit layer, checked against the recorded settings before
bitsandbytes gets them, and adapters merged into dequantized layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlm_adapters.errors import CheckpointError
from vlm_adapters.quantization import dequantized_weight, plain_linear, quantized_layers


def merge_into_dequantized(wrapped: nn.Module) -> None:
    """Replace each LoRA layer on a bitsandbytes layer by a plain linear layer holding the
    dequantized weight plus the active adapters' updates (peft would quantize the sum again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    quantized = {id(m) for m in quantized_layers(wrapped).values()}
    for name, layer in list(wrapped.named_modules()):
        if not isinstance(layer, BaseTunerLayer) or id(layer.get_base_layer()) not in quantized:
            continue
        weight = dequantized_weight(layer.get_base_layer()).float()  # [out, in]
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight += layer.get_delta_weight(adapter).float()
        wrapped.set_submodule(name, plain_linear(layer.get_base_layer(), weight))


def stored_layer(key: str, quantized: dict[str, nn.Module]) -> str | None:
    """The quantized layer whose packed weight or statistic ``key`` is (never its bias)."""
    name, _, rest = key.rpartition(".")
    while name:
        if name in quantized:
            return None if rest == "bias" else name
        name, _, head = name.rpartition(".")
        rest = f"{head}.{rest}"
    return None


def load_quantized(
    quantized: dict[str, nn.Module], base: dict[str, torch.Tensor], path: Path
) -> None:
    """Rebuild every bitsandbytes layer of ``quantized`` (by plain name) from its stored packed
    weight and statistics (taken out of ``base``), after checking them against the live layer,
    which the recorded settings built: same tensors, shapes and dtypes, same quantization
    parameters."""
    stored: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in base if stored_layer(k, quantized) is not None]:
        name = stored_layer(key, quantized)
        stored.setdefault(name, {})[key[len(name) + 1 :]] = base.pop(key)
    for name, layer in quantized.items():
        tensors = stored.get(name, {})
        problem = _quantized_problem(layer, tensors)
        if problem:
            raise CheckpointError(f"{path}: {name}: {problem}; the checkpoint is corrupt")
        _set_quantized(layer, tensors)


def _quantized_problem(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` cannot be the stored form of ``layer`` (None when they can)."""
    live = {k: v for k, v in layer.state_dict().items() if k != "bias"}
    if set(tensors) != set(live):
        return f"stored {sorted(tensors)} where these settings give {sorted(live)}"
    for key, want in live.items():
        got = tensors[key]
        if key.startswith("weight.quant_state."):  # bitsandbytes' JSON of the small fields
            problem = _quant_state_problem(got, want)
            if problem:
                return problem
        elif got.dtype != want.dtype or got.shape != want.shape:
            return (
                f"{key} is {got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}"
            )
    return None


def _quant_state_problem(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """The stored quantization fields must equal the live ones (the offset is data)."""
    if got.dtype != torch.uint8 or got.dim() != 1 or got.numel() > 4096:
        return "the packed quantization state is not a short byte string"
    try:
        fields = json.loads(bytes(got.numpy()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "the packed quantization state is not JSON"
    expected = json.loads(bytes(want.cpu().numpy()).decode("utf-8"))
    if not isinstance(fields, dict) or set(fields) != set(expected):
        return "the packed quantization state has other fields than these settings give"
    for key, value in expected.items():
        data = key == "nested_offset" and isinstance(fields[key], (int, float))
        if not data and fields[key] != value:
            return f"quantization {key} is {fields[key]!r}, expected {value!r}"
    return None


def _set_quantized(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put checked packed weights and statistics into a bitsandbytes layer."""
    import bitsandbytes as bnb

    device = layer.weight.device
    if isinstance(layer, bnb.nn.Linear4bit):
        stats = {k[len("weight.") :]: v for k, v in tensors.items() if k != "weight"}
        layer.weight = bnb.nn.Params4bit.from_prequantized(
            data=tensors["weight"], quantized_stats=stats, device=device, module=layer
        )
        return
    weight = bnb.nn.Int8Params(
        tensors["weight"].to(device), requires_grad=False, has_fp16_weights=False
    )
    weight.CB, weight.SCB = weight.data, tensors["SCB"].to(device)
    layer.weight = weight
    layer.state.CB = layer.state.SCB = None  # the next forward takes them from the weight
