"""The composed model: splicing, loss against a naive reference, generation, save/load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_adapters
from vlm_adapters.errors import CheckpointError, ComponentError
from vlm_adapters.testing import tiny_model_config

_TEXT_2 = "describe <image> the triangle at the left"


def _images(count: int) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (90, 90, 0)]
    return [Image.new("RGB", (36, 32), colours[i % 4]) for i in range(count)]


def _inputs(model: vlm_adapters.VisionLanguageModel, side: str = "right") -> dict:
    """Three samples with 2, 0 and 1 images and different lengths (so padding occurs)."""
    pics = _images(3)
    texts = [
        "<image> <image> what colour is the circle ? red",
        "a small blue square",
        _TEXT_2,
    ]
    return model.processor(texts, [pics[:2], None, [pics[2]]], padding_side=side)


def _labels(model: vlm_adapters.VisionLanguageModel, batch: dict) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == model.image_token_id)] = -100
    labels[0, :4] = -100
    return labels


def _model(tokenizer_dir: str, **parts: str) -> vlm_adapters.VisionLanguageModel:
    torch.manual_seed(0)
    return vlm_adapters.build_vlm(tiny_model_config(tokenizer_dir, **parts)).eval()


@pytest.mark.parametrize("llm", ["llama", "gemma", "gpt2"])
def test_loss_matches_naive_reference(tokenizer_dir: str, llm: str) -> None:
    model = _model(tokenizer_dir, llm=llm)
    batch = _inputs(model)
    labels = _labels(model, batch)
    out = model(**batch, labels=labels)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    logits = model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, reference, rtol=0, atol=1e-5)
    count = int((labels[:, 1:] != -100).sum())
    assert out.num_tokens == count
    half = model(**batch, labels=labels, num_items_in_batch=2 * count).loss
    torch.testing.assert_close(half, reference / 2, rtol=0, atol=1e-5)


def test_visual_tokens_fill_placeholders_in_order(tokenizer_dir: str) -> None:
    model = _model(tokenizer_dir)
    batch = _inputs(model)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])  # [B, T, H]
    visual = model.encode_images(batch["pixel_values"])  # [3, M, H]
    slots = batch["input_ids"] == model.image_token_id
    torch.testing.assert_close(embeds[slots], visual.reshape(-1, visual.shape[-1]))
    text = model.llm.embed(batch["input_ids"])
    torch.testing.assert_close(embeds[~slots], text[~slots])


def test_placeholder_and_image_count_mismatch_raises(tokenizer_dir: str) -> None:
    model = _model(tokenizer_dir)
    batch = _inputs(model)
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        model.embed(batch["input_ids"], batch["pixel_values"][:2])
    with pytest.raises(ValueError, match="image placeholder tokens but no pixel_values"):
        model.embed(batch["input_ids"], None)


def test_right_padding_does_not_change_logits(tokenizer_dir: str) -> None:
    model = _model(tokenizer_dir)
    batch = _inputs(model)
    alone = model.processor([_TEXT_2], [[_images(3)[2]]], padding_side="right")
    with torch.no_grad():
        padded = model(**batch).logits[2]
        single = model(**alone).logits[0]
    length = single.shape[0]
    assert batch["attention_mask"][2].sum() == length < padded.shape[0]
    torch.testing.assert_close(padded[:length], single, rtol=0, atol=1e-5)


def test_generate_with_and_without_cache_agree(tokenizer_dir: str) -> None:
    model = _model(tokenizer_dir)
    batch = _inputs(model, side="left")
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    cached = model.generate_ids(**batch, use_cache=True, **kwargs)
    uncached = model.generate_ids(**batch, use_cache=False, **kwargs)
    assert cached.shape == (3, 6)
    assert torch.equal(cached, uncached)
    texts = model.generate([_TEXT_2], [_images(1)[0]], raw=True, max_new_tokens=3, do_sample=False)
    assert len(texts) == 1 and isinstance(texts[0], str)


ROUND_TRIPS = [
    ("hf", "mlp", "llama"),
    ("timm", "linear", "qwen2"),
    ("hf_siglip", "pool", "gpt2"),
    ("open_clip", "qformer", "gemma"),
    ("fused", "resampler", "phi3"),
    ("hf_dinov2_registers", "mlp", "mistral"),
]


@pytest.mark.parametrize(("vision", "connector", "llm"), ROUND_TRIPS)
def test_save_load_round_trip_is_bitwise(
    tokenizer_dir: str, tmp_path: Path, vision: str, connector: str, llm: str
) -> None:
    model = _model(tokenizer_dir, vision=vision, connector=connector, llm=llm)
    batch = _inputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert loaded.num_image_tokens == model.num_image_tokens
    assert loaded.image_token_id == model.image_token_id
    assert loaded.vision.transform == model.vision.transform
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "vlm-adapters"
    assert config["providers"] == {k: "vlm-adapters" for k in ("vision", "connector", "llm")}


@pytest.mark.parametrize("llm", ["gpt2", "gemma"])
def test_tied_embeddings_stay_tied_after_loading(
    tokenizer_dir: str, tmp_path: Path, llm: str
) -> None:
    model = _model(tokenizer_dir, llm=llm)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    head, embed = loaded.llm.model.get_output_embeddings(), loaded.llm.model.get_input_embeddings()
    assert head.weight.data_ptr() == embed.weight.data_ptr()
    assert torch.equal(embed.weight, model.llm.model.get_input_embeddings().weight)


def test_loading_a_missing_component_names_its_package(tokenizer_dir: str, tmp_path: Path) -> None:
    _model(tokenizer_dir).save_pretrained(tmp_path / "ckpt")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "ckpt", copy)
    config = json.loads((copy / "config.json").read_text())
    config["connector"] = {"type": "honeybee"}
    config["providers"]["connector"] = "vlm-adapters-honeybee"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ComponentError, match=r"'honeybee'.*pip install vlm-adapters-honeybee"):
        vlm_adapters.VisionLanguageModel.from_pretrained(copy)


def test_a_checkpoint_key_we_never_write_is_refused(tokenizer_dir: str, tmp_path: Path) -> None:
    _model(tokenizer_dir).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    assert set(config) == {
        "format",
        "format_version",
        *("vision", "connector", "llm", "providers", "versions"),
    }
    # what the first version wrote (no format_version, template or LoRA) still loads
    first = {key: value for key, value in config.items() if key != "format_version"}
    path.write_text(json.dumps(first))
    vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    path.write_text(json.dumps({**config, "rope_scaling": {"factor": 4}}))
    with pytest.raises(CheckpointError) as info:
        vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert str(info.value).startswith(f"{path}: unknown top-level key 'rope_scaling' (written by")
    assert "upgrade, or remove the key" in str(info.value)


def test_loading_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="not a vlm-adapters checkpoint"):
        vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path)
