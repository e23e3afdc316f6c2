"""Preference pairs: a prompt (one or more turns, with its images) and two answers to it,
``chosen`` and ``rejected`` (see docs/preference.md).

A pair record is a LLaVA record whose ``conversations`` are the prompt turns (ending with a
human turn) plus ``chosen`` and ``rejected`` answer strings; TRL's ``prompt`` / ``chosen`` /
``rejected`` (+ ``images``) rows become one (`pair_of_row`). `PreferenceDataset` encodes each
answer after the prompt with the chat template, labelling the answer tokens only; a pair whose
longer answer does not fit ``max_length`` is skipped whole (images are never cut).
`PairCollator` batches the chosen rows, then the rejected rows, with each sample's images
once: the model computes them once and writes them into both rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlm_adapters.chat.templates import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    normalize_turns,
    with_image_markers,
)
from vlm_adapters.data.dataset import ConversationDataset
from vlm_adapters.data.processor import SampleImages, join_images, pad_batch, pad_rows
from vlm_adapters.data.records import BadSample, Skipped
from vlm_adapters.errors import DataError

ANSWERS = ("chosen", "rejected")


def is_pair(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` (or a row) is a preference pair: it has a ``chosen`` answer."""
    return "chosen" in record


def pair_of_row(row: Mapping[str, Any], where: str, turns_of: Any, images_of: Any) -> dict:
    """The pair record of a row: TRL's ``prompt`` (a string or chat messages) / ``chosen`` /
    ``rejected`` (strings or one assistant message) + ``images``, or a LLaVA pair's
    ``conversations`` + ``image``. ``turns_of(messages, where, inline)`` and
    ``images_of(images, where)`` read messages and images as the row reader does."""
    inline: list[Any] = []
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            conversations: Any = [{"from": "human", "value": prompt}]
        else:
            conversations = turns_of(prompt, f"{where}: prompt", inline)
        images = next((row[k] for k in ("images", "image") if row.get(k) is not None), inline)
    else:
        conversations, images = row.get("conversations"), row.get("image", row.get("images"))
    record: dict[str, Any] = {"conversations": conversations}
    for answer in ANSWERS:
        record[answer] = _answer_text(row.get(answer), f"{where}: {answer}", turns_of)
    if row.get("id") is not None:
        record["id"] = row["id"] if isinstance(row["id"], (int, str)) else str(row["id"])
    image = images_of(images, where)
    if image is not None:
        record["image"] = image
    return record


def _answer_text(answer: Any, where: str, turns_of: Any) -> Any:
    """An answer as text: a string as it is, one assistant message as its content."""
    if not isinstance(answer, list):
        return answer
    turns = turns_of(answer, where, [])
    if len(turns) != 1 or turns[0]["from"] != "gpt":
        raise BadSample("bad pair", f"{where}: expected one assistant message, got {answer!r}")
    return turns[0]["value"]


