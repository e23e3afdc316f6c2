"""The transformers LLaVA format that vLLM and others serve: written (export) and read (import)."""

from vlm_adapters.chat.jinja import chat_template_jinja
from vlm_adapters.errors import ExportError
from vlm_adapters.export.hf_llava_read import from_hf_llava
from vlm_adapters.export.hf_llava_write import check_exportable, to_hf_llava

__all__ = ["ExportError", "chat_template_jinja", "check_exportable", "from_hf_llava", "to_hf_llava"]
