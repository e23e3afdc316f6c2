"""An offline word-level tokenizer, for tests, demos and tiny from-scratch LLMs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

STANDARD_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
"""unk, bos, eos and pad, in that order (ids 0-3)."""

TEMPLATE_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[INST]",
    "[/INST]",
)
"""The special tokens that the built-in chat templates render."""

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""A chatml-like Jinja chat template (needs the `<|im_start|>`/`<|im_end|>` special tokens)."""


def build_word_tokenizer(
    words: Iterable[str],
    special_tokens: Sequence[str] = (),
    out_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Build a lowercase word-level tokenizer whose vocabulary holds every word of `words`.

    Each string of `words` may be a sentence: it is split the way the tokenizer splits text.
    Ids 0-3 are `<unk>`, `<s>` (bos), `</s>` (eos) and `<pad>`; `special_tokens` follow.
    With `out_dir`, the tokenizer is saved there for `AutoTokenizer.from_pretrained(out_dir)`.
    """
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*STANDARD_SPECIAL_TOKENS, *special_tokens]))
    backend = _word_level_backend(specials, words)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[len(STANDARD_SPECIAL_TOKENS) :],
    )
    tokenizer.chat_template = CHATML_JINJA
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _word_level_backend(specials: list[str], words: Iterable[str]) -> Tokenizer:
    """A `tokenizers` WordLevel tokenizer with `specials` first, then the words of `words`."""
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    vocab = {token: index for index, token in enumerate(specials)}
    for text in words:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(specials)
    return backend
