"""Named chat templates as Jinja, so ``apply_chat_template`` renders exactly our text."""

from __future__ import annotations

import json
from typing import Any

from vlm_adapters.chat.templates import EOS, IMAGE_MARKER, VIDEO_MARKER, ChatTemplate, get_template

_CONTENT = "{content}"


def chat_template_jinja(template: str | ChatTemplate, tokenizer: Any) -> str:
    """A Jinja chat template rendering ``template`` exactly like :mod:`vlm_adapters.chat.templates`.

    Message content may be a string or a list of ``{"type": "image"}`` / ``{"type": "text"}``
    items (an image item renders as ``<image>\\n``, a video item as ``<video>\\n``).
    ``bos_token`` is written only when the template wants it and the tokenizer does not add it
    by itself.
    """
    template = get_template(template) if isinstance(template, str) else template
    if template.from_tokenizer:
        return tokenizer.chat_template
    eos = tokenizer.eos_token or ""
    end = template.end_of_turn.replace(EOS, eos) + template.separator
    answer = _wrap(template.answer, "text(message.content)")
    parts = [
        _CONTENT_MACRO,
        f"{{%- set ns = namespace(system={_lit(template.default_system)}) -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = text(messages[0]['content']) -%}"
        "{%- set messages = messages[1:] -%}{%- endif -%}",
        "{{- bos_token -}}" if template.add_bos and not _adds_bos(tokenizer) else "",
        _system_block(template),
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'assistant' -%}",
        f"{{{{- {_lit(template.assistant_prefix)} + {answer} + {_lit(end)} -}}}}",
        "{%- else -%}",
        f"{{%- set content = {_user_content(template)} -%}}",
        _merge_system(template),
        f"{{{{- {_wrap(template.user, 'content')} -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {_lit(template.assistant_prefix)} -}}}}"
        "{%- endif -%}",
    ]
    return "".join(parts)


def _lit(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return json.dumps(text)


_CONTENT_MACRO = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for item in content -%}"
    f"{{%- if item['type'] == 'image' -%}}{{{{- {_lit(IMAGE_MARKER + chr(10))} -}}}}"
    f"{{%- elif item['type'] == 'video' -%}}{{{{- {_lit(VIDEO_MARKER + chr(10))} -}}}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _wrap(pattern: str, expr: str) -> str:
    """Jinja expression: ``pattern`` with ``{content}`` replaced by ``expr``."""
    before, _, after = pattern.partition(_CONTENT)
    return f"{_lit(before)} + {expr} + {_lit(after)}"


def _system_block(template: ChatTemplate) -> str:
    if template.system is None:
        return ""
    return f"{{%- if ns.system -%}}{{{{- {_wrap(template.system, 'ns.system')} -}}}}{{%- endif -%}}"


def _user_content(template: ChatTemplate) -> str:
    """Jinja expression for a human turn's text (system merged / markers only, as in training)."""
    if template.images_only:
        return f"{_lit(IMAGE_MARKER)} * (text(message.content).count({_lit(IMAGE_MARKER)}))"
    return "text(message.content)"


def _merge_system(template: ChatTemplate) -> str:
    """For templates without a system slot: the system text opens the first human turn."""
    if template.system is None:
        return (
            "{%- if ns.system -%}{%- set content = ns.system + '\\n\\n' + content -%}"
            "{%- set ns.system = '' -%}{%- endif -%}"
        )
    return ""


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]
