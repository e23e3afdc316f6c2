"""Generation: train/infer prompt ids agree, left-padded batches, KV cache, stops, sampling, CLI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.chat.templates import encode_conversation
from vlm_adapters.cli import chat, generate, main
from vlm_adapters.model.generation import generate as generate_text
from vlm_adapters.model.generation import generate_ids, prompt_batch
from vlm_adapters.testing import tiny_model_config

QUESTIONS = ["what colour is the shape?", "how many shapes are there?", "where is the red shape?"]


@pytest.fixture(scope="module")
def model(tokenizer_dir: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    vlm = build_vlm(tiny_model_config(tokenizer_dir)).eval()
    for param in vlm.connector.parameters():
        nn.init.normal_(param, std=0.5)
    return vlm


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.effect_noise((32, 32), 40 + 30 * i).convert("RGB") for i in range(3)]


def conversations() -> list[list[dict[str, str]]]:
    return [[{"from": "human", "value": q}] for q in QUESTIONS]


def test_prompt_ids_are_a_prefix_of_the_training_ids(model: VisionLanguageModel) -> None:
    turns = [{"from": "human", "value": QUESTIONS[0]}, {"from": "gpt", "value": "red"}]
    image = Image.new("RGB", (32, 32))
    batch = prompt_batch(model, [turns[:1]], [image], "vicuna_v1")
    train = encode_conversation(
        model.tokenizer,
        "vicuna_v1",
        [{"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}, turns[1]],
        image_token_id=model.image_token_id,
        num_image_tokens=model.num_image_tokens,
    )
    prompt = batch["input_ids"][0].tolist()
    assert train.input_ids[: len(prompt)] == prompt
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_batched_left_padding_and_kv_cache_give_the_same_tokens(
    model: VisionLanguageModel, images: list[Image.Image]
) -> None:
    cached = generate_ids(model, conversations(), images, max_new_tokens=6)
    uncached = generate_ids(model, conversations(), images, max_new_tokens=6, use_cache=False)
    single = [
        generate_ids(model, [c], [i], max_new_tokens=6)[0] for c, i in zip(conversations(), images)
    ]
    assert cached == uncached == single
    assert len({tuple(row) for row in cached}) > 1  # the images and questions matter


def test_generation_stops_at_the_templates_end_of_turn(model: VisionLanguageModel, forced) -> None:
    im_end = forced(model, "<|im_end|>")
    end_id = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generate_ids(im_end, conversations()[:1], template="chatml", max_new_tokens=5) == [[]]
    assert generate_ids(im_end, conversations()[:1], template="vicuna_v1", max_new_tokens=5) == [
        [end_id] * 5
    ]


def test_sampling_is_reproducible_with_a_seed(
    model: VisionLanguageModel, images: list[Image.Image]
) -> None:
    kwargs = dict(temperature=1.5, top_p=0.95, max_new_tokens=8)
    first = generate_ids(model, conversations(), images, seed=1, **kwargs)
    assert generate_ids(model, conversations(), images, seed=1, **kwargs) == first
    assert generate_ids(model, conversations(), images, seed=2, **kwargs) != first


def test_image_markers_must_match_images(model: VisionLanguageModel) -> None:
    turns = [[{"from": "human", "value": "<image> <image> what?"}]]
    with pytest.raises(ValueError, match="2 <image> marker"):
        generate_text(model, turns, [Image.new("RGB", (32, 32))])


def test_generate_command_streams_the_answer(
    model: VisionLanguageModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    forced,
) -> None:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    monkeypatch.setattr(generate, "load_checkpoint", lambda path, trust=False: forced(model, "red"))
    argv = ["generate", "ckpt", "--image", str(tmp_path / "red.png"), "--prompt", QUESTIONS[0]]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() == "red red red"


def _silent(model: VisionLanguageModel) -> VisionLanguageModel:
    """``model`` with an LLM backend whose ``generate`` ignores the streamer."""
    generate_new = model.llm.generate

    def ignoring(embeds, mask, streamer=None, **kwargs):  # noqa: ANN001, ANN202
        return generate_new(embeds, mask, **kwargs)

    model.llm.generate = ignoring
    return model


def test_the_cli_prints_the_answer_when_the_streamer_got_nothing(
    model: VisionLanguageModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    forced,
) -> None:
    stub = _silent(forced(model, "red"))
    monkeypatch.setattr(generate, "load_checkpoint", lambda path, trust=False: stub)
    monkeypatch.setattr(chat, "load_checkpoint", lambda path, trust=False: stub)
    argv = ["ckpt", "--max-new-tokens", "2"]
    assert main(["generate", *argv, "--prompt", QUESTIONS[0]]) == 0
    assert capsys.readouterr().out == "red red\n"  # once, though nothing streamed
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", *argv]) == 0
    assert "assistant> red red\nyou> " in capsys.readouterr().out


def test_chat_command_reads_turns_and_commands_from_stdin(
    model: VisionLanguageModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    forced,
) -> None:
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    seen: list[list[dict]] = []
    stub = forced(model, "blue")
    original = chat._answer

    def recording_answer(vlm, turns, image, args):  # noqa: ANN001, ANN202
        seen.append([dict(t) for t in turns])
        return original(vlm, turns, image, args)

    monkeypatch.setattr(chat, "load_checkpoint", lambda path, trust=False: stub)
    monkeypatch.setattr(chat, "_answer", recording_answer)
    script = [QUESTIONS[0], "and?", "/image missing.png", "/reset", "/image", "hi", "/quit", "x"]
    script[4] = f"/image {tmp_path / 'blue.png'}"
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(script) + "\n"))
    assert (
        main(["chat", "ckpt", "--image", str(tmp_path / "blue.png"), "--max-new-tokens", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert out.count("assistant> blue blue") == 3
    assert "missing.png not found" in out and "(conversation cleared)" in out
    assert [len(turns) for turns in seen] == [1, 3, 1]  # history grows; /reset and /image clear it
    assert seen[1][1] == {"from": "gpt", "value": "blue blue"}
