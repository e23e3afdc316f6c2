"""Where a stage's samples live: LLaVA JSON/JSONL, `datasets` data (a saved folder, Parquet or
Arrow files, a hub id), WebDataset tar shards, and weighted mixtures of them; every row turned
into the one LLaVA record the dataset reads (`to_record`)."""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm_adapters.data.records import RecordSource, load_records
from vlm_adapters.data.rows import to_record
from vlm_adapters.data.shards import TarRecords
from vlm_adapters.errors import ConfigError, DataError, InstallError

__all__ = [
    "FORMATS",
    "Mixture",
    "RowList",
    "RowRecords",
    "detect_format",
    "open_source",
    "to_record",
]

FORMATS = ("auto", "llava", "datasets", "parquet", "arrow", "webdataset", "hub")
"""Values of ``data.<stage>.format`` (``auto``: detected from the path)."""

ROW_COLUMNS = ("messages", "conversations", "prompt")
"""A row holds its turns in one of these (TRL's, LLaVA's)."""


# -- format detection


def detect_format(path: str, format: str = "auto") -> str:
    """The format of ``path``: ``format`` when stated, else detected (.json/.jsonl: llava; a
    ``save_to_disk`` folder: datasets; .parquet / .arrow / .tar files, globs or folders of
    them; a name that is not a local path: a hub id). Ambiguity is a ConfigError naming the
    choices."""
    if format != "auto":
        if format not in FORMATS:
            raise ConfigError(f"format {format!r} is unknown; choose one of {', '.join(FORMATS)}")
        return format
    if not glob.has_magic(path) and not os.path.isdir(path) and _kind_of_file(path):
        return _kind_of_file(path)  # type: ignore[return-value]
    files = data_files(path)
    if files:
        kinds = {_kind_of_file(f) for f in files}
        if len(kinds) == 1 and None not in kinds:
            return kinds.pop()  # type: ignore[return-value]
    elif Path(path).is_dir() and (Path(path) / "dataset_info.json").is_file():
        return "datasets"
    elif not _looks_local(path):
        return "hub"
    raise ConfigError(
        f"{path}: cannot tell its format (found {len(files)} data files: "
        f"{', '.join(sorted({Path(f).suffix or Path(f).name for f in files})) or 'none'}); "
        f"set format to one of {', '.join(FORMATS[1:])}"
    )


def _kind_of_file(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    return {
        ".json": "llava",
        ".jsonl": "llava",
        ".parquet": "parquet",
        ".arrow": "arrow",
        ".tar": "webdataset",
    }.get(suffix)


def data_files(path: str) -> list[str]:
    """The files ``path`` names, sorted: itself, a glob's matches, or a folder's data files
    (.parquet, .arrow, .tar; a ``save_to_disk`` folder's are not listed)."""
    if glob.has_magic(path):
        return sorted(p for p in glob.glob(path) if os.path.isfile(p))
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "dataset_info.json")):
        return sorted(
            str(p)
            for p in Path(path).iterdir()
            if p.is_file() and p.suffix.lower() in (".parquet", ".arrow", ".tar")
        )
    return []


def _looks_local(path: str) -> bool:
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or os.path.exists(path)
        or glob.has_magic(path)
        or path.count("/") > 1
        or Path(path).suffix.lower() in (".json", ".jsonl", ".parquet", ".arrow", ".tar")
    )


# -- opening a source


def open_source(path: str, format: str = "auto", split: str = "train") -> RecordSource:
    """The records of one source, map-style (nothing is read into Python up front but a
    LLaVA file's text): rows are turned into records by `to_record` when used."""
    kind = detect_format(path, format)
    if kind == "llava":
        if not Path(path).is_file():
            raise ConfigError(f"{path}: data file not found; check the path")
        return load_records(path)
    if kind == "webdataset":
        return TarRecords(_existing_files(path, kind))
    return RowRecords(_load_dataset(path, kind, split), path)


def _existing_files(path: str, kind: str) -> list[str]:
    files = data_files(path)
    if not files:
        raise ConfigError(f"{path}: no {kind} files found; check the path or the glob")
    return files


def require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise InstallError(
            "reading datasets, Parquet or Arrow data needs the `datasets` library; "
            "pip install 'vlm-adapters[data]'"
        ) from None
    return datasets


def _load_dataset(path: str, kind: str, split: str) -> Any:
    """The `datasets.Dataset` of ``path`` (memory-mapped Arrow), its turns column checked."""
    datasets = require_datasets()
    if kind == "datasets":
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _split_of(loaded, split, path)
    elif kind in ("parquet", "arrow"):
        files = _existing_files(path, kind)
        _check_schemas(files, kind)
        loaded = _quietly(
            path, lambda: datasets.load_dataset(kind, data_files=files, split="train")
        )
    else:
        loaded = _quietly(path, lambda: datasets.load_dataset(path, split=split))
    _check_columns(loaded.column_names, path)
    return loaded


