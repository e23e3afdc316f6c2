"""An lmms-eval model for any vlm-adapters checkpoint (every composition, plugins included).

Registered through lmms-eval's ``lmms_eval.models`` entry-point group as ``vlm_adapters``:
``python -m lmms_eval --model vlm_adapters --model_args pretrained=DIR --tasks ...``. Prompts
are rendered by the model's one processor with the checkpoint's chat template and answered by
:func:`vlm_adapters.model.generation.generate`, so lmms-eval scores exactly what
``model.generate`` answers. A doc's visuals are PIL images and, for a model with
``vision.video``, video files (paths, as lmms-eval's video tasks give them), sampled as the
model's settings say. Needs the ``eval`` extra (``pip install vlm-adapters[eval]``);
nothing else in the package imports this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from PIL import Image

from vlm_adapters.chat.templates import IMAGE_MARKER, VIDEO_MARKER
from vlm_adapters.data.processor import join_images, pad_batch, with_video_times
from vlm_adapters.data.video import Clip, sample_video
from vlm_adapters.errors import DataError
from vlm_adapters.model.core import VisionLanguageModel, evaluating
from vlm_adapters.model.generation import generate, resolve_template
from vlm_adapters.vision.base import ImageBatch

MODEL_ID = "vlm_adapters"
_MODULE = __name__
MANIFEST = ModelManifest(
    model_id=MODEL_ID,
    simple_class_path=f"{_MODULE}.VLMAdaptersLMM",
    chat_class_path=f"{_MODULE}.VLMAdaptersChatLMM",
)
"""What the entry point gives lmms-eval: the chat form by default, the simple form with
``--force_simple``."""

Request = tuple[list[dict[str, str]], list[Image.Image], list[Clip]]
"""One prompt: conversation turns (ending with a human turn), the images and the videos'
sampled frames they mark."""


class VLMAdaptersLMM(lmms):
    """lmms-eval's simple request form: a text context plus ``doc_to_visual``'s images.

    ``pretrained``: a checkpoint directory or hub id (``model`` instead: a live model, e.g.
    during training). ``template`` overrides the checkpoint's chat template; ``dtype`` and
    ``device`` place a loaded checkpoint as in ``from_pretrained``; ``batch_size`` prompts (or
    log-likelihood rows) run together; ``max_new_tokens`` applies when a task sets none
    (``max_batch_size``, which lmms-eval passes, is unused). The model runs in eval mode and is
    left in the mode it had.
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
        self.model = model if pretrained is None else model.eval()
        self.template = resolve_template(model, template)
        self.batch_size = _positive(batch_size, "batch_size")
        self.max_new_tokens = _positive(max_new_tokens, "max_new_tokens")

    # requests -> prompts

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _request(self, args: tuple) -> tuple[Request, dict[str, Any]]:
        """A generation request's prompt and generation kwargs (simple form)."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        images, videos = _visuals(
            doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else []
        )
        prompt = _simple_prompt(context, images, self._clips(videos))
        return prompt, dict(gen_kwargs or {})

    def _clips(self, paths: list[str]) -> list[Clip]:
        """The videos at ``paths``, sampled as the model's ``vision.video`` says."""
        if not paths:
            return []
        settings = self.model.video
        if settings is None:
            raise DataError(
                f"{paths[0]} is a video but this model takes none (its config has no "
                "vision.video); evaluate a video model or an image task"
            )
        return [sample_video(Path(path), path, settings.sampling()) for path in paths]

    def _timed(self, prompt: Request) -> Request:
        """``prompt`` with its videos' times after their markers when the model was trained
        so (``vision.video.timestamps``), as training and ``model.generate`` callers do."""
        turns, images, clips = prompt
        if clips and self.model.video.timestamps:
            turns = with_video_times(turns, clips)
        return turns, images, clips

    # lmms-eval API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers to each request, cut at the first of its ``until`` strings."""
        with evaluating(self.model):
            return self._generate(requests)

    def _generate(self, requests: list[Instance]) -> list[str]:
        prompts = []
        for request in requests:
            with _about(request):
                prompt, kwargs = self._request(request.args)
                prompts.append((self._timed(prompt), kwargs))
        answers: list[str] = [""] * len(prompts)
        for indices in _groups(prompts, self.batch_size):
            kwargs = prompts[indices[0]][1]
            try:
                texts = generate(
                    self.model,
                    [prompts[i][0][0] for i in indices],
                    [prompts[i][0][1] for i in indices],
                    template=self.template,
                    videos=[[clip.frames for clip in prompts[i][0][2]] for i in indices],
                    max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                    temperature=float(kwargs.get("temperature", 0.0) or 0.0),
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                )
            except DataError:
                self._blame([(requests[i], prompts[i][0]) for i in indices])
                raise
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
        questions: dict[tuple, _Question] = {}
        for index, request in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = request.args
            with _about(request):
                question = questions.get((task, split, doc_id, context))
                if question is None:
                    doc = self._doc(task, split, doc_id)
                    images, videos = _visuals(doc_to_visual(doc) if doc_to_visual else [])
                    prompt = self._timed(_simple_prompt(context, images, self._clips(videos)))
                    question = _Question(request, prompt, doc)
                    questions[(task, split, doc_id, context)] = question
                continuation = target if isinstance(target, str) else target(question.doc)
                ids = self.model.tokenizer(continuation, add_special_tokens=False).input_ids
                if not ids:
                    raise DataError("an empty continuation has no log-likelihood; fix the task")
            question.options.append((index, ids))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        chunk: list[_Question] = []
        with evaluating(self.model):
            for question in questions.values():
                chunk.append(question)
                if sum(len(q.options) for q in chunk) >= self.batch_size:
                    self._score(chunk, results)
                    chunk = []
            if chunk:
                self._score(chunk, results)
        return [GenerationResult(text=pair) for pair in results]  # type: ignore[arg-type]

    def _score(self, chunk: list[_Question], results: list[tuple[float, bool]]) -> None:
        """Score every option of the questions in ``chunk`` in one forward pass; the LM head
        runs only where a continuation token is predicted."""
        processor = self.model.processor_for(self.template)
        rows, spans, pixels, frames = [], [], [], []
        for question in chunk:
            turns, images, clips = question.prompt
            with _about(question.request):
                prompt = processor.prompt(turns, images, [len(clip) for clip in clips])
            for index, ids in question.options:
                spans.append((index, len(prompt), ids))
                rows.append(prompt + ids)
            options = len(question.options)
            pixels.append((processor.images(images), options))
            frames.append((processor.videos([clip.frames for clip in clips]), options))
        batch = pad_batch(rows, self.model.tokenizer.pad_token_id, side="right")
        device = self.model.llm.device
        visual = {**self._visual_inputs(pixels), **self._video_inputs(frames)}
        embeds = self.model.embed(batch["input_ids"].to(device), **visual)
        hidden = self.model.llm.body(embeds, batch["attention_mask"].to(device))  # [B, T, H]
        rows_at = torch.cat([torch.full((len(ids),), row) for row, (_, _, ids) in enumerate(spans)])
        cols_at = torch.cat(
            [torch.arange(start - 1, start - 1 + len(ids)) for _, start, ids in spans]
        )
        picked = hidden[rows_at.to(device), cols_at.to(device)]  # [K, H]
        logprobs = torch.log_softmax(self.model.llm.logits(picked).float(), -1)  # [K, V]
        targets = torch.tensor([t for _, _, ids in spans for t in ids], device=logprobs.device)
        chosen = logprobs.gather(-1, targets[:, None])[:, 0]  # [K]
        hits = logprobs.argmax(-1) == targets  # [K]
        start = 0
        for index, _, ids in spans:
            end = start + len(ids)
            results[index] = (float(chosen[start:end].sum()), bool(hits[start:end].all()))
            start = end

    def _visual_inputs(self, pixels: list[tuple[Any, int]]) -> dict[str, Any]:
        """Each question's images through the vision tower once, repeated for its options
        (``image_features``); variable-size images go as pixels, repeated."""
        present = [(p, n) for p, n in pixels if p is not None]
        if not present:
            return {"pixel_values": None}
        if any(not isinstance(p, torch.Tensor) for p, _ in present):
            return {"pixel_values": join_images([p for p, n in present for _ in range(n)])}
        device, dtype = self.model.llm.device, next(self.model.vision.parameters()).dtype
        features = self.model.vision(torch.cat([p for p, _ in present]).to(device, dtype))
        parts, start = [], 0
        for p, n in present:
            own = features[start : start + len(p)]
            parts += [own] * n
            start += len(p)
        return {"pixel_values": None, "image_features": torch.cat(parts)}

    def _video_inputs(self, frames: list[tuple[ImageBatch | None, int]]) -> dict[str, Any]:
        """Each question's video frames through the vision tower once, repeated for its
        options (``video_features``)."""
        present = [(batch, n) for batch, n in frames if batch is not None]
        if not present:
            return {}
        device, dtype = self.model.llm.device, next(self.model.vision.parameters()).dtype
        tower = self.model.vision.untiled()
        parts = []
        for batch, n in present:
            features = replace(batch, values=tower(batch.values.to(device, dtype)))
            parts += [features] * n
        return {"video_features": ImageBatch.cat(parts)}

    def _blame(self, chunk: list[tuple[Instance, Request]]) -> None:
        """Raise the error of the first prompt in ``chunk`` that cannot be built, naming its
        doc (a batch's own error counts prompts within the batch)."""
        processor = self.model.processor_for(self.template)
        for request, (turns, images, clips) in chunk:
            with _about(request):
                processor.prompt(turns, images, [len(clip) for clip in clips])

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vlm_adapters answers single-round requests only")


