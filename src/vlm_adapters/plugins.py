"""The plugin manager: built-in plugins, entry-point plugins, and the component registry."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import warnings
from typing import Any

import pluggy

from vlm_adapters import hookspecs
from vlm_adapters.registry import ComponentSpec, Registry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vlm_adapters"
DISABLE_ENV = "VLM_ADAPTERS_DISABLE_PLUGINS"
BUILTIN_PROVIDER = "vlm-adapters"
BUILTIN_PLUGINS = (
    "vlm_adapters.vision.builtin",
    "vlm_adapters.connectors.builtin",
    "vlm_adapters.llm.builtin",
)
_PROVIDERS: dict[int, str] = {}  # id(plugin) -> distribution name
_REGISTER_HOOKS = ("register_vision_backbones", "register_connectors", "register_llm_backends")


class PluginLoadWarning(UserWarning):
    """A third-party plugin failed to load; the others keep working."""


def new_plugin_manager(load_entry_points: bool | None = None) -> pluggy.PluginManager:
    """Plugin manager with the built-ins and (unless disabled) the installed plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        register(pm, importlib.import_module(module_name), BUILTIN_PROVIDER)
    if load_entry_points is None:
        load_entry_points = not os.environ.get(DISABLE_ENV)
    if load_entry_points:
        _load_entry_points(pm)
    return pm


def register(pm: pluggy.PluginManager, plugin: Any, provider: str) -> None:
    """Register ``plugin`` under ``provider`` (a distribution name, shown by ``list``)."""
    name = getattr(plugin, "__name__", None) or f"{provider}:{id(plugin)}"
    pm.register(plugin, name=name)
    _PROVIDERS[id(plugin)] = provider


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ep.value
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take down the others
            warnings.warn(
                f"vlm-adapters plugin {ep.name!r} from package {dist!r} failed to load: "
                f"{type(exc).__name__}: {exc} (set {DISABLE_ENV}=1 to skip all plugins)",
                PluginLoadWarning,
                stacklevel=2,
            )
            continue
        if pm.is_registered(plugin):
            continue
        register(pm, plugin, dist)


def collect_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every ``register_*`` hook implementation and build the registry."""
    registry = Registry()
    for hook_name in _REGISTER_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = _PROVIDERS.get(id(impl.plugin), impl.plugin_name)
            for spec in impl.function() or []:
                registry.add(_with_provider(spec, provider))
    return registry


def _with_provider(spec: ComponentSpec, provider: str) -> ComponentSpec:
    return ComponentSpec(
        spec.kind, spec.name, spec.factory, spec.config, spec.description, provider
    )


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    return collect_registry(new_plugin_manager())


def reset() -> None:
    """Forget the cached registry so newly installed plugins are picked up."""
    get_registry.cache_clear()


def list_components(kind: str | None = None) -> list[dict[str, str]]:
    """Every registered component as ``{kind, name, provider, description}``."""
    return [
        {"kind": s.kind, "name": s.name, "provider": s.provider, "description": s.description}
        for s in get_registry().specs(kind)
    ]
