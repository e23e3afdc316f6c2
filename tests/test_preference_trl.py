"""Our preference loss against TRL's ``DPOTrainer`` on an exported twin: the same pairs, the
same token ids, and equal loss, rewards and gradients (fp32, 1e-4), for DPO (sigmoid) and IPO,
with LoRA and full training. TRL's side is tests/scripts/trl_reference.py; ours is the
preference stage's data (`PreferenceDataset` on LLaVA pair records, `PairCollator`) and its
objective (`PreferenceObjective`: one policy pass with each image encoded once, the reference a
frozen copy or the model with its adapters off, reusing the frozen tower's features)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_adapters import VisionLanguageModel, build_vlm, export
from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.data.pairs import PairCollator, PreferenceDataset
from vlm_adapters.model.lora import LoraSettings, apply_lora
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.training.objectives import PreferenceObjective
from vlm_adapters.training.preference import METRICS, PreferenceSettings

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


def tiny_vlm(tokenizer_dir: str) -> VisionLanguageModel:
    """The tiny CLIP + mlp + llama composition the exports are made of."""
    torch.manual_seed(0)
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


def pair_records(root: Path) -> list[dict]:
    """:data:`PAIRS` as LLaVA-style pair records, their images saved (losslessly) in ``root``."""
    records = []
    for n, ((question, chosen, rejected), image) in enumerate(zip(PAIRS, images())):
        image.save(root / f"pair-{n}.png")
        prompt = [{"from": "human", "value": f"<image>\n{question}"}]
        records.append(
            {
                "image": f"pair-{n}.png",
                "conversations": prompt,
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    return records


def pair_batch(model: VisionLanguageModel, root: Path) -> dict:
    """:data:`PAIRS` through our preference data: `PreferenceDataset` and `PairCollator`."""
    dataset = PreferenceDataset.for_model(
        model, pair_records(root), image_root=root, template=TEMPLATE
    )
    kept, skipped = dataset.precheck()
    assert not skipped
    return PairCollator(model.tokenizer.pad_token_id)([kept[i] for i in range(len(kept))])


def our_step(
    model: VisionLanguageModel,
    loss: str,
    reference: str,
    root: Path,
    after_setup: Callable[[VisionLanguageModel], object] = lambda model: None,
) -> dict[str, object]:
    """One forward and backward of the preference stage's objective on :data:`PAIRS`;
    ``after_setup`` changes the policy once the reference is fixed."""
    batch = pair_batch(model, root)
    objective = PreferenceObjective(PreferenceSettings(loss=loss, beta=BETA), reference)
    objective.setup(model, "preference")
    assert objective.reference_kind == reference
    after_setup(model)
    model.zero_grad(set_to_none=True)
    value = objective.loss(model, batch, denominator=batch["pairs"])
    value.backward()
    grads = {
        llava_name(name): param.grad
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
    sums = dict(zip(METRICS, objective.metric_sums().tolist()))
    logps = (sums["logps/chosen"], sums["logps/rejected"])  # summed over the pairs
    return {
        "batch": batch,
        "loss": value.detach(),
        "terms": objective.last,
        "logps": logps,
        "grads": grads,
    }


def assert_matches(ours: dict, theirs: TrlStep, loss: str) -> None:
    batch = ours["batch"]
    assert torch.equal(batch["input_ids"], theirs.batch["input_ids"])  # the same token ids
    answer = (batch["labels"] != IGNORE_INDEX).long()
    assert torch.equal(answer, theirs.batch["completion_mask"])
    torch.testing.assert_close(ours["loss"], theirs.loss, rtol=0, atol=TOLERANCE)
    chosen_logps, rejected_logps = ours["logps"]
    assert chosen_logps == pytest.approx(float(theirs.chosen_logps.sum()), abs=TOLERANCE)
    assert rejected_logps == pytest.approx(float(theirs.rejected_logps.sum()), abs=TOLERANCE)
    terms = ours["terms"]
    chosen_rewards, rejected_rewards = terms.chosen_rewards, terms.rejected_rewards
    if loss == "ipo":  # TRL reports beta * (summed log-ratio) for every loss; ours the IPO one
        chosen_rewards = chosen_rewards * answer[: len(PAIRS)].sum(1)
        rejected_rewards = rejected_rewards * answer[len(PAIRS) :].sum(1)
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


@pytest.mark.parametrize("tower", ["frozen", "trained"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_full_training_matches_trl(
    loss: str, tower: str, tokenizer_dir: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Connector and LLM train; a trained tower runs once per pair here (its gradient the sum
    over both rows) and once per row in TRL."""
    model = tiny_vlm(tokenizer_dir)
    model.vision.requires_grad_(tower == "trained")
    move = lambda policy: perturbed(policy, seed=1)  # noqa: E731 (after the reference copy)
    ours = our_step(model, loss, "copy", tmp_path, after_setup=move)
    towers = [name for name in ours["grads"] if name.startswith("model.vision_tower.")]
    assert bool(towers) == (tower == "trained")
    theirs = trl_dpo_step(
        checkpoints["policy"],
        trl_pairs(),
        loss_type=LOSSES[loss],
        beta=BETA,
        trainable=set(ours["grads"]),
        reference=checkpoints["reference"],
        out_dir=tmp_path / "trl",
    )
    assert_matches(ours, theirs, loss)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_lora_training_matches_trl(
    loss: str, tokenizer_dir: str, checkpoints: dict[str, Path], tmp_path: Path
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
    model.connector.requires_grad_(True)  # the connector trains beside the adapters
    weights = {
        llava_name(name): param.detach().clone()
        for name, param in model.named_parameters()
        if "lora_" in name
    }
    ours = our_step(model, loss, "adapters", tmp_path)
    linears = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    theirs = trl_dpo_step(
        checkpoints["reference"],
        trl_pairs(),
        loss_type=LOSSES[loss],
        beta=BETA,
        lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=linears),
        lora_weights=weights,
        trainable={name for name in ours["grads"] if "lora_" not in name},
        out_dir=tmp_path / "trl",
    )
    assert_matches(ours, theirs, loss)
