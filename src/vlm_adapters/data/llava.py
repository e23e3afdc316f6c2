"""LLaVA-format data: loading records, the dataset, the collator and a length-grouped sampler."""

from __future__ import annotations

import copy
import json
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from vlm_adapters.chat.templates import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    ChatTemplate,
    DataError,
    check_template,
    normalize_turns,
    with_image_markers,
)
from vlm_adapters.data.feature_cache import FeatureCache
from vlm_adapters.data.images import MAX_IMAGE_PIXELS, ImageProblem, confined_path, open_image
from vlm_adapters.data.processor import (
    SampleImages,
    TokenBudgetError,
    VLMProcessor,
    join_images,
    pad_batch,
    pad_rows,
)
from vlm_adapters.vision.base import ImageBatch, Size

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Policy = Literal["skip", "error"]


@dataclass(frozen=True)
class Skipped:
    """A sample left out of training: its id, a short reason (for counting), details, and its
    index in the data file ``file``."""

    id: str
    reason: str
    detail: str = ""
    index: int = -1
    file: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "file": self.file,
            "index": self.index,
            "reason": self.reason,
            "detail": self.detail,
        }


class _BadSample(DataError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class Records(Sequence[dict[str, Any]]):
    """The samples of one LLaVA data file, each decoded when it is used.

    The file's text stays in memory with the offsets of its records, so a 665K-sample
    instruction mix costs its size plus two integers a sample, not millions of Python objects;
    every record was checked to be a JSON object with ``conversations`` when the file was read.
    """

    def __init__(self, text: str, starts: array, ends: array) -> None:
        self.text, self.starts, self.ends = text, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return json.loads(self.text[self.starts[index] : self.ends[index]])


def load_records(path: str | Path) -> Records:
    """Samples of a LLaVA JSON file (a list) or JSONL file (`.jsonl`, one sample per line);
    a malformed file is a DataError naming the line, or the sample without `conversations`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found; check the path in your data config")
    text = _read_utf8(path)
    starts, ends = array("q"), array("q")
    spans = _jsonl_spans(path, text) if path.suffix == ".jsonl" else _array_spans(path, text)
    for start, end in spans:
        starts.append(start)
        ends.append(end)
    return Records(text, starts, ends)


def _read_utf8(path: Path) -> str:
    """The file's text; a DataError naming the line and byte offset where it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte {error.start}: {error.reason}); save the file as UTF-8"
        ) from None


def _checked(path: Path, record: Any, where: str) -> None:
    if not isinstance(record, dict) or "conversations" not in record:
        raise DataError(
            f"{path}{where} has no 'conversations' field; each sample needs "
            "'conversations': a list of {'from': ..., 'value': ...} turns"
        )


def _jsonl_spans(path: Path, text: str) -> Iterator[tuple[int, int]]:
    start = 0
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        end = start + len(line)
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: malformed JSON line ({error.msg}); fix or remove that line"
                ) from None
            _checked(path, record, f":{number}")
            yield start, end
        start = end


def _array_spans(path: Path, text: str) -> Iterator[tuple[int, int]]:
    """Offsets of the elements of a top-level JSON list, each decoded once to check it."""
    decoder = json.JSONDecoder()
    index = _skip(text, 0)
    if text[index : index + 1] != "[":
        _parse_json(path, text)  # raises the precise error
    index = _skip(text, index + 1)
    count = 0
    while index < len(text) and text[index] != "]":
        try:
            record, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            _parse_json(path, text)  # raises the precise error (line and message)
            raise
        _checked(path, record, f": sample {count}")
        yield index, end
        count += 1
        index = _skip(text, end)
        if text[index : index + 1] == ",":
            index = _skip(text, index + 1)
        elif text[index : index + 1] != "]":
            _parse_json(path, text)
    if index >= len(text) or _skip(text, index + 1) != len(text):
        _parse_json(path, text)


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _parse_json(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: malformed JSON ({error.msg}); "
            "for one sample per line, name the file .jsonl"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of samples, got {type(data).__name__}; "
            "wrap the samples in [...]"
        )
    return data


