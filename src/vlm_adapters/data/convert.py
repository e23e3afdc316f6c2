"""LLaVA JSON/JSONL + image folder -> Parquet files or WebDataset tar shards with the images
embedded (what ``vlm-adapters convert-data`` runs).

Each sample passes the checks training makes before it starts (turns, image paths inside the
image folder, images whole, one ``<image>`` marker per image); a bad one is listed in
``OUT/skipped.jsonl`` and counted. Shards are written whole (a temporary file renamed) and
recorded in ``OUT/conversion.json`` after each one, so a rerun continues after the last
complete shard. Nothing but ``OUT`` is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from vlm_adapters._io import atomic_write_text, remove_stale_temps, temp_name
from vlm_adapters.chat.templates import IMAGE_MARKER, normalize_turns, with_image_markers
from vlm_adapters.data.images import ImageProblem, confined_path, open_image
from vlm_adapters.data.records import (
    BadSample,
    Skipped,
    checked_turns,
    image_paths,
    load_records,
    sample_id,
)
from vlm_adapters.errors import ConfigError, OutputError

OutFormat = Literal["parquet", "webdataset"]
STATE = "conversion.json"
SKIPPED = "skipped.jsonl"
SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}
ROLE_NAMES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversion:
    """What a conversion wrote: samples, shard files and skipped samples (all runs)."""

    out: Path
    samples: int
    shards: list[str]
    skipped: int


@dataclass
class _Shard:
    rows: list[dict[str, Any]]
    size: int = 0


def convert(
    source: str | Path,
    image_root: str | Path,
    out: str | Path,
    *,
    format: OutFormat = "parquet",
    shard_size: int | None = None,
    shard_bytes: int | None = None,
    progress: bool = True,
) -> Conversion:
    """Convert the LLaVA file ``source`` (images under ``image_root``) into shards of at most
    ``shard_size`` samples (default 1000) or about ``shard_bytes`` bytes in ``out``; a rerun
    with the same arguments continues an interrupted one."""
    if format not in SUFFIX:
        raise ConfigError(f"format {format!r}: choose parquet or webdataset")
    source, root = Path(source), Path(image_root)
    if not root.is_dir():
        raise ConfigError(f"--image-root: {root} is not a directory")
    records = load_records(source)
    if format == "parquet":
        _features()  # needs `datasets`: one error line now, not after the first shard
    settings = {
        "source": str(source.resolve()),
        "source_sha256": _sha256(source),
        "image_root": str(root.resolve()),
        "format": format,
        "shard_size": shard_size if shard_size or shard_bytes else 1000,
        "shard_bytes": shard_bytes,
    }
    out = _checked_out(Path(out), settings, [source, root])
    out.mkdir(parents=True, exist_ok=True)
    state = _read_state(out) or {**settings, "shards": [], "next": 0, "skipped": []}
    writer = _write_parquet if format == "parquet" else _write_tar
    bar = tqdm(total=len(records), initial=state["next"], disable=not progress, unit="sample")
    with bar:
        for shard, end, skipped in _shards(records, root, state, settings):
            if shard.rows:
                name = f"shard-{len(state['shards']):05d}{SUFFIX[format]}"
                _atomic(
                    out / name, lambda path, rows=shard.rows, name=name: writer(rows, path, name)
                )
                state["shards"].append({"file": name, "samples": len(shard.rows), "end": end})
            state["skipped"] += [s.to_json() for s in skipped]
            bar.update(end - state["next"])
            state["next"] = end
            _save_state(out, state)
    return Conversion(
        out,
        sum(s["samples"] for s in state["shards"]),
        [s["file"] for s in state["shards"]],
        len(state["skipped"]),
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked_out(out: Path, settings: dict[str, Any], inputs: list[Path]) -> Path:
    """``out`` (resolved), refused when it overlaps an input, holds files this command did
    not write, or a conversion with other settings."""
    out = out.expanduser().resolve()
    for given in inputs:
        path = given.resolve()
        if out == path or path in out.parents or out in path.parents:
            raise OutputError(f"--out {out} overlaps the input {path}; write to a separate folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; choose a folder")
    if out.is_dir():
        remove_stale_temps(out)  # shards an interrupted run left half written
    if not out.is_dir() or not any(out.iterdir()):
        return out
    state = _read_state(out)
    if state is None:
        raise OutputError(
            f"--out {out} holds files convert-data did not write; choose an empty or new folder"
        )
    ours = {STATE, SKIPPED, *(s["file"] for s in state["shards"])}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise OutputError(
            f"--out {out} holds {foreign[0]!r}, which convert-data did not write; move it away "
            "or choose another folder"
        )
    changed = [key for key, value in settings.items() if state.get(key) != value]
    if changed:
        raise OutputError(
            f"--out {out} holds a conversion with another {changed[0]} ({state.get(changed[0])!r}"
            f", now {settings[changed[0]]!r}); rerun it as it was, or choose another folder"
        )
    return out


def _read_state(out: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("shards"), list) else None


def _save_state(out: Path, state: dict[str, Any]) -> None:
    """The skipped list, then the state that counts on it (each replaced whole)."""
    lines = "".join(json.dumps(s) + "\n" for s in state["skipped"])
    atomic_write_text(out / SKIPPED, lines)
    atomic_write_text(out / STATE, json.dumps(state, indent=1))


def _atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename onto ``path``: a shard is whole or absent."""
    tmp = path.parent / temp_name(path.name, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shards(
    records: Any, root: Path, state: Mapping[str, Any], settings: Mapping[str, Any]
) -> Iterator[tuple[_Shard, int, list[Skipped]]]:
    """From sample ``state["next"]`` on: each shard's rows, the index after its last sample,
    and the samples skipped on the way."""
    size, limit = settings["shard_size"], settings["shard_bytes"]
    shard, skipped = _Shard([]), []
    for index in range(state["next"], len(records)):
        record = records[index]
        try:
            row, nbytes = sample_row(record, index, root)
        except BadSample as bad:
            name = sample_id(record, index)
            skipped.append(Skipped(name, bad.reason, bad.detail, index, settings["source"]))
        else:
            shard.rows.append(row)
            shard.size += nbytes
        if (size and len(shard.rows) >= size) or (limit and shard.size >= limit):
            yield shard, index + 1, skipped
            shard, skipped = _Shard([]), []
    if shard.rows or skipped:
        yield shard, len(records), skipped


def sample_row(record: Mapping[str, Any], index: int, root: Path) -> tuple[dict[str, Any], int]:
    """The TRL row (``id``, ``messages``, ``images`` as ``{"bytes", "path"}``) of one checked
    LLaVA record, and its size in bytes; a BadSample when training would skip it."""
    turns = checked_turns(record)
    paths = image_paths(record)
    turns = with_image_markers(turns, len(paths))
    markers = sum(str(turn.get("value", "")).count(IMAGE_MARKER) for turn in turns)
    if markers != len(paths):
        raise BadSample(
            "image marker mismatch", f"{markers} {IMAGE_MARKER} markers but {len(paths)} images"
        )
    images = [_image_bytes(root, path) for path in paths]
    messages = [
        {"role": ROLE_NAMES[role], "content": _parts(text)} for role, text in normalize_turns(turns)
    ]
    row = {"id": sample_id(record, index), "messages": messages, "images": images}
    return row, sum(len(image["bytes"]) for image in images) + len(json.dumps(messages))


def _parts(text: str) -> list[dict[str, str | None]]:
    """A turn's text as TRL content parts, an image part where each marker stood."""
    parts: list[dict[str, str | None]] = []
    for number, piece in enumerate(text.split(IMAGE_MARKER)):
        if number:
            parts.append({"type": "image", "text": None})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _image_bytes(root: Path, relative: str) -> dict[str, Any]:
    """The file's bytes after checking it decodes whole (as training would)."""
    try:
        path = confined_path(root, relative)
        open_image(path)
    except ImageProblem as problem:
        raise BadSample(problem.reason, problem.detail) from None
    return {"bytes": path.read_bytes(), "path": relative}


def _features() -> Any:
    from vlm_adapters.data.sources import require_datasets

    datasets = require_datasets()
    text = datasets.Value("string")
    part = {"type": text, "text": text}
    message = {"role": text, "content": datasets.List(part)}
    return datasets.Features(
        {"id": text, "messages": datasets.List(message), "images": datasets.List(datasets.Image())}
    )


def _write_parquet(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    """Rows as Parquet with `datasets` features in the schema (images: ``datasets.Image``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_features().arrow_schema)
    pq.write_table(table, path)


def _write_tar(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    """Rows as the WebDataset shard ``name``: ``KEY.json`` + ``KEY.0.<ext>`` ... (keys: the
    shard's name and the row's number; docs/data.md)."""
    with tarfile.open(path, "w") as archive:
        for number, row in enumerate(rows):
            key = f"{Path(name).stem}-{number:06d}"
            meta = {"id": row["id"], "messages": row["messages"]}
            _add_member(archive, f"{key}.json", json.dumps(meta).encode())
            for index, image in enumerate(row["images"]):
                ext = Path(image["path"]).suffix.lower().lstrip(".") or "img"
                _add_member(archive, f"{key}.{index}.{ext}", image["bytes"])


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))
