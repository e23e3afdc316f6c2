"""Built-in LLM backend, registered through the same hook as any plugin.

Factories and configs are named by import path, so listing them imports no torch."""

from __future__ import annotations

from vlm_adapters.hookspecs import hookimpl
from vlm_adapters.registry import ComponentSpec


@hookimpl
def register_llm_backends() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "llm",
            "hf",
            "vlm_adapters.llm.hf:HFLLM",
            "vlm_adapters.llm.hf:HFLLMConfig",
            "Any transformers AutoModelForCausalLM (hub id, local path or inline config).",
        )
    ]
