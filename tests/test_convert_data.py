"""``vlm-adapters convert-data``: LLaVA JSON + images -> Parquet / WebDataset shards, bad samples
listed, resumable, inputs untouched, foreign output folders refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlm_adapters.cli import main
from vlm_adapters.data import convert as convert_module
from vlm_adapters.data.convert import convert
from vlm_adapters.data.sources import open_source
from vlm_adapters.demo import generate_shapes
from vlm_adapters.errors import OutputError

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` converts Parquet files into its cache: a temporary one here."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


TEXT_ONLY = [{"from": "human", "value": "what colour ?"}, {"from": "gpt", "value": "red"}]
BAD = {"gone": "image missing", "broken": "image unreadable", "escape": "image outside image_root"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A LLaVA JSON of 8 image samples, a text-only one (int id), a two-image one, and three
    bad ones (missing, corrupt and escaping images); returns (file, image folder)."""
    shapes = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_eval=1)
    records = json.loads(shapes.finetune.read_text())
    (shapes.root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    two = [records[0]["image"], records[1]["image"]]
    turns = [{"from": "human", "value": "<image>\n<image>\nsame ?"}, {"from": "gpt", "value": "no"}]
    records += [
        {"id": 9, "conversations": TEXT_ONLY},
        {"id": "two", "image": two, "conversations": turns},
        {"id": "gone", "image": "images/nope.png", "conversations": TEXT_ONLY},
        {"id": "broken", "image": "images/broken.png", "conversations": TEXT_ONLY},
        {"id": "escape", "image": "../../etc/passwd", "conversations": TEXT_ONLY},
    ]
    path = shapes.root / "mixed.json"
    path.write_text(json.dumps(records))
    return path, shapes.root


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("format", ["parquet", "webdataset"])
def test_convert_data_writes_shards_lists_bad_samples_and_leaves_inputs_alone(
    source: tuple[Path, Path], tmp_path: Path, format: str, capsys: pytest.CaptureFixture
) -> None:
    path, root = source
    before = _hashes(root)
    out = tmp_path / "out"
    argv = ["convert-data", str(path), "--image-root", str(root), "--out", str(out)]
    assert main([*argv, "--format", format, "--shard-size", "4"]) == 0
    printed = capsys.readouterr()
    assert (
        f"10 samples in 3 {format} shards; 3 skipped, listed in {out}/skipped.jsonl" in printed.out
    )
    assert "sample" in printed.err  # the progress bar
    assert _hashes(root) == before
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"]: s["reason"] for s in skipped} == BAD
    assert all(s["file"] == str(path.resolve()) for s in skipped)
    records = open_source(str(out))
    assert [str(records[i].get("id")) for i in range(len(records))][-2:] == ["9", "two"]
    assert "image" not in records[8] and len(records[9]["image"]) == 2
    first = records[0]["image"]
    first = first[0] if isinstance(first, list) else first
    with Image.open(root / json.loads(path.read_text())[0]["image"]) as original:
        assert first.convert("RGB").tobytes() == original.convert("RGB").tobytes()
    assert records[9]["conversations"][0]["value"] == "<image>\n<image>\nsame ?"


def test_convert_data_by_bytes_and_the_tar_layout(
    source: tuple[Path, Path], tmp_path: Path
) -> None:
    import tarfile

    path, root = source
    done = convert(path, root, tmp_path / "out", format="webdataset", shard_bytes=1, progress=False)
    assert done.samples == 10 and len(done.shards) == 10  # each sample fills a shard
    with tarfile.open(tmp_path / "out" / done.shards[-1]) as archive:
        names = archive.getnames()
    assert names == [
        "shard-00009-000000.json",
        "shard-00009-000000.0.png",
        "shard-00009-000000.1.png",
    ]


@pytest.mark.parametrize("format", ["parquet", "webdataset"])
def test_an_interrupted_conversion_continues_after_its_last_complete_shard(
    source: tuple[Path, Path], tmp_path: Path, format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, root = source
    whole = convert(path, root, tmp_path / "whole", format=format, shard_size=3, progress=False)
    writer_name = "_write_parquet" if format == "parquet" else "_write_tar"
    real = getattr(convert_module, writer_name)
    calls: list[str] = []

    def failing(rows: list[dict[str, Any]], target: Path, name: str) -> None:
        calls.append(name)
        if len(calls) == 3:
            target.write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real(rows, target, name)

    out = tmp_path / "out"
    monkeypatch.setattr(convert_module, writer_name, failing)
    with pytest.raises(KeyboardInterrupt):
        convert(path, root, out, format=format, shard_size=3, progress=False)
    state = json.loads((out / "conversion.json").read_text())
    assert [s["file"] for s in state["shards"]] == whole.shards[:2]
    assert sorted(p.name for p in out.iterdir()) == [
        "conversion.json",
        *whole.shards[:2],
        "skipped.jsonl",
    ]
    kept = {name: (out / name).stat().st_mtime_ns for name in whole.shards[:2]}
    monkeypatch.setattr(convert_module, writer_name, real)
    again = convert(path, root, out, format=format, shard_size=3, progress=False)
    assert again == convert_module.Conversion(out, whole.samples, whole.shards, whole.skipped)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    for name in whole.shards:
        assert _table(out / name, format) == _table(tmp_path / "whole" / name, format)
    assert (out / "skipped.jsonl").read_text() == (tmp_path / "whole" / "skipped.jsonl").read_text()


def _table(path: Path, format: str) -> Any:
    if format == "webdataset":
        return path.read_bytes()
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_convert_data_refuses_foreign_changed_or_overlapping_outputs(
    source: tuple[Path, Path], tmp_path: Path
) -> None:
    path, root = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files convert-data did not write"):
        convert(path, root, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    done = convert(path, root, tmp_path / "ours", shard_size=4, progress=False)
    with pytest.raises(OutputError, match="conversion with another shard_size"):
        convert(path, root, done.out, shard_size=5, progress=False)
    (done.out / "extra.parquet").write_bytes(b"")
    with pytest.raises(OutputError, match="holds 'extra.parquet', which convert-data did not"):
        convert(path, root, done.out, shard_size=4, progress=False)
    with pytest.raises(OutputError, match="overlaps the input"):
        convert(path, root, root / "converted", progress=False)
    assert not (root / "converted").exists()


def test_a_half_written_shard_of_a_killed_run_is_cleared_first(
    source: tuple[Path, Path], tmp_path: Path
) -> None:
    import socket
    import subprocess

    path, root = source
    ended = subprocess.Popen(["true"])  # a process that has ended
    ended.wait()  # (not os.waitpid: a library's reaper thread may have collected it already)
    pid = ended.pid
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".shard-00000.tar.tmp-{socket.gethostname()}-{pid}-0000abcd"
    stale.write_bytes(b"half a shard")
    done = convert(path, root, out, format="webdataset", progress=False)
    assert done.samples == 10 and not stale.exists()
