"""mkdocs hook: generate the reference pages from the code (typed configs, registry, CLI).

Pages: ``reference/config.md`` (every registered component's options and the training
config), ``reference/components.md`` (the registry) and ``reference/cli.md`` (``--help``).
"""

from __future__ import annotations

import argparse
import importlib
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

KIND_TITLES = {"vision": "Vision backbones", "connector": "Connectors", "llm": "LLM backends"}
SECTION_OF = {"vision": "vision", "connector": "connector", "llm": "llm"}


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the site."""
    from mkdocs.structure.files import File

    pages = {
        "reference/config.md": config_page(),
        "reference/components.md": components_page(),
        "reference/cli.md": cli_page(),
    }
    for path, text in pages.items():
        files.append(File.generated(config, path, content=text))
    return files


# ------------------------------------------------------------------------------ tables


def type_name(annotation: Any) -> str:
    """A readable type: ``int or None``, ``one of: a, b``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__} of {inner}" if inner else origin.__name__
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    return "required" if field.default is PydanticUndefined else f"`{field.default!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def fields_table(model: type[BaseModel], prefix: str = "", skip: tuple[str, ...] = ()) -> str:
    """A markdown table of ``model``'s fields; nested models are expanded with dotted keys."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}{name}"
        rows.append(
            f"| `{key}` | {_cell(type_name(field.annotation))} | {_cell(default_text(field))} "
            f"| {_cell(field.description or '')} |"
        )
    return "\n".join(rows) + "\n"


def nested_models(model: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """``(field name, model class)`` for every field whose type is (optionally) a model."""
    out = []
    for name, field in model.model_fields.items():
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out.append((name, arg))
                break
    return out


def model_sections(
    model: type[BaseModel], path: str, level: int, skip: tuple[str, ...] = ()
) -> list[str]:
    """A heading + table for ``model`` and, recursively, for its nested models."""
    doc = (model.__doc__ or "").strip()
    parts = [f"{'#' * level} `{path}`\n", f"{doc}\n" if doc else "", fields_table(model, "", skip)]
    for name, child in nested_models(model):
        if name not in skip:
            parts += model_sections(child, f"{path}.{name}", min(level + 1, 4))
    return parts


# ------------------------------------------------------------------------------- pages


def config_page() -> str:
    from vlm_adapters.plugins import get_registry

    parts = [
        "# Configuration reference\n",
        "Generated from the typed configs when these docs were built; every key is validated "
        "before anything heavy is built, and unknown keys are errors. A model config has three "
        "sections, each `{type: NAME, ...options}`; the options depend on `type` and are "
        "listed below for every registered component (plugins included).\n",
        "Any key can be overridden on the command line as `section.key=value` "
        "(values are parsed as YAML), e.g. `connector.depth=3 stages.align.lr=2e-3`.\n",
    ]
    for kind, title in KIND_TITLES.items():
        parts.append(f"## {title} (`{SECTION_OF[kind]}:`)\n")
        for spec in get_registry().specs(kind):
            parts.append(f"### `type: {spec.name}`\n")
            parts.append(f"Provided by `{spec.provider}`. {spec.description}\n")
            doc = (spec.config.__doc__ or "").strip()
            if doc and not doc.startswith("Base class"):
                parts.append(f"{doc}\n")
            if spec.config.model_fields:
                parts.append(fields_table(spec.config))
            else:
                parts.append("No options.\n")
    parts += training_sections()
    return "\n".join(parts)


def training_sections() -> list[str]:
    try:
        module = importlib.import_module("vlm_adapters.training.config")
    except ImportError:
        return []
    parts = [
        "## Training sections\n",
        "Beside the model sections, a training YAML holds `data`, `recipe`, `stages` and "
        "`run` (read by `vlm-adapters train`).\n",
    ]
    train = module.TrainConfig
    parts.append(fields_table(train, skip=("model", "where", "data", "stages", "run")))
    for name, child in nested_models(train):
        if name not in ("model", "where"):
            parts += model_sections(child, name, 3)
    return parts


def components_page() -> str:
    from vlm_adapters.plugins import get_registry

    parts = [
        "# Component catalog\n",
        "Every component registered when these docs were built (`vlm-adapters list` prints "
        "the same for your environment). Options: see the "
        "[configuration reference](config.md).\n",
    ]
    for kind, title in KIND_TITLES.items():
        parts += [f"## {title}\n", "| type | provider | description |", "|---|---|---|"]
        for spec in get_registry().specs(kind):
            parts.append(f"| `{spec.name}` | `{spec.provider}` | {_cell(spec.description)} |")
        parts.append("")
    return "\n".join(parts)


def cli_page() -> str:
    from vlm_adapters.cli import build_parser

    parser = build_parser()
    parts = ["# Command line\n", "Generated from `vlm-adapters COMMAND --help`.\n"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        command.prog = f"vlm-adapters {name}"
        parts += [f"## `{name}`\n", "```text", command.format_help().rstrip(), "```\n"]
    return "\n".join(parts)
