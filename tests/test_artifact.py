"""The stage-1 connector artifact: loads where it fits, names every mismatch where it does not."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.errors import CheckpointError
from vlm_adapters.testing import tiny_model_config, tiny_tokenizer
from vlm_adapters.training.artifact import load_connector, save_connector


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def aligned(tok_dir, tmp_path_factory):
    """A model whose connector was saved as a stage-1 artifact, and the artifact's directory."""
    torch.manual_seed(0)
    model = build_vlm(tiny_model_config(tok_dir))
    return model, save_connector(model, tmp_path_factory.mktemp("run") / "align/connector")


def _build(config, seed=1):
    torch.manual_seed(seed)
    return build_vlm(config)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_connector_loads_onto_a_matching_model(tok_dir, aligned, tmp_path):
    source, directory = aligned
    meta = json.loads((directory / "connector.json").read_text())
    assert meta["signature"]["llm_hidden_size"] == 32 and meta["signature"]["num_patches"] == 16
    target = _build(tiny_model_config(tok_dir))
    assert not torch.equal(target.connector.proj[0].weight, source.connector.proj[0].weight)
    load_connector(target, directory)
    for key, value in source.connector.state_dict().items():
        assert torch.equal(target.connector.state_dict()[key], value)
    # a model rebuilt from a checkpoint has the same signature
    source.save_pretrained(tmp_path / "ckpt")
    load_connector(VisionLanguageModel.from_pretrained(tmp_path / "ckpt"), directory)


def _wider_llm(config):
    config["llm"]["config"]["hidden_size"] = 48


def _other_feature_layer(config):
    config["vision"]["feature_layer"] = -1


def _other_vision_arch(config):
    config["vision"]["config"]["intermediate_size"] = 96


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_wider_llm, "aligned for LLM hidden size 32 but this model has 48"),
        (_other_feature_layer, "aligned for vision feature layer -2 but this model has -1"),
        (_other_vision_arch, "aligned for vision backbone architecture"),
        (
            lambda c: c.update(connector={"type": "linear"}),
            "aligned for connector type 'mlp' but this model has 'linear'",
        ),
        (
            lambda c: c["connector"].update(depth=3),
            "aligned for connector config .* but this model has",
        ),
    ],
)
def test_mismatching_model_is_refused_with_the_reason(tok_dir, aligned, change, message):
    config = tiny_model_config(tok_dir)
    change(config)
    target = _build(config)
    before = _state(target.connector)
    with pytest.raises(ValueError, match=message):
        load_connector(target, aligned[1])
    assert all(torch.equal(v, before[k]) for k, v in target.connector.state_dict().items())


def test_not_a_connector_directory(tok_dir, aligned, tmp_path):
    with pytest.raises(CheckpointError, match="stage-1 connector"):
        load_connector(aligned[0], tmp_path)