def checked_pair(record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str, str]:
    """The prompt turns and the two answers of a pair record; a BadSample unless the prompt
    ends with a human turn and the answers are different, non-empty strings without images."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample(
            "bad pair", f"'conversations' (the prompt) must be a list of turns: {turns!r}"[:300]
        )
    try:
        roles = [role for role, _ in normalize_turns(turns)]
    except DataError as error:
        raise BadSample("bad conversation", str(error)) from None
    if roles[-1] != "human":
        raise BadSample("bad pair", "the prompt must end with a human turn (the answers follow)")
    chosen, rejected = (record.get(answer) for answer in ANSWERS)
    for name, answer in zip(ANSWERS, (chosen, rejected)):
        if not isinstance(answer, str):
            raise BadSample("bad pair", f"{name!r} must be a string, got {answer!r}"[:200])
        if not answer.strip():
            raise BadSample("empty answer", f"the {name} answer is empty")
        if IMAGE_MARKER in answer:
            raise BadSample("image marker in an answer", f"the {name} answer holds {IMAGE_MARKER}")
    if chosen.strip() == rejected.strip():
        raise BadSample("identical answers", "chosen and rejected are the same text")
    return [dict(turn) for turn in turns], chosen, rejected  # type: ignore[return-value]


class PreferenceDataset(ConversationDataset):
    """Pair records as the chosen and rejected rows' ids and labels (answer tokens only), the
    sample's images once (pixels or cached features), and its position in the file.

    The same checks and ``on_bad_sample`` policy as `ConversationDataset`, plus: identical or
    empty answers, a prompt that does not end with a human turn, and a pair whose longer row
    exceeds ``max_length`` (skipped whole). ``reference``: the reference model's summed
    log-probabilities ``[records, 2]`` (chosen, rejected), added to each item when given.
    """

    reference: torch.Tensor | None = None

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        item = super().__getitem__(index)
        if isinstance(item, Skipped):
            return item
        position = self.positions[index]
        item["position"] = position
        if self.reference is not None:
            item["reference_logps"] = self.reference[position]
        return item

    def _check(self, record: Mapping[str, Any], name: str) -> int:
        if record.get("video") is not None:
            raise BadSample("video in a pair", "preference pairs take images only, not videos")
        paths = self._image_files(record)
        prompt = with_image_markers(checked_pair(record)[0], len(paths))
        markers = sum(str(turn.get("value", "")).count(IMAGE_MARKER) for turn in prompt)
        if markers != len(paths):
            raise BadSample(
                "image marker mismatch", f"{markers} {IMAGE_MARKER} markers but {len(paths)} images"
            )
        if not self.processor.variable:
            return self._estimate(record)
        return self._estimate(record, sum(self._token_counts(paths)))

    def _estimate(self, record: Mapping[str, Any], visual: int | None = None) -> int:
        """Both rows: twice the prompt's words and visual tokens, plus both answers' words."""
        prompt = record.get("conversations") or []
        text = " ".join(str(t.get("value", "")) for t in prompt if isinstance(t, Mapping))
        num_images = text.count(IMAGE_MARKER)
        answers = sum(len(str(record.get(answer, "")).split()) for answer in ANSWERS)
        words = 2 * len(text.replace(IMAGE_MARKER, " ").split()) + answers
        if num_images == 0 and not record.get("image"):
            return -max(words, 1)
        per_image = self.processor.num_image_tokens
        return words + 2 * (max(num_images, 1) * per_image if visual is None else visual)

    def _item(self, record: Mapping[str, Any], name: str) -> dict[str, Any]:
        paths = self._image_files(record)
        prompt, chosen, rejected = checked_pair(record)
        self._token_counts(paths)  # the per-sample budget, as its own reason
        images = self._sample_images(paths)
        try:
            prefix = self.processor.prompt(prompt, images)  # the same for both answers
        except DataError as error:
            raise BadSample("bad conversation", str(error)) from None
        rows = {answer: self._row(prompt, prefix, text, images, len(paths)) for answer, text in
                zip(ANSWERS, (chosen, rejected))}  # fmt: skip
        longest = max(len(ids) for ids, _ in rows.values())
        if self.max_length is not None and longest > self.max_length:
            raise BadSample(
                f"pair too long (> {self.max_length} tokens)",
                f"its longer row has {longest} tokens; the pair is skipped whole",
            )
        item: dict[str, Any] = {"id": name}
        for answer, (ids, labels) in rows.items():
            item[f"{answer}_input_ids"] = torch.tensor(ids, dtype=torch.long)
            item[f"{answer}_labels"] = torch.tensor(labels, dtype=torch.long)
        return item | self._images(paths)

    def _row(
        self,
        prompt: list[dict[str, Any]],
        prefix: list[int],
        answer: str,
        images: SampleImages,
        count: int,
    ) -> tuple[list[int], list[int]]:
        """Ids and labels of the prompt (``prefix``: its ids) followed by ``answer``: only the
        answer (and its end of turn) labelled."""
        try:
            encoded = self.processor.encode([*prompt, {"from": "gpt", "value": answer}], images)
        except DataError as error:
            raise BadSample("bad conversation", str(error)) from None
        if encoded.num_images != count:
            raise BadSample(
                "image marker mismatch",
                f"{encoded.num_images} {IMAGE_MARKER} markers but {count} images",
            )
        if encoded.input_ids[: len(prefix)] != prefix:
            raise BadSample("template mismatch", "the prompt's ids are not a prefix of the pair's")
        labels = [IGNORE_INDEX] * len(prefix) + encoded.labels[len(prefix) :]
        if all(label == IGNORE_INDEX for label in labels):
            raise BadSample("no supervised tokens", "the answer gets no label")
        return encoded.input_ids, labels


@dataclass
class PairCollator:
    """Pair items -> one batch of ``2P`` rows: the ``P`` chosen rows, then the ``P`` rejected
    rows in the same order (``input_ids``, ``attention_mask``, ``labels`` ``[2P, T]``, right
    padded), each sample's images once (``pixel_values`` or ``image_features``), ``pairs``
    (``P``), ``positions`` ``[P]`` (in the data file), ``reference_logps`` ``[P, 2]`` when the
    items carry them, and the ``skipped`` items. All skipped: ``[0, 0]`` tensors."""

    pad_token_id: int

    def __call__(self, items: Sequence[Mapping[str, Any] | Skipped]) -> dict[str, Any]:
        kept = [item for item in items if not isinstance(item, Skipped)]
        ids = [item[f"{answer}_input_ids"] for answer in ANSWERS for item in kept]
        labels = [item[f"{answer}_labels"] for answer in ANSWERS for item in kept]
        images = [item["pixel_values"] for item in kept if item.get("pixel_values") is not None]
        features = [f for item in kept if (f := item.get("image_features")) is not None]
        batch = {
            **({"image_features": join_images(features)} if features else {}),
            **pad_batch(ids, self.pad_token_id, "right"),
            "labels": pad_rows(labels, IGNORE_INDEX),
            "pixel_values": join_images(images),
            "pairs": len(kept),
            "num_samples": len(kept),
            "positions": torch.tensor([item["position"] for item in kept], dtype=torch.long),
            "skipped": [item for item in items if isinstance(item, Skipped)],
        }
        if kept and all("reference_logps" in item for item in kept):
            batch["reference_logps"] = torch.stack([item["reference_logps"] for item in kept])
        return batch
