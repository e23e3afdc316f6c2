"""Complete, atomic, resumable checkpoints: weights, optimizer, scheduler, RNG, data position.

Layout of ``<stage>/checkpoints/step-000123/`` of an unsharded run (one process, DDP; written
by the main process): ``model/`` (``save_pretrained``), ``optimizer.safetensors`` (the
optimizer's tensors, flattened) and ``trainer_state.json`` (format version, position,
scheduler, optimizer param groups, RNG states). A sharded (FSDP2) run writes its own layout (see
`vlm_adapters.training.sharded_checkpoint`); both are verified here. Everything is
safetensors or JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from vlm_adapters._io import (
    atomic_dir,
    remove_stale_temps,
    remove_tree,
    safetensors_problem,
    temp_name,
)
from vlm_adapters.errors import CheckpointError
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.model.files import FORMAT_VERSION, WEIGHTS_NAME
from vlm_adapters.model.io import format_version
from vlm_adapters.model.lora import ADAPTER_DIRS, CONFIG_KEYS, load_weights

logger = logging.getLogger("vlm_adapters.training")

MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
SHARDED = "sharded"
"""``trainer_state.json``'s ``format`` in a sharded checkpoint (absent in an unsharded one)."""
SHARDS_DIR = "shards"
_RANK_FILE = re.compile(r"^rng-rank-(\d{5})\.json$")
_SHARD_FILE = re.compile(rf"^{SHARDS_DIR}/[A-Za-z0-9_.-]+\.safetensors$")
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where training stands: optimizer steps done, epoch, micro-batches consumed in it."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    seed: int = 0
    world: int = 0
    """Processes a streamed stage's micro-batches are cut for (0: map-style data)."""


def save_checkpoint(
    directory: Path,
    model: VisionLanguageModel,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    position: Position,
) -> Path:
    """Write one checkpoint atomically (a crash leaves any previous one intact)."""
    remove_stale_temps(directory.parent)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp / MODEL_DIR)
        tensors, groups = flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state = {
            "format_version": FORMAT_VERSION,
            "position": asdict(position),
            "scheduler": scheduler.state_dict(),
            "optimizer_groups": groups,
            "rng": rng_state(),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state))
    return directory


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler
) -> Position:
    """Restore everything `save_checkpoint` wrote into live objects; return the position."""
    problem = checkpoint_problem(directory)
    if problem:
        raise CheckpointError(f"{directory}: {problem}; pick another checkpoint or --resume auto")
    state = json.loads((directory / STATE_FILE).read_text())
    format_version(state, directory / STATE_FILE)
    if state.get("format") == SHARDED:
        raise CheckpointError(
            f"{directory}: written by a sharded (FSDP2) run of {state['world_size']} processes; "
            "resume it with the launch that wrote it"
        )
    try:
        load_weights(model, directory / MODEL_DIR, WEIGHTS_NAME)
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer_groups"]))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return Position(**state["position"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"{directory}: does not fit this run ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}); was it written with "
            "another config?"
        ) from None


def checkpoint_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete, readable checkpoint (checked from file sizes,
    safetensors headers and JSON, without loading tensors), or None. Sharded checkpoints
    have every process's part checked."""
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        if isinstance(state, dict) and state.get("format") == SHARDED:
            return _sharded_problem(directory, state)
        config = json.loads((directory / MODEL_DIR / "config.json").read_text())
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (OSError, ValueError) as error:
        return f"unreadable JSON ({error})"
    if not isinstance(state, dict) or not {"position", "rng", "scheduler"} <= set(state):
        return f"{STATE_FILE} is incomplete"
    return _unsharded_problem(directory, config)


def _unsharded_problem(directory: Path, config: Any) -> str | None:
    model_dir = directory / MODEL_DIR
    weights = [model_dir / WEIGHTS_NAME, directory / OPTIMIZER_FILE]
    for part, key in CONFIG_KEYS.items():
        if isinstance(config, dict) and key in config:
            weights.append(model_dir / ADAPTER_DIRS[part] / "adapter_model.safetensors")
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            return problem.replace(f"{directory}/", "")
    return None


def _sharded_problem(directory: Path, state: dict[str, Any]) -> str | None:
    """Every part listed in ``trainer_state.json`` is there, complete, and no process's part
    is missing from the list; ``shards/`` holds nothing else."""
    parts, world = state.get("files"), state.get("world_size")
    keys = {"position", "scheduler", "optimizer_groups"}
    if not (isinstance(parts, dict) and isinstance(world, int) and keys <= set(state)):
        return f"{STATE_FILE} is incomplete"
    if any(not _SHARD_FILE.match(n) and not _RANK_FILE.match(n) for n in parts):
        return f"{STATE_FILE} names a file that is not a checkpoint part"
    try:
        owners = {name: int(info["rank"]) for name, info in parts.items()}
    except (KeyError, TypeError, ValueError):
        return f"{STATE_FILE} is incomplete"
    for rank in range(world):
        if rank_file(rank) not in owners or rank not in owners.values():
            return f"the part of process {rank} is missing from {STATE_FILE}"
    for name, info in sorted(parts.items()):
        problem = _part_problem(directory / name, info)
        if problem:
            return f"{name} (the part of process {owners[name]}) {problem}"
    listed = {name.split("/", 1)[1] for name in parts if _SHARD_FILE.match(name)}
    extra = sorted({p.name for p in (directory / SHARDS_DIR).iterdir()} - listed)
    return f"{SHARDS_DIR}/{extra[0]} is not a part of this checkpoint" if extra else None


def _part_problem(path: Path, info: dict[str, Any]) -> str | None:
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != info.get("bytes"):
        return f"has {size} bytes where {STATE_FILE} says {info.get('bytes')}; it is truncated"
    if path.suffix == ".safetensors":
        problem = safetensors_problem(path)
        return problem.replace(f"{path} ", "") if problem else None
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"is not valid JSON ({error})"
    return None


def rank_file(rank: int) -> str:
    """The name of process ``rank``'s random states in a sharded checkpoint."""
    return f"rng-rank-{rank:05d}.json"


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Every ``step-N`` directory under `checkpoints`, oldest first (complete or not)."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints`; newer broken ones are skipped with a
    warning saying why."""
    for path in reversed(list_checkpoints(checkpoints)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("resume: skipping %s: %s", path, problem)
    return None


def prune_checkpoints(checkpoints: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones, incomplete ones
    older than those (a kill while pruning), and temporary leftovers of dead processes.

    A directory is first renamed to a temporary name, so a kill half-way through leaves only
    something the next call recognises and removes.
    """
    remove_stale_temps(checkpoints)
    every = list_checkpoints(checkpoints)
    complete = [p for p in every if checkpoint_problem(p) is None]
    kept = complete[-keep_last:]
    oldest_kept = every.index(kept[0]) if kept else 0
    for path in every[:oldest_kept]:
        doomed = checkpoints / temp_name(path.name, "old")
        os.replace(path, doomed)
        remove_tree(doomed)


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:06d}"


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as flat tensors (``state.<param>.<key>``) and JSON-able rest."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param, key = name.split(".", 2)
        state.setdefault(int(param), {})[key] = value
    for name, value in rest["scalars"].items():
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and CUDA when present) RNG states as JSON-able data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
