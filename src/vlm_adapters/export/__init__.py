"""Export to (and import from) the transformers LLaVA format that vLLM and others serve."""

from vlm_adapters.chat.jinja import chat_template_jinja
from vlm_adapters.export.hf_llava import ExportError, check_exportable, from_hf_llava, to_hf_llava

__all__ = ["ExportError", "chat_template_jinja", "check_exportable", "from_hf_llava", "to_hf_llava"]
