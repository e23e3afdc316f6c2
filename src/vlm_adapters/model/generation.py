"""Answers for conversations: prompts built as in training, batched, stopping at end of turn.

Prompts come from the model's processor (:class:`vlm_adapters.data.processor.VLMProcessor`),
so the ids a model sees at inference are a prefix of the ids it was trained on; generation
stops at the template's end-of-turn token (:func:`vlm_adapters.chat.templates.stop_token_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vlm_adapters.chat.templates import DEFAULT_TEMPLATE, stop_token_ids
from vlm_adapters.data.processor import ImageInput, Turns, VideoInput

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel


def resolve_template(model: VisionLanguageModel, template: str | None = None) -> str:
    """``template``, else the one the model was trained with, else vicuna_v1."""
    return template or getattr(model, "template", None) or DEFAULT_TEMPLATE


def prompt_batch(
    model: VisionLanguageModel,
    conversations: Sequence[Turns],
    images: Sequence[ImageInput] | None,
    template: str,
    videos: Sequence[VideoInput] | None = None,
) -> dict[str, Any]:
    """Left-padded ``input_ids``/``attention_mask`` [B, T] and ``pixel_values`` [I, 3, H, W]
    (and ``video_values`` for ``videos``), built by the model's processor with ``template``,
    on the model's device."""
    batch = model.processor_for(template).prompt_batch(conversations, images, videos)
    device = model.llm.device
    return {k: v.to(device) if v is not None else None for k, v in batch.items()}


def generate_ids(
    model: VisionLanguageModel,
    conversations: Sequence[Turns],
    images: Sequence[ImageInput] | None = None,
    *,
    template: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    streamer: Any = None,
    use_cache: bool = True,
    videos: Sequence[VideoInput] | None = None,
) -> list[list[int]]:
    """New token ids per conversation, cut before the first stop token.

    Greedy when ``temperature`` is 0, else sampling with ``temperature`` and ``top_p``
    (reproducible with ``seed``). ``streamer`` (e.g. transformers' ``TextStreamer``, batch of
    one) receives tokens as they come. ``videos``: one entry per conversation (a video's
    sampled frames ``[F, H, W, 3]`` uint8, a list of them, or None).
    """
    template = resolve_template(model, template)
    stops = stop_token_ids(model.tokenizer, template)
    batch = prompt_batch(model, conversations, images, template, videos)
    sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate_ids(
        **batch,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        streamer=streamer,
        use_cache=use_cache,
        **sampling,
    )
    return [_until_stop(row, stops) for row in out.tolist()]


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:cut]


def generate(
    model: VisionLanguageModel,
    conversations: Sequence[Turns],
    images: Sequence[ImageInput] | None = None,
    **kwargs: Any,
) -> list[str]:
    """Decoded answers (see :func:`generate_ids` for the keyword arguments)."""
    ids = generate_ids(model, conversations, images, **kwargs)
    return [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
