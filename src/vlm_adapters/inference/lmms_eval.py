"""An lmms-eval model for any vlm-adapters checkpoint (every composition, plugins included).

Registered through lmms-eval's ``lmms_eval.models`` entry-point group as ``vlm_adapters``:
``python -m lmms_eval --model vlm_adapters --model_args pretrained=DIR --tasks ...``. Prompts
are rendered by the model's one processor with the checkpoint's chat template and answered by
:func:`vlm_adapters.model.generation.generate`, so lmms-eval scores exactly what
``model.generate`` answers. Needs the ``eval`` extra (``pip install vlm-adapters[eval]``);
nothing else in the package imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from PIL import Image

from vlm_adapters.chat.templates import IMAGE_MARKER
from vlm_adapters.data.processor import join_images, pad_batch
from vlm_adapters.errors import DataError
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.model.generation import generate, resolve_template

MODEL_ID = "vlm_adapters"
_MODULE = __name__
MANIFEST = ModelManifest(
    model_id=MODEL_ID,
    simple_class_path=f"{_MODULE}.VLMAdaptersLMM",
    chat_class_path=f"{_MODULE}.VLMAdaptersChatLMM",
)
"""What the entry point gives lmms-eval: the chat form by default, the simple form with
``--force_simple``."""

Request = tuple[list[dict[str, str]], list[Image.Image]]
"""One prompt: conversation turns (ending with a human turn) and the images they mark."""


class VLMAdaptersLMM(lmms):
    """lmms-eval's simple request form: a text context plus ``doc_to_visual``'s images.

    ``pretrained``: a checkpoint directory or hub id (``model`` instead: a live model, e.g.
    during training). ``template`` overrides the checkpoint's chat template; ``dtype`` and
    ``device`` place a loaded checkpoint as in ``from_pretrained``; ``batch_size`` prompts (or
    log-likelihood rows) run together; ``max_new_tokens`` applies when a task sets none.
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        model: VisionLanguageModel | None = None,
        template: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 8,
        max_new_tokens: int | str = 128,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if (model is None) == (pretrained is None):
            raise DataError(
                "vlm_adapters needs exactly one of pretrained=DIR (a checkpoint) or model= "
                "(a loaded VisionLanguageModel)"
            )
        if model is None:
            model = VisionLanguageModel.from_pretrained(pretrained, dtype=dtype, device_map=device)
        self.model = model.eval()
        self.template = resolve_template(model, template)
        self.batch_size = _positive(batch_size, "batch_size")
        self.max_new_tokens = _positive(max_new_tokens, "max_new_tokens")

    # requests -> prompts

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _request(self, args: tuple) -> tuple[Request, dict[str, Any]]:
        """A generation request's prompt and generation kwargs (simple form)."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        images = _visuals(doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else [])
        return _simple_prompt(context, images), dict(gen_kwargs or {})

    # lmms-eval API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to each request, cut at the first of its ``until`` strings."""
        prompts = [self._request(request.args) for request in requests]
        answers: list[str] = [""] * len(prompts)
        for indices in _groups(prompts, self.batch_size):
            kwargs = prompts[indices[0]][1]
            texts = generate(
                self.model,
                [prompts[i][0][0] for i in indices],
                [prompts[i][0][1] for i in indices],
                template=self.template,
                max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                temperature=float(kwargs.get("temperature", 0.0) or 0.0),
                top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            )
            for i, text in zip(indices, texts):
                answers[i] = _until(text, kwargs.get("until"))
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(log-probability, is_greedy)`` of each continuation after its context (whether
        greedy decoding would give it); a question's images are encoded once for all its options.

        Each pair is the ``text`` of a ``GenerationResult``: lmms-eval 0.7.3's evaluator turns
        any other non-string response into its ``str()``, which its multiple-choice scoring
        cannot read; a ``GenerationResult``'s ``text`` reaches the task as it is.
        """
        items = []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            images = _visuals(doc_to_visual(doc) if doc_to_visual else [])
            items.append(((task, split, doc_id, context), images, continuation))
        questions: dict[tuple, list[int]] = {}
        for index, (key, _, _) in enumerate(items):
            questions.setdefault(key, []).append(index)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
        processor = self.model.processor_for(self.template)
        chunk: list[list[int]] = []
        for indices in questions.values():
            chunk.append(indices)
            if sum(map(len, chunk)) >= self.batch_size:
                self._score(processor, items, chunk, results)
                chunk = []
        if chunk:
            self._score(processor, items, chunk, results)
        return [GenerationResult(text=pair) for pair in results]  # type: ignore[arg-type]

    def _score(
        self,
        processor: Any,
        items: list[tuple[tuple, list[Image.Image], str]],
        chunk: list[list[int]],
        results: list[tuple[float, bool]],
    ) -> None:
        """Score the options of each question in ``chunk`` in one forward pass."""
        rows, spans, pixels = [], [], []
        for indices in chunk:
            key, images, _ = items[indices[0]]
            prompt = processor.prompt(_simple_prompt(key[3], images)[0], images)
            for i in indices:
                answer = self.model.tokenizer(items[i][2], add_special_tokens=False).input_ids
                if not answer:
                    raise DataError(f"doc {key[2]} of {key[0]}: empty continuation to score")
                spans.append((len(prompt), len(answer)))
                rows.append(prompt + answer)
            pixels.append((processor.images(images), len(indices)))
        batch = pad_batch(rows, self.model.tokenizer.pad_token_id, side="right")
        device = self.model.llm.device
        logits = self.model(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            **self._visual_inputs(pixels, device),
        ).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        flat = [i for indices in chunk for i in indices]
        for row, (i, (start, length)) in enumerate(zip(flat, spans)):
            targets = batch["input_ids"][row, start : start + length].to(device)
            scores = logprobs[row, start - 1 : start + length - 1]  # [L, V]
            total = float(scores.gather(-1, targets[:, None]).sum())
            greedy = bool((scores.argmax(-1) == targets).all())
            results[i] = (total, greedy)

    def _visual_inputs(self, pixels: list[tuple[Any, int]], device: torch.device) -> dict[str, Any]:
        """Each question's images through the vision tower once, repeated for its options
        (``image_features``); variable-size images go as pixels."""
        present = [(p, n) for p, n in pixels if p is not None]
        if not present:
            return {}
        if any(not isinstance(p, torch.Tensor) for p, _ in present):
            return {"pixel_values": join_images([p for p, n in present for _ in range(n)])}
        dtype = next(self.model.vision.parameters()).dtype
        features = self.model.vision(torch.cat([p for p, _ in present]).to(device, dtype))
        parts, start = [], 0
        for p, n in present:
            own = features[start : start + len(p)]
            parts += [own] * n
            start += len(p)
        return {"image_features": torch.cat(parts)}

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vlm_adapters answers single-round requests only")


class VLMAdaptersChatLMM(VLMAdaptersLMM):
    """lmms-eval's chat request form: ``doc_to_messages`` turns with their images in place."""

    is_simple = False

    def _request(self, args: tuple) -> tuple[Request, dict[str, Any]]:
        _, doc_to_messages, gen_kwargs, doc_id, task, split = args
        messages = ChatMessages(messages=doc_to_messages(self._doc(task, split, doc_id)))
        return _chat_prompt(messages, doc_id), dict(gen_kwargs or {})


