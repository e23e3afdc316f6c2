"""Our preference loss against TRL's ``DPOTrainer`` on an exported twin: the same pairs, the
same token ids, and equal loss, rewards and gradients (fp32, 1e-4), for DPO (sigmoid) and IPO,
with LoRA and full training. TRL's side is tests/scripts/trl_reference.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_adapters import VisionLanguageModel, build_vlm, export
from vlm_adapters.chat.templates import IGNORE_INDEX, encode_conversation
from vlm_adapters.model.lora import LoraSettings, apply_lora
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.training.preference import PairLogps, PreferenceSettings, preference_terms

pytest.importorskip("trl", reason="TRL is a test dependency (pip install -e '.[dev]')")
pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset")

from trl_reference import TrlStep, llava_name, trl_dpo_step  # noqa: E402 (tests/scripts)

TEMPLATE = "vicuna_v1"
BETA = 0.1
TOLERANCE = 1e-4
LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}  # ours -> TRL's loss_type
# (question, chosen, rejected): answers of different lengths, so IPO's averages matter
PAIRS = [
    ("what colour is the shape?", "red square", "blue"),
    ("what shape is at the top left?", "circle", "a green triangle"),
    ("how many shapes are there?", "three", "two shapes"),
]


def images() -> list[Image.Image]:
    """One fixed random 32x32 image per pair (the same on every call)."""
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (len(PAIRS), 32, 32, 3), generator=generator)
    return [Image.fromarray(array.numpy().astype("uint8")) for array in pixels]


def trl_pairs() -> list[dict]:
    """The pairs in TRL's conversational format (its collator puts the image before the text)."""
    return [
        {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "images": [image],
        }
        for (question, chosen, rejected), image in zip(PAIRS, images())
    ]


