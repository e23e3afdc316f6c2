"""The RL route through the ecosystem: export a tiny composition to transformers' LLaVA format,
train it two steps with TRL's ``GRPOTrainer`` on CPU, import the result and get the very logits
the GRPO-trained transformers model gives (docs/preference.md, "Reinforcement learning with TRL").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_adapters import VisionLanguageModel, build_vlm, export
from vlm_adapters.chat.templates import encode_prompt
from vlm_adapters.cli import main
from vlm_adapters.testing import tiny_model_config

trl = pytest.importorskip("trl", reason="TRL is a test dependency (pip install -e '.[dev]')")
datasets = pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset")

QUESTION = "what colour is the shape?"
TEMPLATE = "vicuna_v1"


def distinct_characters(completions: list[list[dict]], **_: object) -> list[float]:
    """A toy reward: how many different characters the answer uses (so answers differ)."""
    return [float(len(set(completion[0]["content"]))) for completion in completions]


def exported(tokenizer_dir: str, out: Path) -> Path:
    """A tiny CLIP + mlp + llama composition in transformers' LLaVA format."""
    torch.manual_seed(0)
    model = build_vlm(tiny_model_config(tokenizer_dir, "hf", "mlp", "llama"))
    for param in model.connector.parameters():
        torch.nn.init.normal_(param, std=0.5)  # images visibly move the logits
    return export(model, out, template=TEMPLATE)


def grpo_train(checkpoint: Path, images: list[Image.Image], out: Path):
    """Two GRPO steps on CPU in fp32 (no vLLM); returns the trained transformers model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import GRPOConfig, GRPOTrainer

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint, padding_side="left")
    prompt = [{"role": "user", "content": QUESTION}]
    data = datasets.Dataset.from_dict({"prompt": [prompt] * len(images), "image": images})
    args = GRPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        max_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=distinct_characters,
        args=args,
        train_dataset=data,
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model(str(out))
    return trainer.model.eval(), processor, trainer


@pytest.fixture(scope="module")
def round_trip(tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("grpo")
    images = [Image.effect_noise((32, 32), 60 + 20 * i).convert("RGB") for i in range(2)]
    checkpoint = exported(tokenizer_dir, root / "llava")
    theirs, processor, trainer = grpo_train(checkpoint, images, root / "grpo")
    args = ["import", str(root / "grpo"), "--out", str(root / "ours"), "--template", TEMPLATE]
    assert main(args) == 0
    ours = VisionLanguageModel.from_pretrained(root / "ours").eval()
    return {
        "root": root,
        "image": images[0],
        "theirs": theirs,
        "processor": processor,
        "ours": ours,
        "logs": trainer.state.log_history,
    }


def test_grpo_ran_two_steps_that_changed_the_weights(round_trip: dict) -> None:
    from transformers import LlavaForConditionalGeneration

    steps = [log for log in round_trip["logs"] if "loss" in log]
    assert len(steps) == 2
    before = LlavaForConditionalGeneration.from_pretrained(round_trip["root"] / "llava")
    trained = round_trip["theirs"].state_dict()
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, trained[k])]
    assert changed, "two GRPO steps left every weight as exported"


def test_import_of_the_grpo_result_gives_identical_logits(round_trip: dict) -> None:
    processor, ours = round_trip["processor"], round_trip["ours"]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=round_trip["image"], text=text, return_tensors="pt")
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}]
    ids = encode_prompt(
        ours.tokenizer,
        TEMPLATE,
        turns,
        image_token_id=ours.image_token_id,
        num_image_tokens=ours.num_image_tokens,
    )
    input_ids = torch.tensor([ids])
    pixels = ours.vision.preprocess([round_trip["image"]])
    assert torch.equal(input_ids, inputs["input_ids"])  # each side's own processor
    assert torch.equal(pixels, inputs["pixel_values"])
    with torch.no_grad():
        expected = round_trip["theirs"](**inputs).logits
        got = ours(input_ids, torch.ones_like(input_ids), pixels).logits
    assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max().item()}"
