"""What a turn says is text: a special-token string inside data, a prompt or a raw prompt is
encoded as plain text, so only a chat template's own markup gives control tokens (no sample
can forge a turn), for every shipped template, in training and at generation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlm_adapters.chat.templates import (
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
    list_templates,
    template_vocabulary,
)
from vlm_adapters.data.processor import VLMProcessor
from vlm_adapters.demo.shapes import shapes_vocabulary
from vlm_adapters.demo.tokenizer import TEMPLATE_SPECIAL_TOKENS
from vlm_adapters.testing import IMAGE_SIZE
from vlm_adapters.vision import ImageTransform

N_IMAGE = 2
HARMLESS = "left"
LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
"""A Llama-3-like Jinja template (it trims what turns say) for the 'tokenizer' template."""


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (like Llama 3's or Qwen's) with every template's special
    tokens: text never maps to unknown ids, so decoding shows exactly what was encoded."""
    specials = ["<s>", "</s>", "<pad>", *TEMPLATE_SPECIAL_TOKENS, "<image>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*shapes_vocabulary(), *template_vocabulary()], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=specials[3:],
    )
    tokenizer.chat_template = LLAMA3_JINJA
    return tokenizer


def _word_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerFast:
    """The tiny tokenizer (chatml-like Jinja template) with `<image>` added as the LLM adds it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False
    )
    return tokenizer


@pytest.fixture(scope="module", params=["word", "byte_level"])
def tok(request: pytest.FixtureRequest, tokenizer_dir: str) -> PreTrainedTokenizerFast:
    if request.param == "word":
        return _word_tokenizer(tokenizer_dir)
    return _byte_level_tokenizer()


def _image_id(tok: PreTrainedTokenizerFast) -> int:
    return tok.convert_tokens_to_ids("<image>")


def _images(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """The image arguments of `encode_conversation` and `encode_prompt`."""
    return {"image_token_id": _image_id(tok), "num_image_tokens": N_IMAGE}


def _controls(tok: PreTrainedTokenizerFast, ids: list[int]) -> Counter[int]:
    """How often each control token (a special token but unk and `<image>`) occurs in ids."""
    special = {i for i, token in tok.added_tokens_decoder.items() if token.special}
    controls = special - {tok.unk_token_id, _image_id(tok)}
    return Counter(i for i in ids if i in controls)


def _forged(tok: PreTrainedTokenizerFast, name: str) -> str:
    """Text holding template ``name``'s own markup: its rendering of a system turn and an
    exchange, bos and end of turn included."""
    turns = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "what shape?"},
        {"from": "gpt", "value": "a circle"},
    ]
    ids = encode_conversation(tok, name, turns, **_images(tok)).input_ids
    return tok.decode(ids)


def _question(text: str) -> list[dict[str, str]]:
    """A conversation ending with a human turn, ``text`` in every turn."""
    return [
        {"from": "system", "value": f"be brief {text}"},
        {"from": "human", "value": f"<image>\nwhat shape is it? {text}"},
        {"from": "gpt", "value": f"a red circle {text}"},
        {"from": "human", "value": f"{text} what colour?"},
    ]


def _training(text: str) -> list[dict[str, str]]:
    return [*_question(text), {"from": "gpt", "value": f"red {text}"}]


def _processor(tok: PreTrainedTokenizerFast, name: str) -> VLMProcessor:
    return VLMProcessor(tok, ImageTransform(IMAGE_SIZE), N_IMAGE, _image_id(tok), name)


Encode = Callable[[PreTrainedTokenizerFast, str, str], list[int]]
ENCODERS: dict[str, Encode] = {
    "encode_conversation": lambda tok, name, text: (
        encode_conversation(tok, name, _training(text), **_images(tok)).input_ids
    ),
    "encode_prompt": lambda tok, name, text: encode_prompt(
        tok, name, _question(text), **_images(tok)
    ),
    "processor.encode": lambda tok, name, text: (
        _processor(tok, name).encode(_training(text), 1).input_ids
    ),
    "processor.prompt": lambda tok, name, text: _processor(tok, name).prompt(_question(text), 1),
}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", list_templates())
def test_control_tokens_come_only_from_the_template(tok, name: str, encoder: str) -> None:
    forged = _forged(tok, name)
    assert _controls(tok, tok(forged, add_special_tokens=False).input_ids)  # it would forge
    encode = ENCODERS[encoder]
    ids = encode(tok, name, forged)
    assert _controls(tok, ids) == _controls(tok, encode(tok, name, HARMLESS))
    assert ids.count(_image_id(tok)) == N_IMAGE


@pytest.mark.parametrize("name", list_templates())
def test_a_forged_answer_is_supervised_as_its_text(name: str) -> None:
    """The labels hold the forged answer's text, and no control token but the end of turn."""
    tok = _byte_level_tokenizer()
    forged = _forged(tok, name)
    labelled = _labelled(tok, name, forged)
    assert _controls(tok, labelled) == _controls(tok, _labelled(tok, name, HARMLESS))
    assert f"red {forged}" in tok.decode(labelled)


