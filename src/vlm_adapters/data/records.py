"""LLaVA-format data records: reading a JSON / JSONL data file, records given in memory
(PIL images in place of paths, a `datasets.Dataset`), checking a record, sample ids, and the
samples left out of training."""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_adapters.chat.templates import IMAGE_MARKER, normalize_turns
from vlm_adapters.errors import DataError


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


class BadSample(DataError):
    """A record that cannot be used: a short ``reason`` (for counting) and its ``detail``."""

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


RecordSource = Sequence[Mapping[str, Any]]
"""A stage's samples: a data file's `Records`, or records in memory (`memory_records`)."""

IN_MEMORY = "<in-memory: "
"""How a run's ``config.yaml`` names data given in memory: ``<in-memory: N records, HASH>``."""


def memory_records(data: Any, where: str) -> RecordSource:
    """Samples given in memory, checked like a file's: a list of LLaVA records whose
    ``image`` may be PIL images (or paths), or a `datasets.Dataset` with a ``conversations``
    column (checked by its columns: reading its rows would decode every image). ``where``
    names the data in errors."""
    columns = getattr(data, "column_names", None)
    if isinstance(columns, list):
        if "conversations" not in columns:
            raise DataError(
                f"{where}: the dataset has no 'conversations' column (it has "
                f"{', '.join(columns) or 'none'}); rename the column of the turns to it"
            )
        return data
    if not isinstance(data, (list, tuple)):
        raise DataError(
            f"{where}: expected a data file, a list of records or a datasets.Dataset, got "
            f"{type(data).__name__}"
        )
    for index, record in enumerate(data):
        _checked(where, record, f"[{index}]")
    return list(data)


def describe_memory(records: RecordSource) -> str:
    """What a run records for in-memory data: the count and a digest of the content (the
    pixels of in-memory images included; a `datasets.Dataset`'s own fingerprint)."""
    fingerprint = getattr(records, "_fingerprint", None)
    if not isinstance(fingerprint, str):
        digest = hashlib.sha256()
        for record in records:
            digest.update(json.dumps(record, sort_keys=True, default=_pixel_digest).encode())
        fingerprint = digest.hexdigest()
    return f"{IN_MEMORY}{len(records)} records, {fingerprint[:16]}>"


def _pixel_digest(value: Any) -> str:
    if not isinstance(value, Image.Image):
        raise TypeError(f"{type(value).__name__} in a record is neither JSON nor a PIL image")
    digest = hashlib.sha256(f"{value.mode} {value.size}".encode())
    digest.update(value.tobytes())
    return digest.hexdigest()


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


def _checked(path: str | Path, record: Any, where: str) -> None:
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


def record_images(record: Mapping[str, Any]) -> list[str | Image.Image | bytes]:
    """The record's `image` field as a list of paths, in-memory PIL images and embedded image
    bytes (empty for text-only samples)."""
    image = record.get("image")
    if image is None:
        return []
    images = image if isinstance(image, list) else [image]
    if all(isinstance(item, (str, Image.Image, bytes)) for item in images):
        return images
    raise BadSample(
        "bad image field",
        f"'image' must be a path, a PIL image, an image file's bytes or a list of them: "
        f"{repr(image)[:200]}",
    )


def record_videos(record: Mapping[str, Any]) -> list[str | bytes]:
    """The record's `video` field as a list of paths and embedded video bytes (empty for
    samples without videos)."""
    video = record.get("video")
    if video is None:
        return []
    videos = video if isinstance(video, list) else [video]
    if all(isinstance(item, (str, bytes)) for item in videos):
        return videos
    raise BadSample(
        "bad video field",
        f"'video' must be a path, a video file's bytes or a list of them: {repr(video)[:200]}",
    )


def image_paths(record: Mapping[str, Any]) -> list[str]:
    """The record's `image` field as a list of paths (empty for text-only samples)."""
    images = record_images(record)
    if all(isinstance(image, str) for image in images):
        return images  # type: ignore[return-value]
    raise BadSample("bad image field", "'image' must be a path or a list of paths here")


def checked_turns(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The record's conversation turns; a BadSample unless they are well formed, hold an
    assistant turn and no image marker in an answer."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise BadSample("bad conversation", f"'conversations' must be a list, got {turns!r}")
    try:
        normalized = normalize_turns(turns)
    except DataError as error:
        raise BadSample("bad conversation", str(error)) from None
    if "gpt" not in [role for role, _ in normalized]:
        raise BadSample("bad conversation", "no assistant ('gpt') turn")
    answers = [
        i for i, (role, text) in enumerate(normalized) if role == "gpt" and IMAGE_MARKER in text
    ]
    if answers:
        raise BadSample(
            "image marker in an answer",
            f"turn {answers[0]} (an assistant answer) holds {IMAGE_MARKER}; put image markers "
            "in human turns",
        )
    return [dict(turn) for turn in turns]
