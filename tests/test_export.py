"""Export to and import from transformers' LLaVA format, with logit and greedy-token parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.chat.templates import encode_prompt, stop_token_ids
from vlm_adapters.cli import main
from vlm_adapters.export import ExportError, check_exportable, from_hf_llava, to_hf_llava
from vlm_adapters.testing import tiny_model_config

REFERENCE = Path(__file__).with_name("hf_llava_reference.py")
QUESTION = "what colour is the shape?"
# (vision, connector, llm, template): CLS tower + mlp, CLS-free tower + linear, untied head.
COMPOSITIONS = [
    ("hf", "mlp", "llama", "vicuna_v1"),
    ("hf_siglip", "linear", "qwen2", "chatml"),
    ("hf", "mlp", "gpt2", "llama3"),
]


def tiny_vlm(tokenizer_dir: str, vision: str, connector: str, llm: str) -> VisionLanguageModel:
    """A tiny model whose connector weights are large enough for images to move the logits."""
    torch.manual_seed(0)
    model = build_vlm(tiny_model_config(tokenizer_dir, vision, connector, llm)).eval()
    for param in model.connector.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


def our_outputs(model: VisionLanguageModel, template: str, image: Image.Image) -> dict:
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
    ids = encode_prompt(
        model.tokenizer,
        template,
        turns,
        image_token_id=model.image_token_id,
        num_image_tokens=model.num_image_tokens,
    )
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    pixels = model.vision.preprocess([image])
    with torch.no_grad():
        logits = model(input_ids, mask, pixels).logits
    stops = stop_token_ids(model.tokenizer, template)
    generated = model.generate_ids(
        input_ids, mask, pixels, max_new_tokens=6, do_sample=False, eos_token_id=stops
    )
    return {
        "input_ids": input_ids,
        "pixel_values": pixels,
        "logits": logits,
        "generated": generated,
    }


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.effect_noise((32, 32), 60).convert("RGB").save(path)
    return path


@pytest.fixture(scope="module")
def exported(tokenizer_dir: str, image_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """Each composition exported, then run by plain transformers in one subprocess."""
    root = tmp_path_factory.mktemp("export")
    image = Image.open(image_path)
    cases, jobs = {}, []
    for vision, connector, llm, template in COMPOSITIONS:
        model = tiny_vlm(tokenizer_dir, vision, connector, llm)
        name = f"{vision}-{connector}-{llm}"
        to_hf_llava(model, root / name, template=template)
        cases[name] = (model, our_outputs(model, template, image), root / name)
        message = {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": QUESTION}],
        }
        jobs.append(
            {
                "checkpoint": str(root / name),
                "image": str(image_path),
                "messages": [message],
                "eos_token_id": stop_token_ids(model.tokenizer, template),
                "max_new_tokens": 6,
                "out": str(root / f"{name}.safetensors"),
            }
        )
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REFERENCE), str(root / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: (*case, load_file(root / f"{name}.safetensors")) for name, case in cases.items()}


@pytest.mark.parametrize("name", [f"{v}-{c}-{m}" for v, c, m, _ in COMPOSITIONS])
def test_plain_transformers_matches_ours(exported: dict, name: str) -> None:
    _, ours, _, theirs = exported[name]
    assert torch.equal(theirs["input_ids"], ours["input_ids"])  # processor + chat template
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"])  # the same image processor
    diff = (theirs["logits"] - ours["logits"]).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"
    assert theirs["generated"].tolist() == ours["generated"].tolist()


def test_exported_config_describes_the_composition(exported: dict) -> None:
    clip = json.loads((exported["hf-mlp-llama"][2] / "config.json").read_text())
    siglip = json.loads((exported["hf_siglip-linear-qwen2"][2] / "config.json").read_text())
    processor = json.loads(
        (exported["hf_siglip-linear-qwen2"][2] / "processor_config.json").read_text()
    )
    assert clip["vision_feature_select_strategy"] == "default"
    assert clip["projector_hidden_act"] == "gelu"
    assert clip["image_seq_length"] == 16
    assert siglip["vision_feature_select_strategy"] == "full"
    assert siglip["projector_hidden_act"] == "linear"
    assert processor["num_additional_image_tokens"] == 0
    model, _, directory = exported["hf-mlp-llama"][:3]
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stop_token_ids(model.tokenizer, "vicuna_v1")


def test_import_of_an_export_round_trips(exported: dict, image_path: Path) -> None:
    model, ours, directory, _ = exported["hf_siglip-linear-qwen2"]
    imported = from_hf_llava(directory)  # linear_2 (identity) folds back into one layer
    assert imported.template == "chatml"
    again = our_outputs(imported, "chatml", Image.open(image_path))
    assert (again["logits"] - ours["logits"]).abs().max().item() < 1e-5


def build_foreign_llava(tokenizer_dir: str, directory: Path) -> None:
    """A random LlavaForConditionalGeneration + LlavaProcessor, made with transformers only."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    vision = tiny_model_config(tokenizer_dir)["vision"]["config"]
    text = {**tiny_model_config(tokenizer_dir)["llm"]["config"], "pad_token_id": 3}
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="silu",
        vision_feature_layer=[-2, -1],
    )
    torch.manual_seed(1)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(directory)


