"""Evaluate a model on LLaVA-format Q&A: exact-match accuracy of generated answers and answer loss.

Each record ends with a gpt answer: the prompt is the conversation up to its last human turn,
the reference is that last answer.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlm_adapters.chat.templates import IMAGE_MARKER, DataError, normalize_turns
from vlm_adapters.data import ConversationDataset, DataCollator
from vlm_adapters.data.images import ImageProblem, confined_path, open_image
from vlm_adapters.data.processor import with_video_times
from vlm_adapters.data.records import Skipped, image_paths, record_videos, sample_id
from vlm_adapters.data.video import Clip, VideoProblem, sample_video
from vlm_adapters.model.generation import generate, resolve_template
from vlm_adapters.scoring import normalize_answer

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

__all__ = ["answer_loss", "evaluate", "normalize_answer"]


@dataclass
class _Item:
    id: str
    where: str
    """The data file and the sample, for errors."""
    turns: list[Mapping[str, Any]]
    reference: str
    question: str
    images: list[Path]
    question_type: str | None
    videos: list[Path]


def evaluate(
    model: VisionLanguageModel,
    records: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    template: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    *,
    source: str | Path = "",
) -> dict[str, Any]:
    """Greedy answers and teacher-forced loss over ``records`` (read from ``source``, the data
    file that errors about a record name).

    Returns ``accuracy`` (exact match after :func:`normalize_answer`), ``loss`` (mean over
    answer tokens), ``n``, ``template``, ``per_type`` (accuracy per ``question_type``, for
    records that carry one) and ``samples`` (``(question, reference, prediction)`` per record).
    No records is a DataError.
    """
    template = resolve_template(model, template)
    if not records:
        raise DataError(
            f"{source or 'the eval data'}: no samples; add Q&A records, each ending with the "
            "reference 'gpt' answer"
        )
    root = Path(image_root)
    items = [_item(record, index, root, source) for index, record in enumerate(records)]
    was_training = model.training
    model.eval()
    try:
        predictions = _predict(model, items, template, batch_size, max_new_tokens)
        loss = answer_loss(model, records, image_root, template, batch_size, source=source)
    finally:
        model.train(was_training)
    hits = [
        normalize_answer(p) == normalize_answer(i.reference) for p, i in zip(predictions, items)
    ]
    return {
        "accuracy": sum(hits) / max(len(hits), 1),
        "loss": loss,
        "n": len(items),
        "template": template,
        "per_type": _per_type(items, hits),
        "samples": [(i.question, i.reference, p) for i, p in zip(items, predictions)],
    }


def _item(
    record: Mapping[str, Any], index: int, root: Path, source: str | Path, answered: bool = True
) -> _Item:
    """Split a record into prompt turns and the reference answer (the last 'gpt' turn; with
    ``answered=False`` the record ends with its question, and a last 'gpt' turn is dropped)."""
    name = sample_id(record, index)
    where = _where(source, name, index)
    with _naming(where):
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise DataError(f"'conversations' must be a list of turns, got {turns!r}")
        roles = [role for role, _ in normalize_turns(turns)]
        if not answered:  # the question gets an empty stand-in answer
            keep = len(roles) - 1 if roles[-1:] == ["gpt"] else len(roles)
            turns, roles = [*turns[:keep], {"from": "gpt", "value": ""}], [*roles[:keep], "gpt"]
        if roles[-1:] != ["gpt"] or "human" not in roles:
            raise DataError(
                "an eval sample must end with a 'gpt' answer after a 'human' question; the "
                "last answer is the reference"
                if answered
                else "an eval sample must end with a 'human' question"
            )
        images = [confined_path(root, path) for path in image_paths(record)]
        videos = [confined_path(root, path) for path in _video_paths(record)]
    last_human = max(i for i, role in enumerate(roles) if role == "human")
    question = str(turns[last_human]["value"])
    return _Item(
        id=name,
        where=where,
        turns=turns[:-1],
        reference=str(turns[-1]["value"]),
        question=question.replace(IMAGE_MARKER, "").strip(),
        images=images,
        question_type=record.get("question_type"),
        videos=videos,
    )


def _video_paths(record: Mapping[str, Any]) -> list[str]:
    videos = record_videos(record)
    if all(isinstance(video, str) for video in videos):
        return videos  # type: ignore[return-value]
    raise DataError("'video' must be a path or a list of paths here")


def _where(source: str | Path, name: str, index: int) -> str:
    """How errors name a record: its data file, id and index."""
    file = f"{source}: " if source else ""
    return f"{file}sample {name!r} (index {index})"


@contextlib.contextmanager
def _naming(where: str) -> Iterator[None]:
    """Prefix a DataError raised inside with ``where`` (see :func:`_where`)."""
    try:
        yield
    except DataError as error:
        raise DataError(f"{where}: {error}") from None


def _predict(
    model: VisionLanguageModel,
    items: list[_Item],
    template: str,
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    predictions: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [_open(item) for item in chunk]
        clips = [_clips(model, item) for item in chunk]
        turns = [_timed(model, item.turns, c) for item, c in zip(chunk, clips)]
        videos = [[clip.frames for clip in c] for c in clips] if any(clips) else None
        try:
            predictions += generate(
                model,
                turns,
                images,
                template=template,
                max_new_tokens=max_new_tokens,
                videos=videos,
            )
        except DataError:
            _blame(model, template, chunk, images)
            raise
    return predictions


def _open(item: _Item) -> list[Image.Image]:
    try:
        return [open_image(path) for path in item.images]
    except ImageProblem as problem:
        raise DataError(f"{item.where}: {problem}; check --images / image_root") from None


def _clips(model: VisionLanguageModel, item: _Item) -> list[Clip]:
    """The item's videos, sampled as the model's ``vision.video`` says."""
    if item.videos and model.video is None:
        raise DataError(f"{item.where}: the sample holds a video but the model takes none")
    try:
        return [sample_video(path, str(path), model.video.sampling()) for path in item.videos]
    except VideoProblem as problem:
        raise DataError(f"{item.where}: {problem}; check --images / image_root") from None


def _timed(model: VisionLanguageModel, turns: list, clips: list[Clip]) -> list:
    """``turns`` with the clips' times after their markers when the model was trained so."""
    if clips and model.video is not None and model.video.timestamps:
        return with_video_times(turns, clips)
    return turns


