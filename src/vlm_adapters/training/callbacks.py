"""Callbacks: code of the user's that a training run calls at its events (a logged step, a
saved checkpoint, an evaluation, the end of a stage), in the style of transformers'
``TrainerCallback``; a callback can stop the run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_adapters.errors import ConfigError


@dataclass
class TrainerState:
    """Where the run is when a callback is called."""

    stage: str
    """The stage that runs ("align", "finetune", "preference")."""
    out: Path
    """The run directory."""
    step: int = 0
    """Optimizer steps the stage has taken (a resumed stage counts the earlier ones)."""
    total_steps: int = 0
    """Optimizer steps of the whole stage."""
    epoch: int = 0
    is_main: bool = True
    """Whether this is the main process (callbacks run on every process)."""
    log_history: list[dict[str, Any]] = field(default_factory=list)
    """Every ``on_log`` record of the run so far, each with its ``stage``."""


@dataclass
class TrainerControl:
    """What callbacks ask of the run."""

    should_stop: bool = False
    """Set it to stop after the current optimizer step: the stage writes a checkpoint that
    ``resume="auto"`` continues from, and no later stage runs."""


class TrainerCallback:
    """Base class of callbacks: override the events you need (each does nothing here).

    Every event gets the run's `TrainerState` and its `TrainerControl`; set
    ``control.should_stop = True`` to stop the run.
    """

    def on_log(self, state: TrainerState, control: TrainerControl, logs: dict[str, Any]) -> None:
        """After each optimizer step, with its record (step, epoch, loss, lr, grad_norm,
        seconds and the throughput metrics: a line of the stage's ``metrics.jsonl``)."""

    def on_save(self, state: TrainerState, control: TrainerControl, path: Path) -> None:
        """After a checkpoint (``<stage>/checkpoints/step-N``) or the stage's final model
        (``<stage>/final``) was written to ``path``."""

    def on_evaluate(
        self, state: TrainerState, control: TrainerControl, metrics: dict[str, Any]
    ) -> None:
        """After a stage, when the config has ``data.eval``: ``eval_loss`` (teacher-forced,
        per answer token) and ``eval_samples`` on that data."""

    def on_stage_end(
        self, state: TrainerState, control: TrainerControl, summary: dict[str, Any]
    ) -> None:
        """After a stage ended (finished, or stopped by a callback), with its summary."""


class CallbackHandler:
    """The run's callbacks, called in order with one shared state and control."""

    def __init__(self, callbacks: Iterable[TrainerCallback] | None, out: Path) -> None:
        self.callbacks = list(callbacks or [])
        for callback in self.callbacks:
            if not isinstance(callback, TrainerCallback):
                what = callback.__name__ if isinstance(callback, type) else type(callback).__name__
                raise ConfigError(
                    f"callbacks: {what} is not a TrainerCallback instance; subclass "
                    "vlm_adapters.TrainerCallback and pass an instance of it"
                )
        self.state = TrainerState(stage="", out=out)
        self.control = TrainerControl()
        self.agree: Callable[[bool], bool] | None = None
        """Under several processes: whether any of them asks to stop (so all stop at once)."""

    def event(self, name: str, **data: Any) -> bool:
        """Call ``name`` on every callback with ``data``; returns whether the run should stop
        (the same answer on every process)."""
        if not self.callbacks:
            return False
        if name == "on_log":
            self.state.log_history.append({"stage": self.state.stage, **data["logs"]})
        for callback in self.callbacks:
            getattr(callback, name)(self.state, self.control, **data)
        if self.agree is not None:
            self.control.should_stop = self.agree(self.control.should_stop)
        return self.control.should_stop
