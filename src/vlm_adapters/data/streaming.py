"""Streamed data: Parquet or WebDataset tar shards read in order, a seeded shuffle buffer, and
micro-batches cut for every process and loader worker from one deterministic plan.

Every process (and every loader worker) runs the same light pipeline, rows -> records ->
length estimates -> micro-batches, over the whole stream; micro-batch ``k`` of an epoch is
process ``k % world``'s, and only a process's own micro-batches are decoded (images,
tokens), in turns over the loader workers. Only
per-shard metadata is kept: memory does not grow with the number of samples.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.data.dataset import ConversationDataset
from vlm_adapters.data.records import BadSample, Skipped
from vlm_adapters.data.rows import turns_of_messages
from vlm_adapters.errors import DataError

PARQUET, TAR = ".parquet", ".tar"
TURN_COLUMNS = ("conversations", "messages")
"""What every Parquet shard must have (``id`` and ``image`` are optional)."""
_END_OF_ARCHIVE = b"\0" * 1024


@dataclass(frozen=True)
class Shard:
    """One shard file: its path, rows, and the stream index of its first row (shards counted
    in the order given)."""

    path: str
    rows: int
    first: int


@dataclass(frozen=True)
class Sample:
    """One streamed sample: its stream index, shard, and LLaVA record."""

    index: int
    source: str
    record: dict[str, Any]


def find_shards(pattern: str) -> list[str]:
    """The shard files of ``pattern``: files or globs separated by commas (each glob's matches
    sorted by name), in the order given; a DataError when one matches nothing."""
    paths: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        found = [m for m in matches if Path(m).is_file()]
        if not part or not found:
            raise DataError(
                f"{part or pattern!r}: no shard file there; give .parquet or .tar files"
            )
        paths += found
    return paths


def read_shards(paths: Sequence[str]) -> list[Shard]:
    """The shards' metadata (rows from a Parquet footer, samples from a tar's headers), each
    checked: a corrupt or truncated file, a missing column or a mix of formats is a DataError
    naming the shard."""
    kinds = {Path(p).suffix for p in paths}
    if len(kinds) != 1 or not kinds <= {PARQUET, TAR}:
        raise DataError(
            f"streamed shards must be all {PARQUET} or all {TAR} files, got "
            f"{', '.join(sorted(kinds))}; convert them with vlm-adapters convert-data"
        )
    shards, first = [], 0
    for path in paths:
        rows = _parquet_rows(path) if path.endswith(PARQUET) else _tar_rows(path)
        shards.append(Shard(path, rows, first))
        first += rows
    return shards


def _pyarrow_parquet() -> Any:
    """``pyarrow.parquet``, or a DataError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "streamed Parquet shards need pyarrow: pip install 'vlm-adapters[parquet]'"
        ) from None
    return pq


def _parquet_rows(path: str) -> int:
    pq = _pyarrow_parquet()
    try:
        handle = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"shard {path}: not a readable Parquet file ({error})") from None
    if not any(c in handle.schema_arrow.names for c in TURN_COLUMNS):
        raise DataError(
            f"shard {path}: no conversations (LLaVA) or messages (TRL) column (it has "
            f"{', '.join(handle.schema_arrow.names)}); write LLaVA rows (id, conversations, "
            "image) or TRL rows (id, messages, images)"
        )
    return handle.metadata.num_rows


def _tar_rows(path: str) -> int:
    """Samples (distinct keys) of a tar shard, from its headers; a truncated tar (no end of
    archive after its last member) is a DataError naming the last sample read."""
    keys: dict[str, None] = {}
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                keys.setdefault(_key(member.name))
            end = archive.offset
        with open(path, "rb") as handle:
            handle.seek(end)
            whole = handle.read(len(_END_OF_ARCHIVE)) == _END_OF_ARCHIVE
    except (tarfile.TarError, OSError, EOFError):
        whole = False
    if not whole:
        last = next(reversed(keys), None)
        after = f" after sample {last!r}" if last else ""
        raise DataError(
            f"shard {path}: truncated or corrupt tar{after}; write the shard again "
            "(vlm-adapters convert-data) or leave it out"
        )
    return len(keys)


