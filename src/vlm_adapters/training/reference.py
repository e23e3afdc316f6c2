"""The reference model of a preference stage, without waste.

- ``adapters``: with LoRA, the training model itself with its adapters switched off (peft's
  ``disable_adapter``); a connector that trains outside LoRA is the one part copied (it is
  small), so the reference is the model the stage started from.
- ``copy``: a frozen copy of the whole model, made before the stage trains.
- ``precomputed``: the reference log-probabilities of every pair, computed in one pass before
  the first step and kept in ``OUT/<stage>/reference_logps.safetensors`` (written atomically,
  keyed by a digest of the data, the template, the length limit, the precision and the
  weights), reused on resume and computed again when the key differs.

Reference passes run in eval mode (no dropout) and without gradients.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from vlm_adapters._io import atomic_write_bytes
from vlm_adapters.data.pairs import PairCollator, PreferenceDataset
from vlm_adapters.data.records import describe_memory
from vlm_adapters.errors import ConfigError
from vlm_adapters.inference.preference import pair_forward
from vlm_adapters.model.core import VisionLanguageModel, evaluating
from vlm_adapters.model.lora import adapters_disabled, has_lora, is_quantized

logger = logging.getLogger("vlm_adapters.training")

REFERENCE_NAME = "reference_logps.safetensors"
Batch = dict[str, Any]


def resolve_reference(kind: str, model: VisionLanguageModel) -> str:
    """``auto``: ``adapters`` when the model trains through LoRA, else ``copy``."""
    if kind != "auto":
        return kind
    return "adapters" if has_lora(model) else "copy"


class LiveReference:
    """Reference log-probabilities computed next to each training step (``adapters`` or
    ``copy``); see the module docstring."""

    def __init__(self, kind: str, model: VisionLanguageModel) -> None:
        self.kind = kind
        self.model = model
        self.copy: VisionLanguageModel | None = None
        self.connector: nn.Module | None = None
        if kind == "copy":
            self.copy = _frozen(copy.deepcopy(model))
        elif any(p.requires_grad for p in model.connector.parameters()):
            self.connector = _frozen(copy.deepcopy(model.connector))

    def to(self, device: torch.device) -> LiveReference:
        for module in (self.copy, self.connector):
            if module is not None:
                module.to(device)
        return self

    @torch.no_grad()
    def logps(self, batch: Batch, features: Any = None) -> torch.Tensor:
        """``[2P]`` reference log-probabilities of the pair batch (``features``: the tower's
        output for its images, when the tower is frozen and the policy pass computed them)."""
        extra = {} if features is None else {"image_features": features}
        if self.copy is not None:
            return pair_forward(self.copy, batch, **extra).sequence_logps
        with evaluating(self.model), self._swapped(), adapters_disabled(self.model):
            return pair_forward(self.model, batch, **extra).sequence_logps

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        """The stage's starting connector in place of the training one."""
        if self.connector is None:
            yield
            return
        training = self.model.connector
        self.model.connector = self.connector
        try:
            yield
        finally:
            self.model.connector = training


def _frozen(module: nn.Module) -> Any:
    return module.requires_grad_(False).eval()


def check_reference(kind: str, model: VisionLanguageModel, stage: str) -> None:
    """What each reference needs: adapters need LoRA and a frozen tower outside it; a copy
    cannot hold 4-/8-bit layers."""
    if kind == "adapters":
        if not has_lora(model):
            raise ConfigError(f"stages.{stage}.reference: adapters needs LoRA; use copy")
        plain = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and ".lora_" not in name and not name.startswith("connector.")
        ]
        if plain:
            raise ConfigError(
                f"stages.{stage}.reference: adapters cannot switch off {plain[0]}, which trains "
                "outside LoRA; use copy or precomputed"
            )
    if kind == "copy" and is_quantized(model):
        raise ConfigError(
            f"stages.{stage}.reference: copy cannot copy a 4-/8-bit LLM; use adapters or "
            "precomputed"
        )


@dataclass
class Precompute:
    """What the one pass over the pairs needs."""

    model: VisionLanguageModel
    dataset: PreferenceDataset
    collator: PairCollator
    accelerator: Accelerator
    directory: Path
    batch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    facts: str
    """The template, length limit and precision, as text (part of the key)."""


def precomputed_reference(job: Precompute) -> torch.Tensor:
    """``[records, 2]`` reference log-probabilities (chosen, rejected; NaN for skipped
    records), read from the run folder when its key matches, else computed (each process a
    share) and written there."""
    key = _key(job)
    path = job.directory / REFERENCE_NAME
    table = _read(path, key)
    if table is not None and len(table) == len(job.dataset.records):
        logger.info("reference log-probs: reused %s", path)
        return table
    table = _compute(job)
    if job.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"logps": table}, metadata={"key": key}))
        logger.info("reference log-probs: computed %d pairs into %s", len(job.dataset), path)
    job.accelerator.wait_for_everyone()
    return table


def _read(path: Path, key: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                logger.info("reference log-probs: %s is for other data or weights", path)
                return None
            return handle.get_tensor("logps")
    except (OSError, ValueError, RuntimeError):
        return None


@torch.no_grad()
def _compute(job: Precompute) -> torch.Tensor:
    """Every process runs the same number of batches (FSDP2 passes are collective)."""
    accelerator, size = job.accelerator, job.batch_size
    chunks = [
        list(range(i, min(i + size, len(job.dataset)))) for i in range(0, len(job.dataset), size)
    ]
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = -(-len(chunks) // world)
    found: list[tuple[int, float, float]] = []
    last: Batch | None = None
    with evaluating(job.model):
        for index in range(rounds):
            number = index * world + rank
            batch = (
                job.collator([job.dataset[i] for i in chunks[number]])
                if number < len(chunks)
                else None
            )
            real = batch is not None and batch["pairs"] > 0
            batch = batch if real else last
            if batch is None:
                continue
            last = batch
            moved = _to(batch, accelerator.device)
            with job.autocast():
                logps = pair_forward(job.model, moved).sequence_logps.float().cpu()
            if real:
                pairs = moved["pairs"]
                for position, c, r in zip(
                    batch["positions"].tolist(), logps[:pairs], logps[pairs:]
                ):
                    found.append((position, float(c), float(r)))
    gathered = gather_object(found) if world > 1 else found
    table = torch.full((len(job.dataset.records), 2), float("nan"), dtype=torch.float64)
    for position, chosen, rejected in gathered:
        table[position] = torch.tensor([chosen, rejected], dtype=torch.float64)
    return table


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _key(job: Precompute) -> str:
    """A digest of the pairs, ``facts`` and the weights (every process's shard)."""
    digest = hashlib.sha256(describe_memory(job.dataset.records).encode())
    digest.update(job.facts.encode())
    digest.update(",".join(map(str, job.dataset.positions)).encode())
    local = _weights_digest(job.model)  # this process's shard: one pass over the weights
    digest.update(local.encode())
    if job.accelerator.num_processes > 1:
        digest.update("".join(gather_object([local])).encode())
    return digest.hexdigest()


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if not isinstance(local, torch.Tensor):
            continue
        digest.update(f"{name} {local.dtype} {tuple(local.shape)}".encode())
        data = local.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
