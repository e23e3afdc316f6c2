"""The LLM backend protocol: a causal LM split into embedding, decoder body and output head."""

from __future__ import annotations

import copy
import inspect
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

    def add_placeholder(self, token: str) -> int:
        """Add ``token`` as another placeholder (``<video>``), growing the embeddings if needed;
        returns its id. The default works for a transformers model in ``self.model``."""
        if token not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens(
                {"extra_special_tokens": [token]}, replace_extra_special_tokens=False
            )
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        return self.tokenizer.convert_tokens_to_ids(token)

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
        """Decoder stack without the output head: ``[B, T, H] -> [B, T, H]`` (no KV cache).

        Runs the module the causal LM's own forward runs before its head (see
        :func:`decoder_route`), so the hidden states are the ones that forward feeds its head.
        """
        decoder = _decoder(self.causal_lm)
        if _accepts(decoder, "use_cache"):
            kwargs.setdefault("use_cache", False)
        out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head, exactly as the wrapped model's own forward applies it: ``[..., H] ->
        [..., V]`` (``[K, H]`` supervised positions or ``[B, T, H]``).

        The causal LM's own ``forward`` runs with its decoder stood in for by a stub that
        returns ``hidden``: whatever the family does after its decoder (a prediction-head
        transform, Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma's soft-capping,
        a float upcast...) is applied by the family's own code, and the decoder never runs again.
        The model is not modified: the forward runs on a shallow copy whose decoder slot holds
        the stub, so this is safe while other threads use the model. Models without a
        transformers-style decoder (see :func:`decoder_route`) get the output embeddings plus
        ``final_logit_softcapping``, the one post-processing that could be re-implemented.
        """
        model = self.causal_lm
        route = decoder_route(model)
        if route is None:
            return _plain_head(model, hidden)
        shape = hidden.shape
        flat = hidden.reshape(1, -1, shape[-1]) if hidden.dim() != 3 else hidden  # [B', T', H]
        out = _with_stub(model, route, flat)(**_head_inputs(model, flat))
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B', T', V]
        return logits.reshape(*shape[:-1], logits.shape[-1]) if hidden.dim() != 3 else logits

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers causal LM itself: ``self.model``, unwrapped from peft's LoRA
        wrapper when LoRA is applied (the adapters stay active: peft injects them in place)."""
        model = getattr(self, self.ADAPTABLE)
        unwrap = getattr(type(model), "get_base_model", None)  # peft.PeftModel
        return unwrap(model) if callable(unwrap) else model

    def full_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` of the wrapped model's own forward on text (no KV cache): what
        ``embed`` -> ``body`` -> ``logits`` must reproduce."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if _accepts(self.causal_lm, "use_cache"):
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits

    def generate(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        """New token ids ``[B, new]`` continuing ``inputs_embeds`` (KV cache on by default)."""
        return self.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder's activations in backward instead of storing them."""
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if callable(enable):  # the name since transformers 5.2x (the old one warns)
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
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
        if isinstance(value, int) and value > 0:  # XLNet reports -1: no limit
            return value
    return None


def decoder_route(model: nn.Module) -> tuple[str, frozenset[str]] | None:
    """Where a causal LM keeps the decoder its forward runs before the head.

    The decoder is the direct child holding the input embeddings (``model``, ``transformer``,
    ``bert``, ...). Returns its attribute name and the names, below it on the way to the
    embeddings, of nested transformers models a forward may call instead (``decoder`` for
    OPT / BART-style ``self.model.decoder(...)``, ``language_model``); None when the input
    embeddings are not inside a child module (not a transformers-style causal LM).
    """
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if embeddings is None:
        return None
    paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is embeddings]
    names = next((p.split(".") for p in paths if "." in p), None)  # inside a child module
    if names is None:  # the embeddings are a direct child: there is no decoder module
        return None
    nested, parent = set(), model.get_submodule(names[0])
    for name in names[1:-1]:
        parent = parent.get_submodule(name)
        if hasattr(parent, "config") and hasattr(parent, "get_input_embeddings"):
            nested.add(name)  # a (Pre)TrainedModel on the way: a forward may call it
    return names[0], frozenset(nested)


def _decoder(model: nn.Module) -> nn.Module:
    route = decoder_route(model)
    return model.get_decoder() if route is None else model.get_submodule(route[0])


def _accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes ``name``: as a parameter, or by passing everything on
    (``forward(*args, **kwargs)``, e.g. BART's decoder wrapper)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    kinds = {p.kind for p in params.values()}
    return name in params or kinds == {
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    }


def _head_inputs(model: nn.Module, hidden: torch.Tensor) -> dict[str, Any]:
    """Arguments for the causal LM forward: ``inputs_embeds`` (only its shape matters to the
    stubbed forward), without a cache."""
    kwargs: dict[str, Any] = {"inputs_embeds": hidden}
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


def _with_stub(model: nn.Module, route: tuple[str, frozenset[str]], hidden: torch.Tensor) -> Any:
    """A shallow copy of ``model`` (same parameters, hooks, config) whose decoder slot holds a
    stub returning ``hidden``; ``model`` itself is left untouched."""
    name, nested = route
    clone = copy.copy(model)
    clone.__dict__["_modules"] = dict(model._modules)
    clone._modules[name] = _DecoderStub(model._modules[name], nested, hidden)
    return clone


class _DecoderStub(nn.Module):
    """Stands in for a decoder: calling it (or a nested model named in ``nested``) returns
    ``hidden``; any other attribute reads through to the real decoder."""

    def __init__(self, decoder: nn.Module, nested: frozenset[str], hidden: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "_decoder", decoder)  # not registered: its weights stay out
        object.__setattr__(self, "_nested", nested)
        object.__setattr__(self, "_hidden", hidden)

    def forward(self, *args: Any, **kwargs: Any) -> _HiddenOnly:
        return _HiddenOnly(self._hidden)

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__.get("_nested", ()):
            return self
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_decoder"], name)


class _HiddenOnly:
    """A decoder output with only ``last_hidden_state``: other fields (cache, attentions,
    router logits...) read None, as a decoder run without them returns."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.last_hidden_state,)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key)
        return default if value is None else value


def _plain_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