def tiny_vlm(tokenizer_dir: str, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = build_vlm(tiny_model_config(tokenizer_dir, "hf", "mlp", "llama"))
    for param in model.connector.parameters():
        torch.nn.init.normal_(param, std=0.5)  # images visibly move the log-probabilities
    return model


def perturbed(model: VisionLanguageModel, seed: int) -> VisionLanguageModel:
    """``model`` with the LLM's weights moved a little: a policy that is not its reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.llm.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def encode(model: VisionLanguageModel, question: str, answer: str):
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return encode_conversation(
        model.tokenizer,
        TEMPLATE,
        turns,
        image_token_id=model.image_token_id,
        num_image_tokens=model.num_image_tokens,
    )


def answer_batch(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """Every chosen sequence, then every rejected one, right-padded (TRL's layout)."""
    chosen = [encode(model, question, answer) for question, answer, _ in PAIRS]
    encoded = chosen + [encode(model, question, answer) for question, _, answer in PAIRS]
    width = max(len(e.input_ids) for e in encoded)
    pad = model.tokenizer.pad_token_id
    rows = [
        (
            e.input_ids + [pad] * (width - len(e.input_ids)),
            e.labels + [IGNORE_INDEX] * (width - len(e.labels)),
            [1] * len(e.input_ids) + [0] * (width - len(e.input_ids)),
        )
        for e in encoded
    ]
    ids, labels, mask = (torch.tensor(column) for column in zip(*rows))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sequence_logps(model: VisionLanguageModel, batch: dict, pixels: torch.Tensor) -> tuple:
    """Summed answer log-probabilities ``[2P]`` and answer token counts ``[2P]``."""
    logits = model(batch["input_ids"], batch["attention_mask"], pixels).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logps * supervised).sum(1), supervised.sum(1)


def our_step(
    model: VisionLanguageModel, loss: str, reference: VisionLanguageModel | None
) -> dict[str, object]:
    """One forward and backward of our preference loss on :data:`PAIRS`; ``reference`` None:
    the model with its LoRA adapters disabled."""
    batch = answer_batch(model)
    pixels = model.vision.preprocess(images() * 2)
    with torch.no_grad():
        if reference is None:
            with model.llm.model.disable_adapter():
                ref, _ = sequence_logps(model, batch, pixels)
        else:
            ref, _ = sequence_logps(reference, batch, pixels)
    logps, counts = sequence_logps(model, batch, pixels)
    policy = PairLogps(*logps.chunk(2), *counts.chunk(2))
    terms = preference_terms(PreferenceSettings(loss=loss, beta=BETA), policy, ref.chunk(2))
    value = terms.losses.mean()
    model.zero_grad(set_to_none=True)
    value.backward()
    grads = {
        llava_name(name): param.grad
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    loss_value = value.detach()
    return {"batch": batch, "loss": loss_value, "terms": terms, "policy": policy, "grads": grads}


def assert_matches(ours: dict, theirs: TrlStep, loss: str) -> None:
    batch = ours["batch"]
    assert torch.equal(batch["input_ids"], theirs.batch["input_ids"])  # the same token ids
    answer = (batch["labels"] != IGNORE_INDEX).long()
    assert torch.equal(answer, theirs.batch["completion_mask"])
    torch.testing.assert_close(ours["loss"], theirs.loss, rtol=0, atol=TOLERANCE)
    policy, terms = ours["policy"], ours["terms"]
    torch.testing.assert_close(policy.chosen.detach(), theirs.chosen_logps, rtol=0, atol=TOLERANCE)
    rejected = policy.rejected.detach()
    torch.testing.assert_close(rejected, theirs.rejected_logps, rtol=0, atol=TOLERANCE)
    chosen_rewards, rejected_rewards = terms.chosen_rewards, terms.rejected_rewards
    if loss == "ipo":  # TRL reports beta * (summed log-ratio) for every loss; ours the IPO one
        chosen_rewards = chosen_rewards * policy.chosen_tokens
        rejected_rewards = rejected_rewards * policy.rejected_tokens
    torch.testing.assert_close(chosen_rewards, theirs.chosen_rewards, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(rejected_rewards, theirs.rejected_rewards, rtol=0, atol=TOLERANCE)
    assert theirs.chosen_rewards.abs().max() > 1e-3, "policy and reference did not differ"
    assert set(ours["grads"]) == set(theirs.grads)
    for name, grad in ours["grads"].items():
        torch.testing.assert_close(grad, theirs.grads[name], rtol=0, atol=TOLERANCE, msg=name)
    assert max(g.abs().max() for g in theirs.grads.values()) > 1e-3


@pytest.fixture(scope="module")
def checkpoints(tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference model's export and the (perturbed) policy's export."""
    root = tmp_path_factory.mktemp("preference-trl")
    export(tiny_vlm(tokenizer_dir), root / "reference", template=TEMPLATE)
    export(perturbed(tiny_vlm(tokenizer_dir), seed=1), root / "policy", template=TEMPLATE)
    return {"reference": root / "reference", "policy": root / "policy", "root": root}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_full_training_matches_trl(
    loss: str, tokenizer_dir: str, checkpoints: dict[str, Path]
) -> None:
    model = perturbed(tiny_vlm(tokenizer_dir), seed=1)
    reference = tiny_vlm(tokenizer_dir).eval()
    model.vision.requires_grad_(False)  # the tower frozen; connector and LLM train
    ours = our_step(model, loss, reference)
    theirs = trl_dpo_step(
        checkpoints["policy"],
        trl_pairs(),
        loss_type=LOSSES[loss],
        beta=BETA,
        trainable=set(ours["grads"]),
        reference=checkpoints["reference"],
        out_dir=checkpoints["root"] / f"trl-full-{loss}",
    )
    assert_matches(ours, theirs, loss)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_lora_training_matches_trl(
    loss: str, tokenizer_dir: str, checkpoints: dict[str, Path]
) -> None:
    from peft import LoraConfig

    model = tiny_vlm(tokenizer_dir)
    model.requires_grad_(False)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero B: the policy differs from the adapter-free reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    for param in model.connector.parameters():
        param.requires_grad_(True)  # the connector trains beside the adapters
    weights = {
        llava_name(name): param.detach().clone()
        for name, param in model.named_parameters()
        if "lora_" in name
    }
    ours = our_step(model, loss, None)
    linears = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    theirs = trl_dpo_step(
        checkpoints["reference"],
        trl_pairs(),
        loss_type=LOSSES[loss],
        beta=BETA,
        lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=linears),
        lora_weights=weights,
        trainable={name for name in ours["grads"] if "lora_" not in name},
        out_dir=checkpoints["root"] / f"trl-lora-{loss}",
    )
    assert_matches(ours, theirs, loss)
