"""The LLM backend protocol: a causal LM split into embedding, decoder body and output head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LLMBackend(nn.Module):
    """Wraps a transformers causal LM and its tokenizer.

    Exposes the pieces separately so the loss can apply the output head only where labels
    exist: :meth:`embed` (ids -> ``[B, T, H]``), :meth:`body` (embeddings -> hidden states)
    and :meth:`logits` (hidden states -> vocabulary scores).
    """

    model: Any  # a transformers PreTrainedModel (AutoModelForCausalLM)
    tokenizer: Any  # a transformers tokenizer with the image and pad tokens added
    image_token_id: int

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def max_positions(self) -> int | None:
        return _max_positions(self.model.config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # [B, T, H]

    def body(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        """Decoder stack without the output head: ``[B, T, H] -> [B, T, H]`` (no KV cache)."""
        kwargs.setdefault("use_cache", False)
        out = self.model.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head (with the model's logit soft-capping, if any): ``[..., H] -> [..., V]``."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (tokenizer set on load)."""
        raise NotImplementedError


def _max_positions(config: Any) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
