"""The model card (``README.md``) an export carries: Hub metadata in YAML front matter (licence,
base models, library, pipeline tag, datasets, ``model-index`` with the recorded evaluation) and a
body that says how the model was made and whether vLLM serves it natively.

Everything comes from what is on this machine: the model, the README front matter of the
folders its vision tower and LLM were loaded from (a local folder, or the hub cache), and the
training run folder it came from (``config.yaml`` and each stage's ``summary.json`` /
``metrics.jsonl``). Nothing is fetched; what is not recorded is said to be unknown.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlm_adapters.errors import ExportError
from vlm_adapters.export.serving import ServingReport, text_architecture

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

CARD_NAME = "README.md"
UNKNOWN = "unknown (not recorded)"
_STAGES = ("align", "finetune", "preference")
_DEFAULT_RECIPE = ("align", "finetune")
_RUN_CONFIG = "config.yaml"
_SUMMARY = "summary.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".tar", ".csv")
_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


@dataclass
class Source:
    """Where a component's weights came from, and the licence its own card states."""

    name: str | None
    licence: str = UNKNOWN
    hub_id: str | None = None


@dataclass
class StageRecord:
    """What a training run recorded about one stage."""

    name: str
    settings: dict[str, Any]
    data: dict[str, Any]
    summary: dict[str, Any]
    evaluation: dict[str, Any]
    evaluated_at: str


@dataclass
class RunRecord:
    """A training run folder, read: its config and the stages that finished or logged steps."""

    directory: Path
    config: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    exported_stage: str | None = None
    checkpoint: str | None = None
    """The intermediate checkpoint exported (``step-000500``); None for the stage's final."""


def find_run(checkpoint: str | Path) -> RunRecord | None:
    """The run a checkpoint comes from when a training run wrote it (``RUN/STAGE/final``, or
    ``RUN/STAGE/checkpoints/step-N``), read; else None."""
    path = Path(checkpoint).resolve()
    stage_dir = path.parent
    if path.name == "final" and stage_dir.name in _STAGES:
        step = None
    elif stage_dir.name == "checkpoints" and stage_dir.parent.name in _STAGES:
        stage_dir, step = stage_dir.parent, path.name
    else:
        return None
    if not (stage_dir.parent / _RUN_CONFIG).is_file():
        return None
    return read_run(stage_dir.parent, stage_dir.name, checkpoint=step)


def read_run(
    directory: str | Path, stage: str | None = None, *, checkpoint: str | None = None
) -> RunRecord:
    """Read the run folder ``directory``; ``stage`` is the stage whose weights are exported
    (default: the last one that ran), ``checkpoint`` the intermediate checkpoint of it (None:
    its final). An ExportError when it is not a run folder."""
    directory = Path(directory)
    path = directory / _RUN_CONFIG
    if not path.is_file():
        raise ExportError(
            f"{directory}: no {_RUN_CONFIG}, so not a training run folder; pass the --out "
            "folder of `vlm-adapters train` (or leave the run out)"
        )
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ExportError(
            f"{path}: unreadable ({type(error).__name__}); the run folder is damaged"
        ) from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: not a run config (a mapping); the run folder is damaged")
    recipe = config.get("recipe") or list(_DEFAULT_RECIPE)
    stages = [s for name in recipe if (s := _read_stage(directory, config, str(name)))]
    names = [s.name for s in stages]
    if stage is None and stages:
        stage = names[-1]
    elif stage is not None and stage not in names:
        raise ExportError(
            f"{directory}: stage {stage!r} recorded no results there (stages with results: "
            f"{', '.join(names) or 'none'}); name one of them"
        )
    return RunRecord(directory, config, stages, stage, checkpoint)


