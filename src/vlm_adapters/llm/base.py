"""The LLM backend protocol: a causal LM split into embedding, decoder body and output head."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from vlm_adapters.registry import ComponentConfig


class LLMConfig(ComponentConfig):
    """Base for LLM backend kwargs."""

    def probe(self) -> tuple[int, int | None] | None:
        """``(hidden_size, max_positions)`` from the config alone, without building the model;
        None when that cannot be known before building (checked after building instead).

        The probe lets impossible combinations (visual tokens beyond the context) fail while
        the config is read, with the file and key in the message.
        """
        return None


class LLMBackend(nn.Module, ABC):
    """A causal LM and its tokenizer, split into embedding, decoder body and output head.

    The model applies :meth:`embed` (ids -> ``[B, T, H]``), writes visual tokens into the
    embeddings, runs :meth:`body` (-> hidden states) and applies :meth:`logits` only where
    labels exist. The defaults work for a transformers ``PreTrainedModel`` stored in
    ``self.model`` (``AutoModelForCausalLM``-style); override them for anything else. Nothing
    outside the backend touches ``model`` or ``cfg``: the rest of vlm-adapters uses this
    interface only.

    Subclasses set ``tokenizer`` (with the image token, and a pad token, added) and
    ``image_token_id``, and implement :meth:`rebuild_kwargs`.
    """

    tokenizer: Any
    """A transformers tokenizer with the image and pad tokens added."""
    image_token_id: int
    """Id of the placeholder token every visual token position holds."""
    ADAPTABLE: str = "model"
    """Attribute holding the module LoRA adapters wrap (peft replaces it by its wrapper)."""

    @property
    def image_token(self) -> str:
        """The placeholder token's text (``<image>``)."""
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings the connector must produce."""
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        """Rows of the output head (the logits' last dimension)."""
        return self.model.get_output_embeddings().out_features

    @property
    def max_positions(self) -> int | None:
        """The context length, when the model has one."""
        return _max_positions(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: ``[B, T] -> [B, T, H]``."""
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

    def full_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` of the wrapped model's own forward on text: what
        ``embed`` -> ``body`` -> ``logits`` must reproduce."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def generate(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        """New token ids ``[B, new]`` continuing ``inputs_embeds`` (KV cache on by default)."""
        return self.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder's activations in backward instead of storing them."""
        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    @abstractmethod
    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (tokenizer set on load)."""


def _max_positions(config: Any) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