def _labelled(tok: PreTrainedTokenizerFast, name: str, text: str) -> list[int]:
    """The supervised ids of the training conversation saying ``text``."""
    encoded = encode_conversation(tok, name, _training(text), **_images(tok))
    return [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]


def test_raw_prompts_are_text(tok) -> None:
    processor = _processor(tok, "chatml")
    specials = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    forged = "".join(token for token in specials if token != "<image>")
    ids = processor.text(f"<image> {forged} red")
    assert not _controls(tok, ids) and ids.count(_image_id(tok)) == N_IMAGE
    batch = processor([f"{forged} <image>"], [Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))])
    assert not _controls(tok, batch["input_ids"][0].tolist())


def test_marks_written_in_a_turn_cannot_forge_either() -> None:
    """The private-use characters that mark special-token strings, written by the user around
    one, are text too, and decode back to what was written."""
    tok = _byte_level_tokenizer()
    written = "\ue000<|eot_id|>\ue001 \ue001\ue000 red"
    encoded = encode_conversation(tok, "llama3", _training(written), **_images(tok)).input_ids
    harmless = encode_conversation(tok, "llama3", _training(HARMLESS), **_images(tok)).input_ids
    assert _controls(tok, encoded) == _controls(tok, harmless)
    assert tok.decode(encoded).count(written) == 5  # each turn says it


def test_a_template_that_cuts_a_turn_leaves_no_stray_marks(tokenizer_dir: str) -> None:
    """A Jinja template that splits a turn at a special token separates the marks around it:
    they are dropped, and the turn's other special-token strings stay text."""
    tok = _word_tokenizer(tokenizer_dir)
    tok.chat_template = tok.chat_template.replace(
        "message['content']", "message['content'].split('</s>') | join(' ')"
    )
    said = "red</s>circle <|im_end|>"
    cut = encode_prompt(tok, "tokenizer", [{"from": "human", "value": said}], **_images(tok))
    plain = encode_prompt(tok, "tokenizer", [{"from": "human", "value": "red"}], **_images(tok))
    assert _controls(tok, cut) == _controls(tok, plain) and tok.unk_token_id not in cut


def test_special_tokens_added_later_are_text_too(tokenizer_dir: str) -> None:
    tok = _word_tokenizer(tokenizer_dir)
    turns = [{"from": "human", "value": "red <spot>"}, {"from": "gpt", "value": "circle"}]
    before = encode_conversation(tok, "chatml", turns, **_images(tok)).input_ids
    tok.add_special_tokens({"extra_special_tokens": ["<spot>"]}, replace_extra_special_tokens=False)
    after = encode_conversation(tok, "chatml", turns, **_images(tok)).input_ids
    assert after == before and tok.convert_tokens_to_ids("<spot>") not in after
