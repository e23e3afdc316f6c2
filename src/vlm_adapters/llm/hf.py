"""``hf``: any transformers ``AutoModelForCausalLM`` and its tokenizer, optionally quantized to
4 or 8 bits by bitsandbytes (QLoRA)."""

from __future__ import annotations

import functools
import logging
import re
import warnings
from importlib import metadata
from typing import Any, Literal

import torch
from packaging.version import Version
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from vlm_adapters._transformers import (
    check_attn_implementation,
    check_dtype,
    check_inline_config,
    inline_config,
    load_or_explain,
)
from vlm_adapters.errors import ConfigError
from vlm_adapters.llm.base import LLMBackend, LLMConfig, _max_positions
from vlm_adapters.quantization import dequantized_weight, plain_linear, quantized_layers

BITSANDBYTES_MIN_VERSION = "0.46.1"
"""The oldest bitsandbytes transformers quantizes with (its own minimum)."""
_FOUR_BIT_ONLY = ("quant_type", "double_quant", "compute_dtype")
_QUANTIZED_CONFIG_KEY = "quantization_config"


class QuantizationSettings(BaseModel):
    """bitsandbytes quantization of the LLM's linear layers (QLoRA: 4-bit NF4 with double
    quantization, LoRA adapters on top). The output head and embeddings stay unquantized.

    Plain values only: nothing here names a file, a repository or code, so the settings a
    checkpoint records are safe to rebuild from.
    """

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(description="4 (QLoRA, NF4/FP4 blocks) or 8 (LLM.int8()).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: quantize the block scales too.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit: dtype of the matmuls; default: the LLM's `dtype`."
    )

    @model_validator(mode="after")
    def _usable(self) -> QuantizationSettings:
        if self.bits == 8:
            set_here = sorted(set(_FOUR_BIT_ONLY) & self.model_fields_set)
            if set_here:
                raise ValueError(f"{', '.join(set_here)} apply to bits: 4 only; remove them")
        problem = bitsandbytes_problem()
        if problem:  # the registry reports it as a one-line ConfigError naming the key
            raise ValueError(problem)
        return self

    def recorded(self) -> dict[str, Any]:
        """The settings a checkpoint records: every field that applies to ``bits``."""
        skip = set(_FOUR_BIT_ONLY) if self.bits == 8 else set()
        return self.model_dump(exclude=skip, exclude_none=True)

    def bnb_config(self, dtype: torch.dtype) -> Any:
        """The transformers ``BitsAndBytesConfig``; ``dtype`` is the LLM's (the default
        compute dtype)."""
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = getattr(torch, self.compute_dtype) if self.compute_dtype else dtype
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute,
        )


@functools.cache
def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantize on this machine (one line, with the fix), or None."""
    fix = "run `pip install 'vlm-adapters[qlora]'` or remove llm.quantization"
    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return f"needs bitsandbytes, which is not installed; {fix}"
    if Version(version) < Version(BITSANDBYTES_MIN_VERSION):
        return (
            f"needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION}, found {version}; run "
            "`pip install -U bitsandbytes` or remove llm.quantization"
        )
    try:
        from bitsandbytes import cextension
    except Exception as error:  # a broken install fails in many ways; report the first line
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        return f"bitsandbytes {version} fails to load ({type(error).__name__}: {first}); {fix}"
    native = type(getattr(cextension, "lib", None)).__name__
    if torch.cuda.is_available() and native == "ErrorHandlerMockBNBNativeLibrary":
        return (
            f"bitsandbytes {version} has no library for this CUDA/ROCm version; install a build "
            "that matches your torch (see the bitsandbytes installation guide) or remove "
            "llm.quantization"
        )
    return None


def _no_kernels_advice(record: logging.LogRecord) -> bool:
    """Drop bitsandbytes' import-time advice to `pip install kernels` (a package that downloads
    and runs code from the hub); its own CPU kernels work without it."""
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_kernels_advice)


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
    quantization: QuantizationSettings | None = Field(
        None,
        description="Load the linear layers in 4 or 8 bits with bitsandbytes (QLoRA), e.g. "
        "{bits: 4}; needs the `qlora` extra (see Training > QLoRA). With an inline `config` the "
        "random weights are quantized (how checkpoints of quantized models rebuild).",
    )

    _inline = field_validator("config")(check_inline_config)
    _dtype = field_validator("dtype")(check_dtype)
    _attn = field_validator("attn_implementation")(check_attn_implementation)

    @field_validator("config")
    @classmethod
    def _not_quantized(cls, config: dict[str, Any] | None) -> dict[str, Any] | None:
        if config is not None and _QUANTIZED_CONFIG_KEY in config:
            raise ValueError(
                f"an inline config may not carry `{_QUANTIZED_CONFIG_KEY}`; set "
                "llm.quantization (e.g. {bits: 4}) instead"
            )
        return config

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
        """``(hidden_size, max_positions)`` from the config alone; a checkpoint stored
        already quantized is refused here (we quantize full-precision weights ourselves)."""
        config = self.hf_config()
        stored = getattr(config, _QUANTIZED_CONFIG_KEY, None)
        if stored:
            method = stored.get("quant_method") if isinstance(stored, dict) else stored
            raise ConfigError(
                f"llm.model: {self.model!r} is stored quantized ({method}); point llm.model at "
                "its full-precision checkpoint and set llm.quantization (e.g. {bits: 4})"
            )
        text = config.get_text_config()
        return text.hidden_size, _max_positions(text)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the unquantized weights (float32 when ``dtype`` is unset)."""
        return getattr(torch, self.dtype) if self.dtype else torch.float32