def sample_id(record: Mapping[str, Any], index: int) -> str:
    """The record's `id`, or `#index` when it has none."""
    return str(record.get("id", f"#{index}"))


def image_paths(record: Mapping[str, Any]) -> list[str]:
    """The record's `image` field as a list of paths (empty for text-only samples)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(path, str) for path in image):
        return image
    raise _BadSample("bad image field", f"'image' must be a path or a list of paths: {image!r}")


class LlavaDataset(Dataset):
    """LLaVA-format samples as token ids, labels and pixel tensors; images load lazily.

    One policy, `on_bad_sample`, covers every unusable sample: a missing, unreadable or too
    large image, an image path that leaves `image_root`, a bad conversation (unknown role, no
    assistant turn), `<image>` in an answer, markers that do not match the images, more than
    `max_length` tokens (visual tokens are never cut: the whole sample goes), more visual
    tokens than the per-sample budget, or no supervised token. With "skip" the item is a
    `Skipped` (the collator drops and reports it); with "error" a DataError names the sample
    and the reason.
    `source` (the data file) and `positions` (each item's index in it) name skipped samples.
    :meth:`precheck` finds the problems that need no decoding or tokenizing, for the whole
    file, up front.
    A single-image sample without a marker gets `<image>\\n` before its first human turn.
    With variable-size vision (an `image_transform` that counts tokens per image size: AnyRes,
    NaFlex), each image's placeholders follow its size (read from the file's header), and
    `num_image_tokens` is the most one image gives.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        image_root: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        template: str | ChatTemplate,
        image_transform: Callable[[Image.Image], torch.Tensor],
        image_token_id: int,
        num_image_tokens: int,
        max_length: int | None = None,
        on_bad_sample: Policy = "skip",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        source: str | Path = "",
        positions: Sequence[int] | None = None,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        check_template(tokenizer, template)
        self.records = records
        self.image_root = Path(image_root)
        self.processor = VLMProcessor(
            tokenizer, image_transform, num_image_tokens, image_token_id, template
        )
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.max_image_pixels = max_image_pixels
        self.source = str(source)
        self.feature_cache = feature_cache
        self._keys: dict[Path, str] = {}
        self._files: dict[str, Path] = {}  # image path in a record -> checked file
        self._sizes: dict[Path, Size] = {}  # checked file -> (height, width), for variable vision
        self._lengths: array | None = None
        self.positions = list(positions) if positions is not None else list(range(len(records)))

    @classmethod
    def for_model(
        cls,
        model: Any,
        records: Sequence[Mapping[str, Any]],
        *,
        image_root: str | Path,
        template: str | ChatTemplate,
        **options: Any,
    ) -> LlavaDataset:
        """A dataset encoded for ``model`` (a :class:`~vlm_adapters.VisionLanguageModel`): its
        tokenizer, image preprocessing and visual tokens; ``max_length`` defaults to the LLM's
        context. ``options``: the other keyword arguments of the constructor."""
        options.setdefault("max_length", model.llm.max_positions)
        return cls(
            records,
            image_root=image_root,
            tokenizer=model.tokenizer,
            template=template,
            image_transform=model.vision.transform,
            image_token_id=model.image_token_id,
            num_image_tokens=model.num_image_tokens,
            **options,
        )

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        return self._guarded(index, self._item)

    def _guarded(self, index: int, work: Callable[[Mapping[str, Any], str], Any]) -> Any:
        """``work(record, id)``, with a bad sample turned into a Skipped or a DataError."""
        position = self.positions[index]
        record = self.records[position]
        name = sample_id(record, position)
        try:
            return work(record, name)
        except _BadSample as bad:
            if self.on_bad_sample == "error":
                where = f"{self.source}: " if self.source else ""
                raise DataError(
                    f"{where}sample {name!r} (index {position}): {bad}; fix the sample or set "
                    "data.on_bad_sample: skip"
                ) from None
            return Skipped(name, bad.reason, bad.detail, position, self.source)

    def precheck(self) -> tuple[LlavaDataset, list[Skipped]]:
        """Check every sample without decoding images or tokenizing: the image field, paths
        (inside `image_root`, present), roles, markers (none in answers) and their counts.
        Returns the dataset of the samples that pass and the Skipped ones (with "error", the
        first problem raises)."""
        results = [self._guarded(i, self._check) for i in range(len(self))]
        skipped = [r for r in results if isinstance(r, Skipped)]
        kept = [(p, r) for p, r in zip(self.positions, results) if not isinstance(r, Skipped)]
        subset = copy.copy(self)
        subset.positions = [p for p, _ in kept]
        subset._lengths = array("q", (length for _, length in kept))
        return subset, skipped

    def _check(self, record: Mapping[str, Any], name: str) -> int:
        """Raise for a bad sample; return its length estimate (one decode serves both)."""
        paths = self._image_files(record)
        turns = with_image_markers(_turns(record), len(paths))
        markers = sum(str(turn.get("value", "")).count(IMAGE_MARKER) for turn in turns)
        if markers != len(paths):
            raise _BadSample(
                "image marker mismatch", f"{markers} {IMAGE_MARKER} markers but {len(paths)} images"
            )
        if not self.processor.variable:
            return self._estimate(record)
        return self._estimate(record, sum(self._token_counts(paths)))

    def _image_files(self, record: Mapping[str, Any]) -> list[Path]:
        return [self._image_file(relative) for relative in image_paths(record)]

    def _image_file(self, relative: str) -> Path:
        """The checked file of ``relative`` (inside image_root, present), remembered: an
        instruction mix reuses a few hundred thousand images over many samples."""
        if relative not in self._files:
            try:
                path = confined_path(self.image_root, relative)
            except ImageProblem as problem:
                raise _BadSample(problem.reason, problem.detail) from None
            if not path.is_file():
                raise _BadSample("image missing", str(path))
            self._files[relative] = path
        return self._files[relative]

    def image_files(self) -> list[Path]:
        """The distinct image files of the samples (checked ones after `precheck`), in order
        of first use."""
        files: dict[Path, None] = {}
        for position in self.positions:
            files.update(dict.fromkeys(self._image_files(self.records[position])))
        return list(files)

    @property
    def lengths(self) -> list[int]:
        """Estimated token counts without tokenizing; negative for text-only samples (known
        from :meth:`precheck` when it ran, with the exact visual tokens of every image)."""
        if self._lengths is not None:
            return list(self._lengths)
        return [self._estimate(self.records[p]) for p in self.positions]

    def _estimate(self, record: Mapping[str, Any], visual: int | None = None) -> int:
        """Words plus ``visual`` tokens (default: ``num_image_tokens`` per marker, the most
        for variable-size vision)."""
        turns = record.get("conversations") or []
        text = " ".join(str(turn.get("value", "")) for turn in turns if isinstance(turn, Mapping))
        num_images = text.count(IMAGE_MARKER)
        words = len(text.replace(IMAGE_MARKER, " ").split())
        if num_images == 0 and not record.get("image"):
            return -max(words, 1)
        return words + (max(num_images, 1) * self.num_image_tokens if visual is None else visual)

    def _sample_images(self, paths: list[Path]) -> SampleImages:
        """What the processor counts tokens from: image sizes for variable vision."""
        return [self._size(path) for path in paths] if self.processor.variable else len(paths)

    def _token_counts(self, paths: list[Path]) -> list[int]:
        try:
            return self.processor.token_counts(self._sample_images(paths))
        except TokenBudgetError as error:
            raise _BadSample("too many visual tokens", str(error)) from None

    def _size(self, path: Path) -> Size:
        """(height, width) of an image file from its header (no decoding), remembered."""
        if path not in self._sizes:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(path) as image:
                        height, width = image.height, image.width
            except Image.DecompressionBombError as error:
                raise _BadSample("image too large", f"{path}: {error}") from None
            except (OSError, SyntaxError, ValueError) as error:
                raise _BadSample("image unreadable", f"{path}: {error}") from None
            if height * width > self.max_image_pixels:
                detail = f"{path} is {width}x{height}, over data.max_image_pixels"
                raise _BadSample("image too large", detail)
            self._sizes[path] = (height, width)
        return self._sizes[path]

    def _item(self, record: Mapping[str, Any], name: str) -> dict[str, Any]:
        paths = self._image_files(record)
        turns = _turns(record)
        self._token_counts(paths)  # the per-sample budget, as its own reason
        try:
            encoded = self.processor.encode(turns, self._sample_images(paths))
        except DataError as error:
            raise _BadSample("bad conversation", str(error)) from None
        if encoded.num_images != len(paths):
            raise _BadSample(
                "image marker mismatch",
                f"{encoded.num_images} {IMAGE_MARKER} markers but {len(paths)} images",
            )
        self._check_length(encoded.input_ids, encoded.labels)
        return {
            "id": name,
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            **self._images(paths),
        }

    def _images(self, paths: list[Path]) -> dict[str, torch.Tensor | ImageBatch | None]:
        """``pixel_values`` ``[I, 3, H, W]``, or ``image_features`` ``[I, N, D]`` read from the
        feature cache (an entry that cannot be trusted makes the sample a bad one); an
        :class:`ImageBatch` of either for variable-size vision (one cache entry per image,
        ``[tiles, N, D]``)."""
        if self.feature_cache is None or not paths:
            return {"pixel_values": self._pixels(paths)}
        features = []
        for path in paths:
            key = self._keys.get(path) or self._keys.setdefault(path, self.feature_cache.key(path))
            entry = self.feature_cache.read(key)
            if entry is None:
                problem = self.feature_cache.problem(key)
                raise _BadSample("feature cache entry unusable", f"{path}: {problem}")
            features.append(entry)
        if not self.processor.variable:
            return {"pixel_values": None, "image_features": torch.stack(features)}
        sizes = tuple(self._size(path) for path in paths)
        rows = tuple(len(entry) for entry in features)
        batch = ImageBatch(torch.cat(features), sizes, rows)
        return {"pixel_values": None, "image_features": batch}

    def _check_length(self, input_ids: list[int], labels: list[int]) -> None:
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise _BadSample(f"too long (> {self.max_length} tokens)", f"{len(input_ids)} tokens")
        if all(label == IGNORE_INDEX for label in labels):
            raise _BadSample("no supervised tokens", "no assistant answer gets a label")

    def _pixels(self, paths: list[Path]) -> torch.Tensor | ImageBatch | None:
        if not paths:
            return None
        try:
            images = [open_image(path, self.max_image_pixels) for path in paths]
        except ImageProblem as problem:
            raise _BadSample(problem.reason, problem.detail) from None
        return self.processor.images(images)  # [num_images, 3, H, W] or an ImageBatch


