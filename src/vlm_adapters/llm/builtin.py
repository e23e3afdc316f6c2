"""Built-in LLM backend, registered through the same hook as any plugin."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..registry import ComponentSpec
from .hf import HFLLM, HFLLMConfig


@hookimpl
def register_llm_backends() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "llm",
            "hf",
            HFLLM,
            HFLLMConfig,
            "Any transformers AutoModelForCausalLM (hub id, local path or inline config).",
        )
    ]