def test_import_matches_transformers(tokenizer_dir: str, image_path: Path, tmp_path: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    build_foreign_llava(tokenizer_dir, tmp_path / "llava")
    assert main(["import", str(tmp_path / "llava"), "--out", str(tmp_path / "ours")]) == 0
    model = VisionLanguageModel.from_pretrained(tmp_path / "ours").eval()
    assert model.template == "vicuna_v1"
    assert model.connector.cfg.activation == "silu"
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    inputs = processor(
        images=Image.open(image_path), text=f"<image> {QUESTION}", return_tensors="pt"
    )
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
        greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
        their_tokens = theirs.generate(**inputs, **greedy)[:, inputs["input_ids"].shape[1] :]
    our_tokens = model.generate_ids(**inputs, **greedy)
    assert (got - expected).abs().max().item() < 1e-4
    assert our_tokens.tolist() == their_tokens.tolist()


def test_lora_is_merged_before_export(tokenizer_dir: str, image_path: Path, tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    from vlm_adapters.model.lora import LoraSettings, apply_lora

    model = tiny_vlm(tokenizer_dir, "hf", "mlp", "llama")
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ours = our_outputs(model, "vicuna_v1", Image.open(image_path))
    to_hf_llava(model, tmp_path / "merged")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        logits = theirs(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"]).logits
    assert (logits - ours["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("vision", "connector", "overrides", "reason"),
    [
        ("hf_dinov2_registers", "mlp", {}, "5 prefix tokens"),
        ("hf", "qformer", {}, "'qformer' has no counterpart"),
        ("timm", "mlp", {}, "not a transformers vision model"),
        ("hf", "mlp", {"depth": 3}, "depth 3"),
    ],
)
def test_unexportable_compositions_say_why(
    tokenizer_dir: str, tmp_path: Path, vision: str, connector: str, overrides: dict, reason: str
) -> None:
    config = tiny_model_config(tokenizer_dir, vision, connector)
    config["connector"].update(overrides)
    model = build_vlm(config)
    assert reason in check_exportable(model)
    with pytest.raises(ExportError, match="save_pretrained"):
        to_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_unsupported_component_is_named_in_one_message(
    tokenizer_dir: str, tmp_path: Path
) -> None:
    model = build_vlm(tiny_model_config(tokenizer_dir, "timm", "qformer"))
    with pytest.raises(ExportError) as info:
        to_hf_llava(model, tmp_path / "out")
    message = str(info.value)
    vision, connector = message.index("not a transformers vision model"), message.index("qformer")
    assert vision < connector < message.index("save_pretrained")
    assert "use connector type `linear` or `mlp`" in message and "\n" not in message


def test_export_command(tokenizer_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    build_vlm(tiny_model_config(tokenizer_dir, connector="pool")).save_pretrained(tmp_path / "pool")
    assert main(["export", str(tmp_path / "pool"), "--out", str(tmp_path / "out")]) == 2
    assert "'pool' has no counterpart" in capsys.readouterr().err
    model = tiny_vlm(tokenizer_dir, "hf", "mlp", "llama")
    model.template = "chatml"
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    processor = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert "<|im_start|>" in (tmp_path / "out" / "chat_template.jinja").read_text()
    assert processor["patch_size"] == 8
