"""``new_plugin``: write a ready-to-install plugin package with a working stub component.

The package's files are rendered from ``templates/*.tmpl`` (``string.Template`` syntax).
"""

from __future__ import annotations

import re
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


def new_plugin(name: str, kind: str, out: str | Path = ".") -> Path:
    """Write the package ``vlm-adapters-NAME`` into ``out``; return its directory."""
    values = _values(name, kind)
    target = Path(out) / values["dist"]
    if target.exists():
        raise OutputError(f"{target} already exists; choose another --out or remove it")
    files = {
        "pyproject.toml": "pyproject.toml",
        "README.md": "README.md",
        f"src/{values['module']}/__init__.py": "__init__.py",
        f"src/{values['module']}/plugin.py": "plugin.py",
        f"src/{values['module']}/component.py": f"component_{kind}.py",
        f"tests/test_{values['component']}.py": "test.py",
    }
    with atomic_dir(target) as tmp:
        for rel, template in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(_template(template)).substitute(values))
    return target


def _template(name: str) -> str:
    """The text of ``templates/NAME.tmpl`` (package data)."""
    return (resources.files("vlm_adapters.scaffold") / "templates" / f"{name}.tmpl").read_text()


def _values(name: str, kind: str) -> dict[str, str]:
    """Template values; rejects bad names and names already registered."""
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not _NAME.match(name):
        raise ConfigError(
            f"plugin name {name!r}: use lower-case letters, digits, '-' or '_', "
            "starting with a letter (e.g. my-connector)"
        )
    component = name.replace("-", "_")
    if component in get_registry().names(kind):
        provider = get_registry().get(kind, component).provider
        raise ConfigError(f"a {kind} named {component!r} already exists (from {provider})")
    fixture, check, section = _TESTS[kind]
    llm = kind == "llm"
    return {
        "name": component,
        "kind": kind,
        "dist": f"vlm-adapters-{component.replace('_', '-')}",
        "module": f"vlm_adapters_{component}",
        "component": component,
        "cls": "".join(part.capitalize() for part in component.split("_")),
        "hook": _HOOKS[kind],
        "description": _DESCRIPTIONS[kind],
        "example": _EXAMPLES[kind],
        "fixture": fixture,
        "check": Template(check).substitute(name=component),
        "section": section,
        "tok_arg": ", vlm_tiny_tokenizer" if llm else "",
        "section_extra": ', "tokenizer": vlm_tiny_tokenizer' if llm else "",
    }
