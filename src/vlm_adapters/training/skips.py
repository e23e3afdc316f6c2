"""A stage's skipped samples: the ``skipped.jsonl`` list, the skip limit, the per-epoch report."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object

from vlm_adapters.data import Skipped
from vlm_adapters.errors import TrainingError

logger = logging.getLogger("vlm_adapters.training")

SKIPPED_NAME = "skipped.jsonl"


@dataclass
class SkipCounter:
    """Counts samples seen and skipped (by reason) over an epoch, for the end-of-epoch report,
    and keeps each skipped sample once (by its index in the data file)."""

    seen: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    samples: dict[int, Skipped] = field(default_factory=dict)

    def update(self, batch: Mapping[str, Any]) -> None:
        """Count one collated batch."""
        kept = batch.get("num_samples", len(batch["input_ids"]))  # packed rows hold several
        self.seen += kept + len(batch["skipped"])
        self.add(batch["skipped"])

    def add(self, skipped: Sequence[Skipped]) -> None:
        """Count samples skipped outside a batch (e.g. by the up-front check)."""
        self.reasons.update(item.reason for item in skipped)
        for item in skipped:
            self.samples.setdefault(item.index, item)

    def merge(self, other: SkipCounter) -> None:
        """Add another process's counts."""
        self.seen += other.seen
        self.reasons.update(other.reasons)
        for index, item in other.samples.items():
            self.samples.setdefault(index, item)

    def report(self) -> str:
        """E.g. "skipped 3 of 120 samples: 2 image missing, 1 too long (> 512 tokens)"."""
        line = f"skipped {sum(self.reasons.values())} of {self.seen} samples"
        if not self.reasons:
            return line
        counts = ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common())
        return f"{line}: {counts}"

    def reset(self) -> None:
        """Start a new epoch."""
        self.seen = 0
        self.reasons.clear()
        self.samples.clear()


class SkipLog:
    """Every distinct sample a stage skipped (up front and in its epochs), kept in
    ``<stage dir>/skipped.jsonl``; a resumed stage keeps the list an earlier run wrote."""

    def __init__(
        self, stage: str, directory: Path, accelerator: Accelerator, max_fraction: float
    ) -> None:
        self.stage, self.directory = stage, directory
        self.accelerator = accelerator
        self.max_fraction = max_fraction
        self.path = directory / SKIPPED_NAME
        self.samples: dict[int, Skipped] = {}
        self.num_samples = 0
        """Records in the stage's data file (what the limit is a fraction of)."""
        self.epoch = SkipCounter()
        """The current epoch's skips on this process (counted batch by batch)."""

    def start(self, num_samples: int) -> None:
        """Begin with the list an earlier (interrupted) run of the stage wrote."""
        self.num_samples = num_samples
        self.samples = _read_skipped(self.path)

    def record(self, skipped: list[Skipped], when: str) -> None:
        """Append newly skipped samples to ``skipped.jsonl``; fail past the skip limit."""
        new = [item for item in skipped if item.index not in self.samples]
        for item in new:
            self.samples[item.index] = item
        if self.accelerator.is_main_process and new:
            self.directory.mkdir(parents=True, exist_ok=True)
            _append_lines(self.path, [_json_line(item.to_json()) for item in new])
        count, total = len(self.samples), self.num_samples
        if count > self.max_fraction * total or count == total:
            raise TrainingError(
                f"stage {self.stage}: {count} of {total} samples were skipped by {when}, more "
                f"than data.max_skip_fraction={self.max_fraction}; the samples and reasons are "
                f"in {self.path}; fix them or raise the limit"
            )

    def report(self, epoch: int) -> None:
        """Record the epoch's skips (every process's), then log every sample skipped so far,
        up front included: the count is the number of rows in ``skipped.jsonl``."""
        merged = SkipCounter()
        for counter in gather_object([self.epoch]):
            merged.merge(counter)
        self.record(list(merged.samples.values()), f"epoch {epoch}")
        if self.accelerator.is_main_process:
            every = SkipCounter(seen=self.num_samples)
            every.add(list(self.samples.values()))
            where = f"; listed in {self.path}" if self.samples else ""
            logger.info("%s epoch %d: %s%s", self.stage, epoch, every.report(), where)


def _read_skipped(path: Path) -> dict[int, Skipped]:
    """The samples an earlier (interrupted) run of the stage listed in ``skipped.jsonl``."""
    found: dict[int, Skipped] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            item = Skipped(**json.loads(line))
        except (TypeError, ValueError):
            continue  # a line cut by a kill
        found[item.index] = item
    return found


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append to a JSONL file, first ending a last line that a kill cut short."""
    with open(path, "a+b") as handle:
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(lines).encode())


def _json_line(record: dict[str, object]) -> str:
    """One JSONL line."""
    return json.dumps(record) + "\n"
