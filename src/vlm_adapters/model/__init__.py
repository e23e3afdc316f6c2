"""The composed model: vision backbone -> connector -> visual tokens spliced into the LLM;
conversation-level generation and its checkpoint format (with LoRA adapters)."""

from vlm_adapters.model.core import VisionLanguageModel, VLMOutput

__all__ = ["VLMOutput", "VisionLanguageModel"]
