"""WebDataset tar shards, map-style: each shard's members indexed once (names, offsets,
sizes; no data read), a sample's members read when it is used.

A sample is the members sharing a key (the name up to its first dot): ``KEY.json`` holds the
row without its images (TRL's ``messages`` or LLaVA's ``conversations``, and ``id``), and
``KEY.0.png``, ``KEY.1.jpg`` ... its images in order (any image extension). Samples may hold
different numbers of images (none: text-only), which `datasets`' own WebDataset reader refuses
(it needs the same members in every sample).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

from vlm_adapters.data.records import BadSample
from vlm_adapters.data.rows import to_record
from vlm_adapters.errors import DataError

_IMAGE = re.compile(r"^(\d+)\.[A-Za-z0-9]+$")


class TarRecords(Sequence[dict[str, Any]]):
    """The samples of WebDataset tar ``files``, in file and member order."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self.samples: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for number, file in enumerate(self.files):
            self.samples += [(number, key, fields) for key, fields in index_tar(file)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        number, key, fields = self.samples[index]
        where = f"{self.files[number]} sample {key!r}"
        with open(self.files[number], "rb") as file:
            members = {name: _read(file, *span) for name, span in fields.items()}
        return to_record(sample_row(members, where), where)

    def origin(self, index: int) -> str:
        """The shard and key of sample ``index``, for messages."""
        number, key, _ = self.samples[index]
        return f"{self.files[number]} sample {key!r}"


def _read(file: Any, offset: int, size: int) -> bytes:
    file.seek(offset)
    return file.read(size)


def sample_row(members: dict[str, bytes], where: str) -> dict[str, Any]:
    """The row of one sample's members (``json`` + numbered images)."""
    if "json" not in members:
        raise BadSample("bad row", f"{where}: no .json member")
    try:
        row = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as error:
        raise BadSample("bad row", f"{where}: its .json is not JSON ({error})") from None
    if not isinstance(row, dict):
        raise BadSample("bad row", f"{where}: its .json must hold an object")
    numbered = sorted(
        (int(match.group(1)), name) for name in members if (match := _IMAGE.match(name))
    )
    if [n for n, _ in numbered] != list(range(len(numbered))):
        raise BadSample("bad row", f"{where}: images must be numbered 0, 1, ... without gaps")
    images = [members[name] for _, name in numbered] or None
    row["images" if "messages" in row else "image"] = images
    return row


def index_tar(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``(key, {field: (offset, size)})`` of each sample of a tar shard, in member order; a
    DataError naming the shard (and the last whole sample) when it is not a whole tar."""
    size = os.path.getsize(path)
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                _add(samples, member, path, size)
            _check_end(archive, samples, path)
    except tarfile.TarError as error:
        last = f" after sample {samples[-1][0]!r}" if samples else ""
        raise DataError(
            f"{path}: not a whole tar file{last} ({error}); re-create the shard"
        ) from None
    return samples


def _check_end(
    archive: tarfile.TarFile, samples: list[tuple[str, dict[str, tuple[int, int]]]], path: str
) -> None:
    """A whole tar ends with a zero block after its last member (tarfile reads a cut header
    as the end)."""
    assert archive.fileobj is not None
    archive.fileobj.seek(archive.offset)
    if archive.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        last = f" after sample {samples[-1][0]!r}" if samples else ""
        raise DataError(f"{path}: truncated{last} (no end-of-archive block); re-create the shard")


def _add(
    samples: list[tuple[str, dict[str, tuple[int, int]]]],
    member: tarfile.TarInfo,
    path: str,
    size: int,
) -> None:
    if member.offset_data + member.size > size:
        last = f" after sample {samples[-1][0]!r}" if samples else ""
        raise DataError(
            f"{path}: truncated{last} (member {member.name!r} runs past the end of the file); "
            "re-create the shard"
        )
    base = member.name.rsplit("/", 1)[-1]
    prefix = member.name[: len(member.name) - len(base)]
    key, dot, field = base.partition(".")
    if not dot:
        return
    key = prefix + key
    if not samples or samples[-1][0] != key:
        samples.append((key, {}))
    samples[-1][1][field] = (member.offset_data, member.size)
