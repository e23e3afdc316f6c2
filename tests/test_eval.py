"""Evaluation: exact-match accuracy per question type, answer loss, batching, the eval command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.cli import main
from vlm_adapters.data import ConversationDataset, DataError, load_records
from vlm_adapters.demo import ShapesPaths, generate_shapes
from vlm_adapters.inference.evaluation import evaluate, normalize_answer
from vlm_adapters.testing import tiny_model_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> ShapesPaths:
    return generate_shapes(
        tmp_path_factory.mktemp("shapes"), num_train=2, num_eval=20, image_size=32
    )


@pytest.fixture(scope="module")
def model(tokenizer_dir: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    vlm = build_vlm(tiny_model_config(tokenizer_dir))
    for param in vlm.connector.parameters():
        nn.init.normal_(param, std=0.5)
    return vlm


def test_normalize_answer() -> None:
    assert normalize_answer("  Red.  ") == "red"
    assert normalize_answer("Top   Left!?") == "top left"
    assert normalize_answer("two") != normalize_answer("three")


def test_accuracy_per_question_type(
    model: VisionLanguageModel, shapes: ShapesPaths, forced
) -> None:
    records = load_records(shapes.eval)
    red = forced(model, "red")
    result = evaluate(red, records, shapes.root, batch_size=8, max_new_tokens=1)
    answers = [r["conversations"][-1]["value"] for r in records]
    colour = [a for r, a in zip(records, answers) if r["question_type"] == "colour"]
    assert result["n"] == len(records)
    assert result["accuracy"] == pytest.approx(answers.count("red") / len(records))
    assert result["per_type"]["colour"] == pytest.approx(colour.count("red") / len(colour))
    assert result["per_type"]["count"] == 0.0
    assert result["samples"][0] == (
        records[0]["conversations"][0]["value"].replace("<image>", "").strip(),
        answers[0],
        "red",
    )


def test_batching_changes_nothing(model: VisionLanguageModel, shapes: ShapesPaths) -> None:
    records = load_records(shapes.eval)
    big = evaluate(model, records, shapes.root, batch_size=64)
    small = evaluate(model, records, shapes.root, batch_size=3)
    assert big["samples"] == small["samples"]
    assert big["loss"] == pytest.approx(small["loss"], rel=1e-5)
    dataset = ConversationDataset.for_model(
        model,
        records,
        image_root=shapes.root,
        template="vicuna_v1",
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for item in dataset:
            out = model(item["input_ids"][None], None, item["pixel_values"], item["labels"][None])
            total, count = total + float(out.loss) * out.num_tokens, count + out.num_tokens
    assert big["loss"] == pytest.approx(total / count, rel=1e-5)
    assert model.training  # evaluate restores the mode it found


def test_records_must_end_with_an_answer(model: VisionLanguageModel, shapes: ShapesPaths) -> None:
    record = {"id": "q", "conversations": [{"from": "human", "value": "what?"}]}
    with pytest.raises(DataError, match=r"sample 'q' \(index 0\): .* must end with a 'gpt' answer"):
        evaluate(model, [record], shapes.root)


def test_eval_command(
    model: VisionLanguageModel, shapes: ShapesPaths, tmp_path: Path, capsys
) -> None:
    model.template = "chatml"
    model.save_pretrained(tmp_path / "ckpt")
    model.template = None
    argv = [
        "eval",
        str(tmp_path / "ckpt"),
        "--data",
        str(shapes.eval),
        "--images",
        str(shapes.root),
    ]
    assert main([*argv, "--json", "--batch-size", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 20 and result["template"] == "chatml"
    assert set(result["per_type"]) == {"colour", "shape", "count"}
    assert main([*argv, "--images", str(tmp_path / "nowhere")]) == 2
    assert "eval_00000.png not found" in capsys.readouterr().err
