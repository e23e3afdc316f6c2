"""Sharded checkpoints (FSDP2): every process writes its own part, the checkpoint counts once
all have.

Layout of ``<stage>/checkpoints/step-000123/``: ``shards/shard-0000R-model-00001-of-00001
.safetensors`` (process R-1's shard of the weights and optimizer tensors, written by torch's
distributed checkpoint with ``HuggingFaceStorageWriter``), ``rng-rank-0000R.json`` (each
process's random states) and ``trainer_state.json`` (format version, position, scheduler,
optimizer param groups, world size and every part with its process and size). Nothing is pickled.

Every process writes into one temporary directory; only when all of them report success does
the main process write ``trainer_state.json`` and rename the directory into place, so a
directory named ``step-N`` always holds every process's part (`checkpoint_problem` checks
each one).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from vlm_adapters._io import atomic_dir, remove_stale_temps
from vlm_adapters.errors import CheckpointError
from vlm_adapters.model.files import FORMAT_VERSION
from vlm_adapters.model.io import format_version
from vlm_adapters.training.checkpoint import (
    SHARDED,
    SHARDS_DIR,
    STATE_FILE,
    Position,
    checkpoint_problem,
    rank_file,
    rng_state,
    set_rng_state,
)


def save_sharded_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    position: Position,
    state: Any,
) -> Path:
    """Write one sharded checkpoint; every process must call it (``state``: accelerate's).

    A process that fails makes every process raise; the previous checkpoints stay intact.
    """
    model_state, optim_state = _live_state(model, optimizer)
    tensors = _flat(model_state, optim_state)
    if not state.is_main_process:
        tmp = _share_tmp(None, state)
        _write_parts(Path(tmp), tensors, state)
        _all_succeeded(True, state, "the main process could not complete the checkpoint")
        return directory
    phase = "share"
    try:
        remove_stale_temps(directory.parent)
        with atomic_dir(directory) as tmp:
            _share_tmp(tmp, state)
            phase = "write"
            files = _write_parts(tmp, tensors, state)
            phase = "finish"
            saved = {
                "format": SHARDED,
                "format_version": FORMAT_VERSION,
                "world_size": state.num_processes,
                "position": asdict(position),
                "scheduler": scheduler.state_dict(),
                "optimizer_groups": optim_state["param_groups"],
                "files": files,
            }
            (tmp / STATE_FILE).write_text(json.dumps(saved))
    except Exception:
        if phase == "share":
            _share_tmp(None, state)
        elif phase == "finish":
            _all_succeeded(False, state, "")
        raise
    _all_succeeded(True, state, "")
    return directory


def load_sharded_checkpoint(
    directory: Path, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, state: Any
) -> Position:
    """Restore what `save_sharded_checkpoint` wrote, each process its own part (same world
    size); every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    saved = _verified_state(directory, state)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    try:
        model_state, optim_state = _live_state(model, optimizer)  # the targets, sharded
        reader = HuggingFaceStorageReader(str(directory / SHARDS_DIR))
        dcp.load(_flat(model_state, optim_state), storage_reader=reader)
        optim_state = {"state": optim_state["state"], "param_groups": saved["optimizer_groups"]}
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(json.loads((directory / rank_file(state.process_index)).read_text()))
        return Position(**saved["position"])
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, CheckpointException) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise CheckpointError(
            f"{directory}: does not fit this run ({type(error).__name__}: {first}); was it "
            "written with another config?"
        ) from None


def _verified_state(directory: Path, state: Any) -> dict[str, Any]:
    problem = checkpoint_problem(directory)
    if problem:
        raise CheckpointError(f"{directory}: {problem}; pick another checkpoint or --resume auto")
    saved = json.loads((directory / STATE_FILE).read_text())
    format_version(saved, directory / STATE_FILE)
    if saved.get("format") != SHARDED:
        raise CheckpointError(
            f"{directory}: written by an unsharded run (one process or DDP); this run shards "
            "its model (FSDP2): resume it with the launch that wrote it"
        )
    if saved["world_size"] != state.num_processes:
        raise CheckpointError(
            f"{directory}: written by {saved['world_size']} processes, this run has "
            f"{state.num_processes}; a sharded checkpoint resumes on the same number"
        )
    return saved


def _live_state(model: nn.Module, optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's state dicts with parameter names as keys (sharded tensors
    under FSDP2); an optimizer that has not stepped yet gets its state made first (a step
    with zero gradients and learning rate)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, getattr(optimizer, "optimizer", optimizer))


def _flat(model_state: dict[str, Any], optim_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor under one flat name: ``model.<param>``, ``optimizer.<param>.<key>``."""
    flat = {f"model.{name}": value for name, value in model_state.items()}
    for name, values in optim_state["state"].items():
        flat |= {f"optimizer.{name}.{key}": value for key, value in values.items()}
    bad = [name for name, value in flat.items() if not isinstance(value, torch.Tensor)]
    if bad:  # the safetensors writer would put them, pickled, before the tensors
        raise CheckpointError(f"cannot write {bad[0]!r} as a tensor; it is not one")
    return flat


def _share_tmp(tmp: Path | None, state: Any) -> str:
    """The main process's temporary directory, sent to every process (None: it failed)."""
    from accelerate.utils import broadcast_object_list

    shared = broadcast_object_list([str(tmp) if tmp is not None else None])[0]
    if shared is None:
        raise CheckpointError("the main process could not create the checkpoint directory")
    return shared


def _write_parts(tmp: Path, tensors: dict[str, torch.Tensor], state: Any) -> dict[str, Any]:
    """Each process writes its shard and its random states; returns (on the main process)
    every part written, ``{relative path: {"rank": R, "bytes": N}}``."""
    import torch.distributed.checkpoint as dcp

    writer = _listing_writer()(str(tmp / SHARDS_DIR), save_distributed=True)
    dcp.save(tensors, storage_writer=writer)  # raises on every process if one fails
    error = None
    try:
        _write_synced(tmp / rank_file(state.process_index), json.dumps(rng_state()))
    except OSError as failure:
        error = failure
    _all_succeeded(error is None, state, "another process could not write its random states")
    if error is not None:
        raise error
    if not state.is_main_process:
        return {}
    ranks = {f"{SHARDS_DIR}/{name}": rank for name, rank in writer.files.items()}
    ranks |= {rank_file(rank): rank for rank in range(state.num_processes)}
    return {name: {"rank": r, "bytes": (tmp / name).stat().st_size} for name, r in ranks.items()}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _all_succeeded(ok: bool, state: Any, message: str) -> None:
    """A barrier that also tells every process whether all of them succeeded."""
    import torch.distributed as dist

    failed = torch.tensor([0 if ok else 1], device=state.device)
    dist.all_reduce(failed)
    if int(failed.item()) and ok:
        raise CheckpointError(f"checkpoint not written: {message or 'another process failed'}")


def _listing_writer() -> type:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    class ListingWriter(HuggingFaceStorageWriter):
        """Records, on the main process, the file each process wrote."""

        files: dict[str, int] = {}

        def finish(self, metadata: Any, results: list[list[Any]]) -> None:
            self.files = {
                result.storage_data.relative_path: rank
                for rank, written in enumerate(results)
                for result in written
            }
            return super().finish(metadata, results)

    return ListingWriter
