"""Chat templates: exact label masks, train/inference agreement, errors."""

from __future__ import annotations

import pytest

from vlm_adapters.chat.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplate,
    DataError,
    check_template,
    encode_conversation,
    encode_prompt,
    get_template,
    list_templates,
    stop_token_ids,
    template_vocabulary,
)
from vlm_adapters.demo.shapes import shapes_vocabulary
from vlm_adapters.demo.tokenizer import TEMPLATE_SPECIAL_TOKENS, build_word_tokenizer

N_IMAGE = 3
TURNS = [
    {"from": "human", "value": "<image>\nwhat colour is the shape at the top left?"},
    {"from": "gpt", "value": "red"},
    {"from": "user", "value": "what shape is at the top left?"},
    {"from": "assistant", "value": "a red square"},
]
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "tokenizer": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "vicuna_v1": "</s>",
    "mistral": "</s>",
    "plain": "</s>",
}


@pytest.fixture(scope="module")
def tok():
    words = [*shapes_vocabulary(), *template_vocabulary(), "be brief"]
    return build_word_tokenizer(words, [*TEMPLATE_SPECIAL_TOKENS, "<image>"])


def _encode(tok, template, turns):
    image_id = tok.convert_tokens_to_ids("<image>")
    return encode_conversation(
        tok, template, turns, image_token_id=image_id, num_image_tokens=N_IMAGE
    )


def _prompt(tok, template, turns):
    image_id = tok.convert_tokens_to_ids("<image>")
    return encode_prompt(tok, template, turns, image_token_id=image_id, num_image_tokens=N_IMAGE)


def _labelled(encoded):
    return [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]


def test_builtin_templates_are_listed():
    assert list_templates() == ["chatml", "llama3", "mistral", "plain", "tokenizer", "vicuna_v1"]


@pytest.mark.parametrize("name", list_templates())
def test_labels_are_exactly_the_answers_and_their_end_of_turn(tok, name):
    turns = TURNS[:2] if name == "plain" else TURNS
    encoded = _encode(tok, name, turns)
    answers = [turn["value"] for turn in turns if turn["from"] in ("gpt", "assistant")]
    expected = " ".join(f"{answer} {END_OF_TURN[name]}" for answer in answers)
    assert tok.decode(_labelled(encoded)) == expected
    kept = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert kept == _labelled(encoded)  # labels copy the ids they supervise
    assert encoded.num_images == 1
    assert encoded.input_ids.count(tok.convert_tokens_to_ids("<image>")) == N_IMAGE


@pytest.mark.parametrize("name", list_templates())
def test_prompt_is_a_prefix_of_the_training_ids(tok, name):
    turns = TURNS[:2] if name == "plain" else TURNS
    encoded = _encode(tok, name, turns)
    prompt = _prompt(tok, name, turns[:-1])
    assert encoded.input_ids[: len(prompt)] == prompt
    rest = tok.decode(encoded.input_ids[len(prompt) :])
    assert rest.split() == [*turns[-1]["value"].split(), END_OF_TURN[name]]


def test_llama3_multi_turn_with_two_images(tok):
    turns = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image>\nwhat colour is the shape at the top left?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nhow many shapes are there?"},
        {"from": "gpt", "value": "two"},
    ]
    encoded = _encode(tok, "llama3", turns)
    images = " ".join(["<image>"] * N_IMAGE)
    head = "<|start_header_id|> {} <|end_header_id|>"
    assert tok.decode(encoded.input_ids) == " ".join(
        [
            "<s>",
            head.format("system"), "be brief <|eot_id|>",
            head.format("user"), images, "what colour is the shape at the top left? <|eot_id|>",
            head.format("assistant"), "red <|eot_id|>",
            head.format("user"), images, "how many shapes are there? <|eot_id|>",
            head.format("assistant"), "two <|eot_id|>",
        ]
    )  # fmt: skip
    assert encoded.num_images == 2
    assert tok.decode(_labelled(encoded)) == "red <|eot_id|> two <|eot_id|>"


def test_vicuna_multi_turn_with_two_images(tok):
    turns = [
        {"from": "human", "value": "<image>\n<image>\nhow many shapes are there?"},
        {"from": "gpt", "value": "two"},
        {"from": "human", "value": "what shape is at the top left?"},
        {"from": "gpt", "value": "circle"},
    ]
    encoded = _encode(tok, "vicuna_v1", turns)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert encoded.input_ids[0] == tok.bos_token_id
    assert encoded.input_ids.count(image_id) == 2 * N_IMAGE
    assert encoded.num_images == 2
    text = tok.decode(encoded.input_ids)
    assert text.startswith("<s> a chat between a curious user")
    assert text.endswith("user : what shape is at the top left? assistant : circle </s>")
    assert tok.decode(_labelled(encoded)) == "two </s> circle </s>"


