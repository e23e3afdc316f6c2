"""``run.compile``: ``torch.compile`` applied per block, as torchtitan does.

Each decoder layer and vision block (`block_modules`, the FSDP2 units) gets its ``forward``
compiled; blocks of one class share their compiled graphs, so compiling costs a few graphs
per block class, not one per layer. Only ``forward`` is compiled: module hooks (FSDP2's
gathers) stay outside, LoRA's adapters inside the block are compiled with it, and the state
dict keeps its names. `compile_blocks` returns the undo, so nothing compiled outlives the
stage.

Two settings keep the losses those of eager: random ops (dropout) draw from eager's random
stream (inductor's ``fallback_random``), and under gradient checkpointing a block's
bookkeeping of its own state (transformers' kernel routing sets and resets a context
variable) is not replayed in the recomputation, which eager does not need either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlm_adapters.training.sharding import block_modules

_INDUCTOR = {"fallback_random": True}
_DYNAMO = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def compile_blocks(model: nn.Module) -> Callable[[], None]:
    """Compile the ``forward`` of every block of ``model`` in place; return the undo."""
    blocks = block_modules(model)
    for block in blocks:
        block.forward = _compiled(block.forward)  # type: ignore[method-assign]

    def restore() -> None:
        for block in blocks:
            block.__dict__.pop("forward", None)

    return restore


def _compiled(forward: Callable[..., Any]) -> Callable[..., Any]:
    compiled = torch.compile(forward, options=_INDUCTOR)

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(_DYNAMO):
            return compiled(*args, **kwargs)

    return run