def _key(name: str) -> str:
    """A WebDataset member's sample key: its name up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def shard_rows(shard: Shard) -> Iterator[dict[str, Any]]:
    """The rows of a shard in file order: a Parquet row, or a tar sample's members
    (``__key__``, ``json``: the bytes of ``key.json``, ``images``: ``key.N.<ext>`` in N's
    order). A shard that cannot be read to its end, or no longer has the rows it had when
    the stage started, is a DataError naming it."""
    read = _parquet_shard if shard.path.endswith(PARQUET) else _tar_shard
    count = 0
    try:
        for row in read(shard.path):
            count += 1
            yield row
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:  # pyarrow's too
        raise DataError(
            f"shard {shard.path}: unreadable after row {count} ({error}); write the shard "
            "again or leave it out"
        ) from None
    if count != shard.rows:
        raise DataError(
            f"shard {shard.path}: {count} rows, but {shard.rows} when the stage started; "
            "keep shards unchanged while a stage trains"
        )


def _parquet_shard(path: str) -> Iterator[dict[str, Any]]:
    handle = _pyarrow_parquet().ParquetFile(path)
    for group in range(handle.num_row_groups):
        yield from handle.read_row_group(group).to_pylist()


def _tar_shard(path: str) -> Iterator[dict[str, Any]]:
    row: dict[str, Any] = {}
    with tarfile.open(path, mode="r:") as archive:
        for member in archive:
            key = _key(member.name)
            if row and row["__key__"] != key:
                yield _tar_row(row)
                row = {}
            row = row or {"__key__": key, "parts": {}}
            handle = archive.extractfile(member)
            if handle is not None:
                row["parts"][member.name[len(key) + 1 :]] = handle.read()
    if row:
        yield _tar_row(row)


def _tar_row(row: dict[str, Any]) -> dict[str, Any]:
    parts: dict[str, bytes] = row["parts"]
    numbered = sorted(
        (int(name.split(".")[0]), data)
        for name, data in parts.items()
        if name.split(".")[0].isdigit()
    )
    return {
        "__key__": row["__key__"],
        "json": parts.get("json"),
        "images": [d for _, d in numbered],
    }


def to_record(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A LLaVA record (``id``, ``conversations``, ``image`` as embedded bytes) of a Parquet
    row or a tar sample, in LLaVA's columns (``conversations`` + ``image``) or TRL's
    (``messages`` + ``images``, as `vlm-adapters convert-data` writes them); turns may be JSON
    text, images bytes, ``{"bytes", "path"}`` structs or lists of them. Images stay bytes (the
    feature cache keys on them); a malformed row keeps what it has, for the dataset to skip
    with its reason. ``where``: the shard."""
    if "__key__" in row:
        try:
            record = json.loads(row["json"]) if row.get("json") is not None else {}
        except (ValueError, UnicodeDecodeError):
            record = {}
        record = record if isinstance(record, dict) else {}
        record.setdefault("id", row["__key__"])
        images = row["images"] or None
    else:
        keys = ("id", "conversations", "messages")
        record = {k: v for k, v in row.items() if k in keys and v is not None}
        images = next((row[k] for k in ("images", "image") if row.get(k) is not None), None)
    for key in ("conversations", "messages"):
        if isinstance(record.get(key), (str, bytes)):
            with contextlib.suppress(ValueError):
                record[key] = json.loads(record[key])
    if record.get("messages") is not None:
        inline: list[Any] = []
        with contextlib.suppress(BadSample):  # no conversations: the dataset says why
            record["conversations"] = turns_of_messages(record.pop("messages"), where, inline)
        images = images or inline or None
    image = _image_bytes(images)
    if image is not None:
        record["image"] = image
    return record