def test_plain_keeps_only_image_placeholders_and_caption(tok):
    turns = [
        {"from": "human", "value": "<image>\nwhat shape is at the top left?"},
        {"from": "gpt", "value": "a red square"},
    ]
    image_id = tok.convert_tokens_to_ids("<image>")
    caption = tok("a red square", add_special_tokens=False)["input_ids"]
    head = [tok.bos_token_id, *[image_id] * N_IMAGE]
    assert _encode(tok, "plain", turns).input_ids == [*head, *caption, tok.eos_token_id]
    assert _prompt(tok, "plain", turns[:1]) == head


def test_chatml_has_no_bos_and_mistral_merges_the_system_turn(tok):
    assert _encode(tok, "chatml", TURNS).input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    turns = [{"from": "system", "value": "be brief"}, *TURNS[2:]]
    assert tok.decode(_encode(tok, "mistral", turns).input_ids) == (
        "<s> [INST] be brief what shape is at the top left? [/INST] a red square </s>"
    )


def test_tokenizer_template_matches_chatml_and_survives_a_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    build_word_tokenizer(
        [*shapes_vocabulary(), *template_vocabulary()],
        [*TEMPLATE_SPECIAL_TOKENS, "<image>"],
        out_dir=tmp_path,
    )
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert _encode(reloaded, "tokenizer", TURNS) == _encode(reloaded, "chatml", TURNS)
    assert stop_token_ids(reloaded, "tokenizer") == stop_token_ids(reloaded, "chatml")


def test_stop_token_ids(tok):
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    assert stop_token_ids(tok, "chatml") == [im_end, tok.eos_token_id]
    assert stop_token_ids(tok, "llama3") == [eot, tok.eos_token_id]
    assert stop_token_ids(tok, "vicuna_v1") == [tok.eos_token_id]


def test_unknown_role_is_named(tok):
    turns = [{"from": "robot", "value": "hi"}, TURNS[1]]
    with pytest.raises(DataError, match=r"turn 0 has unknown role 'robot'; use one of human"):
        _encode(tok, "chatml", turns)


def test_unknown_template_lists_the_available_ones():
    with pytest.raises(DataError, match=r"unknown chat template 'chatgpt'; available: chatml, "):
        get_template("chatgpt")


def test_prompt_must_end_with_a_human_turn(tok):
    with pytest.raises(DataError, match="last turn is from 'human'"):
        _prompt(tok, "chatml", TURNS)


def test_system_turn_only_first(tok):
    turns = [*TURNS[:2], {"from": "system", "value": "be brief"}, *TURNS[2:]]
    with pytest.raises(DataError, match="turn 2: a system turn may only come first"):
        _encode(tok, "llama3", turns)


def test_template_that_does_not_fit_the_tokenizer_is_refused():
    bare = build_word_tokenizer(template_vocabulary())
    with pytest.raises(DataError, match=r"'chatml' needs '<\|im_start\|>' as a single token"):
        check_template(bare, "chatml")
    check_template(bare, "vicuna_v1")


def test_tokenizer_template_that_rewrites_history_is_refused(tok, tmp_path):
    build_word_tokenizer(template_vocabulary(), TEMPLATE_SPECIAL_TOKENS, out_dir=tmp_path)
    from transformers import AutoTokenizer

    unstable = AutoTokenizer.from_pretrained(tmp_path)
    unstable.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    with pytest.raises(DataError, match="rewrites earlier turns when turn 1 is added"):
        _encode(unstable, "tokenizer", TURNS)
    unstable.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    with pytest.raises(DataError, match="ends assistant turn 1 without a special token"):
        _encode(unstable, "tokenizer", TURNS)


def test_every_template_special_token_is_in_the_tokenizer_list():
    for template in TEMPLATES.values():
        assert set(template.special_tokens) <= set(TEMPLATE_SPECIAL_TOKENS)


def test_custom_template_can_be_registered(tok, monkeypatch):
    custom = ChatTemplate(
        name="qa", user="Q: {content} ", assistant_prefix="A:", end_of_turn="{eos}"
    )
    monkeypatch.setitem(TEMPLATES, "qa", custom)
    assert "qa" in list_templates()
    assert tok.decode(_labelled(_encode(tok, "qa", TURNS))) == "red </s> a red square </s>"


def test_cached_piece_ids_follow_tokens_added_later():
    tok = build_word_tokenizer(
        [*shapes_vocabulary(), *template_vocabulary()], TEMPLATE_SPECIAL_TOKENS
    )
    turns = [{"from": "human", "value": "red <spot>"}, {"from": "gpt", "value": "circle"}]
    before = _encode(tok, "chatml", turns).input_ids
    tok.add_tokens(["<spot>"])  # not special: a special one in a turn's text stays text
    after = _encode(tok, "chatml", turns).input_ids
    assert tok.unk_token_id in before
    assert tok.convert_tokens_to_ids("<spot>") in after and tok.unk_token_id not in after