def _blame(
    model: VisionLanguageModel,
    template: str,
    chunk: list[_Item],
    images: list[list[Image.Image]],
) -> None:
    """Raise, naming the sample, the error of the first prompt in ``chunk`` that cannot be
    built (a batch's own error counts conversations within the batch)."""
    processor = model.processor_for(template)
    for item, sample_images in zip(chunk, images):
        with _naming(item.where):
            processor.prompt(item.turns, sample_images)


@torch.no_grad()
def answer_loss(
    model: VisionLanguageModel,
    records: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    template: str,
    batch_size: int = 64,
    *,
    source: str | Path = "",
) -> float:
    """Teacher-forced cross-entropy, averaged over every supervised (answer) token; a record
    that cannot be encoded is a DataError naming it (and ``source``, its data file)."""
    dataset = ConversationDataset.for_model(
        model, records, image_root=image_root, template=template, source=source
    )
    collate = DataCollator(model.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        if batch["skipped"]:
            _refuse(batch["skipped"][0], source)
        keys = ("input_ids", "attention_mask", "labels", "pixel_values", "video_values")
        inputs = {k: batch[k] for k in keys if k in batch}
        inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
        out = model(**inputs, num_items_in_batch=1)
        total += float(out.loss)
        count += out.num_tokens
    return total / max(count, 1)


def _refuse(bad: Skipped, source: str | Path) -> None:
    raise DataError(
        f"{_where(source, bad.id, bad.index)}: {bad.reason}: {bad.detail}; fix or remove the sample"
    )


def _per_type(items: list[_Item], hits: list[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, hit in zip(items, hits):
        if item.question_type is not None:
            groups[str(item.question_type)].append(hit)
    return {kind: sum(group) / len(group) for kind, group in sorted(groups.items())}
