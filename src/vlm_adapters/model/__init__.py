"""The composed model: vision backbone -> connector -> visual tokens spliced into the LLM;
its checkpoint format (with LoRA adapters) and the one loader for ours and transformers'."""

from vlm_adapters.model.core import VisionLanguageModel, VLMOutput, load

__all__ = ["VLMOutput", "VisionLanguageModel", "load"]
