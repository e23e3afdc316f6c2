"""Name -> component spec lookup for the three component families."""

from __future__ import annotations

import copy
import difflib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from vlm_adapters.errors import ComponentError, ConfigError, VLMError

Kind = Literal["vision", "connector", "llm"]
KINDS: tuple[Kind, ...] = ("vision", "connector", "llm")


class ComponentConfig(BaseModel):
    """Base class for a component's typed keyword arguments (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def sources(self) -> dict[str, Any]:
        """What building this config would read from outside: hub ids, local paths, pretrained
        weights, keyed by field. Sections read from a checkpoint must have none (its weights
        come from its own safetensors); override this when a field names such a source."""
        return {}


class Section(BaseModel):
    """One component: its registered ``type`` and its validated keyword arguments."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    type: str
    params: ComponentConfig

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.params.model_dump(exclude_defaults=True)}


def format_errors(exc: ValidationError, root: str = "") -> str:
    """Pydantic errors as ``key.path: message`` joined on one line."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (root, *err["loc"]) if p != "")
        shown = repr(err["input"])
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        got = f" (got {shown})" if err["type"] not in ("missing", "extra_forbidden") else ""
        msg = "unknown key; check the spelling" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


class _Imported:
    """A field holding an object or its import path ``"package.module:name"``; a path is
    imported when the field is first read, so a registry can list components without importing
    the modules (and torch) that build them."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, spec: Any, owner: type | None = None) -> Any:
        if spec is None:  # the class itself: no default value
            raise AttributeError(self.name)
        value = spec.__dict__[self.slot]
        if isinstance(value, str):
            value = _import(value, f"{spec.kind} component {spec.name!r} ({self.name})")
            spec.__dict__[self.slot] = value
        return value

    def __set__(self, spec: Any, value: Any) -> None:
        spec.__dict__[self.slot] = value


def _import(path: str, what: str) -> Any:
    """The object ``"package.module:name"`` names; ComponentError naming ``what`` otherwise."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ComponentError(
            f"{what}: cannot import {path!r} ({type(exc).__name__}: {exc}); give an import path "
            "'package.module:name' that exists, or install what that module needs"
        ) from exc


@dataclass(frozen=True)
class ComponentSpec:
    """How to build one named component.

    ``factory`` receives the validated ``config`` instance (plus, for connectors, the
    keyword arguments ``in_dim``, ``out_dim`` and ``num_input_tokens``). Either may be given
    as an import path ``"package.module:name"``, imported when it is first used: listing the
    components (``vlm-adapters list``) then imports none of the modules that build them.
    """

    kind: Kind
    name: str
    factory: Callable[..., Any] = _Imported()  # type: ignore[assignment]
    config: type[ComponentConfig] = _Imported()  # type: ignore[assignment]
    description: str
    provider: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for path in (self.__dict__["_factory"], self.__dict__["_config"]):
            if isinstance(path, str) and not all(path.partition(":")[::2]):
                raise ComponentError(
                    f"{self.kind} component {self.name!r}: {path!r} is not an import path; "
                    "write it as 'package.module:name' or pass the object itself"
                )

    def with_provider(self, provider: str) -> ComponentSpec:
        """The same spec from ``provider``, without importing what it names."""
        spec = copy.copy(self)
        object.__setattr__(spec, "provider", provider)
        return spec


class Registry:
    """All registered components, keyed by ``(kind, name)``."""

    def __init__(self, specs: Iterable[ComponentSpec] = ()) -> None:
        self._specs: dict[tuple[str, str], ComponentSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: ComponentSpec) -> None:
        """Add ``spec``; a name already taken in its kind is an error naming both providers."""
        if spec.kind not in KINDS:
            raise ComponentError(
                f"{spec.provider}: unknown component kind {spec.kind!r}; use one of {KINDS}"
            )
        key = (spec.kind, spec.name)
        if key in self._specs:
            other = self._specs[key].provider
            raise ComponentError(
                f"duplicate {spec.kind} component {spec.name!r}: provided by both {other!r} and "
                f"{spec.provider!r}; uninstall one of them or rename the component"
            )
        self._specs[key] = spec

    def remove(self, kind: str, name: str) -> None:
        """Forget ``(kind, name)`` (for tests that register components temporarily)."""
        self._specs.pop((kind, name), None)

    def get(self, kind: str, name: str) -> ComponentSpec:
        """Return the spec, or raise naming the available names and the closest match."""
        try:
            return self._specs[(kind, name)]
        except KeyError:
            names = self.names(kind)
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ComponentError(
                f"unknown {kind} component {name!r}{hint}; available: {', '.join(names) or 'none'}"
            ) from None

    def parse(self, kind: str, raw: Any, where: str = "") -> Section:
        """Validate one section (``{type: ..., **kwargs}``); ConfigError naming the key."""
        prefix = f"{where}: " if where else ""
        if not isinstance(raw, dict) or "type" not in raw:
            raise ConfigError(f"{prefix}{kind}: expected a mapping with a `type` key, got {raw!r}")
        params = dict(raw)
        name = params.pop("type")
        try:
            spec = self.get(kind, str(name))
        except ComponentError as exc:
            raise ConfigError(f"{prefix}{kind}.type: {exc}") from None
        try:
            return Section(type=name, params=spec.config.model_validate(params))
        except ValidationError as exc:
            raise ConfigError(prefix + format_errors(exc, kind)) from None

    def create(self, kind: str, section: Section | dict[str, Any], **kwargs: Any) -> Any:
        """Build the component of ``section`` (validated first when it is a plain dict).

        Connectors also get ``in_dim``, ``out_dim`` and ``num_input_tokens`` as ``kwargs``. A
        ``ValueError`` from the factory (a bad option) becomes a one-line ConfigError.
        """
        if not isinstance(section, Section):
            section = self.parse(kind, section)
        spec = self.get(kind, section.type)
        try:
            return spec.factory(section.params, **kwargs)
        except ValueError as error:
            if isinstance(error, VLMError):
                raise
            raise ConfigError(f"{kind} {section.type!r}: {error}") from error

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(n for k, n in self._specs if k == kind)

    def specs(self, kind: str | None = None) -> list[ComponentSpec]:
        """All specs (of one kind), sorted by kind then name."""
        order = {k: i for i, k in enumerate(KINDS)}
        chosen = [s for s in self._specs.values() if kind in (None, s.kind)]
        return sorted(chosen, key=lambda s: (order[s.kind], s.name))