def _turns(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation's turns, checked; DataError becomes a bad sample."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise _BadSample("bad conversation", f"'conversations' must be a list, got {turns!r}")
    try:
        normalized = normalize_turns(turns)
    except DataError as error:
        raise _BadSample("bad conversation", str(error)) from None
    if "gpt" not in [role for role, _ in normalized]:
        raise _BadSample("bad conversation", "no assistant ('gpt') turn")
    answers = [
        i for i, (role, text) in enumerate(normalized) if role == "gpt" and IMAGE_MARKER in text
    ]
    if answers:
        raise _BadSample(
            "image marker in an answer",
            f"turn {answers[0]} (an assistant answer) holds {IMAGE_MARKER}; put image markers "
            "in human turns",
        )
    return [dict(turn) for turn in turns]


@dataclass
class DataCollator:
    """Pad a list of dataset items into a batch; `Skipped` items are dropped and listed.

    Returns `input_ids`, `attention_mask` and `labels` (padded with -100) as [B, T] tensors,
    `pixel_values` (every image of the batch, in sample order, [num_images, 3, H, W], or one
    `ImageBatch` for variable-size vision) or None, and `skipped` (the dropped items). When
    every item was skipped, B is 0: the tensors have shape [0, 0]; count the skips and do not
    step on such a batch.
    """

    pad_token_id: int
    padding_side: Literal["left", "right"] = "right"

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise DataError(
                "pad_token_id is None: the tokenizer has no pad token; "
                "set tokenizer.pad_token (e.g. to its eos token) first"
            )
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, items: Sequence[Mapping[str, Any] | Skipped]) -> dict[str, Any]:
        kept = [item for item in items if not isinstance(item, Skipped)]
        skipped = [item for item in items if isinstance(item, Skipped)]
        side = self.padding_side
        ids = [item["input_ids"] for item in kept]
        images = [item["pixel_values"] for item in kept if item.get("pixel_values") is not None]
        features = [f for item in kept if (f := item.get("image_features")) is not None]
        return {
            **({"image_features": join_images(features)} if features else {}),
            **pad_batch(ids, self.pad_token_id, side),
            "labels": pad_rows([item["labels"] for item in kept], IGNORE_INDEX, side),
            "pixel_values": join_images(images),
            "skipped": skipped,
        }


