"""mkdocs hook: generate the reference pages from the code (typed configs, registry, CLI,
chat templates).

Pages: ``reference/config.md`` (every key: each registered component's options, ``vision.tiling``
and the training config), ``reference/components.md`` (the registry), ``reference/cli.md``
(``--help``) and ``reference/templates.md`` (each chat template and what it renders).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import types
import typing
from collections.abc import Iterator
from itertools import groupby
from types import SimpleNamespace
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
        "reference/templates.md": templates_page(),
    }
    for path, text in pages.items():
        files.append(File.generated(config, path, content=text))
    return files


# ------------------------------------------------------------------------------ tables


def type_name(annotation: Any) -> str:
    """A readable type: ``int or None``, ``one of: a, b``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # a constrained type (PositiveInt): the base type
        return type_name(args[0])
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
    """``(field name, model class)`` for every field whose type holds a model (``X``,
    ``X | None``, ``list[X] | None``: the keys of a list's items are listed as its own)."""
    out = []
    for name, field in model.model_fields.items():
        found = next(_models_in(field.annotation), None)
        if found is not None:
            out.append((name, found))
    return out


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def model_sections(
    model: type[BaseModel], path: str, level: int, skip: tuple[str, ...] = ()
) -> list[str]:
    """A heading + table for ``model`` (keys written in full: ``path.key``) and, recursively,
    for its nested models."""
    doc = inspect.cleandoc(model.__doc__ or "")
    parts = [f"{'#' * level} `{path}`\n", f"{doc}\n" if doc else ""]
    parts.append(fields_table(model, f"{path}.", skip))
    return parts + nested_sections(model, path, min(level + 1, 4), skip)


def nested_sections(
    model: type[BaseModel], path: str, level: int, skip: tuple[str, ...] = ()
) -> list[str]:
    """:func:`model_sections` of every nested model of ``model`` (at ``path.field``)."""
    parts = []
    for name, child in nested_models(model):
        if name not in skip:
            parts += model_sections(child, f"{path}.{name}", level)
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
        section = SECTION_OF[kind]
        parts.append(f"## {title} (`{section}:`)\n")
        for spec in get_registry().specs(kind):
            parts.append(f"### `type: {spec.name}`\n")
            parts.append(f"Provided by `{spec.provider}`. {spec.description}\n")
            doc = inspect.cleandoc(spec.config.__doc__ or "")
            if doc and not doc.startswith("Base class"):
                parts.append(f"{doc}\n")
            if spec.config.model_fields:
                parts.append(fields_table(spec.config, f"{section}."))
                parts += nested_sections(spec.config, section, 4)
            else:
                parts.append("No options.\n")
        parts += section_sections(kind)
    parts += training_sections()
    return "\n".join(parts)


def section_sections(kind: str) -> list[str]:
    """The keys a section of ``kind`` takes beside its component's options, whatever its
    ``type`` (``vision.tiling``)."""
    from vlm_adapters.config import VisionSection
    from vlm_adapters.registry import Section

    if kind != "vision":
        return []
    common = tuple(Section.model_fields)  # type and the component's options, listed above
    section = SECTION_OF[kind]
    parts = ["### Any backbone\n", "Keys every vision section takes, whatever its `type`.\n"]
    parts.append(fields_table(VisionSection, f"{section}.", skip=common))
    return parts + nested_sections(VisionSection, section, 4, skip=common)


def training_sections() -> list[str]:
    try:
        module = importlib.import_module("vlm_adapters.training.config")
    except ImportError:
        return []
    parts = [
        "## Training sections\n",
        "Beside the model sections, a training YAML holds `data`, `recipe`, `stages` and "
        "`run` (read by `vlm-adapters train`). `data.*.template` names one of the "
        "[chat templates](templates.md).\n",
    ]
    train = module.TrainConfig
    parts.append(fields_table(train, skip=("model", "where", "data", "stages", "run")))
    for name, child in nested_models(train):
        if name not in ("model", "where"):
            parts += model_sections(child, name, 3)
    return parts


# ---------------------------------------------------------------------------- templates

EXAMPLE_TURNS = [
    ("human", "<image>\nWhat shape is it?"),
    ("gpt", "A circle."),
    ("human", "What colour?"),
    ("gpt", "Red."),
]
"""The conversation every chat template is shown rendering."""
EXAMPLE_EOS = "</s>"
"""The eos token the examples are rendered with (the tokenizer's, in use)."""


def rendered_example(template: Any) -> str:
    """``EXAMPLE_TURNS`` as ``template`` renders them, supervised text between ⟦ ⟧."""
    from vlm_adapters.chat.templates import _template_pieces

    tokenizer = SimpleNamespace(eos_token=EXAMPLE_EOS)  # all a named template reads of one
    pieces = _template_pieces(tokenizer, template, EXAMPLE_TURNS)
    spans = [(key, "".join(t for t, _ in run)) for key, run in groupby(pieces, lambda p: p[1])]
    text = "".join(f"⟦{text}⟧" if supervised else text for supervised, text in spans if text)
    return text.rstrip("\n")


def templates_page() -> str:
    from vlm_adapters.chat.templates import DEFAULT_TEMPLATE, TEMPLATES, list_templates

    parts = [
        "# Chat templates\n",
        "The names `data.*.template` (and the `--template` of `generate`, `chat`, `eval`, "
        "`export` and `import`) take, each with the text it renders for this conversation: a "
        "human turn `<image>\\nWhat shape is it?`, the answer `A circle.`, then `What "
        "colour?` and `Red.`, with no system turn (so a template's default system prompt "
        "shows). Supervised text (what the model learns to say) is between ⟦ ⟧; "
        f"`{EXAMPLE_EOS}` stands for the tokenizer's eos token. A model without a recorded "
        f"template uses `{DEFAULT_TEMPLATE}`.\n",
        "| name | special tokens (each must be one token) | BOS added | system turn |",
        "|---|---|---|---|",
    ]
    for name in list_templates():
        t = TEMPLATES[name]
        specials = ", ".join(f"`{s}`" for s in t.special_tokens) or "none"
        system = "merged into the first human turn" if t.system is None else "own text"
        if t.images_only:
            system = "dropped (only the `<image>` markers of human turns are kept)"
        if t.from_tokenizer:
            specials, system = "the tokenizer's", "the tokenizer's"
        bos = "the tokenizer's" if t.from_tokenizer else ("yes" if t.add_bos else "no")
        parts.append(f"| [`{name}`](#{name}) | {specials} | {bos} | {system} |")
    parts.append("")
    for name in list_templates():
        t = TEMPLATES[name]
        parts.append(f"## `{name}`\n")
        if t.from_tokenizer:
            parts.append(
                "Rendered by the tokenizer's own Jinja chat template (`chat_template` in "
                "its `tokenizer_config.json`); each answer and the end-of-turn token after "
                "it are supervised.\n"
            )
            continue
        parts += ["```text", rendered_example(t), "```\n"]
    return "\n".join(parts)


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
