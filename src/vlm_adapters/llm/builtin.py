"""Built-in LLM backend, registered through the same hook as any plugin."""

from __future__ import annotations

from vlm_adapters.hookspecs import hookimpl
from vlm_adapters.llm.hf import HFLLM, HFLLMConfig
from vlm_adapters.registry import ComponentSpec


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
