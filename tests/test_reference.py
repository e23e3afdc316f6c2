"""The generated reference is complete: every key of every config model (each registered
component's options, `vision.tiling`, the training sections) and every chat template with
what it renders."""

from __future__ import annotations

import importlib.util
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

from vlm_adapters.chat.templates import EOS, TEMPLATES, list_templates
from vlm_adapters.config import VisionSection
from vlm_adapters.plugins import get_registry
from vlm_adapters.registry import KINDS, Section

GEN_REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "gen_reference.py"
TRAIN_SKIP = {"model": "the three component sections", "where": "set by the loader"}


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", GEN_REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config_page(gen: ModuleType) -> str:
    return gen.config_page()


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """Every pydantic model inside ``annotation`` (``X | None``, ``list[X]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def _keys(model: type[BaseModel], prefix: str, skip: set[str] = frozenset()) -> Iterator[str]:
    """Every key of ``model`` as written in YAML (``prefix.field``, nested ones dotted on)."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        yield f"{prefix}{name}"
        for child in _models(field.annotation):
            yield from _keys(child, f"{prefix}{name}.")


def _section(page: str, heading: str, level: int) -> str:
    """The text under the first heading of ``level`` starting with ``heading``, up to the
    next heading of that level or above."""
    marker = f"\n{'#' * level} {heading}"
    start = page.index(marker) + len(marker)
    ends = [page.find(f"\n{'#' * n} ", start) for n in range(1, level + 1)]
    return page[start : min([e for e in ends if e != -1], default=len(page))]


def _listed(key: str, text: str) -> bool:
    """Whether ``key`` has a row in a table of ``text``, or (a section) a heading of its own."""
    return f"| `{key}` |" in text or f"# `{key}`\n" in text


@pytest.mark.parametrize("kind", KINDS)
def test_every_component_option_is_in_its_types_section(config_page: str, kind: str) -> None:
    part = config_page[config_page.index(f"(`{kind}:`)") :]
    specs = get_registry().specs(kind)
    assert specs
    for spec in specs:
        text = _section(part, f"`type: {spec.name}`", 3)
        missing = [k for k in _keys(spec.config, f"{kind}.") if not _listed(k, text)]
        assert not missing, f"{kind} type {spec.name}: {missing} not in the reference"


def test_vision_tiling_is_in_the_reference(config_page: str) -> None:
    keys = list(_keys(VisionSection, "vision.", skip=set(Section.model_fields)))
    assert "vision.tiling.max_tiles" in keys
    missing = [k for k in keys if not _listed(k, config_page)]
    assert not missing, f"{missing} not in the reference"


def test_every_training_key_is_in_the_reference(config_page: str) -> None:
    from vlm_adapters.training.config import TrainConfig

    keys = list(_keys(TrainConfig, "", skip=set(TRAIN_SKIP)))
    assert {"recipe", "data.align.template", "stages.align.lr", "run.seed"} <= set(keys)
    missing = [k for k in keys if not _listed(k, config_page)]
    assert not missing, f"{missing} not in the reference"
    assert set(TRAIN_SKIP) <= set(TrainConfig.model_fields)  # skipped on purpose, still there


def test_every_chat_template_is_listed_with_what_it_renders(gen: ModuleType) -> None:
    page = gen.templates_page()
    for name in list_templates():
        template = TEMPLATES[name]
        assert f"| [`{name}`](#{name}) |" in page
        text = _section(page, f"`{name}`", 2)
        if template.from_tokenizer:
            assert "tokenizer's own Jinja chat template" in text
            continue
        end = template.end_of_turn.replace(EOS, gen.EXAMPLE_EOS)
        for answer in ("A circle.", "Red."):  # each answer and its end of turn, supervised
            assert "⟦" + template.answer.replace("{content}", answer) + end + "⟧" in text
        assert all(token in text for token in template.special_tokens)
        assert "<image>" in text and ("What colour?" in text) != template.images_only
        assert template.default_system in text
