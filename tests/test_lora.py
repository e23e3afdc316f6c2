"""LoRA: scoped to the LLM (or vision tower), complete checkpoints, merging, partial unfreezing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import load_file, load_model

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.cli import main
from vlm_adapters.model.lora import (
    LoraSettings,
    apply_lora,
    has_lora,
    load_weights,
    mark_lora_trainable,
    merge_lora,
)
from vlm_adapters.testing import tiny_model_config, tiny_tokenizer
from vlm_adapters.training.recipes import ensure_lora, unfreeze_last_vision_layers

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tok_dir, llm="llama"):
    torch.manual_seed(0)
    return build_vlm(tiny_model_config(tok_dir, llm=llm)).eval()


def _batch(model):
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (0, 90, 250))]
    return model.processor(["<image> red circle", "<image> blue square left"], images)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomize_lora(model):
    """LoRA B starts at zero (a no-op); give it values so the tests can tell."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.5)


def _adapted(module):
    return [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def test_lora_touches_only_the_llm_and_freezes_only_its_base(tok_dir):
    model = _model(tok_dir)
    model.vision.requires_grad_(False)  # what the finetune stage does
    apply_lora(model, SETTINGS)
    assert not _adapted(model.vision) and not _adapted(model.connector)
    adapted = _adapted(model.llm)
    assert any(n.endswith("self_attn.q_proj") for n in adapted)
    assert any(n.endswith("mlp.down_proj") for n in adapted)
    assert not any("lm_head" in n for n in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    connector = {f"connector.{n}" for n, _ in model.connector.named_parameters()}
    assert connector <= trainable
    assert all(".lora_" in n for n in trainable - connector) and trainable - connector
    # the plain accessors still work through the peft wrapper
    assert model.llm.hidden_size == 32 and model.llm.model.get_decoder() is not None
    assert model(**_batch(model)).logits.shape[-1] == model.llm.model.config.vocab_size


def test_colliding_names_never_reach_the_vision_tower(tok_dir):
    model = _model(tok_dir)
    apply_lora(model, LoraSettings(r=2, alpha=4, target_modules=["q_proj", "out_proj"]))
    assert not _adapted(model.vision)  # CLIP has q_proj and out_proj too
    assert {n.rsplit(".", 1)[-1] for n in _adapted(model.llm)} == {"q_proj"}
    with pytest.raises(ValueError, match="matched no layer"):
        apply_lora(_model(tok_dir), LoraSettings(target_modules=["fc1"]))  # CLIP-only name
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, SETTINGS)


@pytest.mark.parametrize(
    ("llm", "parts"), [("llama", ("llm",)), ("gpt2", ("llm",)), ("llama", ("llm", "vision"))]
)
def test_lora_checkpoint_is_complete_and_reloads_bitwise(tok_dir, tmp_path, llm, parts):
    model = _model(tok_dir, llm)
    for part in parts:
        apply_lora(model, SETTINGS, part=part)
    _randomize_lora(model)
    batch = _batch(model)
    before = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")

    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    assert config["lora"]["r"] == 4 and config["lora"]["target_modules"] == "all-linear"
    assert ("vision_lora" in config) == ("vision" in parts)
    adapter = load_file(tmp_path / "ckpt/adapter/adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert json.loads((tmp_path / "ckpt/adapter/adapter_config.json").read_text())["r"] == 4
    plain = _model(tok_dir, llm)  # base weights load into the plain model under plain names
    assert not load_model(plain, tmp_path / "ckpt/model.safetensors", strict=True)[1]

    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded.llm.model, PeftModel)
    assert torch.equal(_logits(loaded, batch), before)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".lora_" in n)
    with pytest.raises(ValueError, match="resume with the checkpoint's settings"):
        ensure_lora(loaded, LoraSettings(r=8))
    ensure_lora(loaded, SETTINGS)  # resuming LoRA training: the loaded adapter trains on
    assert mark_lora_trainable(loaded)
    loaded(**batch, labels=batch["input_ids"]).loss.backward()
    llm_lora = [p for n, p in loaded.named_parameters() if ".lora_" in n and n.startswith("llm.")]
    assert llm_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in llm_lora)


def test_merge_matches_unmerged_and_cli_merges(tok_dir, tmp_path, capsys):
    model = _model(tok_dir)
    apply_lora(model, SETTINGS)
    _randomize_lora(model)
    batch = _batch(model)
    model.save_pretrained(tmp_path / "lora")
    before = _logits(model, batch)
    merged = merge_lora(model)
    assert not has_lora(merged) and not isinstance(merged.llm.model, PeftModel)
    assert not _adapted(merged)
    torch.testing.assert_close(_logits(merged, batch), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_lora(merged)

    assert main(["merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged/adapter").exists()
    assert "lora" not in json.loads((tmp_path / "merged/config.json").read_text())
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded, batch), before, atol=1e-5, rtol=0)
    assert main(["merge", str(tmp_path / "merged"), "--out", str(tmp_path / "again")]) == 2
    assert "nothing to merge" in capsys.readouterr().err


def test_unfreeze_last_vision_layers(tok_dir):
    model = _model(tok_dir)
    model.requires_grad_(False)
    params = unfreeze_last_vision_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(n.startswith("vision.tower.") and ".layers.1." in n for n in trainable)
    assert len(trainable) == len(params)
    with pytest.raises(ValueError, match="has 2 blocks"):
        unfreeze_last_vision_layers(model, 3)


def test_a_live_lora_model_reloads_its_checkpoint_to_resume(tok_dir, tmp_path):
    model = _model(tok_dir)
    apply_lora(model, SETTINGS)
    _randomize_lora(model)
    batch = _batch(model)
    before = _logits(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():  # training goes on and changes base, adapter and connector weights
        for param in model.parameters():
            param.add_(0.1)
    assert not torch.equal(_logits(model, batch), before)
    load_weights(model, tmp_path / "ckpt", "model.safetensors")
    assert torch.equal(_logits(model, batch), before)
