"""SigLIP2 NaFlex towers through the `hf` backbone: each image at its own aspect ratio, the
patch mask and spatial shapes passed through, one visual token per patch, counted ahead."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_adapters import build_vlm, load
from vlm_adapters.config import model_config_from_dict
from vlm_adapters.errors import ConfigError
from vlm_adapters.export import check_exportable
from vlm_adapters.plugins import get_registry
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.testing.tiny import NAFLEX_PATCHES, tiny_naflex_config

# (width, height): square, wide, tall, panoramas, tiny, one pixel, large, odd sizes
SIZES = [
    (32, 32), (64, 32), (32, 64), (200, 30), (30, 200), (7, 5), (1, 1), (640, 480),
    (33, 65), (97, 41), (100, 100), (45, 128), (8, 8), (513, 17),
]  # fmt: skip


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(tokenizer_dir: str):
    torch.manual_seed(0)
    return build_vlm(tiny_model_config(tokenizer_dir, tiny_naflex_config())).eval()


def test_token_counts_predicted_equal_what_the_model_produces(model) -> None:
    images = [_image(w, h) for w, h in SIZES]
    batch = model.processor(["<image> what shape ?"] * len(images), images)
    placeholders = (batch["input_ids"] == model.image_token_id).sum(1).tolist()
    with torch.no_grad():
        produced = [model.visual_tokens(model.vision.preprocess([i])).shape[0] for i in images]
        model(**batch)  # every image's tokens fill its placeholders
    predicted = [model.image_tokens((h, w)) for w, h in SIZES]
    assert predicted == produced == placeholders
    assert len(set(predicted)) >= 3 and max(predicted) == model.num_image_tokens == NAFLEX_PATCHES


def test_the_tower_sees_what_transformers_gives_it(model) -> None:
    """Our pixels are Siglip2ImageProcessor's; the kept tokens are the tower's outputs for the
    real patches when it runs on the processor's mask and spatial shapes."""
    from transformers import Siglip2ImageProcessor

    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=NAFLEX_PATCHES)
    images = [_image(w, h) for w, h in SIZES[:6]]
    inputs = processor(images=images, return_tensors="pt")
    batch = model.vision.preprocess(images)
    assert torch.equal(batch.values, inputs["pixel_values"])
    with torch.no_grad():
        hidden = model.vision.tower(**inputs, output_hidden_states=True).hidden_states[-2]
        ours = model.vision(batch)  # [I, P, D]
    for row, (mask, theirs) in enumerate(zip(inputs["pixel_attention_mask"].bool(), hidden)):
        torch.testing.assert_close(ours[row][mask], theirs[mask], rtol=1e-5, atol=1e-5)
    counts = [int(mask.sum()) for mask in inputs["pixel_attention_mask"]]
    assert counts == [model.image_tokens((h, w)) for w, h in SIZES[:6]]


def test_a_mixed_batch_trains_generates_and_round_trips(model, tmp_path) -> None:
    texts = ["<image> a red circle", "a blue square", "<image> <image> two shapes"]
    images = [_image(120, 30), None, [_image(9, 9), _image(30, 90)]]
    batch = model.processor(texts, images, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, -100)
    model.train()
    out = model(**batch, labels=labels.masked_fill(batch["attention_mask"] == 0, -100))
    out.loss.backward()
    model.eval()
    assert all(p.grad is not None for p in model.connector.parameters())
    model.zero_grad()
    assert len(model.generate(["what shape ?"], [_image(50, 20)], max_new_tokens=2)) == 1
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["vision"]["image_processor"]["max_num_patches"] == NAFLEX_PATCHES
    again = load(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_the_probe_knows_the_most_patches_an_image_gives() -> None:
    section = get_registry().parse("vision", tiny_naflex_config(max_num_patches=40))
    assert section.params.probe() == (40, 32) and section.params.native_resolution()


def test_a_naflex_model_does_not_export_to_llava(model) -> None:
    assert "NaFlex tower" in check_exportable(model)


@pytest.mark.parametrize(
    ("vision", "connector", "message"),
    [
        ({**tiny_naflex_config(), "image_size": 32}, "mlp", r"vision.image_size: .*NaFlex"),
        (
            {**tiny_model_config("x")["vision"], "max_num_patches": 64},
            "mlp",
            r"vision.max_num_patches: only NaFlex towers",
        ),
        (tiny_naflex_config(), "pool", r"connector: 'pool' cannot take a NaFlex tower"),
        (
            tiny_naflex_config(),
            "qformer",
            r"connector: 'qformer' cannot take a NaFlex tower.*or set `per_token = True` on the "
            "connector's config",
        ),
        (
            tiny_naflex_config(max_num_patches=300),
            "mlp",
            r"connector: 300 visual tokens per image do not fit the LLM context of 256",
        ),
    ],
)
def test_impossible_naflex_setups_fail_when_the_config_is_read(
    tokenizer_dir: str, vision: dict, connector: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(tiny_model_config(tokenizer_dir, vision, connector))
