"""``new_plugin``: write a ready-to-install plugin package with a working stub component for
each kind asked for.

The package's files are rendered from ``templates/*.tmpl`` (``string.Template`` syntax). A
package of one kind keeps its component in ``component.py`` and its tests in
``tests/test_NAME.py``; a package of several kinds has one module per kind
(``connector.py``, ``vision.py``, ``llm.py``) and one test file per kind (``tests/test_KIND.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

from vlm_adapters._io import atomic_dir
from vlm_adapters.errors import ConfigError, OutputError
from vlm_adapters.plugins import get_registry

KINDS = ("connector", "vision", "llm")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*[a-z0-9]$")

_TESTS = {
    "connector": ("connector", 'vlm_check_connector("$name")', "connector"),
    "vision": ("vision_backbone", 'vlm_check_vision_backbone("$name")', "vision"),
    "llm": (
        "llm_backend",
        'vlm_check_llm_backend("$name", {"tokenizer": vlm_tiny_tokenizer})',
        "llm",
    ),
}

_DESCRIPTIONS = {
    "connector": "Linear layers with GELU per patch token (scaffold stub).",
    "vision": "Patch embedding with LayerNorm (scaffold stub).",
    "llm": "A small random Llama with the image token added (scaffold stub).",
}
_EXAMPLES = {"connector": "  depth: 2\n", "vision": "  image_size: 32\n", "llm": ""}
_HOOKS = {
    "connector": "register_connectors",
    "vision": "register_vision_backbones",
    "llm": "register_llm_backends",
}
_WORDS = {"connector": "connector", "vision": "vision backbone", "llm": "LLM backend"}
_SUFFIX = {"connector": "Connector", "vision": "Vision", "llm": "LLM"}
"""Class names end with the kind, so the components of one package never clash."""


def new_plugin(
    name: str,
    kinds: str | Sequence[str],
    out: str | Path = ".",
    *,
    components: Sequence[str] | None = None,
) -> Path:
    """Write the package ``vlm-adapters-NAME`` into ``out`` with a stub component of each of
    ``kinds``, named ``components`` (one per kind, in order; default: NAME for each); return
    its directory."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    package = _package_values(name)
    parts = [_component_values(k, c, len(kinds) > 1) for k, c in _pairs(name, kinds, components)]
    target = Path(out) / package["dist"]
    if target.exists():
        raise OutputError(f"{target} already exists; choose another --out or remove it")
    package.update(_package_texts(package, parts))
    files = {
        "pyproject.toml": _render("pyproject.toml", package),
        "README.md": _render("README.md", package),
        f"src/{package['module']}/__init__.py": _render("__init__.py", package),
        f"src/{package['module']}/plugin.py": _render("plugin.py", package),
    }
    for part in parts:
        values = {**package, **part}
        files[f"src/{package['module']}/{part['file']}.py"] = _render(
            f"component_{part['kind']}.py", values
        )
        files[f"tests/{part['test_file']}.py"] = _render("test.py", values)
    with atomic_dir(target) as tmp:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return target


def _render(template: str, values: dict[str, str]) -> str:
    """``templates/TEMPLATE.tmpl`` (package data) filled in with ``values``."""
    text = (resources.files("vlm_adapters.scaffold") / "templates" / f"{template}.tmpl").read_text()
    return Template(text).substitute(values)


def _pairs(name: str, kinds: list[str], components: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(kind, component name)`` for every component; rejects repeated or unknown kinds and
    a count of names that does not match the kinds."""
    if not kinds:
        raise ConfigError(f"give at least one kind ({', '.join(KINDS)})")
    for kind in kinds:
        if kind not in KINDS:
            raise ConfigError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"kinds {kinds}: give each kind once (one component per kind)")
    if components is None:
        return [(kind, name) for kind in kinds]
    if len(components) != len(kinds):
        raise ConfigError(
            f"{len(components)} component names for {len(kinds)} kinds; give one --name per "
            "--kind, in the same order, or none (the components take the package name)"
        )
    return list(zip(kinds, components))


def _checked(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"{what} {name!r}: use lower-case letters, digits, '-' or '_', "
            "starting with a letter (e.g. my-connector)"
        )
    return name.replace("-", "_")


def _package_values(name: str) -> dict[str, str]:
    package = _checked(name, "plugin name")
    return {
        "package": package,
        "dist": f"vlm-adapters-{package.replace('_', '-')}",
        "module": f"vlm_adapters_{package}",
    }


def _component_values(kind: str, name: str, several: bool) -> dict[str, str]:
    """One component's template values; rejects bad names and names already registered."""
    component = _checked(name, "component name")
    if component in get_registry().names(kind):
        provider = get_registry().get(kind, component).provider
        raise ConfigError(f"a {kind} named {component!r} already exists (from {provider})")
    fixture, check, section = _TESTS[kind]
    llm = kind == "llm"
    return {
        "name": component,
        "kind": kind,
        "file": kind if several else "component",
        "test_file": f"test_{kind}" if several else f"test_{component}",
        "cls": _class_name(component, kind),
        "hook": _HOOKS[kind],
        "description": _DESCRIPTIONS[kind],
        "example": _EXAMPLES[kind],
        "fixture": fixture,
        "check": Template(check).substitute(name=component),
        "section": section,
        "tok_arg": ", vlm_tiny_tokenizer" if llm else "",
        "section_extra": ', "tokenizer": vlm_tiny_tokenizer' if llm else "",
    }


def _class_name(component: str, kind: str) -> str:
    """``window_mlp`` -> ``WindowMlpConnector``: CamelCase ending with the kind."""
    camel = "".join(part.capitalize() for part in component.split("_"))
    suffix = _SUFFIX[kind]
    return camel if camel.lower().endswith(suffix.lower()) else camel + suffix


def _package_texts(package: dict[str, str], parts: list[dict[str, str]]) -> dict[str, str]:
    """The package-level pieces that list every component: what it provides, imports,
    ``__all__``, hooks and the README's config sections."""
    provides = " and ".join(f"the {p['name']} {_WORDS[p['kind']]}" for p in parts)
    homes = {n: p["file"] for p in parts for n in (p["cls"], f"{p['cls']}Config")}
    return {
        "provides": provides,
        "Provides": provides[0].upper() + provides[1:],
        "homes": "".join(f'    "{n}": "{f}",\n' for n, f in sorted(homes.items())),
        "hooks": "".join(_render("hook.py", {**package, **p}) for p in parts),
        "sections": "".join(_render("section.md", p) for p in parts),
    }
