"""The conformance kit checks every member of the LLM backend protocol: a complete backend that
is not a transformers model passes; one missing a member, or whose ``generate`` ignores the
streamer, the stop ids or the sampling arguments, fails with the member named."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlm_adapters import ComponentSpec
from vlm_adapters.llm import LLMBackend, LLMConfig
from vlm_adapters.testing import ConformanceWarning, check_llm_backend, registered


class TinyConfig(LLMConfig):
    tokenizer: str = Field(description="Tokenizer directory.")
    hidden_size: int = 16
    max_positions: int = 64
    image_token: str = "<image>"


class Decoder(nn.Module):
    """One causal attention block with learned positions, in plain PyTorch. Position ids that
    restart at 0 start a new sample: attention stays inside it (packing)."""

    def __init__(self, vocab: int, width: int, positions: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(positions, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def hidden(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = embeds.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=embeds.device).expand(b, t)
        x = embeds + self.positions(position_ids).to(embeds.dtype)  # [B, T, H]
        sample = (position_ids == 0).cumsum(1)  # [B, T]: which packed sample
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # [T, T]
        allowed = allowed & (sample[:, :, None] == sample[:, None, :])  # [B, T, T]
        if mask is not None:
            allowed = allowed & mask[:, None, :].bool()
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, T, H]
        x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.norm(x + self.mlp(x))


class PurePyTorchLM(LLMBackend):
    """Complete: every member implemented without transformers' model classes."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        self.tokenizer.add_tokens([cfg.image_token], special_tokens=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.add_special_tokens({"pad_token": "<pad>"})
        self.model = Decoder(len(self.tokenizer), cfg.hidden_size, cfg.max_positions)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(cfg.image_token)

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.head.out_features

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.tokens(input_ids)

    def body(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        return self.model.hidden(inputs_embeds, attention_mask, kwargs.get("position_ids"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden)

    def full_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.logits(self.body(self.embed(input_ids), attention_mask))

    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        max_new_tokens: int = 20,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        streamer: Any = None,
        **unused: Any,
    ) -> torch.Tensor:
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        mask = attention_mask
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            scores = self.logits(self.body(inputs_embeds, mask)[:, -1]).float()  # [B, V]
            if do_sample:
                probs = F.softmax(scores / (temperature or 1.0), dim=-1)
                token = torch.multinomial(probs, 1)[:, 0]  # [B]
            else:
                token = scores.argmax(-1)  # [B]
            new.append(token)
            if streamer is not None:
                streamer.put(token)
            inputs_embeds = torch.cat([inputs_embeds, self.embed(token)[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if all(int(t) in stops for t in token):
                break
        if streamer is not None:
            streamer.end()
        return torch.stack(new, dim=1)  # [B, new]

    def rebuild_kwargs(self) -> dict[str, Any]:
        return self.cfg.model_dump(exclude={"tokenizer"})


class NoGenerate(PurePyTorchLM):
    generate = LLMBackend.generate  # the transformers default: self.model.generate


class IgnoresStreamer(PurePyTorchLM):
    def generate(self, inputs_embeds: torch.Tensor, mask: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("streamer", None)
        return super().generate(inputs_embeds, mask, **kwargs)


class NoEnd(PurePyTorchLM):
    def generate(self, inputs_embeds: torch.Tensor, mask: Any, **kwargs: Any) -> torch.Tensor:
        streamer = kwargs.pop("streamer", None)
        out = super().generate(inputs_embeds, mask, **kwargs)
        if streamer is not None:
            streamer.put(out[0])
        return out


class IgnoresStops(PurePyTorchLM):
    def generate(self, inputs_embeds: torch.Tensor, mask: Any, **kwargs: Any) -> torch.Tensor:
        return super().generate(inputs_embeds, mask, **{**kwargs, "eos_token_id": None})


class AlwaysGreedy(PurePyTorchLM):
    def generate(self, inputs_embeds: torch.Tensor, mask: Any, **kwargs: Any) -> torch.Tensor:
        return super().generate(inputs_embeds, mask, **{**kwargs, "do_sample": False})


class ReturnsPrompt(PurePyTorchLM):
    def generate(self, inputs_embeds: torch.Tensor, mask: Any, **kwargs: Any) -> torch.Tensor:
        out = super().generate(inputs_embeds, mask, **kwargs)
        return torch.cat([torch.zeros(1, inputs_embeds.shape[1], dtype=out.dtype), out], 1)


class NoSizes(PurePyTorchLM):
    hidden_size = LLMBackend.hidden_size  # the transformers defaults


class NoFullLogits(PurePyTorchLM):
    full_logits = LLMBackend.full_logits


class IgnoresPositions(PurePyTorchLM):
    def body(self, inputs_embeds: torch.Tensor, mask: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.hidden(inputs_embeds, mask)


def _check(backend: type[LLMBackend], tokenizer_dir: str) -> LLMBackend:
    spec = ComponentSpec("llm", "pure", backend, TinyConfig, "pure-PyTorch test backend")
    with registered(spec):
        return check_llm_backend(spec, {"tokenizer": tokenizer_dir})


def test_a_complete_pure_pytorch_backend_passes(tokenizer_dir: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConformanceWarning)  # packing supported: no warning
        llm = _check(PurePyTorchLM, tokenizer_dir)
    assert not hasattr(llm.model, "generate")  # nothing from transformers' model classes
    assert (llm.hidden_size, llm.max_positions) == (16, 64)


@pytest.mark.parametrize(
    ("backend", "match"),
    [
        (NoGenerate, r"`generate` failed \(AttributeError: .*implement `generate\(inputs_embeds"),
        (IgnoresStreamer, r"the streamer received nothing but generate returned \[.*streamer.put"),
        (NoEnd, r"never called `streamer.end\(\)`"),
        (IgnoresStops, r"with eos_token_id=\[\d+\] generate returned \[.*stop after the first"),
        (AlwaysGreedy, r"three seeds all gave the greedy answer .*must sample when do_sample"),
        (ReturnsPrompt, r"generate returned a torch.int64 tensor of shape \(1, 10\).*new token"),
        (NoSizes, r"`hidden_size` failed \(AttributeError: .*the `hidden_size` property"),
        (NoFullLogits, r"`full_logits` failed \(.*implement `full_logits\(input_ids"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_a_missing_or_broken_member_fails_naming_it(
    tokenizer_dir: str, backend: type[LLMBackend], match: str
) -> None:
    with pytest.raises(AssertionError, match=match) as info:
        _check(backend, tokenizer_dir)
    assert str(info.value).startswith("llm 'pure': ")


def test_a_body_that_ignores_position_ids_is_warned_about_packing(tokenizer_dir: str) -> None:
    with pytest.warns(ConformanceWarning, match=r"data.packing will be refused .*position_ids"):
        _check(IgnoresPositions, tokenizer_dir)
