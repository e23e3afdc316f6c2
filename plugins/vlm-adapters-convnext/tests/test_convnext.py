"""Tests for the convnext backbone, using the fixtures vlm-adapters gives plugin authors."""

from __future__ import annotations

import pytest
import torch
import yaml
from vlm_adapters_convnext import ConvNeXtConfig, build_convnext

import vlm_adapters

# a 4-stage ConvNeXt with one block per stage and narrow channels: random weights, offline
TINY = {
    "model": "convnext_atto",
    "pretrained": False,
    "image_size": 64,
    "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
}


def test_registered_with_this_package_as_provider() -> None:
    rows = {r["name"]: r for r in vlm_adapters.list_components("vision")}
    assert rows["convnext"]["provider"] == "vlm-adapters-convnext"


@pytest.mark.parametrize(
    ("options", "patches", "width"),
    [
        ({}, 4, 32),  # last stage: stride 32 -> 2x2 grid
        ({"stage": -2, "extra_stages": [1]}, 16, 24 + 16),  # stage 2 (4x4) + stage 1 pooled
    ],
)
def test_conformance(vlm_check_vision_backbone, options: dict, patches: int, width: int) -> None:
    backbone = vlm_check_vision_backbone("convnext", {**TINY, **options})
    assert (backbone.num_patches, backbone.hidden_size) == (patches, width)


def test_multi_scale_tokens_are_pooled_earlier_stages() -> None:
    single = build_convnext(ConvNeXtConfig(**TINY, stage=2)).eval()
    multi = build_convnext(ConvNeXtConfig(**TINY, stage=2, extra_stages=[1])).eval()
    multi.tower.load_state_dict(single.tower.state_dict(), strict=False)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(multi(pixels)[..., :24], single(pixels))


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="stage 7 does not exist"):
        build_convnext(ConvNeXtConfig(**TINY, stage=7))
    with pytest.raises(ValueError, match="must come before stage"):
        build_convnext(ConvNeXtConfig(**TINY, stage=1, extra_stages=[2]))
    with pytest.raises(ValueError, match="not a multiple of"):
        build_convnext(ConvNeXtConfig(**{**TINY, "image_size": 72}))
    with pytest.raises(ValueError, match="not a ConvNeXt"):
        build_convnext(ConvNeXtConfig(model="resnet18", pretrained=False))
    with pytest.raises(ValueError, match="checkpoint_path not allowed"):
        ConvNeXtConfig(**{**TINY, "model_kwargs": {"checkpoint_path": "weights.pt"}})
    assert ConvNeXtConfig(**{**TINY, "pretrained": True}).sources() == {"pretrained": True}


def test_composes_with_builtins_from_yaml(tmp_path, vlm_tiny_model_config, vlm_check_vlm) -> None:
    vision = {"type": "convnext", **TINY, "stage": -2, "extra_stages": [1]}
    config = vlm_tiny_model_config(vision=vision, connector="mlp")
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    model = vlm_check_vlm(str(path))  # build_vlm, forward, backward, save/load round trip
    assert type(model.vision).__name__ == "ConvNeXtBackbone"
    assert model.num_image_tokens == 16