class HFLLM(LLMBackend):
    """A transformers causal LM with ``<image>`` (and, if missing, a pad token) added."""

    def __init__(self, cfg: HFLLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = _load_tokenizer(cfg)
        self.model = _load_model(cfg)
        warn_tokenizer_disagreements(self.tokenizer, self.model, cfg.tokenizer or cfg.model)
        _keep_portable_layout(self.model)
        self.image_token_id = _add_special_tokens(self.tokenizer, self.model, cfg)

    @property
    def transformers_model(self) -> Any:
        """The wrapped ``AutoModelForCausalLM`` model, for interop (export to transformers)."""
        return self.model

    @property
    def is_quantized(self) -> bool:
        """Whether bitsandbytes layers hold (some of) the weights."""
        return bool(quantized_layers(self.causal_lm))

    def rebuild_kwargs(self) -> dict[str, Any]:
        exclude = {"model", "revision", "tokenizer", "trust_remote_code"}
        kwargs = self.cfg.model_dump(exclude=exclude, exclude_none=True)
        if self.cfg.quantization is not None:
            kwargs["quantization"] = self.cfg.quantization.recorded()
        config = self.model.config.to_dict()
        config.pop("dtype", None)
        config.pop(_QUANTIZED_CONFIG_KEY, None)  # recorded as our own `quantization`
        return {**kwargs, "config": config}

    def dequantize(self) -> None:
        """Replace every bitsandbytes layer by a plain linear layer holding its dequantized
        weight, in ``dtype``; afterwards the backend is an ordinary unquantized one (its
        checkpoints record no ``quantization``). Merging adapters first (see
        :func:`vlm_adapters.model.lora.merge_lora`) keeps them exact."""
        model = self.causal_lm
        for name, layer in quantized_layers(model).items():
            model.set_submodule(name, plain_linear(layer, dequantized_weight(layer)))
        self.cfg = self.cfg.model_copy(update={"quantization": None})
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # transformers' own flags and config entry
            quantizer.remove_quantization_config(model)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(model, flag, False):
                setattr(model, flag, False)
        model.to(self.cfg.torch_dtype)  # undo k-bit training's float32 upcast


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
    """The causal LM; quantized layers land on the current CUDA device (CPU without one)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": cfg.torch_dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantized = {}
    if cfg.quantization is not None:
        quantized["quantization_config"] = cfg.quantization.bnb_config(cfg.torch_dtype)
    if cfg.model is None:
        model = AutoModelForCausalLM.from_config(cfg.hf_config(), **kwargs)
        if not quantized:
            return model
        return type(model).from_pretrained(  # the random weights, quantized as from a checkpoint
            None, config=model.config, state_dict=model.state_dict(), **kwargs, **quantized
        )
    return load_or_explain(
        "llm.model",
        cfg.model,
        lambda: AutoModelForCausalLM.from_pretrained(
            cfg.model,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **kwargs,
            **quantized,
        ),
    )


class TokenizerWarning(UserWarning):
    """The tokenizer and the LLM disagree: training would go on, on garbage."""


def warn_tokenizer_disagreements(tokenizer: Any, model: Any, source: str | None) -> None:
    """Warn (:class:`TokenizerWarning`) once per way the tokenizer loaded from ``source`` and the
    causal LM disagree (see :func:`tokenizer_disagreements`), before tokens are added."""
    for problem in tokenizer_disagreements(tokenizer, model):
        warnings.warn(f"llm tokenizer {source!r}: {problem}", TokenizerWarning, stacklevel=2)


def tokenizer_disagreements(tokenizer: Any, model: Any) -> list[str]:
    """How the tokenizer and the causal LM disagree, one line each: more tokens than
    embedding rows, an end-of-text token missing or not the LLM's, chat-template markers that
    are not single tokens, and words of the vocabulary split into characters (a tokenizer
    class that does not match the saved vocabulary)."""
    found = [
        _vocabulary_problem(tokenizer, model),
        _eos_problem(tokenizer, model),
        _marker_problem(tokenizer),
        _splitting_problem(tokenizer),
    ]
    return [problem for problem in found if problem]


def _vocabulary_problem(tokenizer: Any, model: Any) -> str | None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return None
    return (
        f"{len(tokenizer)} tokens but the LLM has {rows} embedding rows: ids {rows} and above "
        "would get new, untrained rows; use the tokenizer the LLM was trained with"
    )


def _eos_problem(tokenizer: Any, model: Any) -> str | None:
    if tokenizer.eos_token_id is None:
        return (
            "no end-of-text (eos) token: answers cannot end (plain, vicuna_v1 and mistral "
            "templates end turns with it); give the tokenizer an eos token"
        )
    generation = getattr(model, "generation_config", None)
    llm_ids = _ids(getattr(model.config.get_text_config(), "eos_token_id", None)) | _ids(
        getattr(generation, "eos_token_id", None)
    )
    if not llm_ids or tokenizer.eos_token_id in llm_ids:
        return None
    return (
        f"its eos token {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}) is not the LLM's "
        f"(eos_token_id {sorted(llm_ids)}): the tokenizer may belong to another model"
    )


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    return {v for v in value if isinstance(v, int)} if isinstance(value, (list, tuple)) else set()


_MARKER = re.compile(r"<\|[^<>|\s]{1,40}\|>|<[a-z]+(?:_[a-z]+)+>")
"""Chat-template markers: ``<|im_start|>``, ``<|eot_id|>``, ``<start_of_turn>``..."""
_SAMPLE_CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _marker_problem(tokenizer: Any) -> str | None:
    """The markers the tokenizer's own chat template renders that it does not encode as one
    token each."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(_SAMPLE_CHAT, tokenize=False)
    except Exception:  # a template that needs other roles: nothing to check it with
        return None
    split = [
        marker
        for marker in dict.fromkeys(_MARKER.findall(str(text)))
        if _pieces(tokenizer, marker) != 1
    ]
    if not split:
        return None
    return (
        f"its chat template's markers {', '.join(split)} are not single tokens: add them as "
        "special tokens (tokenizer.add_special_tokens) or use a template the tokenizer has"
    )


def _pieces(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return 0 if tokenizer.unk_token_id in ids else len(ids)


def _splitting_problem(tokenizer: Any, sample: int = 16) -> str | None:
    """Words of the tokenizer's own vocabulary encoded as characters (or as nothing): a
    word-level vocabulary read by a subword class (e.g. one saved beside a Qwen2 config and
    reloaded as ``Qwen2Tokenizer``)."""
    words = _vocabulary_words(tokenizer, sample)
    split = [word for word in words if not 0 < _pieces(tokenizer, word) < len(word)]
    if len(words) < 3 or 2 * len(split) <= len(words):
        return None
    example = split[0]
    return (
        f"{type(tokenizer).__name__} breaks words of its own vocabulary into characters or "
        f"drops them ({len(split)} of {len(words)} tried, e.g. {example!r} -> "
        f"{tokenizer.tokenize(example)}): its class does not fit the saved vocabulary; save "
        "the tokenizer with the class it was built with (tokenizer_class) or load it with it"
    )


def _vocabulary_words(tokenizer: Any, count: int) -> list[str]:
    """Up to ``count`` plain words (ASCII letters, four or more) spread over the vocabulary."""
    vocab = tokenizer.get_vocab()
    added = set(tokenizer.get_added_vocab())
    tokens = [t for t in sorted(vocab, key=vocab.__getitem__) if t not in added]
    words: list[str] = []
    for token in tokens[:: max(1, len(tokens) // (50 * count))]:
        text = tokenizer.convert_tokens_to_string([token]).strip()
        if len(text) >= 4 and text.isascii() and text.isalpha():
            words.append(text)
            if len(words) == count:
                break
    return words


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


def _keep_portable_layout(model: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference kernel from repacking 4-bit weights on the first
    forward in eval mode: the repacking rounds the block scales to bf16 (eval results would
    differ from training's and from a reloaded checkpoint's), and a repacked layer fails to
    train afterwards. CUDA is unaffected."""
    for layer in quantized_layers(model).values():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
