"""Chat templates: conversations to token ids with exact assistant-span label masks.

A conversation is a list of turns `{"from": "human" | "gpt" | "system", "value": str}`
("user" and "assistant" are accepted aliases). Ids are built piece by piece: every rendered
piece (a role header, a turn's text, an end-of-turn token) is tokenized on its own and the
pieces are concatenated, so label masks never depend on guessed offsets, and the prompt built
for generation is exactly a prefix of the ids seen in training.

Every `<image>` marker becomes `num_image_tokens` copies of `image_token_id`; the text around a
marker (including the newline LLaVA puts after it) is kept as written.

What a turn says is text: a special-token string in it (`<|eot_id|>`, `<|im_start|>`, eos...)
is encoded as plain text (the tokenizer's `split_special_tokens`), so only the template's own
markup gives control tokens and data or a prompt cannot forge a turn.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlm_adapters.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of a position that is not supervised (PyTorch's cross-entropy default)."""
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
DEFAULT_TEMPLATE = "vicuna_v1"
"""The template a model without a recorded one is used with (LLaVA-1.5's)."""
EOS = "{eos}"
"""Stands for the tokenizer's eos token in a template's `end_of_turn`."""

ROLE_ALIASES: dict[str, str] = {
    "human": "human",
    "user": "human",
    "gpt": "gpt",
    "assistant": "gpt",
    "system": "system",
}

