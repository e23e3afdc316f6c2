"""The synthetic shapes dataset: determinism, honest eval split, answers that need the image."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image

from vlm_adapters.chat.templates import template_vocabulary
from vlm_adapters.data import ConversationDataset, load_records
from vlm_adapters.data.processor import VLMProcessor
from vlm_adapters.demo import (
    build_word_tokenizer,
    chance_accuracy,
    generate_shapes,
    shapes_vocabulary,
)
from vlm_adapters.demo.shapes import COLOURS, COUNTS, EVAL_ANSWERS, POSITIONS
from vlm_adapters.demo.tokenizer import TEMPLATE_SPECIAL_TOKENS


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=40, num_eval=36, seed=7)


def _pixels(paths, split):
    records = load_records(getattr(paths, split))
    return {hashlib.sha1((paths.root / r["image"]).read_bytes()).hexdigest() for r in records}


def test_same_seed_same_data_other_seed_other_data(shapes, tmp_path):
    again = generate_shapes(tmp_path / "a", num_train=40, num_eval=36, seed=7)
    other = generate_shapes(tmp_path / "b", num_train=40, num_eval=36, seed=8)
    for split in ("align", "finetune", "eval"):
        assert getattr(again, split).read_text() == getattr(shapes, split).read_text()
        assert _pixels(again, split) == _pixels(shapes, split)
    assert other.finetune.read_text() != shapes.finetune.read_text()
    assert _pixels(other, "eval") != _pixels(shapes, "eval")


def test_eval_images_are_never_training_images(shapes):
    train = {r["image"] for r in [*load_records(shapes.align), *load_records(shapes.finetune)]}
    evaluation = {r["image"] for r in load_records(shapes.eval)}
    assert len(train) == 40 and len(evaluation) == 36
    assert not train & evaluation
    assert not _pixels(shapes, "finetune") & _pixels(shapes, "eval")


def test_eval_answers_are_single_words_with_low_chance(shapes):
    records = load_records(shapes.eval)
    for record in records:
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n")
        assert gpt["value"] in EVAL_ANSWERS[record["question_type"]]
    assert shapes.chance == chance_accuracy(records) <= 0.35
    assert shapes.chance == pytest.approx((1 / 4 + 1 / 3 + 1 / 3) / 3)


def test_chance_is_the_per_type_majority_baseline():
    def record(kind, answer):
        return {"question_type": kind, "conversations": [{"value": "?"}, {"value": answer}]}

    records = [record("colour", "red")] * 3 + [record("colour", "blue"), record("count", "one")]
    assert chance_accuracy(records) == 4 / 5


def _cell_colour(image: Image.Image, position: str) -> str:
    row, column = divmod(POSITIONS.index(position), 2)
    half = image.width // 2
    pixel = image.getpixel((column * half + half // 2, row * half + half // 2))
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], pixel)))


def _occupied(image: Image.Image) -> int:
    half = image.width // 2
    centres = [(c * half + half // 2, r * half + half // 2) for r in (0, 1) for c in (0, 1)]
    return sum(max(image.getpixel(xy)) > 100 for xy in centres)


def test_answers_match_the_pixels(shapes):
    for record in load_records(shapes.eval):
        image = Image.open(shapes.root / record["image"]).convert("RGB")
        assert image.size == (48, 48)
        question, answer = (turn["value"] for turn in record["conversations"])
        if record["question_type"] == "colour":
            position = question.split("at the ")[1].rstrip("?")
            assert _cell_colour(image, position) == answer
        if record["question_type"] == "count":
            assert COUNTS[_occupied(image) - 1] == answer


def test_captions_and_finetune_questions(shapes):
    align = load_records(shapes.align)
    assert align[0]["conversations"][0]["value"] == "<image>\n"
    assert align[0]["conversations"][1]["value"].startswith("a ")
    for record in load_records(shapes.finetune):
        turns = record["conversations"]
        assert 4 <= len(turns) <= 6
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == 1


def test_vocabulary_covers_all_text_and_the_data_loads(shapes):
    tok = build_word_tokenizer(
        [*shapes_vocabulary(), *template_vocabulary()], [*TEMPLATE_SPECIAL_TOKENS, "<image>"]
    )
    records = [
        *load_records(shapes.align),
        *load_records(shapes.finetune),
        *load_records(shapes.eval),
    ]
    text = " ".join(turn["value"] for r in records for turn in r["conversations"])
    assert tok.unk_token_id not in tok(text.replace("<image>", " "))["input_ids"]
    image_token_id = tok.convert_tokens_to_ids("<image>")
    processor = VLMProcessor(tok, lambda image: torch.zeros(3, 4, 4), 9, image_token_id, "llama3")
    dataset = ConversationDataset(
        load_records(shapes.finetune), processor, image_root=shapes.root, max_length=128
    )
    assert all(isinstance(dataset[i], dict) for i in range(len(dataset)))
