"""Name -> component spec lookup for the three component families."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from vlm_adapters.errors import ComponentError

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


@dataclass(frozen=True)
class ComponentSpec:
    """How to build one named component.

    ``factory`` receives the validated ``config`` instance (plus, for connectors, the
    keyword arguments ``in_dim``, ``out_dim`` and ``num_input_tokens``).
    """

    kind: Kind
    name: str
    factory: Callable[..., Any]
    config: type[ComponentConfig]
    description: str
    provider: str = field(default="", compare=False)


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

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``."""
        return sorted(n for k, n in self._specs if k == kind)

    def specs(self, kind: str | None = None) -> list[ComponentSpec]:
        """All specs (of one kind), sorted by kind then name."""
        order = {k: i for i, k in enumerate(KINDS)}
        chosen = [s for s in self._specs.values() if kind in (None, s.kind)]
        return sorted(chosen, key=lambda s: (order[s.kind], s.name))