def _image_bytes(value: Any) -> Any:
    """Embedded image bytes of a Parquet cell (``{"bytes": ..., "path": ...}`` structs read
    as their bytes); None for none."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    if isinstance(value, list):
        return [_image_bytes(item) for item in value] or None
    return value


def stream_images(
    shards: Sequence[Shard], images_of: Callable[[dict[str, Any]], list[Any]]
) -> Iterator[Any]:
    """Every image of the shards' samples, in file order (``images_of``: a record's images;
    a record whose images cannot be given is passed over, to be skipped when met)."""
    for shard in shards:
        for row in shard_rows(shard):
            try:
                yield from images_of(to_record(row, shard.path))
            except BadSample:
                continue


@dataclass
class StreamPlan:
    """The deterministic order of a stream: shards permuted per ``(seed, epoch)``, a seeded
    shuffle buffer of ``shuffle_buffer`` samples (0: shards and rows in file order), then
    micro-batches of ``batch_size`` samples or of ``max_tokens`` estimated tokens."""

    shards: list[Shard]
    seed: int
    shuffle_buffer: int
    batch_size: int
    max_tokens: int | None
    estimate: Callable[[dict[str, Any]], int]

    @property
    def num_samples(self) -> int:
        return sum(shard.rows for shard in self.shards)

    def _random(self, epoch: int, salt: int) -> random.Random:
        return random.Random((self.seed * 100_003 + epoch) * 7 + salt)

    def samples(self, epoch: int) -> Iterator[Sample]:
        """Every sample of the epoch, once, in the shuffled order."""
        shards = list(self.shards)
        if self.shuffle_buffer:
            self._random(epoch, 1).shuffle(shards)
        rows = (
            Sample(shard.first + n, shard.path, to_record(row, shard.path))
            for shard in shards
            for n, row in enumerate(shard_rows(shard))
        )
        return self._shuffled(rows, self._random(epoch, 2))

    def _shuffled(self, samples: Iterator[Sample], rng: random.Random) -> Iterator[Sample]:
        """A shuffle buffer: each new sample takes the place of a random held one, which goes
        out; the last held ones go out in a random order."""
        held: list[Sample] = []
        for sample in samples:
            if len(held) < self.shuffle_buffer:
                held.append(sample)
                continue
            if not held:
                yield sample
                continue
            slot = rng.randrange(len(held))
            yield held[slot]
            held[slot] = sample
        rng.shuffle(held)
        yield from held

    def micro_batches(self, epoch: int) -> Iterator[list[Sample]]:
        """The epoch's micro-batches, for every process together."""
        batch: list[Sample] = []
        used = 0
        for sample in self.samples(epoch):
            length = abs(self.estimate(sample.record)) if self.max_tokens else 1
            limit = self.max_tokens or self.batch_size
            if batch and used + length > limit:
                yield batch
                batch, used = [], 0
            batch.append(sample)
            used += length
        if batch:
            yield batch

    def count(self, epoch: int) -> int:
        """Micro-batches of the epoch (all processes'): from the metadata for batches of
        ``batch_size``, by running the (undecoded) plan for a token budget."""
        if not self.max_tokens:
            return math.ceil(self.num_samples / self.batch_size)
        return sum(1 for _ in self.micro_batches(epoch))


class StreamDataset(IterableDataset):
    """Process ``rank``'s collated micro-batches of the epoch (`set_epoch`) from ``plan``,
    after the first ``skip`` (a resumed run's, never decoded); ``dataset`` encodes samples
    (bad ones are `Skipped` items, counted where they are met), ``collate`` batches them.
    Every process gets ``ceil(count / world)`` micro-batches: where the last round has none
    for a process, it gets a filler of no weight (`_filler`), so all take equal steps.
    Each batch lists its ``samples`` (stream indices, skipped ones included)."""

    def __init__(
        self,
        plan: StreamPlan,
        dataset: ConversationDataset,
        collate: Callable[[list[Any]], dict[str, Any]],
        rank: int,
        world: int,
    ) -> None:
        self.plan, self.dataset, self.collate = plan, dataset, collate
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def batches(self, epoch: int, world: int | None = None) -> int:
        """This process's micro-batches in ``epoch`` (cut for ``world`` processes: default,
        this stream's)."""
        return math.ceil(self.plan.count(epoch) / (world or self.world))

    def __iter__(self) -> Iterator[dict[str, Any] | DataError]:
        """The micro-batches; a DataError (a bad shard, or a bad sample with
        ``on_bad_sample: error``) is yielded, for the loader to raise as one line in the
        training process, instead of a loader worker's traceback."""
        try:
            yield from self._batches()
        except DataError as error:
            yield error

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)

        def mine(local: int) -> bool:  # the loader takes its workers' batches in turn
            return local >= self.skip and (local - self.skip) % workers == worker

        count, opener = 0, []
        for count, batch in enumerate(self.plan.micro_batches(self.epoch), 1):
            rank, local = (count - 1) % self.world, (count - 1) // self.world
            opener = batch if rank == 0 else opener
            if rank == self.rank and mine(local):
                items = [self._encode(sample) for sample in batch]
                yield {**self.collate(items), "samples": [s.index for s in batch]}
        short = count % self.world  # processes with a micro-batch in the last round
        if short and self.rank >= short and mine(count // self.world):
            yield self._filler(opener)

    def _filler(self, batch: list[Sample]) -> dict[str, Any]:
        """A micro-batch that trains nothing: ``batch``'s samples (the last round's first
        micro-batch, trained by process 0) with every label -100, so this process runs the
        same forward and backward as the others; it counts no sample."""
        items = [item for item in map(self._encode, batch) if not isinstance(item, Skipped)]
        filler = self.collate(items)
        filler["labels"] = torch.full_like(filler["labels"], IGNORE_INDEX)
        return {**filler, "skipped": [], "num_samples": 0, "num_tokens": 0, "samples": []}

    def _encode(self, sample: Sample) -> Any:
        return self.dataset.encode(sample.record, sample.index, sample.source)
