"""Typed, validated configs: YAML in, dotted overrides, errors that name the key and the file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlm_adapters.errors import ComponentError, ConfigError
from vlm_adapters.geometry import check_token_bound, image_token_bound
from vlm_adapters.plugins import get_registry
from vlm_adapters.registry import KINDS, ComponentConfig, Section, format_errors
from vlm_adapters.vision.tiling import TilingConfig
from vlm_adapters.vision.video import VideoConfig

SECTIONS = KINDS


class VisionSection(Section):
    """The vision section: a backbone of any registered type, optionally ``tiling`` (AnyRes)
    and ``video`` (video frames through the tower)."""

    tiling: TilingConfig | None = Field(
        None, description="AnyRes: cut images into tiles (below); null: whole images."
    )
    video: VideoConfig | None = Field(
        None, description="Videos: frame sampling, pooling and budget; null: no videos."
    )

    def to_dict(self) -> dict[str, Any]:
        extra = {k: getattr(self, k).model_dump() for k in _EXTRAS if getattr(self, k) is not None}
        return {**super().to_dict(), **extra}


_EXTRAS = {"tiling": TilingConfig, "video": VideoConfig}
"""What a vision section may hold beside its backbone's options, whatever the backbone."""


class ModelConfig(BaseModel):
    """The three components of a vision-language model."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    vision: Section = Field(description="The vision backbone section (`type` + its options).")
    connector: Section = Field(description="The connector section (`type` + its options).")
    llm: Section = Field(description="The LLM backend section (`type` + its options).")

    def to_dict(self) -> dict[str, Any]:
        """The YAML shape: ``{vision: {type: ..., ...}, connector: ..., llm: ...}``."""
        return {k: getattr(self, k).to_dict() for k in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "") -> ModelConfig:
        """Validate the YAML shape (the ``vision`` / ``connector`` / ``llm`` sections of
        ``data``; other keys are ignored) without building anything: each section against its
        component, then what the sections imply together. A problem is one ConfigError line
        naming the key (and ``where``, e.g. the file)."""
        return model_config_from_dict(data, where)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> ModelConfig:
        """As :meth:`from_dict` for a dict of YAML-shaped sections; pydantic's own validation
        for anything else (a dict of :class:`~vlm_adapters.registry.Section` objects)."""
        if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in SECTIONS):
            return model_config_from_dict(obj)
        return super().model_validate(obj, **kwargs)


def parse_section(kind: str, raw: Any, where: str = "") -> Section:
    """Validate one component section (``{type: ..., **kwargs}``) against the registry; a
    vision section may also hold ``tiling`` and ``video``, which any backbone takes."""
    if kind != "vision" or not isinstance(raw, dict) or not _EXTRAS.keys() & raw.keys():
        return get_registry().parse(kind, raw, where)
    rest = {k: v for k, v in raw.items() if k not in _EXTRAS}
    section = get_registry().parse(kind, rest, where)
    extras: dict[str, Any] = {}
    for key, model in _EXTRAS.items():
        if raw.get(key) is None:
            continue
        try:
            extras[key] = model.model_validate(raw[key])
        except ValidationError as exc:
            prefix = f"{where}: " if where else ""
            raise ConfigError(prefix + format_errors(exc, f"vision.{key}")) from None
    if not extras:
        return section
    return VisionSection(type=section.type, params=section.params, **extras)


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
    try:
        return key.strip(), load_yaml(value)
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {item!r}: duplicate key {exc.key!r}; give it once") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: the value is not plain YAML ({_problem(exc)}); write a number, "
            "true/false, a [list], a {mapping} or text (quoted if it holds YAML syntax)"
        ) from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (PyYAML would keep the last value silently)."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first})")
        self.key, self.line, self.first = key, line, first


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping; a key merged in with
    ``<<`` may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first
            except TypeError:  # unhashable: the base class says so
                continue
            if seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, first[key])
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (plain values only, no tags that build objects), refusing
    duplicate keys and values that contain themselves."""
    data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
    _refuse_cycles(data, ())
    return data


def _refuse_cycles(value: Any, ancestors: tuple[Any, ...]) -> None:
    """A YAMLError when an alias makes ``value`` contain itself (``&a [*a]``)."""
    if not isinstance(value, (dict, list)):
        return
    if any(value is ancestor for ancestor in ancestors):
        raise yaml.YAMLError("an alias refers to a value that contains it (endless nesting)")
    for child in value.values() if isinstance(value, dict) else value:
        _refuse_cycles(child, (*ancestors, value))


def _problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong, without the quoted source."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        return exc.problem.replace("tag:yaml.org,2002:", "!!")
    return " ".join(str(exc).split())


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping with a clear error for a missing file, bad syntax or a key given
    twice."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{path}:{exc.line}: duplicate key {exc.key!r} (first on line {exc.first}); YAML "
            "would keep only the last value: remove one"
        ) from None
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
    """Catch impossible combinations from the configs alone (cheap; no weights loaded): the
    visual tokens of the largest image must be known, fit the LLM and any tiling budget."""
    prefix = f"{where}: " if where else ""
    try:
        vision = _probe(config.vision.params)
        llm = _probe(config.llm.params)
        if vision is None:
            return
        native = config.vision.params.native_resolution()
        tiling = getattr(config.vision, "tiling", None)
        grids = tiling.resolved_grids() if tiling is not None else None
        connector = config.connector
        bound = image_token_bound(vision[0], native, grids, connector.params, connector.type)
        budget = tiling.max_visual_tokens if tiling is not None else None
        context = llm[1] if llm is not None else None
        check_token_bound(bound, context, tiled=tiling is not None, budget=budget)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


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