@dataclass
class SkipCounter:
    """Counts samples seen and skipped (by reason) over an epoch, for the end-of-epoch report,
    and keeps each skipped sample once (by its index in the data file)."""

    seen: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    samples: dict[int, Skipped] = field(default_factory=dict)

    def update(self, batch: Mapping[str, Any]) -> None:
        """Count one collated batch."""
        kept = batch.get("num_samples", len(batch["input_ids"]))  # packed rows hold several
        self.seen += kept + len(batch["skipped"])
        self.add(batch["skipped"])

    def add(self, skipped: Sequence[Skipped]) -> None:
        """Count samples skipped outside a batch (e.g. by the up-front check)."""
        self.reasons.update(item.reason for item in skipped)
        for item in skipped:
            self.samples.setdefault(item.index, item)

    def merge(self, other: SkipCounter) -> None:
        """Add another process's counts."""
        self.seen += other.seen
        self.reasons.update(other.reasons)
        for index, item in other.samples.items():
            self.samples.setdefault(index, item)

    def report(self) -> str:
        """E.g. "skipped 3 of 120 samples: 2 image missing, 1 too long (> 512 tokens)"."""
        line = f"skipped {sum(self.reasons.values())} of {self.seen} samples"
        if not self.reasons:
            return line
        counts = ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common())
        return f"{line}: {counts}"

    def reset(self) -> None:
        """Start a new epoch."""
        self.seen = 0
        self.reasons.clear()
        self.samples.clear()


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which every `batch_size` run holds samples of similar length.

    Indices are shuffled, cut into megabatches of `megabatch_size` batches, sorted by length
    inside each megabatch and cut into batches; the full batches are shuffled. With
    `group_by_modality`, image (length >= 0) and text-only (length < 0) samples share no batch
    but (at most) one of the last two, which hold the leftovers of both. Deterministic given
    `seed` and the epoch (`set_epoch`).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        group_by_modality: bool = True,
        megabatch_size: int = 16,
    ) -> None:
        if batch_size < 1 or megabatch_size < 1:
            raise ValueError("batch_size and megabatch_size must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.megabatch_size = megabatch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` (so every epoch is shuffled differently)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        full: list[list[int]] = []
        leftovers: list[int] = []
        for group in self._groups():
            batches = self._group_batches(group, generator)
            if batches and len(batches[-1]) < self.batch_size:
                leftovers += batches.pop()
            full += batches
        order = torch.randperm(len(full), generator=generator).tolist()
        for position in order:
            yield from full[position]
        yield from leftovers

    def _groups(self) -> list[list[int]]:
        indices = range(len(self.lengths))
        if not self.group_by_modality:
            return [list(indices)]
        return [
            [i for i in indices if self.lengths[i] >= 0],
            [i for i in indices if self.lengths[i] < 0],
        ]

    def _group_batches(self, group: list[int], generator: torch.Generator) -> list[list[int]]:
        """Batches of one group: shuffled, then sorted by length inside each megabatch."""
        shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        mega = self.batch_size * self.megabatch_size
        batches = []
        for start in range(0, len(shuffled), mega):
            chunk = sorted(shuffled[start : start + mega], key=lambda i: -abs(self.lengths[i]))
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        return batches
