"""Benchmark scoring of LLaVA-format task files: exact match, open VQA (VQAv2 soft accuracy),
yes/no (POPE) and multiple choice by log-likelihood (with MMBench's circular evaluation).

Each task type reads LLaVA records (``id``, ``image``/``images``, ``conversations``):

- ``exact``: the last 'gpt' turn is the reference (as :func:`evaluation.evaluate`).
- ``yesno``: the last 'gpt' turn is ``yes`` or ``no``.
- ``vqa``: ``answers`` holds the 10 annotator answers; the conversation ends with the question.
- ``choice``: ``options`` lists the choices and ``answer`` names the right one (a letter, an
  index or the option's text); the conversation ends with the question, without the options:
  they are appended to it as lines ``A. cat``.

A last 'gpt' turn of a ``vqa`` or ``choice`` record is ignored. The metric functions are in
:mod:`vlm_adapters.scoring`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.data.processor import Turns, pad_batch
from vlm_adapters.errors import DataError
from vlm_adapters.inference.evaluation import _Item, _item, _naming, _open, _predict, evaluate
from vlm_adapters.model.generation import resolve_template
from vlm_adapters.scoring import (
    VQA_ANNOTATORS,
    answer_index,
    choice_metrics,
    exact_match,
    option_letter,
    pope_metrics,
    rotations,
    vqa_accuracy,
    yes_no,
)

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

TASK_TYPES = ("exact", "vqa", "yesno", "choice")


@dataclass
class Scored:
    """A task's ``summary`` (metrics, ``n``, ``task_type``, ``template``) and ``samples``, one
    JSON-ready row per record (``id``, ``question``, ``prediction``, the reference, the score)."""

    summary: dict[str, Any]
    samples: list[dict[str, Any]]


def score(
    model: VisionLanguageModel,
    records: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    task_type: str = "exact",
    template: str | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    *,
    source: str | Path = "",
) -> Scored:
    """Score ``records`` (read from ``source``, which errors name) as ``task_type``; every record
    is checked before the model runs, and a bad one is a DataError naming it."""
    if task_type not in TASK_TYPES:
        raise DataError(f"unknown task type {task_type!r}; choose one of {', '.join(TASK_TYPES)}")
    template = resolve_template(model, template)
    if task_type == "exact":
        return _exact(model, records, image_root, template, batch_size, max_new_tokens, source)
    if not records:
        raise DataError(f"{source or 'the task file'}: no samples")
    root = Path(image_root)
    was_training = model.training
    model.eval()
    try:
        if task_type == "choice":
            questions = [_choice(r, i, root, source) for i, r in enumerate(records)]
            samples, metrics = _score_choices(model, questions, template, batch_size)
        else:
            answered = task_type == "yesno"
            items = [_item(r, i, root, source, answered) for i, r in enumerate(records)]
            references = [_reference(task_type, item, r) for item, r in zip(items, records)]
            predictions = _predict(model, items, template, batch_size, max_new_tokens)
            samples, metrics = _score_answers(task_type, items, references, predictions)
    finally:
        model.train(was_training)
    summary = {"task_type": task_type, **metrics, "n": len(samples), "template": template}
    return Scored(summary, samples)


def _exact(
    model: VisionLanguageModel,
    records: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    template: str,
    batch_size: int,
    max_new_tokens: int,
    source: str | Path,
) -> Scored:
    result = evaluate(
        model, records, image_root, template, batch_size, max_new_tokens, source=source
    )
    items = [_item(r, i, Path(image_root), source) for i, r in enumerate(records)]
    samples = [
        {
            "id": item.id,
            "question": question,
            "prediction": prediction,
            "answer": reference,
            "correct": exact_match(prediction, reference),
        }
        for item, (question, reference, prediction) in zip(items, result.pop("samples"))
    ]
    return Scored({"task_type": "exact", **result}, samples)


def _reference(task_type: str, item: _Item, record: Mapping[str, Any]) -> Any:
    """The yes/no label, or the 10 VQA answers, of ``record``; a DataError naming it."""
    with _naming(item.where):
        if task_type == "yesno":
            label = item.reference.strip().lower().rstrip(".!")
            if label not in ("yes", "no"):
                raise DataError(f"the reference answer {item.reference!r} is not 'yes' or 'no'")
            return label
        answers = record.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(
                f"'answers' must be a list of the {VQA_ANNOTATORS} annotator answers (strings), "
                f"got {answers!r}"
            )
        vqa_accuracy("", answers)  # checks the count
        return answers


def _score_answers(
    task_type: str, items: list[_Item], references: list[Any], predictions: list[str]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows = [
        {"id": item.id, "question": item.question, "prediction": prediction}
        for item, prediction in zip(items, predictions)
    ]
    if task_type == "vqa":
        for row, answers in zip(rows, references):
            row.update(answers=answers, score=vqa_accuracy(row["prediction"], answers))
        return rows, {"accuracy": sum(r["score"] for r in rows) / len(rows)}
    said = [yes_no(p) for p in predictions]
    for row, label, answer in zip(rows, references, said):
        row.update(answer=label, read_as=answer, correct=answer == label)
    return rows, pope_metrics(said, references)


@dataclass
class _Choice:
    item: _Item
    options: list[str]
    answer: int


def _choice(record: Mapping[str, Any], index: int, root: Path, source: str | Path) -> _Choice:
    item = _item(record, index, root, source, answered=False)
    with _naming(item.where):
        options = record.get("options")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise DataError(f"'options' must be a list of strings, got {options!r}")
        if len(options) < 2:
            raise DataError(f"'options' has {len(options)} choice(s); give at least 2")
        if len(set(options)) != len(options):
            raise DataError(f"'options' repeats a choice: {options!r}")
        answer = answer_index(record.get("answer"), options)
    return _Choice(item, options, answer)


def _score_choices(
    model: VisionLanguageModel, questions: list[_Choice], template: str, batch_size: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows, correct = [], []
    for question in questions:
        images = _open(question.item)
        shifts = rotations(question.options, question.answer)
        prompts = [_with_options(question.item.turns, shift.options) for shift in shifts]
        with _naming(question.item.where):
            scores = option_logprobs(
                model, prompts, [s.options for s in shifts], images, template, batch_size
            )
        picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
        hits = [pick == shift.answer for pick, shift in zip(picks, shifts)]
        correct.append(hits)
        rows.append(
            {
                "id": question.item.id,
                "question": question.item.question,
                "options": question.options,
                "prediction": option_letter(picks[0]),
                "answer": option_letter(question.answer),
                "option_logprobs": scores[0],
                "correct": hits[0],
                "circular_correct": all(hits),
                "shift_predictions": [option_letter(s.order[p]) for p, s in zip(picks, shifts)],
            }
        )
    return rows, choice_metrics(correct)


def _with_options(turns: list[Mapping[str, Any]], options: Sequence[str]) -> list[dict[str, Any]]:
    """``turns`` with the options listed under the last (human) turn, lettered A, B, ..."""
    listed = "\n".join(f"{option_letter(i)}. {option}" for i, option in enumerate(options))
    last = {**turns[-1], "value": f"{turns[-1]['value']}\n{listed}"}
    return [*map(dict, turns[:-1]), last]


@torch.no_grad()
def option_logprobs(
    model: VisionLanguageModel,
    prompts: Sequence[Turns],
    options: Sequence[Sequence[str]],
    images: list[Image.Image],
    template: str,
    batch_size: int = 64,
) -> list[list[float]]:
    """Log-likelihood of each of ``options[k]`` as the answer to conversation ``prompts[k]``
    (the option's tokens and the end of turn, summed), all about the same ``images``.

    The images go through the vision tower and connector once; every (prompt, option) row
    reuses those visual tokens, ``batch_size`` rows per language-model pass.
    """
    processor = model.processor_for(template)
    rows: list[tuple[list[int], list[int]]] = []
    for turns, choices in zip(prompts, options):
        start = len(processor.prompt(turns, images))
        for option in choices:
            encoded = processor.encode([*turns, {"from": "gpt", "value": option}], images)
            labels = [IGNORE_INDEX] * start + list(encoded.labels[start:])
            rows.append((list(encoded.input_ids), labels))
    pixels = processor.images(images)
    device = model.llm.device
    visual = None if pixels is None else model.visual_tokens(pixels.to(device))  # [K, H]
    flat: list[float] = []
    for begin in range(0, len(rows), batch_size):
        flat += _row_logprobs(model, rows[begin : begin + batch_size], visual)
    out, at = [], 0
    for choices in options:
        out.append(flat[at : at + len(choices)])
        at += len(choices)
    return out


def _row_logprobs(
    model: VisionLanguageModel,
    rows: list[tuple[list[int], list[int]]],
    visual: torch.Tensor | None,
) -> list[float]:
    """Summed log-probabilities of each row's labelled tokens, the rows' image placeholders
    filled with ``visual`` (one image set's tokens, repeated per row)."""
    pad = model.tokenizer.pad_token_id
    device = model.llm.device
    batch = pad_batch([ids for ids, _ in rows], pad, "right")
    labels = pad_batch([lab for _, lab in rows], IGNORE_INDEX, "right")["input_ids"].to(device)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    is_image = ids == model.image_token_id
    embeds = model.llm.embed(ids.masked_fill(is_image, 0))  # [B, T, H]
    if visual is not None:
        filled = visual.to(embeds.dtype).repeat(len(rows), 1)  # [B*K, H]
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), filled)
    hidden = model.llm.body(embeds, mask)  # [B, T, H]
    logprobs = model.llm.logits(hidden[:, :-1]).float().log_softmax(-1)  # [B, T-1, V]
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * supervised).sum(-1).tolist()
