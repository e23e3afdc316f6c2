"""Typed, validated configs: YAML in, dotted overrides, errors that name the key and the file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from vlm_adapters.errors import ComponentError, ConfigError
from vlm_adapters.plugins import get_registry
from vlm_adapters.registry import KINDS, ComponentConfig, Section

SECTIONS = KINDS


class ModelConfig(BaseModel):
    """The three components of a vision-language model."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    vision: Section = Field(description="The vision backbone section (`type` + its options).")
    connector: Section = Field(description="The connector section (`type` + its options).")
    llm: Section = Field(description="The LLM backend section (`type` + its options).")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).to_dict() for k in SECTIONS}


def parse_section(kind: str, raw: Any, where: str = "") -> Section:
    """Validate one component section (``{type: ..., **kwargs}``) against the registry."""
    return get_registry().parse(kind, raw, where)


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a copy of ``data``.

    Changing a section's ``type`` drops that section's other keys unless they are also
    overridden, since options rarely carry over between component types.
    """
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    items = sorted(items, key=lambda kv: not _is_type_key(kv[0]))  # type switches first
    out = copy.deepcopy(data)
    for key, value in items:
        path = key.split(".")
        section = out.get(path[0]) if _is_type_key(key) else None
        if isinstance(section, dict) and section.get("type") != value:
            out[path[0]] = {}
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a mapping")
        node[path[-1]] = value
    return out


def _is_type_key(key: str) -> bool:
    return key.count(".") == 1 and key.endswith(".type")


def _split(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. connector.type=mlp")
    return key.strip(), yaml.safe_load(value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping with a clear error for a missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def model_config_from_dict(data: dict[str, Any], where: str = "") -> ModelConfig:
    """Validate the ``vision`` / ``connector`` / ``llm`` sections of ``data``."""
    missing = [k for k in SECTIONS if k not in data]
    if missing:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}missing section(s): {', '.join(missing)}")
    sections = {k: parse_section(k, data[k], where) for k in SECTIONS}
    config = ModelConfig(**sections)
    check_compatibility(config, where)
    return config


def check_compatibility(config: ModelConfig, where: str = "") -> None:
    """Catch impossible combinations from the configs alone (cheap; no weights loaded)."""
    prefix = f"{where}: " if where else ""
    try:
        vision = _probe(config.vision.params)
        llm = _probe(config.llm.params)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    if vision is None:
        return
    num_patches, _ = vision
    try:
        tokens = config.connector.params.num_output_tokens(num_patches)
    except ValueError as exc:
        raise ConfigError(f"{prefix}connector: {exc}") from None
    if llm is not None and llm[1] is not None and tokens >= llm[1]:
        raise ConfigError(
            f"{prefix}connector: {tokens} visual tokens per image do not fit the LLM context of "
            f"{llm[1]} positions; use a pooling/query connector or a smaller image size"
        )


def llm_context(config: ModelConfig) -> int | None:
    """The LLM's context length from its config alone, when it can be read without building."""
    probed = _probe(config.llm.params)
    return probed[1] if probed is not None else None


def _probe(params: ComponentConfig) -> tuple[int, int | None] | None:
    probe = getattr(params, "probe", None)
    if probe is None:
        return None
    try:
        return probe()
    except ComponentError:  # e.g. not available offline: reported when the model is built
        return None
