"""Chat templates: conversations to token ids with exact label masks, and the same templates
as Jinja for exported checkpoints."""

from vlm_adapters.chat.jinja import chat_template_jinja
from vlm_adapters.chat.templates import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_MARKER,
    TEMPLATES,
    ChatTemplate,
    encode_conversation,
    encode_prompt,
    get_template,
    list_templates,
    stop_token_ids,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "TEMPLATES",
    "ChatTemplate",
    "chat_template_jinja",
    "encode_conversation",
    "encode_prompt",
    "get_template",
    "list_templates",
    "stop_token_ids",
]