def _read_stage(directory: Path, config: dict[str, Any], name: str) -> StageRecord | None:
    stage_dir = directory / name
    summary = _read_json(stage_dir / _SUMMARY)
    metrics = _read_metrics(stage_dir / "metrics.jsonl")
    if not summary and not metrics:
        return None
    if not summary:
        last = metrics[-1]
        summary = {"steps": last.get("step"), "final_loss": last.get("loss")}
    evaluation = _eval_metrics(summary)
    where = "after the stage"
    if not evaluation:
        evaluated = [r for r in metrics if _eval_metrics(r)]
        if evaluated:
            evaluation = _eval_metrics(evaluated[-1])
            where = f"at step {evaluated[-1].get('step')}"
    settings = (config.get("stages") or {}).get(name) or {}
    data = (config.get("data") or {}).get(name) or {}
    return StageRecord(name, settings, data, summary, evaluation, where)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict):
            records.append(record)
    return records


def _eval_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The evaluation scores of a summary or metrics record (``eval_samples`` left out)."""
    return {
        k: v
        for k, v in record.items()
        if k.startswith("eval_") and k != "eval_samples" and isinstance(v, (int, float))
    }


def component_source(name: str | None) -> Source:
    """The licence a component's own card states: a local folder's ``README.md``, or for a hub
    id the ``README.md`` in the hub cache when it is there. Nothing is downloaded."""
    if not name:
        return Source(None)
    readme, hub_id = None, None
    local = Path(name).expanduser()
    if local.is_dir():
        readme = local / CARD_NAME
        match = _CACHE_SNAPSHOT.search(local.resolve().as_posix())
        hub_id = f"{match.group(1)}/{match.group(2)}" if match else None
    elif _HUB_ID.match(name):
        hub_id = name
        readme = _cached_readme(name)
    return Source(name, _licence(readme), hub_id)


def _cached_readme(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, CARD_NAME)
    except Exception:  # an id the cache cannot hold: no card to read
        return None
    return Path(found) if isinstance(found, str) else None


def _licence(readme: Path | None) -> str:
    """The ``license`` of a card's front matter (``other`` with its ``license_name``)."""
    from huggingface_hub.repocard import metadata_load

    if readme is None or not readme.is_file():
        return UNKNOWN
    try:
        meta = metadata_load(readme) or {}
    except Exception:  # a card whose front matter does not parse states nothing usable
        return UNKNOWN
    licence = meta.get("license")
    if isinstance(licence, list):
        licence = ", ".join(str(item) for item in licence)
    if not licence:
        return UNKNOWN
    if licence == "other" and meta.get("license_name"):
        return f"other ({meta['license_name']})"
    return str(licence)


def _component_name(model: VisionLanguageModel, kind: str, run: RunRecord | None) -> str | None:
    """The hub id / folder a component was loaded from: the live config's, else the run's
    config.yaml's, else what transformers recorded in the component's config."""
    cfg = getattr(getattr(model, kind), "cfg", None)
    name = getattr(cfg, "model", None)
    if not name and run is not None:
        name = (run.config.get(kind) or {}).get("model")
    if not name:
        module = getattr(model, kind)
        inner = getattr(module, "tower", None) if kind == "vision" else None
        if kind == "llm":
            inner = getattr(module, "transformers_model", None)
        name = getattr(getattr(inner, "config", None), "name_or_path", None)
    return str(name) if name else None


def model_card(
    model: VisionLanguageModel,
    report: ServingReport,
    *,
    name: str,
    template: str,
    llava_class: str,
    run: RunRecord | None = None,
) -> str:
    """The ``README.md`` text for ``model``'s export named ``name``."""
    from huggingface_hub import ModelCard

    vision = component_source(_component_name(model, "vision", run))
    llm = component_source(_component_name(model, "llm", run))
    data = _card_data(model, name, vision, llm, run)
    body = _body(model, report, name, template, llava_class, vision, llm, run)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)


