"""Test shards written from LLaVA records: Parquet (id, conversations as JSON, image as
bytes) and WebDataset tar (key.json + key.N.<ext>), images embedded."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import yaml


def _image_list(record: dict[str, Any]) -> list[str]:
    image = record.get("image")
    return [] if image is None else image if isinstance(image, list) else [image]


def write_parquet_shards(
    records: list[dict[str, Any]], image_root: Path, out: Path, per_shard: int, row_group: int = 2
) -> list[Path]:
    """Single-image or text-only records as Parquet shards of ``per_shard`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(records), per_shard)):
        chunk = records[start : start + per_shard]
        images = [_image_list(r) for r in chunk]
        table = pa.table(
            {
                "id": [str(r.get("id")) for r in chunk],
                "conversations": [json.dumps(r["conversations"]) for r in chunk],
                "image": [(image_root / i[0]).read_bytes() if i else None for i in images],
            }
        )
        path = out / f"train-{number:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        paths.append(path)
    return paths


def write_tar_shards(
    records: list[dict[str, Any]], image_root: Path, out: Path, per_shard: int
) -> list[Path]:
    """Records (any number of images) as WebDataset tar shards of ``per_shard`` samples."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(records), per_shard)):
        path = out / f"train-{number:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for offset, record in enumerate(records[start : start + per_shard]):
                key = f"s{start + offset:06d}"
                meta = {k: v for k, v in record.items() if k != "image"}
                _add(archive, f"{key}.json", json.dumps(meta).encode())
                for n, name in enumerate(_image_list(record)):
                    suffix = Path(name).suffix
                    _add(archive, f"{key}.{n}{suffix}", (image_root / name).read_bytes())
        paths.append(path)
    return paths


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def stream_config(config: Path, stage: str, pattern: str, **data: Any) -> Path:
    """Point ``stage`` of the tiny config at streamed shards ``pattern`` (``data``: more
    ``data.*`` settings)."""
    raw = yaml.safe_load(config.read_text())
    raw["data"][stage]["path"] = pattern
    raw["data"][stage]["streaming"] = True
    raw["data"] |= data
    config.write_text(yaml.safe_dump(raw))
    return config
