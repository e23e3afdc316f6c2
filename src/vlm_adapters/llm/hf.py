"""``hf``: any transformers ``AutoModelForCausalLM`` and its tokenizer."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from vlm_adapters._transformers import (
    check_attn_implementation,
    check_inline_config,
    inline_config,
    load_or_explain,
)
from vlm_adapters.llm.base import LLMBackend, LLMConfig, _max_positions


class HFLLMConfig(LLMConfig):
    """A causal LM from a hub id / local path, or an inline config with random weights."""

    model: str | None = Field(None, description="Hub id or local directory of the checkpoint.")
    config: dict[str, Any] | None = Field(
        None, description="Inline transformers config (with `model_type`); random weights."
    )
    tokenizer: str | None = Field(None, description="Tokenizer id or path; default: `model`.")
    revision: str | None = Field(None, description="Hub revision of `model`.")
    dtype: str | None = Field(None, description="e.g. float32, bfloat16; default: float32.")
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2...")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint.")
    image_token: str = Field("<image>", description="Placeholder token added to the tokenizer.")
    pad_token: str = Field("<pad>", description="Pad token added when the tokenizer has none.")

    _inline = field_validator("config")(check_inline_config)
    _attn = field_validator("attn_implementation")(check_attn_implementation)

    def sources(self) -> dict[str, Any]:
        """The hub id / path of the weights and of the tokenizer, when set."""
        return {k: v for k, v in (("model", self.model), ("tokenizer", self.tokenizer)) if v}

    @model_validator(mode="after")
    def _one_source(self) -> HFLLMConfig:
        if (self.model is None) == (self.config is None):
            raise ValueError("set exactly one of `model` (hub id or path) or `config` (inline)")
        if self.model is None and self.tokenizer is None:
            raise ValueError("an inline `config` needs `tokenizer` (a tokenizer id or directory)")
        return self

    def hf_config(self) -> Any:
        from transformers import AutoConfig

        if self.config is not None:
            return inline_config(self.config, "llm.config")
        return load_or_explain(
            "llm.model",
            self.model,
            lambda: AutoConfig.from_pretrained(
                self.model, revision=self.revision, trust_remote_code=self.trust_remote_code
            ),
        )

    def probe(self) -> tuple[int, int | None]:
        """``(hidden_size, max_positions)`` from the config alone."""
        config = self.hf_config()
        text = config.get_text_config()
        return text.hidden_size, _max_positions(text)


class HFLLM(LLMBackend):
    """A transformers causal LM with ``<image>`` (and, if missing, a pad token) added."""

    def __init__(self, cfg: HFLLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = _load_tokenizer(cfg)
        self.model = _load_model(cfg)
        self.image_token_id = _add_special_tokens(self.tokenizer, self.model, cfg)

    @property
    def transformers_model(self) -> Any:
        """The wrapped ``AutoModelForCausalLM`` model, for interop (export to transformers)."""
        return self.model

    def rebuild_kwargs(self) -> dict[str, Any]:
        exclude = {"model", "revision", "tokenizer", "trust_remote_code"}
        kwargs = self.cfg.model_dump(exclude=exclude, exclude_none=True)
        config = self.model.config.to_dict()
        config.pop("dtype", None)
        return {**kwargs, "config": config}


def _load_tokenizer(cfg: HFLLMConfig) -> Any:
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.model
    return load_or_explain(
        "llm.tokenizer" if cfg.tokenizer else "llm.model",
        source,
        lambda: AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        ),
    )


def _load_model(cfg: HFLLMConfig) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, cfg.dtype) if cfg.dtype else torch.float32}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.model is None:
        return AutoModelForCausalLM.from_config(cfg.hf_config(), **kwargs)
    return load_or_explain(
        "llm.model",
        cfg.model,
        lambda: AutoModelForCausalLM.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        ),
    )


def _add_special_tokens(tokenizer: Any, model: Any, cfg: HFLLMConfig) -> int:
    """Add the image token (and a pad token if none), grow embeddings; return the image id."""
    if cfg.image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [cfg.image_token]}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": cfg.pad_token})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.convert_tokens_to_ids(cfg.image_token)
