"""What an optimizer step processed and how fast: token counts, the model's FLOPs, the
device's peak, MFU and the share of the step spent waiting for data.

A step's counts (`step_counts`) are device tensors summed over its micro-batches, so they ride
on the loop's one existing reduction across processes. Model FLOPs count ``2 * N`` per token
forward for each part (N: its parameters) and, backward, ``4 * N`` for trained parameters,
``2 * N`` for frozen ones that gradients pass through, and nothing for a part no gradient
reaches (see docs/training.md, "Throughput metrics").
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.vision.base import ImageBatch

Batch = dict[str, Any]

COUNTS = ("tokens", "supervised", "visual", "vision_rows")
"""What `step_counts` counts: tokens (padding excluded), supervised tokens (labels != -100),
visual tokens (image placeholders) and rows the vision tower encodes (images or tiles)."""

# Dense (no sparsity) peak FLOP/s per GPU from NVIDIA's datasheets, by the name
# torch.cuda.get_device_name gives; the first pattern that matches wins. fp32: plain FP32
# (not TF32), what PyTorch's default float32 matmul precision uses.
PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH[12]00 NVL\b", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    (r"\bH100 PCIe\b", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    (r"\b(G?H100|G?H200)\b", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    (r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    (r"\bL40S\b", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    (r"\bV100-SXM2\b", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bV100-PCIE\b", {"fp16": 112e12, "fp32": 14e12}),
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),
)
_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """The dense peak FLOP/s of one ``device`` at the precision ``run.mixed_precision`` computes
    in; None on a CPU, an unknown GPU or a precision the table does not hold."""
    name = device_name(device)
    return lookup_peak(name, mixed_precision) if name is not None else None


def device_name(device: torch.device) -> str | None:
    """The GPU's name (``torch.cuda.get_device_name``); None for any other device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def lookup_peak(name: str, mixed_precision: str) -> float | None:
    """`PEAKS`' entry for a GPU called ``name`` at ``mixed_precision`` ("no", "bf16", "fp16")."""
    precision = _PRECISION.get(mixed_precision)
    for pattern, peaks in PEAKS:
        if re.search(pattern, name):
            return peaks.get(precision) if precision else None
    return None


@dataclass(frozen=True)
class FlopModel:
    """Model FLOPs (forward + backward) per unit counted in a step: a vision tower row, a
    visual token through the connector, a token through the LLM's body, a supervised token
    through the output head (applied only there)."""

    vision_row: float
    connector_token: float
    llm_token: float
    head_token: float

    @classmethod
    def of(cls, model: VisionLanguageModel) -> FlopModel:
        """From the parameters of ``model`` and which of them train (set up for the stage;
        before any engine shards them)."""
        embedding, head = _embedding_and_head(model.llm)
        skip = {id(p) for p in [*embedding, *head]}
        body = [p for p in model.llm.parameters() if id(p) not in skip]
        parts = [list(model.vision.parameters()), list(model.connector.parameters()), body, head]
        embedding_trains = any(p.requires_grad for p in embedding)
        reached, costs = False, []
        for index, params in enumerate(parts):  # in the order the forward runs them
            reached = reached or any(p.requires_grad for p in params)
            reached = reached or (index == 2 and embedding_trains)
            costs.append(sum(_numel(p) * _factor(p, reached) for p in params))
        patches = model.vision.untiled().num_patches
        return cls(costs[0] * patches, costs[1], costs[2], costs[3])

    def step_flops(self, counts: dict[str, float]) -> float:
        """The FLOPs of a step with `step_counts`' ``counts``."""
        return (
            self.vision_row * counts["vision_rows"]
            + self.connector_token * counts["visual"]
            + self.llm_token * counts["tokens"]
            + self.head_token * counts["supervised"]
        )


def _factor(param: nn.Parameter, reached: bool) -> int:
    """FLOPs per parameter and token: 2 forward, + 4 backward when it trains (input and
    weight gradients), + 2 when gradients only pass through it."""
    return 6 if param.requires_grad else 4 if reached else 2


def _numel(param: nn.Parameter) -> int:
    """Elements of the weight ``param`` stands for (a 4-bit weight stores two per byte)."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def _embedding_and_head(llm: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The input embedding's and output head's parameters (the head's are the embedding's
    when they are tied); none when the LLM does not expose them (all counts as the body)."""
    causal_lm = getattr(llm, "causal_lm", None)
    try:
        embedding = list(causal_lm.get_input_embeddings().parameters())
        head = [causal_lm.get_output_embeddings().weight]
    except AttributeError:
        return [], []
    return embedding, head


def step_counts(window: Iterable[Batch], image_token_id: int, device: torch.device) -> torch.Tensor:
    """`COUNTS` of the micro-batches of one step, as an int64 tensor on ``device``; sums of
    device tensors, so counting waits for nothing (one host-to-device copy)."""
    host = torch.zeros(len(COUNTS), dtype=torch.long)  # packed tokens, vision rows
    summed = torch.zeros(len(COUNTS), dtype=torch.long, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    for batch in window:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.numel() == 0:  # every sample skipped
            continue
        if mask is None:  # packed rows count their tokens in the collator
            host[0] += batch["num_tokens"]
        if batch.get("image_features") is None:  # cached features: the tower does not run
            host[3] += _rows(batch["pixel_values"])
        tokens = mask.sum() if mask is not None else zero
        supervised = (batch["labels"] != IGNORE_INDEX).sum()
        summed += torch.stack([tokens, supervised, (ids == image_token_id).sum(), zero])
    return summed + host.to(device)


def _rows(images: torch.Tensor | ImageBatch | None) -> int:
    """Rows the vision tower encodes for ``images``."""
    if images is None:
        return 0
    return len(images.values) if isinstance(images, ImageBatch) else len(images)


class Meter:
    """A stage's throughput: each step's metrics and the totals for the stage's summary."""

    def __init__(self, flops: FlopModel, peak: float | None, processes: int) -> None:
        self.flops = flops
        self.peak = peak * processes if peak else None  # every process's device alike
        self.totals = dict.fromkeys(("tokens", "supervised", "flops", "seconds", "wait"), 0.0)

    def step(self, counts: dict[str, float], seconds: float, wait: float) -> dict[str, float]:
        """The metrics of a step with ``counts`` (all processes) that took ``seconds``, of
        which ``wait`` waiting for batches; adds them to the totals."""
        flops = self.flops.step_flops(counts)
        values = {"tokens": counts["tokens"], "supervised": counts["supervised"]}
        values |= {"flops": flops, "seconds": seconds, "wait": wait}
        for key, value in values.items():
            self.totals[key] += value
        return self._metrics(values)

    def summary(self) -> dict[str, float]:
        """The stage's metrics over every step this process ran (empty before the first)."""
        return self._metrics(self.totals) if self.totals["seconds"] > 0 else {}

    def _metrics(self, values: dict[str, float]) -> dict[str, float]:
        seconds = max(values["seconds"], 1e-9)
        metrics = {
            "tokens": int(values["tokens"]),
            "supervised_tokens": int(values["supervised"]),
            "step_seconds": values["seconds"],
            "tokens_per_s": values["tokens"] / seconds,
            "supervised_tokens_per_s": values["supervised"] / seconds,
            "data_wait": min(values["wait"] / seconds, 1.0),
        }
        if self.peak:
            metrics["mfu"] = values["flops"] / seconds / self.peak
        return metrics


class TimedIterator:
    """Iterates ``batches``, adding up the seconds spent waiting for each next one."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches
        self.waited = 0.0

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - start

    def take(self) -> float:
        """The seconds waited since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited
