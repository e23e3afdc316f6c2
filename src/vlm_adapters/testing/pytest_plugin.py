"""pytest fixtures for plugin authors, loaded automatically when vlm-adapters is installed.

Registered through the ``pytest11`` entry point, so any test suite in an environment with
vlm-adapters can use these fixtures without imports.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(scope="session")
def vlm_tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a tiny offline word tokenizer (for tiny LLM configs)."""
    from vlm_adapters.testing import tiny_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return tiny_tokenizer(tmp_path_factory.mktemp("vlm_tiny_tokenizer"))


@pytest.fixture
def vlm_tiny_model_config(vlm_tiny_tokenizer: str) -> Callable[..., dict[str, Any]]:
    """Factory for a tiny whole-model config; each section a built-in tiny name or a dict.

    ``vlm_tiny_model_config(connector={"type": "mine", "width": 8})`` keeps the tiny
    vision backbone and LLM and swaps in your connector section.
    """
    from vlm_adapters.testing import tiny_model_config

    def make(
        vision: str | dict[str, Any] = "hf",
        connector: str | dict[str, Any] = "mlp",
        llm: str | dict[str, Any] = "llama",
    ) -> dict[str, Any]:
        return tiny_model_config(vlm_tiny_tokenizer, vision, connector, llm)

    return make


@pytest.fixture
def vlm_check_connector() -> Callable[..., Any]:
    """:func:`vlm_adapters.testing.check_connector`."""
    from vlm_adapters.testing.checks import check_connector

    return check_connector


@pytest.fixture
def vlm_check_vision_backbone() -> Callable[..., Any]:
    """:func:`vlm_adapters.testing.check_vision_backbone`."""
    from vlm_adapters.testing.checks import check_vision_backbone

    return check_vision_backbone


@pytest.fixture
def vlm_check_llm_backend() -> Callable[..., Any]:
    """:func:`vlm_adapters.testing.check_llm_backend`."""
    from vlm_adapters.testing.checks import check_llm_backend

    return check_llm_backend


@pytest.fixture
def vlm_check_vlm() -> Callable[..., Any]:
    """:func:`vlm_adapters.testing.check_vlm`: build a whole model, train a step, round-trip."""
    from vlm_adapters.testing.checks import check_vlm

    return check_vlm
