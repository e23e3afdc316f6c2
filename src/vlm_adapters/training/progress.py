"""Progress of one stage: a tqdm bar, periodic log lines, metrics JSONL and a loss-curve PNG."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("vlm_adapters.training")


class Progress:
    """Reports optimizer steps; writes only on the main process (`enabled`)."""

    def __init__(
        self,
        stage: str,
        total_steps: int,
        metrics_path: Path,
        *,
        log_every: int,
        enabled: bool,
        initial: int = 0,
        tracker: Any = None,
    ) -> None:
        self.stage = stage
        self.total = total_steps
        self.path = metrics_path
        self.log_every = log_every
        self.enabled = enabled
        self.tracker = tracker
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total_steps,
            initial=initial,
            desc=stage,
            disable=not enabled or not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def step(self, record: dict[str, Any]) -> None:
        """One optimizer step: `record` holds step, epoch, loss, lr, grad_norm and the
        throughput metrics (`Meter.step`: tokens_per_s, supervised_tokens_per_s, data_wait,
        mfu where known, ...)."""
        if not self.enabled:
            return
        record = {**record, "seconds": round(time.perf_counter() - self.start, 3)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
        )
        if self.tracker is not None:
            self.tracker.log(
                {f"{self.stage}/{k}": v for k, v in record.items()}, step=record["step"]
            )
        if record["step"] % self.log_every == 0 or record["step"] == self.total:
            logger.info(
                "%s step %d/%d loss %.4f lr %.3g %s",
                self.stage, record["step"], self.total, record["loss"], record["lr"],
                throughput_text(record),
            )  # fmt: skip

    def close(self) -> None:
        self.bar.close()


def throughput_text(metrics: dict[str, Any]) -> str:
    """``tok/s 1234 sup tok/s 210 data wait 3% MFU 41.2%`` (MFU only where it is known)."""
    text = (
        f"tok/s {metrics['tokens_per_s']:.0f} sup tok/s {metrics['supervised_tokens_per_s']:.0f} "
        f"data wait {metrics['data_wait']:.0%}"
    )
    return text + (f" MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (empty when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (a resumed stage logs the later ones again)."""
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def plot_loss(metrics_path: Path, png_path: Path, title: str) -> Path | None:
    """Draw loss against step from a metrics JSONL file; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["step"] for r in records], [r["loss"] for r in records])
    axis.set(xlabel="optimizer step", ylabel="loss", title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
