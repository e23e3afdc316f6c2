"""Task scoring on a tiny model: multiple-choice log-likelihoods (image encoded once per
question), and ``vlm-adapters eval --task-type`` end to end for each task type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters._io import MANIFEST
from vlm_adapters.cli import main
from vlm_adapters.inference.tasks import option_logprobs, score
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.testing.tiny import tiny_tiled_config

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def model(tokenizer_dir: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    vlm = build_vlm(tiny_model_config(tokenizer_dir))
    for param in vlm.connector.parameters():
        nn.init.normal_(param, std=0.5)
    return vlm.eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(root / f"{i}.png")
    return root


def _question(i: int, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"q{i}",
        "image": f"{i}.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat colour is the shape?"}],
        **fields,
    }


def _check_against_loss(model: VisionLanguageModel, pictures: list[Image.Image]) -> None:
    """Option log-likelihoods equal minus the summed training loss of each option answered."""
    turns = [{"from": "human", "value": "<image>\n" * len(pictures) + "what colour is it?"}]
    fast = option_logprobs(model, [turns], [COLOURS], pictures, "vicuna_v1", batch_size=3)[0]
    processor = model.processor_for("vicuna_v1")
    pixels = processor.images(pictures)
    for option, value in zip(COLOURS, fast):
        encoded = processor.encode([*turns, {"from": "gpt", "value": option}], pictures)
        ids, labels = torch.tensor([encoded.input_ids]), torch.tensor([encoded.labels])
        with torch.no_grad():
            out = model(ids, None, pixels, labels, num_items_in_batch=1)
        assert value == pytest.approx(-float(out.loss), abs=1e-4)
    assert len(set(fast)) == len(COLOURS)  # the options really differ


@pytest.mark.parametrize("count", [0, 1, 2])
def test_option_logprobs_equal_the_model_loss(
    model: VisionLanguageModel, images: Path, count: int
) -> None:
    _check_against_loss(model, [Image.open(images / f"{i}.png") for i in range(count)])


def test_option_logprobs_with_anyres_tiles(tokenizer_dir: str) -> None:
    torch.manual_seed(0)
    vision = tiny_tiled_config("hf", max_tiles=None, grids=None)
    tiled = build_vlm(tiny_model_config(tokenizer_dir, vision)).eval()
    sizes = [(64, 32), (50, 97)]  # different grids: different visual token counts
    _check_against_loss(tiled, [Image.new("RGB", size, "blue") for size in sizes])


def test_choice_encodes_each_image_once(model: VisionLanguageModel, images: Path) -> None:
    records = [_question(i, options=COLOURS, answer=i) for i in range(len(COLOURS))]
    calls = []
    hook = model.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        scored = score(model, records, images, "choice", "vicuna_v1", batch_size=5)
    finally:
        hook.remove()
    # 4 questions x 4 circular shifts x 4 options = 64 scored rows, 4 vision passes
    assert len(calls) == len(records)
    assert scored.summary["n"] == 4
    row = scored.samples[0]
    assert row["answer"] == "A" and len(row["shift_predictions"]) == 4
    assert row["prediction"] == "ABCD"[max(range(4), key=row["option_logprobs"].__getitem__)]
    assert row["correct"] == (row["prediction"] == "A")
    hits = [[p == s["answer"] for p in s["shift_predictions"]] for s in scored.samples]
    assert scored.summary["circular_accuracy"] == sum(all(h) for h in hits) / 4
    assert scored.summary["accuracy"] == sum(h[0] for h in hits) / 4


def _answered(i: int, answer: str) -> dict[str, Any]:
    record = _question(i)
    record["conversations"].append({"from": "gpt", "value": answer})
    return record


def test_choice_counts_a_question_only_if_every_shift_is_right(
    model: VisionLanguageModel, images: Path, forced
) -> None:
    red = forced(model, "red")  # prefers the option "red" whatever the order
    records = [_question(0, options=COLOURS, answer="A"), _question(1, options=COLOURS, answer=2)]
    result = score(red, records, images, "choice")
    assert result.summary["accuracy"] == 0.5 and result.summary["circular_accuracy"] == 0.5
    assert [r["prediction"] for r in result.samples] == ["A", "A"]
    assert result.samples[0]["shift_predictions"] == ["A"] * 4  # always the original "red"
    assert [r["circular_correct"] for r in result.samples] == [True, False]


def test_vqa_and_yesno(model: VisionLanguageModel, images: Path, forced) -> None:
    two = forced(model, "two")  # always answers "two"
    vqa = [
        _question(0, answers=["2"] * 3 + ["3"] * 7),
        _question(1, answers=["two"] * 10),
        _answered(2, "1") | {"answers": ["1"] * 10},  # a last answer is ignored
    ]
    result = score(two, vqa, images, "vqa", max_new_tokens=1)
    assert [r["score"] for r in result.samples] == pytest.approx([0.9, 1.0, 0.0])
    assert result.summary["accuracy"] == pytest.approx(1.9 / 3) and result.summary["n"] == 3
    assert result.samples[0]["prediction"] == "two"

    pope = [_answered(0, "yes"), _answered(1, "No"), _answered(2, "no"), _answered(3, "yes.")]
    result = score(two, pope, images, "yesno", max_new_tokens=1)
    # "two" reads as no: TN 2, FN 2
    assert result.summary["accuracy"] == 0.5 and result.summary["yes_ratio"] == 0.0
    assert result.summary["recall"] == 0.0 and result.summary["n"] == 4
    assert [r["read_as"] for r in result.samples] == ["no"] * 4
    assert [r["correct"] for r in result.samples] == [False, True, True, False]


def test_exact_rows(model: VisionLanguageModel, images: Path, forced) -> None:
    records = [_answered(i, COLOURS[i]) for i in range(4)]
    result = score(forced(model, "red"), records, images, "exact", max_new_tokens=1)
    assert result.summary["accuracy"] == 0.25 and result.summary["loss"] > 0
    assert [r["correct"] for r in result.samples] == [True, False, False, False]
    assert result.samples[1] == {
        "id": "q1",
        "question": "what colour is the shape?",
        "prediction": "red",
        "answer": "green",
        "correct": False,
    }


TASKS = {
    "exact": [_answered(i, COLOURS[i]) for i in range(2)],
    "vqa": [_question(i, answers=["red"] * 10) for i in range(2)],
    "yesno": [_answered(0, "yes"), _answered(1, "no")],
    "choice": [_question(i, options=COLOURS[:3], answer=i) for i in range(2)],
}


@pytest.mark.parametrize("task", list(TASKS))
def test_eval_command_writes_predictions(
    model: VisionLanguageModel, images: Path, tmp_path: Path, task: str, capsys
) -> None:
    data = tmp_path / "task.json"
    data.write_text(json.dumps(TASKS[task]))
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    argv = ["eval", str(tmp_path / "ckpt"), "--data", str(data), "--images", str(images)]
    assert main([*argv, "--task-type", task, "--out", str(out), "--json"]) == 0
    expected = score(model, TASKS[task], images, task)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "summary.json").read_text())
    assert printed == json.loads(json.dumps(expected.summary))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1"]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in expected.samples]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "predictions.jsonl", "summary.json"]
    )