def _card_data(
    model: VisionLanguageModel,
    name: str,
    vision: Source,
    llm: Source,
    run: RunRecord | None,
) -> Any:
    from huggingface_hub import ModelCardData

    licence = _combined_licence(vision.licence, llm.licence)
    results = _eval_results(run)
    tiled = model.vision.tiling is not None
    tags = ["vlm-adapters", "llava_next" if tiled else "llava", "vision-language"]
    tags.append(f"connector-{model.component_types.get('connector', 'unknown')}")
    return ModelCardData(
        license=licence,
        base_model=[s.hub_id for s in (vision, llm) if s.hub_id] or None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=tags,
        datasets=_dataset_ids(run) or None,
        model_name=name if results else None,
        eval_results=results or None,
    )


def _combined_licence(*licences: str) -> str:
    """The Hub ``license`` of a model made of parts: theirs when all state the same one,
    ``unknown`` when any is not recorded, else ``other`` (the body lists each)."""
    if UNKNOWN in licences:
        return "unknown"
    if len(set(licences)) == 1 and not licences[0].startswith("other") and "," not in licences[0]:
        return licences[0]
    return "other"


def _dataset_ids(run: RunRecord | None) -> list[str]:
    """Hub dataset ids among the run's data sources (local files and in-memory data are
    named in the body only)."""
    if run is None:
        return []
    ids = []
    for section in (run.config.get("data") or {}).values():
        if not isinstance(section, dict):
            continue
        for value in (section.get("path"), section.get("source")):
            if isinstance(value, str) and _is_hub_dataset(value) and value not in ids:
                ids.append(value)
    return ids


def _is_hub_dataset(value: str) -> bool:
    return (
        bool(_HUB_ID.match(value))
        and not value.lower().endswith(_DATA_SUFFIXES)
        and not Path(value).exists()
    )


def _eval_results(run: RunRecord | None) -> list[Any]:
    """``EvalResult`` per score the exported stage recorded (``model-index``)."""
    from huggingface_hub import EvalResult

    stage = _exported(run)
    if stage is None or run is None or run.checkpoint is not None:
        return []  # the stage's scores describe its final weights, not a checkpoint's
    source = (run.config.get("data") or {}).get("eval") or {}
    dataset = Path(str(source.get("path") or "eval")).name
    results = []
    for key, value in stage.evaluation.items():
        if not math.isfinite(value):
            continue
        metric = key.removeprefix("eval_")
        data_name, data_type = dataset, dataset
        if metric.startswith("lmms/"):  # eval_lmms/<task>/<metric>
            _, task, metric = (metric.split("/", 2) + ["", ""])[:3]
            data_name = data_type = task
        results.append(
            EvalResult(
                task_type="image-text-to-text",
                dataset_type=data_type,
                dataset_name=data_name,
                metric_type=metric,
                metric_value=value,
                metric_name=f"{metric} ({stage.name}, {stage.evaluated_at})",
            )
        )
    return results


def _exported(run: RunRecord | None) -> StageRecord | None:
    if run is None:
        return None
    return next((s for s in run.stages if s.name == run.exported_stage), None)


def _body(
    model: VisionLanguageModel,
    report: ServingReport,
    name: str,
    template: str,
    llava_class: str,
    vision: Source,
    llm: Source,
    run: RunRecord | None,
) -> str:
    kinds = model.component_types
    connector = model.connector
    connector_kwargs = connector.rebuild_kwargs() if hasattr(connector, "rebuild_kwargs") else {}
    lines = [
        f"# {name}",
        "",
        f"A LLaVA-style vision-language model made with vlm-adapters and exported as a "
        f"transformers `{llava_class}` checkpoint with its processor (chat template "
        f"`{template}`).",
        "",
        "## Serving",
        "",
        f"{report.line()}.",
        "",
        "## Components",
        "",
        "| Part | What | Licence |",
        "| --- | --- | --- |",
        f"| Vision | {_cell(vision.name or 'built from a config (random init)')} "
        f"(`{kinds.get('vision', '?')}`, {_vision_config_name(model)}) | {_cell(vision.licence)} |",
        f"| Connector | `{kinds.get('connector', '?')}` {_cell(_kwargs(connector_kwargs))}, "
        f"{model.num_image_tokens} visual tokens per image | trained here |",
        f"| LLM | {_cell(llm.name or 'built from a config (random init)')} "
        f"(`{text_architecture(model) or kinds.get('llm', '?')}`) | {_cell(llm.licence)} |",
        "",
    ]
    if run is None:
        lines += [
            "## Training",
            "",
            "Not recorded: this export was not made from a training run folder.",
            "",
        ]
    else:
        lines += _training(run)
    return "\n".join(lines)


