"""Evaluate a model on LLaVA-format Q&A: exact-match accuracy of generated answers and answer loss.

Each record ends with a gpt answer: the prompt is the conversation up to its last human turn,
the reference is that last answer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlm_adapters.chat.templates import IMAGE_MARKER, DataError, normalize_turns
from vlm_adapters.data import DataCollator, LlavaDataset
from vlm_adapters.data.images import ImageProblem, confined_path, open_image
from vlm_adapters.data.llava import image_paths, sample_id
from vlm_adapters.inference.generation import generate, resolve_template

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

_TRAILING_PUNCT = re.compile(r"[\s.!?,;:]+$")


@dataclass
class _Item:
    turns: list[Mapping[str, Any]]
    reference: str
    question: str
    images: list[Path]
    question_type: str | None


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation (for exact-match comparison)."""
    return _TRAILING_PUNCT.sub("", " ".join(text.lower().split()))


def evaluate(
    model: VisionLanguageModel,
    records: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    template: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> dict[str, Any]:
    """Greedy answers and teacher-forced loss over ``records``.

    Returns ``accuracy`` (exact match after :func:`normalize_answer`), ``loss`` (mean over
    answer tokens), ``n``, ``template``, ``per_type`` (accuracy per ``question_type``, for
    records that carry one) and ``samples`` (``(question, reference, prediction)`` per record).
    """
    template = resolve_template(model, template)
    items = [_item(record, index, Path(image_root)) for index, record in enumerate(records)]
    was_training = model.training
    model.eval()
    try:
        predictions = _predict(model, items, template, batch_size, max_new_tokens)
        loss = answer_loss(model, records, image_root, template, batch_size)
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


def _item(record: Mapping[str, Any], index: int, root: Path) -> _Item:
    """Split a record into prompt turns and the reference answer."""
    name = sample_id(record, index)
    turns = list(record.get("conversations") or [])
    roles = [role for role, _ in normalize_turns(turns)] if turns else []
    if not roles or roles[-1] != "gpt" or "human" not in roles:
        raise DataError(
            f"eval sample {name!r} must end with a 'gpt' answer after a 'human' question; "
            "the last answer is the reference"
        )
    last_human = max(i for i, role in enumerate(roles) if role == "human")
    question = str(turns[last_human]["value"])
    return _Item(
        turns=turns[:-1],
        reference=str(turns[-1]["value"]),
        question=question.replace(IMAGE_MARKER, "").strip(),
        images=[_confined(root, path, name) for path in image_paths(record)],
        question_type=record.get("question_type"),
    )


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
        images = [[_open(path) for path in item.images] for item in chunk]
        turns = [item.turns for item in chunk]
        predictions += generate(
            model, turns, images, template=template, max_new_tokens=max_new_tokens
        )
    return predictions


def _confined(root: Path, relative: str, name: str) -> Path:
    try:
        return confined_path(root, relative)
    except ImageProblem as problem:
        raise DataError(f"eval sample {name!r}: {problem}") from None


def _open(path: Path) -> Image.Image:
    try:
        return open_image(path)
    except ImageProblem as problem:
        raise DataError(f"{problem}; check --images / image_root") from None


@torch.no_grad()
def answer_loss(
    model: VisionLanguageModel,
    records: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    template: str,
    batch_size: int = 64,
) -> float:
    """Teacher-forced cross-entropy, averaged over every supervised (answer) token."""
    dataset = LlavaDataset.for_model(
        model, records, image_root=image_root, template=template, on_bad_sample="error"
    )
    collate = DataCollator(model.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
        out = model(**inputs, num_items_in_batch=1)
        total += float(out.loss)
        count += out.num_tokens
    return total / max(count, 1)


def _per_type(items: list[_Item], hits: list[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for item, hit in zip(items, hits):
        if item.question_type is not None:
            groups[str(item.question_type)].append(hit)
    return {kind: sum(group) / len(group) for kind, group in sorted(groups.items())}
