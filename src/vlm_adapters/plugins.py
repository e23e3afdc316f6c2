"""The plugin manager: built-ins, guarded entry-point plugins, their versions and status.

A third-party plugin package is loaded only when its declared range of ``vlm-adapters``
versions (``Requires-Dist``) contains the installed one; one that is incompatible, fails to
import, or whose hook raises is reported with a :class:`PluginLoadWarning` naming the package
and skipped, and the others load. Every package's outcome is kept for ``vlm-adapters list``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import pluggy
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

import vlm_adapters.hookspecs as hookspecs
from vlm_adapters._env import env_flag
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
REGISTER_HOOKS = {
    "register_vision_backbones": "vision",
    "register_connectors": "connector",
    "register_llm_backends": "llm",
}
"""Each ``register_*`` hook and the component kind its specs must have."""

LOADED, FAILED, INCOMPATIBLE, DISABLED = "loaded", "failed", "incompatible", "disabled"
STATUSES = (LOADED, FAILED, INCOMPATIBLE, DISABLED)


class PluginLoadWarning(UserWarning):
    """A third-party plugin was skipped (incompatible, failed to import, or a hook raised);
    the others keep working."""


@dataclass
class PluginStatus:
    """What start-up made of one plugin package."""

    package: str
    """Distribution name (the provider shown for its components)."""
    version: str
    """Installed version of the package ("" when unknown)."""
    status: str
    """``loaded``, ``failed``, ``incompatible`` or ``disabled``."""
    reason: str = ""
    """Why it is not loaded (the warning's text); empty when loaded."""
    entry_points: list[str] = field(default_factory=list)
    """Its names in the ``vlm_adapters`` entry-point group (empty for the built-ins)."""
    components: list[str] = field(default_factory=list)
    """``kind:name`` of each component it registered."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager for the hooks of :mod:`vlm_adapters.hookspecs`, plus the package that
    provides each plugin and every package's :class:`PluginStatus`."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.providers: dict[int, str] = {}  # id(plugin) -> distribution name
        self.statuses: dict[str, PluginStatus] = {}  # distribution name -> status

    def record(
        self, package: str, version: str, status: str, entry_point: str = "", reason: str = ""
    ) -> PluginStatus:
        """Note an outcome for ``package``; a failure outranks an earlier success."""
        row = self.statuses.setdefault(package, PluginStatus(package, version, status))
        if status == FAILED:
            row.status = FAILED
        if entry_point:
            row.entry_points.append(entry_point)
        if reason:
            row.reason = "; ".join(r for r in (row.reason, reason) if r)
        return row


def new_plugin_manager(load_entry_points: bool | None = None) -> PluginManager:
    """Plugin manager with the built-ins and, unless disabled (by default through
    ``VLM_ADAPTERS_DISABLE_PLUGINS``), the installed compatible plugins."""
    pm = PluginManager()
    for module_name in BUILTIN_PLUGINS:
        register(pm, importlib.import_module(module_name), BUILTIN_PROVIDER)
    if load_entry_points is None:
        load_entry_points = not env_flag(DISABLE_ENV)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if load_entry_points:
            _load_entry_point(pm, ep)
        else:
            package, version = _dist_name_version(ep)
            pm.record(package, version, DISABLED, ep.name, f"{DISABLE_ENV} is set")
    return pm


def register(pm: PluginManager, plugin: Any, provider: str, entry_point: str = "") -> None:
    """Register ``plugin`` under ``provider`` (a distribution name, shown by ``list``)."""
    name = getattr(plugin, "__name__", None) or f"{provider}:{id(plugin)}"
    pm.register(plugin, name=name)
    pm.providers[id(plugin)] = provider
    pm.record(provider, _version(provider), LOADED, entry_point)


def incompatibility(dist: importlib.metadata.Distribution, installed: str | None = None) -> str:
    """Why ``dist`` cannot work with vlm-adapters ``installed`` (default: the installed
    version): its ``Requires-Dist`` range for vlm-adapters excludes it. Empty when it fits."""
    installed = installed if installed is not None else _version(BUILTIN_PROVIDER)
    if not installed:
        return ""
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != BUILTIN_PROVIDER:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if not req.specifier.contains(installed, prereleases=True):
            return (
                f"it requires vlm-adapters{req.specifier} but vlm-adapters {installed} is installed"
            )
    return ""


def _load_entry_point(pm: PluginManager, ep: importlib.metadata.EntryPoint) -> None:
    package, version = _dist_name_version(ep)
    problem = incompatibility(ep.dist) if ep.dist is not None else ""
    if problem:
        advice = f"install a release of {package} made for this vlm-adapters"
        _skip(pm, package, version, INCOMPATIBLE, ep.name, f"{problem}; {advice}")
        return
    try:
        plugin = ep.load()
        if not pm.is_registered(plugin):
            register(pm, plugin, package, ep.name)
    except Exception as exc:  # a broken plugin must not take down the others
        _skip(pm, package, version, FAILED, ep.name, f"loading it raised {_describe(exc)}")


def _skip(
    pm: PluginManager, package: str, version: str, status: str, entry_point: str, reason: str
) -> None:
    """Warn that ``package`` is skipped and record why."""
    warnings.warn(
        f"vlm-adapters plugin package {package!r} {version} ({status}): {reason}; skipped "
        f"(set {DISABLE_ENV}=1 to skip all plugins)",
        PluginLoadWarning,
        stacklevel=2,
    )
    pm.record(package, version, status, entry_point, reason)


def collect_registry(pm: PluginManager) -> Registry:
    """Call every ``register_*`` hook implementation and build the registry.

    A third-party plugin whose hook raises (or returns something other than specs of its
    hook's kind) is warned about and contributes nothing; a duplicate name is an error.
    """
    found: list[tuple[Any, ComponentSpec]] = []
    failed: set[int] = set()
    for hook_name, kind in REGISTER_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if id(impl.plugin) in failed:
                continue
            try:
                found += [(impl.plugin, spec) for spec in _call(impl, kind)]
            except Exception as exc:
                provider = pm.providers.get(id(impl.plugin), impl.plugin_name)
                if provider == BUILTIN_PROVIDER:
                    raise
                failed.add(id(impl.plugin))
                reason = f"hook {hook_name}() raised {_describe(exc)}"
                _skip(pm, provider, _version(provider), FAILED, "", reason)
    registry = Registry()
    for plugin, spec in found:
        if id(plugin) not in failed:
            provider = pm.providers.get(id(plugin), pm.get_name(plugin) or "")
            registry.add(spec.with_provider(provider))
            row = pm.statuses.get(provider) or pm.record(provider, "", LOADED)
            row.components.append(f"{spec.kind}:{spec.name}")
    return registry


def _call(impl: pluggy.HookImpl, kind: str) -> list[ComponentSpec]:
    """The specs one hook implementation returns, checked."""
    specs = list(impl.function() or [])
    for spec in specs:
        if not isinstance(spec, ComponentSpec):
            raise TypeError(f"returned a {type(spec).__name__}, not a ComponentSpec")
        if spec.kind != kind:
            raise ValueError(f"returned {spec.name!r} of kind {spec.kind!r}; it takes {kind!r}")
    return specs


def _describe(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _dist_name_version(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    if ep.dist is None:
        return ep.value, ""
    return ep.dist.name, ep.dist.version


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def _loaded() -> tuple[PluginManager, Registry]:
    pm = new_plugin_manager()
    return pm, collect_registry(pm)


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    return _loaded()[1]


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager the registry was built from."""
    return _loaded()[0]


def reset() -> None:
    """Forget the cached registry so newly installed plugins are picked up."""
    _loaded.cache_clear()


def list_components(kind: str | None = None) -> list[dict[str, str]]:
    """Every registered component as ``{kind, name, provider, description}``."""
    return [
        {"kind": s.kind, "name": s.name, "provider": s.provider, "description": s.description}
        for s in get_registry().specs(kind)
    ]


def list_plugins() -> list[dict[str, Any]]:
    """Every plugin package (vlm-adapters' built-ins first) as ``{package, version, status,
    reason, entry_points, components}``; ``status`` is one of :data:`STATUSES`."""
    rows = get_plugin_manager().statuses.values()
    ordered = sorted(rows, key=lambda r: (r.package != BUILTIN_PROVIDER, r.package.lower()))
    return [row.to_dict() for row in ordered]


def plugin_status(package: str) -> PluginStatus | None:
    """The status of the plugin package ``package`` (any spelling), or None if none was found."""
    wanted = canonicalize_name(package)
    rows = get_plugin_manager().statuses.values()
    return next((r for r in rows if canonicalize_name(r.package) == wanted), None)


def why_unavailable(package: str) -> str | None:
    """Why a component recorded as coming from ``package`` is not registered, as a clause for
    an error message; None when no plugin package of that name is installed."""
    status = plugin_status(package)
    if status is None:
        return None
    if status.status == DISABLED:
        return f"it is installed but disabled ({DISABLE_ENV}); unset it to load the plugin"
    if status.status == FAILED:
        return f"it is installed but failed to load: {status.reason}"
    if status.status == INCOMPATIBLE:
        return f"it is installed but incompatible: {status.reason}"
    return (
        f"it is installed (version {status.version}) but does not provide it; install the "
        "version the checkpoint was saved with"
    )
