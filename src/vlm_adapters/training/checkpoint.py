"""Complete, atomic, resumable checkpoints: weights, optimizer, scheduler, RNG, data position.

Layout of ``<stage>/checkpoints/step-000123/``: ``model/`` (``save_pretrained``),
``optimizer.safetensors`` (the optimizer's tensors, flattened) and ``trainer_state.json``
(position, scheduler, optimizer param groups, RNG states). Everything is safetensors or JSON.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file

from .._io import atomic_dir
from .lora import has_lora, load_weights

MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where training stands: optimizer steps done, epoch, micro-batches consumed in it."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    seed: int = 0


def save_checkpoint(
    directory: Path, model: Any, optimizer: Any, scheduler: Any, position: Position
) -> Path:
    """Write one checkpoint atomically (a crash leaves any previous one intact)."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp / MODEL_DIR)
        tensors, groups = flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state = {
            "position": asdict(position),
            "scheduler": scheduler.state_dict(),
            "optimizer_groups": groups,
            "rng": rng_state(),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state))
    return directory


def load_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any) -> Position:
    """Restore everything `save_checkpoint` wrote into live objects; return the position."""
    if not is_complete(directory):
        raise FileNotFoundError(f"{directory}: not a complete training checkpoint")
    load_model_weights(model, directory / MODEL_DIR)
    state = json.loads((directory / STATE_FILE).read_text())
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer_groups"]))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Position(**state["position"])


def load_model_weights(model: Any, directory: Path) -> None:
    """Restore a ``save_pretrained`` directory's weights into the live (possibly LoRA) model."""
    if has_lora(model):
        load_weights(model, directory, "model.safetensors")
    else:
        load_model(model, str(directory / "model.safetensors"), strict=True)


def is_complete(directory: Path) -> bool:
    """True when every part of a checkpoint is present."""
    parts = (MODEL_DIR + "/model.safetensors", OPTIMIZER_FILE, STATE_FILE)
    return all((directory / part).is_file() for part in parts)


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete ``step-N`` checkpoints under `checkpoints`, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found) if is_complete(path)]


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints`, if any."""
    found = list_checkpoints(checkpoints)
    return found[-1] if found else None


def prune_checkpoints(checkpoints: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    for path in list_checkpoints(checkpoints)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


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
    """Python, numpy and torch (CPU) RNG states as JSON-able data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
