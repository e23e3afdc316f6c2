"""A training run (`train`): the recipe's stages in order in one run directory, which of them
are finished or resume where, the stage-1 connector carried into a later stage, the model and
data given in Python, callbacks, and the evaluation after each stage."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from vlm_adapters._io import atomic_write_text, remove_tree, safetensors_problem
from vlm_adapters.chat.templates import check_template
from vlm_adapters.config import apply_overrides, read_yaml
from vlm_adapters.data.records import RecordSource
from vlm_adapters.errors import CheckpointError, ComponentError, ConfigError, OutputError
from vlm_adapters.model.build import build_vlm
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.model.files import WEIGHTS_NAME
from vlm_adapters.model.io import read_checkpoint_config
from vlm_adapters.model.lora import (
    CONFIG_KEYS,
    has_lora,
    load_lora,
    load_weights,
)
from vlm_adapters.training.artifact import CONFIG_NAME as CONNECTOR_CONFIG
from vlm_adapters.training.callbacks import CallbackHandler, TrainerCallback
from vlm_adapters.training.checkpoint import checkpoint_problem
from vlm_adapters.training.config import (
    DEFAULT_RECIPE,
    DatasetConfig,
    TrainConfig,
    check_max_length,
    save_train_config,
    train_config_from_dict,
)
from vlm_adapters.training.data import (
    DataSources,
    check_memory_cache,
    read_stage_records,
    with_given_data,
)
from vlm_adapters.training.engine import make_accelerator
from vlm_adapters.training.evaluation import Evaluator
from vlm_adapters.training.loop import Trainer
from vlm_adapters.training.recipes import carry_connector, stages_to_run
from vlm_adapters.training.rundir import (
    CONFIG_NAME,
    check_resume_config,
    locked_run_dir,
    on_main,
)
from vlm_adapters.training.sections import with_model_sections

logger = logging.getLogger("vlm_adapters.training")

Plan = dict[str, Any]
"""Per stage: "done" (skip it), a checkpoint to resume from, "auto" or None (fresh)."""


@dataclass
class TrainResult:
    """What `train` returns."""

    model: VisionLanguageModel
    """The trained model (a stopped stage's: its weights at the step it stopped)."""
    summary: dict[str, dict[str, Any]]
    """Per stage that ran: steps, final_loss, seconds, skipped, final_dir, stopped_at (the
    checkpoint of a stage a callback stopped), its throughput over the steps it took (tokens,
    supervised_tokens, step_seconds, tokens_per_s, supervised_tokens_per_s, data_wait and,
    on a GPU whose peak is known, mfu), a preference stage's last step's rewards/* and
    logps/* (docs/preference.md) and, with ``data.eval``, eval_loss."""
    out: Path
    """The run directory."""
    stopped: bool = False
    """Whether a callback stopped the run (``resume="auto"`` continues it)."""


def train(
    config: TrainConfig | dict[str, Any] | str | Path,
    stage: str = "all",
    out: str | Path = "runs/vlm",
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
    model: VisionLanguageModel | None = None,
    *,
    data: DataSources = None,
    callbacks: Iterable[TrainerCallback] | None = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
    fresh_connector: bool = False,
) -> TrainResult:
    """Run `stage` ("all" = the recipe, in order); return the model and a summary per stage.

    `config`: a YAML path, a dict of the YAML's shape or a `TrainConfig`. `model` defaults to
    one built from the config; when given, the config's vision / connector / llm sections
    come from it (a section that says otherwise is refused) and the same object carries each
    stage's weights into the next. `data`: the stages' data given in Python instead of
    ``data.<stage>.path`` (see `DataSources`); the run's config.yaml names in-memory records
    by their count and digest, and a resume needs them again. `callbacks`: `TrainerCallback`
    instances, called at each logged step, saved checkpoint, evaluation (``data.eval``, after
    each stage) and stage end; one can stop the run.
    `resume`: "auto" continues from the newest complete checkpoints (finished stages are
    skipped), a checkpoint path continues from there; a changed config is refused unless
    `allow_config_change`. A stage that already has results in `out` is trained again only
    with `overwrite`, which also allows a non-empty `out` that is not a run directory (its
    files are kept). `--stage finetune` needs the stage-1 connector in `out/align/connector`
    unless `fresh_connector` (or a `model` is passed). Progress is logged at INFO (with a
    bar on a terminal) when the program has not configured logging.
    """
    with _default_logging():
        handler = CallbackHandler(callbacks, Path(out))
        raw, where = _raw_config(config, overrides)
        if model is not None:
            raw = with_model_sections(raw, model, where)
        memory: dict[str, RecordSource] = {}
        if data is not None:
            raw, memory = with_given_data(raw, data, _named_stages(raw, stage))
        config = train_config_from_dict(raw, where)
        check_memory_cache(config, memory)
        return _run(
            config,
            stage,
            Path(out),
            resume,
            model,
            memory,
            handler,
            overwrite=overwrite,
            allow_config_change=allow_config_change,
            fresh_connector=fresh_connector,
        )


def _run(
    config: TrainConfig,
    stage: str,
    out: Path,
    resume: str | Path | None,
    model: VisionLanguageModel | None,
    memory: dict[str, RecordSource],
    callbacks: CallbackHandler,
    *,
    overwrite: bool,
    allow_config_change: bool,
    fresh_connector: bool,
) -> TrainResult:
    names = stages_to_run(config, stage)
    datasets = {name: config.dataset(name) for name in names}  # every stage, before any runs
    with naming_file(config.where):
        records = {
            name: read_stage_records(name, source, memory.get(name), config.run.seed)
            for name, source in datasets.items()
        }
    accelerator = make_accelerator(config, out)
    evaluator = Evaluator.of_run(config, memory.get("eval"), accelerator.is_main_process)
    with locked_run_dir(out, overwrite=overwrite, state=accelerator.state):
        plan = on_main(
            accelerator.state,
            lambda: _prepare_run(out, config, names, resume, overwrite, allow_config_change),
        )
        built_here = model is None
        if model is None:
            set_seed(config.run.seed)  # same initial weights on every process and every run
            with naming_file(config.where):
                model = build_vlm(config.model)
        _check_model_fits(config, model, datasets)
        if names == ["preference"] and _finished(out / "finetune"):
            _load_final(model, out / "finetune" / "final", needed=True)  # the model it tunes
        elif "align" not in names:
            _carry_connector(model, out, required=built_here and not fresh_connector)
        summaries = {}
        for name in names:
            if plan[name] == "done":
                _load_final(model, out / name / "final", needed=name != names[-1])
                continue
            samples = None if records[name] is None else len(records[name])  # None: streamed
            trainer = Trainer(
                model,
                config,
                name,
                out,
                accelerator,
                records.pop(name),
                callbacks=callbacks,
                evaluator=evaluator,
            )
            summary = trainer.fit(resume=plan[name])
            if summary["stopped_at"] is None:
                model = trainer.trained_model()
                if evaluator is not None:
                    metrics = evaluator.run(model, name, "end")
                    summary.update(metrics)
                    callbacks.event("on_evaluate", metrics=metrics)
            callbacks.event("on_stage_end", summary=summary)
            summaries[name] = summary
            if summary["stopped_at"] is None and accelerator.is_main_process:
                counted = {} if samples is None else {"samples": samples}
                _save_summary(out / name, {**summary, **counted})
            if callbacks.control.should_stop:
                break
    return TrainResult(model, summaries, out, callbacks.control.should_stop)


def _raw_config(
    config: TrainConfig | dict[str, Any] | str | Path, overrides: list[str] | None
) -> tuple[dict[str, Any], str]:
    """The config as YAML-shaped data with the dotted ``overrides``, and where it is from."""
    if isinstance(config, (str, Path)):
        raw, where = read_yaml(config), str(config)
    elif isinstance(config, TrainConfig):
        raw, where = config.to_dict(), config.where
    elif isinstance(config, dict):
        raw, where = config, ""
    else:
        raise ConfigError(
            f"config: expected a YAML path, a dict or a TrainConfig, got {type(config).__name__}"
        )
    return apply_overrides(raw, overrides or []), where


def _named_stages(raw: dict[str, Any], stage: str) -> list[str]:
    """The stages ``stage`` names in the raw config (validated later)."""
    if stage != "all":
        return [stage]
    recipe = raw.get("recipe")
    return [str(name) for name in recipe] if isinstance(recipe, list) else list(DEFAULT_RECIPE)


@contextlib.contextmanager
def _default_logging() -> Iterator[None]:
    """Progress lines at INFO on stderr, as the CLI prints them, while the program has
    configured no logging of its own (no handler on the root or our logger)."""
    package = logging.getLogger("vlm_adapters")
    if logging.getLogger().handlers or package.handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


@contextlib.contextmanager
def naming_file(where: str) -> Iterator[None]:
    """Prefix config and component errors raised inside with the config file's name."""
    try:
        yield
    except (ConfigError, ComponentError) as error:
        if not where or str(error).startswith(where):
            raise
        raise type(error)(f"{where}: {error}") from None


def _check_model_fits(
    config: TrainConfig, model: VisionLanguageModel, datasets: dict[str, DatasetConfig]
) -> None:
    """What needs the built model: the context length and each stage's template tokens."""
    context = model.llm.max_positions
    if context is not None:
        check_max_length(config, context)
    for source in datasets.values():  # the eval data's too
        check_template(model.tokenizer, source.template)


def _prepare_run(
    out: Path,
    config: TrainConfig,
    names: list[str],
    resume: str | Path | None,
    overwrite: bool,
    allow_config_change: bool,
) -> Plan:
    """On the main process: check the resume config, protect finished stages, save the config."""
    if resume is not None:
        check_resume_config(out, config.to_dict(), allow_config_change)
    plan = _resume_plan(names, out, resume)
    for name, step in plan.items():
        if step is None:
            _clear_stage(out / name, overwrite)
    if resume is None or allow_config_change or not (out / CONFIG_NAME).is_file():
        save_train_config(config, out / CONFIG_NAME)
    return plan


SUMMARY_NAME = "summary.json"
"""A finished stage's summary (steps, final_loss, seconds, skipped, samples and the
evaluation after it), which the model card of an export reads."""


def _save_summary(directory: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(directory / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


_STAGE_OUTPUTS = (
    "final",
    SUMMARY_NAME,
    "checkpoints",
    "connector",
    "metrics.jsonl",
    "skipped.jsonl",
    "loss.png",
)


def _clear_stage(directory: Path, overwrite: bool) -> None:
    """A stage about to start fresh: refuse to replace its results unless `overwrite`."""
    found = [name for name in _STAGE_OUTPUTS if (directory / name).exists()]
    if not found:
        return
    if not overwrite:
        what = "a finished stage" if "final" in found else "checkpoints of an unfinished run"
        raise OutputError(
            f"{directory} already holds {what} ({', '.join(found)}); pass --resume auto to "
            "continue it, --overwrite to train it again, or choose another --out"
        )
    for name in found:
        remove_tree(directory / name)


def _resume_plan(names: list[str], out: Path, resume: str | Path | None) -> Plan:
    """What each stage does: see `Plan`."""
    if resume is None:
        return dict.fromkeys(names)
    if resume == "auto":
        plan: Plan = {}
        for name in names:
            finished = _finished(out / name)
            earlier_done = all(value == "done" for value in plan.values())
            plan[name] = "done" if finished and earlier_done else "auto"
        return plan
    path = Path(resume)
    owner = path.parent.parent.name
    if owner not in names:
        raise ConfigError(f"--resume {path}: expected OUT/<stage>/checkpoints/step-N of {names}")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"--resume {path}: {problem}; use another one or --resume auto")
    index = names.index(owner)
    return {n: ("done" if i < index else path if i == index else None) for i, n in enumerate(names)}


def _finished(stage_dir: Path) -> bool:
    """A stage is done when its final model (and, for align, the connector) is complete."""
    done = safetensors_problem(stage_dir / "final" / WEIGHTS_NAME) is None
    if stage_dir.name == "align":
        done = done and (stage_dir / "connector" / CONNECTOR_CONFIG).is_file()
    return done


def _carry_connector(model: VisionLanguageModel, out: Path, required: bool) -> None:
    artifact = out / "align" / "connector"
    if carry_connector(model, artifact):
        logger.info("finetune: connector loaded from %s", artifact)
    elif required:
        raise ConfigError(
            f"{artifact}: no stage-1 connector; run `--stage align` into this --out first, or "
            "pass --fresh-connector to fine-tune from an untrained connector"
        )
    else:
        logger.warning("finetune: no %s; the connector trains from its current weights", artifact)


def _load_final(model: VisionLanguageModel, final: Path, needed: bool) -> None:
    """A finished stage's weights (its adapters attached first when the model lacks them)."""
    logger.info("%s already finished; using its final model", final.parent.name)
    if not needed:
        return
    saved = read_checkpoint_config(final)  # checked, as loading a checkpoint reads it
    if any(key in saved for key in CONFIG_KEYS.values()) and not has_lora(model):
        load_lora(model, final, saved)
    else:
        load_weights(model, final, WEIGHTS_NAME)
