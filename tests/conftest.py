"""Shared fixtures: offline mode and the tiny tokenizer every tiny LLM uses."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from vlm_adapters import VisionLanguageModel, build_vlm  # noqa: E402
from vlm_adapters.testing import tiny_model_config, tiny_tokenizer  # noqa: E402

# Tiny models: thread start-up and spinning cost far more than the maths on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of the tiny word tokenizer (shapes + template vocabulary)."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _forced(model: VisionLanguageModel, token: str) -> VisionLanguageModel:
    """A copy of ``model`` (in eval mode) whose output head always picks ``token``."""
    clone = build_vlm(tiny_model_config(model.llm.cfg.tokenizer)).eval()
    clone.load_state_dict(model.state_dict())
    old = clone.llm.model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-10.0)
        head.bias[clone.tokenizer.convert_tokens_to_ids(token)] = 10.0
    clone.llm.model.lm_head = head
    return clone


@pytest.fixture
def forced():
    """``forced(model, token)``: a copy of a tiny model that always answers ``token``."""
    return _forced
