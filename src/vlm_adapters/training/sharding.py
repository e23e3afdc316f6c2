"""Sharded training (FSDP2): which modules become units, how a run comes to shard its model,
and how a sharded model's full weights come back to one process.

The units are the LLM's decoder layers and the vision tower's blocks, each its own
``fully_shard`` unit; everything else (embeddings, final norm, output head, the connector,
the tower's stem) belongs to the root unit, the `VisionLanguageModel` itself. accelerate's
FSDP2 plugin is given the same classes (:func:`configure_fsdp_plugin`), so a GPU run with
``fsdp_version: 2`` and :func:`shard_model` make the same units.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlm_adapters.errors import ConfigError
from vlm_adapters.llm import LLMBackend
from vlm_adapters.vision import VisionBackbone

FULLY_SHARD_ENV = "VLM_ADAPTERS_FULLY_SHARD"
"""Set to 1 under ``torchrun`` (no accelerate config) to shard with ``fully_shard`` directly
instead of DDP: how the CPU tests run FSDP2, which accelerate maps to DDP on CPU."""
_LISTS = (nn.ModuleList, nn.Sequential)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers and the vision tower's blocks: the entries of the lists
    (``nn.ModuleList``, ``nn.Sequential``) that repeat one class. Inside a transformers model
    that class must be one its ``_no_split_modules`` names (so a decoder layer is taken, not
    the experts list inside it); elsewhere (timm, open_clip) the outermost such list counts.
    A list of whole backbones (a fused tower) is looked into, not taken."""
    return [*_blocks(model.llm, None), *_blocks(model.vision, None)]


def block_classes(model: nn.Module) -> list[type[nn.Module]]:
    """The classes of :func:`block_modules` (decoder layer and vision block classes)."""
    return list(dict.fromkeys(type(module) for module in block_modules(model)))


def _blocks(module: nn.Module, declared: frozenset[str] | None) -> list[nn.Module]:
    names = getattr(module, "_no_split_modules", None)
    if names:
        declared = frozenset(names) | (declared or frozenset())
    repeats = isinstance(module, _LISTS) and _repeats_one_class(module)
    if repeats and (declared is None or type(module[0]).__name__ in declared):
        return list(module)
    found = []
    for child in module.children():
        found += _blocks(child, declared)
    return found


def _repeats_one_class(container: nn.Module) -> bool:
    entries = list(container)
    return (
        len(entries) >= 2
        and len({type(entry) for entry in entries}) == 1
        and not isinstance(entries[0], (VisionBackbone, LLMBackend))
        and all(any(True for _ in entry.parameters()) for entry in entries)
    )


def shard_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Apply ``fully_shard`` to every block (:func:`block_modules`), then to the root; the
    model is changed in place (its parameters become DTensors) and returned. ``kwargs`` go
    to ``fully_shard`` (mesh, reshard_after_forward, mp_policy...)."""
    from torch.distributed.fsdp import fully_shard

    for block in block_modules(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wants_fully_shard() -> bool:
    """Whether this launch asks for :func:`shard_model` instead of DDP (:data:`FULLY_SHARD_ENV`
    and several processes)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several and os.environ.get(FULLY_SHARD_ENV, "").lower() in ("1", "true", "yes")


def configure_fsdp_plugin(accelerator: Any, model: nn.Module) -> None:
    """Make accelerate's FSDP plugin wrap the blocks of :func:`block_classes` (unless the
    launch config names its own classes; a config without a wrap policy gets the transformer
    policy); refuse FSDP version 1."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ConfigError(
            "accelerate FSDP: only fsdp_version: 2 is supported (sharded checkpoints and the "
            "final model are written with torch's FSDP2 state-dict API); see "
            "examples/accelerate/fsdp.yaml"
        )
    if plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = [cls.__name__ for cls in block_classes(model)]
    if plugin.auto_wrap_policy is None:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin.auto_wrap_policy = transformer_auto_wrap_policy


def skeleton(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` whose parameters are on the meta device (no memory): taken
    before sharding, it is filled later with the gathered full weights (:func:`fill`)."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def fill(plain: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Give a :func:`skeleton`'s meta parameters the tensors of ``state`` (a full state dict:
    every parameter must be in it; buffers in it are loaded too) or, without it, empty CPU
    tensors; tied parameters stay tied."""
    made: dict[int, nn.Parameter] = {}
    olds = []  # keep the replaced parameters alive so their ids stay unique
    for prefix, module in plain.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                key = f"{prefix}.{name}" if prefix else name
                data = torch.empty_like(param, device="cpu") if state is None else _own(state[key])
                made[id(param)] = nn.Parameter(data.to(param.dtype), param.requires_grad)
                olds.append(param)
            module._parameters[name] = made[id(param)]
    if state is not None:
        unexpected = plain.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"the gathered weights do not fit the model: {unexpected[0]!r}")
    return plain


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger buffer (as gathered shards are):
    safetensors writes only tensors that cover their storage."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() else tensor.clone()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of an FSDP2 model, on the CPU of the main process (an empty
    dict elsewhere); a collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside; FSDP2's ``no_sync``."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