def evaluate_tasks(
    model: VisionLanguageModel,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """lmms-eval's ``tasks`` on a live ``model`` through lmms-eval's Python entry (the simple
    request form, which scores generation and log-likelihood tasks alike): each task's
    numeric metrics as ``{"<task>/<metric>": value}`` (lmms-eval's ``,none`` filter suffix
    and standard errors left out). ``include_path``: a folder of task YAML files of one's own;
    ``limit``: the most docs per task."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    lm = VLMAdaptersLMM(model=model, batch_size=batch_size)
    out = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, verbosity="WARNING"
    )
    if out is None:
        return {}
    return {
        f"{task}/{name.split(',')[0]}": float(value)
        for task, metrics in out["results"].items()
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name
    }


class VLMAdaptersChatLMM(VLMAdaptersLMM):
    """lmms-eval's chat request form: ``doc_to_messages`` turns with their images in place."""

    is_simple = False

    def _request(self, args: tuple) -> tuple[Request, dict[str, Any]]:
        _, doc_to_messages, gen_kwargs, doc_id, task, split = args
        messages = ChatMessages(messages=doc_to_messages(self._doc(task, split, doc_id)))
        return _chat_prompt(messages, self._clips), dict(gen_kwargs or {})


def _simple_prompt(context: str, images: list[Image.Image], clips: list[Clip]) -> Request:
    """One human turn: ``context`` with an ``<image>`` line per image and a ``<video>`` line
    per video (videos first) unless it marks them."""
    if images and IMAGE_MARKER not in context:
        context = f"{IMAGE_MARKER}\n" * len(images) + context
    if clips and VIDEO_MARKER not in context:
        context = f"{VIDEO_MARKER}\n" * len(clips) + context
    return [{"from": "human", "value": context}], images, clips


def _chat_prompt(messages: ChatMessages, sample: Callable[[list[str]], list[Clip]]) -> Request:
    """Turns from chat messages: each image becomes an ``<image>`` line and each video (a
    file, sampled by ``sample``) a ``<video>`` line where it stands."""
    turns, images, videos = [], [], []
    for message in messages.messages:
        parts = []
        for content in message.content:
            if content.type == "text":
                parts.append(content.text)
            elif content.type == "image":
                if not isinstance(content.url, Image.Image):
                    kind = type(content.url).__name__
                    raise DataError(f"vlm_adapters takes images as PIL images, got {kind}")
                images.append(content.url)
                parts.append(f"{IMAGE_MARKER}\n")
            elif content.type == "video" or _webm(content.type, content.url):
                videos += _video_path(content.url)
                parts.append(f"{VIDEO_MARKER}\n")
            else:
                raise DataError(f"vlm_adapters takes text, images and videos, not {content.type}")
        turns.append({"from": message.role, "value": "".join(parts)})
    return turns, images, sample(videos)


@dataclass
class _Question:
    """A log-likelihood context with its images, and the options scored after it."""

    request: Instance
    prompt: Request
    doc: Any
    options: list[tuple[int, list[int]]] = field(default_factory=list)
    """(request index, continuation ids) per option."""


@contextlib.contextmanager
def _about(request: Instance) -> Iterator[None]:
    """Prefix a DataError raised inside with the task and doc of ``request``."""
    try:
        yield
    except DataError as error:
        raise DataError(f"task {request.task_name!r}, doc {request.doc_id}: {error}") from None


def _visuals(visuals: Any) -> tuple[list[Image.Image], list[str]]:
    """A doc's visuals (None, an image, a video file's path, or a nested list of them) as
    flat lists of images and of video paths."""
    if visuals is None:
        return [], []
    if isinstance(visuals, Image.Image):
        return [visuals], []
    if isinstance(visuals, (str, Path)):
        return [], _video_path(visuals)
    if isinstance(visuals, (bytes, Mapping)) or not isinstance(visuals, Sequence):
        raise DataError(
            "vlm_adapters takes images (PIL) and video files (paths) as visuals, got "
            f"{type(visuals).__name__}; audio is not supported"
        )
    images, videos = [], []
    for item in visuals:
        more_images, more_videos = _visuals(item)
        images += more_images
        videos += more_videos
    return images, videos


def _webm(kind: str, url: Any) -> bool:
    """Whether ``url`` is a WebM file that lmms-eval 0.7.3 calls audio by its extension alone
    (WebM holds video as often): it is read as a video (one without a video stream is
    refused as such)."""
    return kind == "audio" and isinstance(url, (str, Path)) and str(url).lower().endswith(".webm")


def _video_path(url: Any) -> list[str]:
    """A video given as a file path (lmms-eval's video tasks), as a one-item list."""
    if not isinstance(url, (str, Path)):
        raise DataError(f"vlm_adapters takes videos as file paths, got {type(url).__name__}")
    return [str(url)]


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
