"""Shared fixtures: offline mode and the tiny tokenizer every tiny LLM uses."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from vlm_adapters.testing import tiny_tokenizer  # noqa: E402

# Tiny models: thread start-up and spinning cost far more than the maths on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of the tiny word tokenizer (shapes + template vocabulary)."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