def _simple_prompt(context: str, images: list[Image.Image]) -> Request:
    """One human turn: ``context`` with an ``<image>`` line per image unless it marks them."""
    if images and IMAGE_MARKER not in context:
        context = f"{IMAGE_MARKER}\n" * len(images) + context
    return [{"from": "human", "value": context}], images


def _chat_prompt(messages: ChatMessages, doc_id: int) -> Request:
    """Turns from chat messages: each image becomes an ``<image>`` line where it stands."""
    turns, images = [], []
    for message in messages.messages:
        parts = []
        for content in message.content:
            if content.type == "text":
                parts.append(content.text)
            elif content.type == "image":
                images += _visuals([content.url])
                parts.append(f"{IMAGE_MARKER}\n")
            else:
                raise DataError(
                    f"doc {doc_id}: vlm_adapters takes text and images, not {content.type}"
                )
        turns.append({"from": message.role, "value": "".join(parts)})
    return turns, images


def _visuals(visuals: Any) -> list[Image.Image]:
    """A doc's visuals (None, an image, or a nested list of images) as a flat list."""
    if visuals is None:
        return []
    if isinstance(visuals, Image.Image):
        return [visuals]
    if isinstance(visuals, (str, bytes, Mapping)) or not isinstance(visuals, Sequence):
        raise DataError(
            f"vlm_adapters takes images (PIL) as visuals, got {type(visuals).__name__}; "
            "videos and audio are not supported"
        )
    return [image for item in visuals for image in _visuals(item)]


def _groups(prompts: list[tuple[Request, dict[str, Any]]], size: int) -> Iterator[list[int]]:
    """Indices of prompts that share generation kwargs, ``size`` at a time, in order."""
    by_kwargs: dict[str, list[int]] = {}
    for index, (_, kwargs) in enumerate(prompts):
        by_kwargs.setdefault(repr(sorted(kwargs.items(), key=str)), []).append(index)
    for indices in by_kwargs.values():
        for start in range(0, len(indices), size):
            yield indices[start : start + size]


def _until(text: str, until: str | Sequence[str] | None) -> str:
    """``text`` cut before the first stop string."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def _positive(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise DataError(f"vlm_adapters: {name} must be a positive integer, got {value!r}")
    return number
