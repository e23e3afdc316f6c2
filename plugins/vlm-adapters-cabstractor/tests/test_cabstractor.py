"""Tests for the cabstractor connector, using the fixtures vlm-adapters gives plugin authors."""

from __future__ import annotations

import pytest
import torch
import yaml
from vlm_adapters_cabstractor import CAbstractor, CAbstractorConfig

import vlm_adapters


def test_registered_with_this_package_as_provider() -> None:
    rows = {r["name"]: r for r in vlm_adapters.list_components("connector")}
    assert rows["cabstractor"]["provider"] == "vlm-adapters-cabstractor"


@pytest.mark.parametrize("options", [{"num_queries": 4}, {"num_queries": 9, "pos_emb": False}])
def test_conformance(vlm_check_connector, options: dict) -> None:
    connector = vlm_check_connector("cabstractor", options, num_input_tokens=16)
    assert connector.num_output_tokens() == options["num_queries"]


def test_pooling_is_local() -> None:
    """Without conv blocks an output token sees only the patches in its pooling window."""
    cfg = CAbstractorConfig(num_queries=4, depth=0, pos_emb=False)
    connector = CAbstractor(cfg, in_dim=8, out_dim=8, num_input_tokens=16).eval()
    features = torch.randn(1, 16, 8)
    changed = features.clone()
    changed[0, 0] += 1.0  # the top-left patch of the 4x4 grid
    with torch.no_grad():
        diff = (connector(changed) - connector(features)).abs().sum(-1)[0]  # [4]
    assert diff[0] > 0
    assert torch.all(diff[1:] == 0)


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        CAbstractorConfig(num_queries=10)
    with pytest.raises(ValueError, match="square patch grid"):
        CAbstractorConfig(num_queries=4).num_output_tokens(12)


def test_composes_with_builtins_from_yaml(tmp_path, vlm_tiny_model_config, vlm_check_vlm) -> None:
    config = vlm_tiny_model_config(connector={"type": "cabstractor", "num_queries": 4, "depth": 1})
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    model = vlm_check_vlm(str(path))  # build_vlm, forward, backward, save/load round trip
    assert type(model.connector).__name__ == "CAbstractor"
    assert model.num_image_tokens == 4