Piece = tuple[str, bool]
"""A rendered piece of text and whether it is supervised (labelled)."""


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is rendered; `{content}` stands for a turn's text.

    `end_of_turn` closes every assistant answer and is supervised, so the model learns to stop;
    `separator` follows it unsupervised. `system=None` merges the system text into the first
    human turn. `images_only` keeps only the `<image>` markers of human turns (stage-1 `plain`).
    `special_tokens` must each be one token of the tokenizer (see `check_template`).
    `from_tokenizer` renders with the tokenizer's own Jinja chat template instead.
    """

    name: str
    user: str
    assistant_prefix: str
    end_of_turn: str
    answer: str = "{content}"
    separator: str = ""
    system: str | None = "{content}"
    default_system: str = ""
    add_bos: bool = True
    images_only: bool = False
    special_tokens: tuple[str, ...] = ()
    from_tokenizer: bool = False


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(
        name="plain", user="{content}", assistant_prefix="", end_of_turn=EOS, images_only=True
    ),
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        system="{content} ",
        default_system=VICUNA_SYSTEM,
        user="USER: {content} ",
        assistant_prefix="ASSISTANT:",
        answer=" {content}",
        end_of_turn=EOS,
    ),
    "llama3": ChatTemplate(
        name="llama3",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": ChatTemplate(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        separator="\n",
        add_bos=False,
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
    "mistral": ChatTemplate(
        name="mistral",
        system=None,
        user="[INST] {content} [/INST]",
        assistant_prefix="",
        answer=" {content}",
        end_of_turn=EOS,
    ),
    "tokenizer": ChatTemplate(
        name="tokenizer",
        user="",
        assistant_prefix="",
        end_of_turn="",
        add_bos=False,
        from_tokenizer=True,
    ),
}
"""Templates by name; add entries to register more."""


@dataclass
class Encoded:
    """Token ids of one conversation, its labels (-100 = not supervised) and image count."""

    input_ids: list[int]
    labels: list[int]
    num_images: int


def list_templates() -> list[str]:
    """Names of the registered chat templates."""
    return sorted(TEMPLATES)


def get_template(name: str) -> ChatTemplate:
    """The template called `name`."""
    if name not in TEMPLATES:
        raise DataError(f"unknown chat template {name!r}; available: {', '.join(list_templates())}")
    return TEMPLATES[name]


def template_vocabulary() -> list[str]:
    """All literal text the registered templates render (for `build_word_tokenizer`)."""
    texts = []
    for template in TEMPLATES.values():
        if not template.from_tokenizer:
            fields = (template.user, template.assistant_prefix, template.system or "")
            texts += [text.replace("{content}", " ") for text in fields]
            texts.append(template.default_system)
    return texts


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate,
    turns: Sequence[Mapping[str, Any]],
    *,
    image_token_id: int,
    num_image_tokens: int,
) -> Encoded:
    """Token ids and labels for training: only assistant answers and their end of turn count."""
    template = _resolve(template)
    pieces = _pieces(tokenizer, template, normalize_turns(turns), generation=False)
    return _encode_pieces(
        tokenizer,
        template,
        pieces,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: str | ChatTemplate,
    turns: Sequence[Mapping[str, Any]],
    *,
    image_token_id: int,
    num_image_tokens: int,
) -> list[int]:
    """Token ids for generation: `turns` (ending with a human turn), then the assistant prefix."""
    template = _resolve(template)
    normalized = normalize_turns(turns)
    if not normalized or normalized[-1][0] != "human":
        raise DataError("encode_prompt needs a conversation whose last turn is from 'human'")
    pieces = _pieces(tokenizer, template, normalized, generation=True)
    encoded = _encode_pieces(
        tokenizer,
        template,
        pieces,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )
    return encoded.input_ids


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: str | ChatTemplate) -> list[int]:
    """Ids that end an assistant turn (the template's end of turn, then eos), for generation."""
    check_template(tokenizer, template)
    ids = _piece_ids(tokenizer, _end_of_turn(tokenizer, _resolve(template)))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def check_template(tokenizer: PreTrainedTokenizerBase, template: str | ChatTemplate) -> None:
    """Raise DataError unless the template's end of turn and special tokens are single tokens."""
    template = _resolve(template)
    end_of_turn = _end_of_turn(tokenizer, template)
    for token in (*template.special_tokens, *([end_of_turn] if end_of_turn else [])):
        ids = _piece_ids(tokenizer, token)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise DataError(
                f"chat template {template.name!r} needs {token!r} as a single token, but the "
                f"tokenizer splits it into {ids}; add it as a special token or pick another "
                "template"
            )


def normalize_turns(turns: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """`(role, text)` pairs with roles mapped to human/gpt/system; DataError on bad turns."""
    normalized = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise DataError(f"turn {index} needs 'from' and 'value' keys, got {turn!r}")
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(
                f"turn {index} has unknown role {turn['from']!r}; "
                f"use one of {', '.join(ROLE_ALIASES)}"
            )
        if not isinstance(turn["value"], str):
            raise DataError(f"turn {index} 'value' must be a string, got {turn['value']!r}")
        normalized.append((role, turn["value"]))
    return normalized


def _resolve(template: str | ChatTemplate) -> ChatTemplate:
    return get_template(template) if isinstance(template, str) else template


def _pieces(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    turns: list[tuple[str, str]],
    *,
    generation: bool,
) -> list[Piece]:
    """The labelled pieces of `turns`; with `generation`, followed by the assistant prefix.

    Turn texts are rendered marked (see `_mark_specials`), so the template's markup and what
    the turns say stay apart through any rendering.
    """
    turns = [(role, _mark_specials(tokenizer, text)) for role, text in turns]
    if template.from_tokenizer:
        return _chat_template_pieces(tokenizer, turns, generation)
    pieces = list(_template_pieces(tokenizer, template, turns))
    return [*pieces, (template.assistant_prefix, False)] if generation else pieces


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> str:
    """The text that ends an assistant turn, with `{eos}` resolved."""
    if template.from_tokenizer:
        pieces = _chat_template_pieces(tokenizer, [("human", "x"), ("gpt", "y")], False)
        return _first_special(tokenizer, pieces[-2][0], 1)[1]  # [-2]: the supervised end
    if EOS not in template.end_of_turn:
        return template.end_of_turn
    if tokenizer.eos_token is None:
        raise DataError(
            f"chat template {template.name!r} ends turns with eos, but the tokenizer has no "
            "eos_token; set one or pick another template"
        )
    return template.end_of_turn.replace(EOS, tokenizer.eos_token)


def _template_pieces(
    tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, turns: list[tuple[str, str]]
) -> Iterator[Piece]:
    """Render `turns` with a named template as labelled pieces."""
    late = [index for index, (role, _) in enumerate(turns) if role == "system" and index > 0]
    if late:
        raise DataError(f"turn {late[0]}: a system turn may only come first")
    end_of_turn = _end_of_turn(tokenizer, template)
    system = template.default_system
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    if system and template.system is not None:
        yield template.system.replace("{content}", system), False
    for role, text in turns:
        if role == "gpt":
            yield template.assistant_prefix, False
            yield template.answer.replace("{content}", text), True
            yield end_of_turn, True
            yield template.separator, False
            continue
        if template.images_only:
            text = IMAGE_MARKER * text.count(IMAGE_MARKER)
        elif system and template.system is None:
            text, system = f"{system}\n\n{text}", ""
        yield template.user.replace("{content}", text), False


def _chat_template_pieces(
    tokenizer: PreTrainedTokenizerBase, turns: list[tuple[str, str]], generation: bool
) -> list[Piece]:
    """Render `turns` with the tokenizer's Jinja template, as the growth of prefix renderings."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [{"role": roles[role], "content": text} for role, text in turns]
    pieces: list[Piece] = []
    done = ""
    for index, (role, text) in enumerate(turns):
        if role == "gpt":
            prompt = _render(tokenizer, messages[:index], generation=True)
            pieces.append((_grown(done, prompt, index), False))
            done = _render(tokenizer, messages[: index + 1], generation=False)
            pieces += _split_answer(tokenizer, _grown(prompt, done, index), text, index)
        else:
            rendered = _render(tokenizer, messages[: index + 1], generation=False)
            pieces.append((_grown(done, rendered, index), False))
            done = rendered
    if generation:
        pieces.append((_grown(done, _render(tokenizer, messages, generation=True), -1), False))
    return pieces


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, generation: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _grown(before: str, after: str, index: int) -> str:
    """The text `after` adds to `before`; DataError if `before` is not a prefix of it."""
    if not after.startswith(before):
        raise DataError(
            f"the tokenizer's chat template rewrites earlier turns when turn {index} is added, "
            "so labels cannot be exact; use a named template instead of 'tokenizer'"
        )
    return after[len(before) :]


def _split_answer(
    tokenizer: PreTrainedTokenizerBase, text: str, answer: str, index: int
) -> list[Piece]:
    """Split a rendered assistant turn into: lead, answer, end of turn, trailing text."""
    start = text.find(answer)
    if start < 0:
        raise DataError(
            f"the tokenizer's chat template changes the text of assistant turn {index}; "
            "use a named template instead of 'tokenizer'"
        )
    tail = text[start + len(answer) :]
    position, token = _first_special(tokenizer, tail, index)
    cut = position + len(token)
    return [(text[:start], False), (answer, True), (tail[:cut], True), (tail[cut:], False)]


def _first_special(tokenizer: PreTrainedTokenizerBase, text: str, index: int) -> tuple[int, str]:
    """Position and text of the first special token in `text` (an assistant turn's end)."""
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    found = [(text.find(token), token) for token in specials if token in text]
    if not found:
        raise DataError(
            f"the tokenizer's chat template ends assistant turn {index} without a special "
            "token, so generation could not stop; use a named template instead of 'tokenizer'"
        )
    return min(found)


def _encode_pieces(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    pieces: list[Piece],
    *,
    image_token_id: int,
    num_image_tokens: int,
) -> Encoded:
    """Tokenize each piece on its own, expand `<image>` markers and concatenate."""
    ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    num_images = 0
    for text, supervised in pieces:
        segments = text.split(IMAGE_MARKER)
        for position, segment in enumerate(segments):
            if position > 0:
                ids += [image_token_id] * num_image_tokens
                labels += [IGNORE_INDEX] * num_image_tokens
                num_images += 1
            segment_ids = _rendered_ids(tokenizer, segment)
            ids += segment_ids
            labels += segment_ids if supervised else [IGNORE_INDEX] * len(segment_ids)
    return Encoded(input_ids=ids, labels=labels, num_images=num_images)


_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
"""Private-use characters around a special-token string that a turn's text holds."""


def _mark_specials(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """`text` with each special-token string (and each mark character) between marks."""
    strings, _ = _special_patterns(tokenizer, len(tokenizer))
    return strings.sub(lambda found: f"{_MARK_OPEN}{found.group()}{_MARK_CLOSE}", text)


def _rendered_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of rendered text: marked strings as plain text, the markup around them as is.

    A mark a Jinja template cut from its string is dropped (it still separates the text).
    """
    _, marked = _special_patterns(tokenizer, len(tokenizer))
    parts = marked.split(text)  # text, marked string (None: a lone mark), text, ...
    ids = _piece_ids(tokenizer, parts[0])
    for index in range(1, len(parts), 2):
        ids += _piece_ids(tokenizer, parts[index] or "", split_special=True)
        ids += _piece_ids(tokenizer, parts[index + 1])
    return ids


@functools.lru_cache(maxsize=64)
def _special_patterns(
    tokenizer: PreTrainedTokenizerBase, size: int
) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Regexes of the strings `_mark_specials` marks (the tokenizer's special tokens but the
    `<image>` marker, and the marks, longest first) and of a marked one or a lone mark.

    ``size`` (the vocabulary length) is part of the key, so adding tokens invalidates it.
    """
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    strings = sorted(specials - {IMAGE_MARKER} | {_MARK_OPEN, _MARK_CLOSE}, key=len, reverse=True)
    either = "|".join(map(re.escape, strings))
    marked = f"{_MARK_OPEN}({either}){_MARK_CLOSE}|[{_MARK_OPEN}{_MARK_CLOSE}]"
    return re.compile(either), re.compile(marked)


def _piece_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, *, split_special: bool = False
) -> list[int]:
    """Ids of `text`; with `split_special`, special-token strings in it are plain text."""
    if not text:
        return []
    return list(_cached_piece_ids(tokenizer, len(tokenizer), text, split_special))


@functools.lru_cache(maxsize=65536)
def _cached_piece_ids(
    tokenizer: PreTrainedTokenizerBase, size: int, text: str, split_special: bool
) -> tuple[int, ...]:
    """Headers, questions and answers repeat across samples: tokenize each text once.

    ``size`` (the vocabulary length) is part of the key, so adding tokens invalidates it.
    """
    encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)
    return tuple(encoded["input_ids"])


def with_image_markers(
    turns: Sequence[Mapping[str, Any]], num_images: int, marker: str = IMAGE_MARKER
) -> list[dict[str, Any]]:
    """Turns with ``<image>\\n`` (``marker``: another placeholder, such as ``<video>``) opening
    the first human turn when one image has no marker."""
    turns = [dict(turn) for turn in turns]
    if num_images != 1 or any(marker in str(turn["value"]) for turn in turns):
        return turns
    for turn in turns:
        if str(turn["from"]).lower() in ("human", "user"):
            turn["value"] = f"{marker}\n{turn['value']}"
            break
    return turns