def _training(run: RunRecord) -> list[str]:
    lines = [
        "## Training",
        "",
        f"Run folder `{run.directory.name}`; exported weights: stage "
        f"`{run.exported_stage or 'unknown'}`"
        f"{f', checkpoint `{run.checkpoint}`' if run.checkpoint else ''}. {_run_settings(run)}.",
        "",
        "### Data",
        "",
        "| Stage | Source | Images | Template | Samples | Skipped |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage in run.stages:
        data, summary = stage.data, stage.summary
        lines.append(
            f"| {stage.name} | {_cell(_source(data))} | {_cell(data.get('image_root') or '')} "
            f"| {_cell(data.get('template') or '')} | {summary.get('samples', UNKNOWN)} "
            f"| {summary.get('skipped', UNKNOWN)} |"
        )
    lines += ["", "### Stages", ""]
    for stage in run.stages:
        summary = stage.summary
        loss = summary.get("final_loss")
        shown = f"{loss:.4g}" if isinstance(loss, (int, float)) else UNKNOWN
        lines += [
            f"**{stage.name}**: optimizer steps {summary.get('steps', UNKNOWN)}, final loss "
            f"{shown}.",
            "",
            "| Hyperparameter | Value |",
            "| --- | --- |",
            *[f"| {key} | {_cell(value)} |" for key, value in _flat(stage.settings)],
            "",
        ]
    lines += ["## Evaluation", ""]
    evaluated = [s for s in run.stages if s.evaluation]
    if not evaluated:
        return [*lines, "No evaluation was recorded.", ""]
    lines += ["| Stage | When | Metric | Value |", "| --- | --- | --- | --- |"]
    for stage in evaluated:
        for key, value in stage.evaluation.items():
            lines.append(f"| {stage.name} | {stage.evaluated_at} | {key} | {value:.6g} |")
    return [*lines, ""]


def _run_settings(run: RunRecord) -> str:
    """Seed, precision and the data settings every stage shares."""
    settings, data = run.config.get("run") or {}, run.config.get("data") or {}
    shown = {
        "seed": settings.get("seed", UNKNOWN),
        "mixed precision": settings.get("mixed_precision", UNKNOWN),
        "max_length": data.get("max_length", UNKNOWN),
        "packing": data.get("packing", UNKNOWN),
    }
    return "; ".join(f"{key} {value}" for key, value in shown.items()).capitalize()


def _source(data: dict[str, Any]) -> str:
    source = data.get("source") or data.get("path") or UNKNOWN
    return source if isinstance(source, str) else json.dumps(source)


def _vision_config_name(model: VisionLanguageModel) -> str:
    tower = getattr(model.vision.untiled(), "tower", None)
    config = getattr(tower, "config", None)
    return type(config).__name__ if config is not None else type(model.vision.untiled()).__name__


def _flat(settings: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of nested settings."""
    items: list[tuple[str, Any]] = []
    for key, value in settings.items():
        here = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flat(value, f"{here}.")
        else:
            items.append((here, value))
    return items


def _kwargs(kwargs: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if not isinstance(v, (dict, list)))
    return f"({shown})" if shown else ""


def _cell(value: Any) -> str:
    """``value`` as one Markdown table cell."""
    text = "null" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")
