"""The model sections (vision, connector, llm) of a model given to `train` as ``model=``:
read from the model itself, and checked against what the config says."""

from __future__ import annotations

from typing import Any

from vlm_adapters.config import SECTIONS, VisionSection, parse_section
from vlm_adapters.errors import ConfigError
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.registry import Section
from vlm_adapters.training.rundir import config_differences


def model_sections(model: VisionLanguageModel) -> dict[str, Section]:
    """The vision / connector / llm sections ``model`` was built from (each component's
    ``cfg`` and registered type), which rebuild it."""
    sections: dict[str, Section] = {}
    for kind in SECTIONS:
        module = getattr(model, kind)
        tiling = module.tiling if kind == "vision" else None
        params = getattr(module.untiled() if tiling else module, "cfg", None)
        name = model.component_types.get(kind)
        if name is None or params is None:
            raise ConfigError(
                f"model=: its {kind} does not say how it was built (no registered type or "
                "`cfg`); pass a model from vlm_adapters.build_vlm or vlm_adapters.load"
            )
        sections[kind] = (
            VisionSection(type=name, params=params, tiling=tiling)
            if tiling
            else Section(type=name, params=params)
        )
    return sections


def with_model_sections(
    raw: dict[str, Any], model: VisionLanguageModel, where: str = ""
) -> dict[str, Any]:
    """``raw`` with the model sections of ``model`` (what config.yaml records, so a resume
    rebuilds the same model); a section of ``raw`` that says otherwise (another type, or a
    value it sets that the model's section holds otherwise) is a ConfigError naming both."""
    actual = model_sections(model)
    problems = []
    for kind, section in actual.items():
        if raw.get(kind) is not None:
            problems += _contradictions(kind, parse_section(kind, raw[kind], where), section)
    if problems:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}the config contradicts the model given as model= ({'; '.join(problems)}); "
            "remove those sections (the model's own are used) or pass the model they describe"
        )
    return {**raw, **{kind: section.to_dict() for kind, section in actual.items()}}


def _contradictions(kind: str, given: Section, actual: Section) -> list[str]:
    """``kind.key: X in the config, Y in the model`` for the type, and every value ``given``
    sets (explicitly) that ``actual`` holds otherwise; a value the model leaves unset (e.g. a
    hub id of a model loaded from a checkpoint) contradicts nothing."""
    if given.type != actual.type:
        return [f"{kind}.type: {given.type!r} in the config, {actual.type!r} in the model"]
    mine = given.params.model_dump(mode="json", include=given.params.model_fields_set)
    theirs = actual.params.model_dump(mode="json")
    for section, data in ((given, mine), (actual, theirs)):
        tiling = getattr(section, "tiling", None)
        data["tiling"] = tiling.model_dump(mode="json") if tiling is not None else None
    return [
        f"{kind}.{key}: {old!r} in the config, {new!r} in the model"
        for key, old, new in config_differences(mine, _within(theirs, mine))
        if new is not None and old is not None
    ]


def _within(actual: Any, given: Any) -> Any:
    """``actual`` cut to the keys ``given`` has (recursively)."""
    if isinstance(actual, dict) and isinstance(given, dict):
        return {key: _within(actual.get(key), value) for key, value in given.items()}
    return actual