def _split_of(loaded: Any, split: str, path: str) -> Any:
    if split not in loaded:
        raise ConfigError(
            f"{path}: no split {split!r}; it has {', '.join(loaded)}; set split to one of them"
        )
    return loaded[split]


def _quietly(path: str, load: Callable[[], Any]) -> Any:
    """``load()`` with the library's errors as one DataError line naming ``path``."""
    try:
        return load()
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())
        raise DataError(f"{path}: cannot load the data: {message}") from None
    except Exception as error:
        if type(error).__module__.startswith("datasets"):
            cause = error.__cause__ or error
            message = " ".join(str(cause).split())
            raise DataError(f"{path}: cannot load the data: {message}") from None
        raise


def _check_columns(columns: Sequence[str], where: str) -> None:
    if not any(column in columns for column in ROW_COLUMNS):
        raise DataError(
            f"{where}: no 'messages' (TRL) or 'conversations' (LLaVA) column, nor 'prompt' "
            f"(TRL preference pairs) (it has "
            f"{', '.join(columns) or 'none'}); rename the column of the turns to one of them"
        )


def _check_schemas(files: list[str], kind: str) -> None:
    """Every Parquet/Arrow file holds a turns column and the first file's columns and types:
    otherwise a DataError naming the file and the column."""
    schemas = [(f, _schema(f, kind)) for f in files]
    first_file, first = schemas[0]
    for file, schema in schemas:
        _check_columns(schema.names, file)
        for field in first:
            if field.name not in schema.names:
                raise DataError(
                    f"{file}: column {field.name!r} is missing (it is in {first_file}); every "
                    "file of a source needs the same columns"
                )
            if schema.field(field.name).type != field.type:
                raise DataError(
                    f"{file}: column {field.name!r} is {schema.field(field.name).type}, but "
                    f"{field.type} in {first_file}; every file of a source needs the same types"
                )
        extra = [name for name in schema.names if name not in first.names]
        if extra:
            raise DataError(
                f"{file}: column {extra[0]!r} is not in {first_file}; every file of a source "
                "needs the same columns"
            )


def _schema(file: str, kind: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            return pq.read_schema(file)
        with pa.memory_map(file) as source:
            try:
                return pa.ipc.open_stream(source).schema
            except pa.ArrowInvalid:
                return pa.ipc.open_file(source).schema
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{file}: not a readable {kind} file ({error})") from None


class RowRecords(Sequence[dict[str, Any]]):
    """The rows of a `datasets.Dataset` as LLaVA records (`to_record`), one row read when it
    is used; images stay undecoded until the dataset opens them."""

    def __init__(self, dataset: Any, where: str) -> None:
        self.dataset, self.where = dataset, where
        self._rows = dataset.with_format("arrow")
        self._fingerprint = getattr(dataset, "_fingerprint", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        row = self._rows[index].to_pylist()[0]
        return to_record(row, f"{self.where} row {index}")


class RowList(Sequence[dict[str, Any]]):
    """Rows given in memory (TRL's ``prompt`` / ``chosen`` / ``rejected`` dicts) as records
    (`to_record`), each converted when it is used."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], where: str) -> None:
        self.rows, self.where = list(rows), where

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return to_record(self.rows[index], f"{self.where} row {index}")


# -- mixtures


class Mixture(Sequence[Mapping[str, Any]]):
    """Several sources as one: each source's samples repeated by its weight (2: each twice,
    0.5: a seeded half), in source order. ``parts``: (records, weight, name)."""

    def __init__(self, parts: Sequence[tuple[RecordSource, float, str]], seed: int) -> None:
        self.parts = [records for records, _, _ in parts]
        self.names = [name for _, _, name in parts]
        self.index: list[tuple[int, int]] = []
        for number, (records, weight, _) in enumerate(parts):
            chosen = weighted_indices(len(records), weight, f"{seed}:{number}")
            self.index += [(number, i) for i in chosen]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Mapping[str, Any]:  # type: ignore[override]
        part, position = self.index[index]
        return self.parts[part][position]

    def origin(self, index: int) -> str:
        """The source and row of sample ``index``, for messages."""
        part, position = self.index[index]
        return f"{self.names[part]} sample {position}"


def weighted_indices(count: int, weight: float, seed: str) -> list[int]:
    """Indices of ``count`` samples under ``weight``: each whole part of the weight takes
    every sample once, the fraction a seeded subset (kept in order)."""
    if weight < 0:
        raise ConfigError(f"weight {weight} is negative; use 0 or more")
    whole, fraction = int(weight), weight - int(weight)
    indices = list(range(count)) * whole
    chosen = random.Random(f"{seed}:{count}:{weight}").sample(range(count), round(fraction * count))
    return indices + sorted(chosen)
