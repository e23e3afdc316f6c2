"""Streamed training data (``data.<stage>.streaming``): the order, every sample once per epoch
on any number of processes and loader workers, exact resume after a kill, bad shards."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from torch.utils.data import DataLoader

from vlm_adapters.data.streaming import (
    StreamDataset,
    StreamPlan,
    find_shards,
    read_shards,
    shard_rows,
)
from vlm_adapters.errors import ConfigError, DataError

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from shards import stream_config, write_parquet_shards, write_tar_shards  # noqa: E402
from tiny_train import max_weight_diff, write_tiny_config  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]], Path]:
    """The tiny config's text, its 13 finetune records and their image folder."""
    root = tmp_path_factory.mktemp("tiny")
    config = write_tiny_config(root, num_train=13)
    raw = yaml.safe_load(config.read_text())
    records = json.loads(Path(raw["data"]["finetune"]["path"]).read_text())
    return config.read_text(), records, Path(raw["data"]["finetune"]["image_root"])


def _plan(shards: list[Path], buffer: int, batch_size: int = 2, **options: Any) -> StreamPlan:
    found = read_shards(find_shards(",".join(map(str, shards))))
    return StreamPlan(found, 0, buffer, batch_size, options.get("max_tokens"), _words)


def _words(record: dict[str, Any]) -> int:
    return sum(len(str(turn.get("value", "")).split()) for turn in record["conversations"])


def _ids(plan: StreamPlan, epoch: int) -> list[str]:
    return [sample.record["id"] for sample in plan.samples(epoch)]


def test_no_shuffle_buffer_streams_in_file_order_and_a_buffer_shuffles_per_epoch(tiny, tmp_path):
    _, records, images = tiny
    ids = [r["id"] for r in records]
    parquet = write_parquet_shards(records, images, tmp_path / "pq", per_shard=5)
    tar = write_tar_shards(records, images, tmp_path / "tar", per_shard=4)
    for shards in (parquet, tar):
        assert len(shards) >= 3
        assert _ids(_plan(shards, 0), 0) == ids == _ids(_plan(shards, 0), 2)
        shuffled = _plan(shards, 4)
        first, second = _ids(shuffled, 0), _ids(shuffled, 1)
        assert sorted(first) == sorted(second) == sorted(ids)
        assert first != ids and first != second
        assert _ids(shuffled, 0) == first  # fixed by (seed, epoch)


class _Indices:
    """An encoder that gives a sample's stream index (no model needed)."""

    def encode(self, record: dict[str, Any], index: int, source: str) -> int:
        return index


def _collate(items: list[int]) -> dict[str, Any]:
    return {"items": items, "labels": torch.zeros((len(items), 2), dtype=torch.long)}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _epoch(plan: StreamPlan, world: int, workers: int, epoch: int, skip: int = 0) -> list[list]:
    """Each process's micro-batches (their sample indices; [] for a filler) in ``epoch``."""
    out = []
    for rank in range(world):
        stream = StreamDataset(plan, _Indices(), _collate, rank, world)  # type: ignore[arg-type]
        stream.epoch, stream.skip = epoch, skip
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is)
        got = list(loader)
        for batch in got:  # a filler: the samples of process 0's last batch, with no labels
            filler = not batch["samples"]
            assert filler == bool((batch["labels"] == -100).all()) and batch["items"]
            assert filler or batch["items"] == batch["samples"]
        batches = [batch["samples"] for batch in got]
        assert len(batches) == stream.batches(epoch) - skip
        out.append(batches)
    return out


@pytest.mark.parametrize(("world", "workers", "max_tokens"), [(2, 2, None), (3, 0, 40)])
def test_every_sample_is_seen_once_per_epoch_on_every_process_count(
    tiny, tmp_path, world, workers, max_tokens
):
    """13 samples over ``world`` processes, each with ``workers`` loader workers: every epoch
    gives each sample to exactly one process once; the processes take equal steps (a filler
    without labels where the last round has none); a resumed epoch is the uninterrupted one's
    tail."""
    _, records, images = tiny
    shards = write_parquet_shards(records, images, tmp_path / "pq", per_shard=4)
    plan = _plan(shards, 3, max_tokens=max_tokens)
    for epoch in range(3):
        per_process = _epoch(plan, world, workers, epoch)
        seen = Counter(i for batches in per_process for batch in batches for i in batch)
        assert seen == Counter(range(len(records)))
        assert len({len(batches) for batches in per_process}) == 1
        resumed = _epoch(plan, world, workers, epoch, skip=1)
        assert resumed == [batches[1:] for batches in per_process]


def test_bad_shards_are_one_clear_error_naming_the_shard(tiny, tmp_path):
    from vlm_adapters.training import train

    _, records, images = tiny
    tar = write_tar_shards(records, images, tmp_path / "tar", per_shard=7)
    data = tar[1].read_bytes()
    tar[1].write_bytes(data[: len(data) // 2 // 512 * 512])  # cut at a block boundary
    with pytest.raises(DataError, match=rf"shard {tar[1]}: truncated or corrupt tar after"):
        read_shards([str(p) for p in tar])
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"id": ["a"], "turns": ["[]"]}), missing)
    no_turns = rf"shard {missing}: no conversations \(LLaVA\) or messages \(TRL\) column"
    with pytest.raises(DataError, match=no_turns):
        read_shards([str(missing)])
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"shard {broken}: not a readable Parquet file"):
        read_shards([str(broken)])
    with pytest.raises(DataError, match="no shard file there"):
        find_shards(str(tmp_path / "none-*.parquet"))
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny[0])
    stream_config(config, "finetune", f"{tar[1]},{tmp_path / 'none-*.tar'}")
    refused = rf"^{config}: data.finetune.path: '.*none-\*.tar': no shard file there"
    with pytest.raises(ConfigError, match=refused):
        train(config, "finetune", tmp_path / "out", fresh_connector=True)
    assert not (tmp_path / "out").exists()  # refused before the run directory is made
    intact = read_shards([str(tar[0])])[0]
    tar[0].write_bytes(tar[0].read_bytes()[:3000])  # damaged after the stage started
    with pytest.raises(DataError, match=rf"shard {tar[0]}: unreadable after row 1 .*\); write"):
        list(shard_rows(intact))


def _corrupt_png(tar: Path, member: str) -> None:
    """Rewrite ``member`` of ``tar`` as bytes that are no image."""
    out = io.BytesIO()
    with tarfile.open(tar) as source, tarfile.open(fileobj=out, mode="w") as target:
        for info in source:
            data = source.extractfile(info).read()  # type: ignore[union-attr]
            data = b"\x89PNG\r\n\x1a\n broken" if info.name == member else data
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    tar.write_bytes(out.getvalue())


def test_a_stream_trains_text_only_multi_image_with_or_without_a_cache_and_skips_a_bad_image(
    tiny, tmp_path
):
    from vlm_adapters.training import train

    text, records, images = tiny
    first = records[0]["image"]
    extra = [
        {
            "id": 100,
            "conversations": [
                {"from": "human", "value": "say hi"},
                *records[1]["conversations"][1:2],
            ],
        },
        {
            "id": "two-images",
            "image": [first, records[1]["image"]],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nhow many pictures?"},
                {"from": "gpt", "value": "two"},
            ],
        },
    ]
    tar = write_tar_shards(records + extra, images, tmp_path / "tar", per_shard=5)
    _corrupt_png(tar[0], "s000003.0.png")
    config = tmp_path / "tiny.yaml"
    config.write_text(text)
    stream_config(config, "finetune", str(tmp_path / "tar" / "*.tar"), max_skip_fraction=0.2)
    result = train(config, "finetune", tmp_path / "out", fresh_connector=True)
    assert result.summary["finetune"]["steps"] == 4  # 15 samples, batch size 4
    skipped = [json.loads(line) for line in (tmp_path / "out/finetune/skipped.jsonl").open()]
    assert [(s["id"], s["index"], s["reason"], s["file"]) for s in skipped] == [
        (records[3]["id"], 3, "image unreadable", str(tar[0]))
    ]
    # the feature cache keys on the embedded bytes: one entry per distinct usable image, and
    # training from it gives the losses of training from pixels
    cache = ["stages.finetune.feature_cache=" + str(tmp_path / "cache")]
    train(config, "finetune", tmp_path / "cached", overrides=cache, fresh_connector=True)
    usable = {(images / r["image"]).read_bytes() for n, r in enumerate(records) if n != 3}
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == len(usable)
    losses = {}
    for run in ("out", "cached"):
        lines = (tmp_path / run / "finetune" / "metrics.jsonl").read_text().splitlines()
        losses[run] = [json.loads(line)["loss"] for line in lines]
    assert losses["cached"] == pytest.approx(losses["out"], abs=1e-5)
    skipped = [json.loads(line) for line in (tmp_path / "cached/finetune/skipped.jsonl").open()]
    assert [(s["id"], s["reason"]) for s in skipped] == [
        (records[3]["id"], "feature cache entry unusable")
    ]


def _batches(prefix: Path) -> dict[str, dict[str, Any]]:
    """Every recorded micro-batch (``tiny_train.py --record-batches``), by file name."""
    found = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}.*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            samples = json.loads((handle.metadata() or {})["samples"])
        found[path.name[len(prefix.name) :]] = {"tensors": tensors, "samples": samples}
    return found


def test_a_killed_two_process_streaming_run_with_packing_resumes_exactly(tiny, tmp_path):
    """Two processes, two loader workers each, packing, 3 epochs of 13 streamed samples (7
    micro-batches an epoch: the last round gives process 1 a filler without labels). SIGKILL
    process 0 after the mid-epoch step-5 checkpoint; a one-process resume is refused; the
    two-process resume trains on batches torch.equal to the uninterrupted run's and ends
    bitwise equal. Every sample is seen exactly once per epoch."""
    text, records, images = tiny
    write_parquet_shards(records, images, tmp_path / "pq", per_shard=4)
    config = tmp_path / "tiny.yaml"
    config.write_text(text)
    stream_config(
        config, "finetune", str(tmp_path / "pq" / "*.parquet"), packing=True, shuffle_buffer=5,
        num_workers=2,
    )  # fmt: skip
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    args = ["--stage", "finetune", "--fresh-connector", "stages.finetune.epochs=3"]
    args += ["stages.finetune.batch_size=2", "run.save_every=5"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    record = ["--world", "2", "--record-batches"]
    kill = ["--kill-in", "vlm_adapters.training.engine:prune_checkpoints", "--kill-rank", "0"]
    run = [*TORCHRUN, *script]
    subprocess.run(
        [*run, str(reference), *args, *record, str(tmp_path / "ref")],
        check=True,
        env=ENV,
        timeout=300,
    )
    crashed = subprocess.run(
        [*run, str(killed), *args, *record, str(tmp_path / "run"), *kill], env=ENV, timeout=300
    )
    assert crashed.returncode != 0
    assert [p.name for p in (killed / "finetune" / "checkpoints").iterdir()] == ["step-000005"]
    one = [sys.executable, *script, str(killed), *args, "--resume", "auto"]
    refused = subprocess.run(one, env=ENV, timeout=300, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "streamed to 2 processes, and this run has 1; resume on 2 processes" in refused.stderr
    resume = [*run, str(killed), *args, *record, str(tmp_path / "run"), "--resume", "auto"]
    subprocess.run(resume, check=True, env=ENV, timeout=300)

    expected, got = _batches(tmp_path / "ref"), _batches(tmp_path / "run")
    assert got.keys() == expected.keys() and len(expected) == 2 * 12  # 4 steps an epoch
    for name, batch in expected.items():
        assert got[name]["samples"] == batch["samples"], name
        assert batch["tensors"].keys() == got[name]["tensors"].keys()
        assert all(torch.equal(v, got[name]["tensors"][k]) for k, v in batch["tensors"].items())
    for epoch in range(3):
        steps = {
            f".{rank}.{step:04d}.0" for rank in (0, 1) for step in range(4 * epoch, 4 * epoch + 4)
        }
        seen = Counter(i for name in steps for i in expected[f"{name}.safetensors"]["samples"])
        assert seen == Counter(range(len(records)))
    final = "finetune/final"
    assert max_weight_diff(killed / final, reference / final) == 0.0


def test_a_bad_sample_met_in_a_loader_worker_with_on_bad_sample_error_is_one_line(tiny, tmp_path):
    from vlm_adapters.training import train

    text, records, images = tiny
    tar = write_tar_shards(records, images, tmp_path / "tar", per_shard=5)
    _corrupt_png(tar[1], "s000006.0.png")
    config = tmp_path / "tiny.yaml"
    config.write_text(text)
    pattern = str(tmp_path / "tar" / "*.tar")
    stream_config(config, "finetune", pattern, on_bad_sample="error", num_workers=1)
    with pytest.raises(DataError) as error:
        train(config, "finetune", tmp_path / "out", fresh_connector=True)
    assert str(error.value).startswith(f"{tar[1]}: sample {records[6]['id']!r} (index 6): image")
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


def test_cache_features_fills_a_streamed_stage_from_its_shards(tiny, tmp_path, capsys):
    from vlm_adapters.cli import main

    text, records, images = tiny
    write_parquet_shards(records, images, tmp_path / "pq", per_shard=5)
    config = tmp_path / "tiny.yaml"
    config.write_text(text)
    stream_config(config, "finetune", str(tmp_path / "pq" / "*.parquet"))
    cache = f"stages.finetune.feature_cache={tmp_path / 'cache'}"
    assert main(["cache-features", str(config), "--stage", "finetune", cache]) == 0
    distinct = {(images / r["image"]).read_bytes() for r in records}
    assert f"{len(distinct)} computed" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == len(distinct)
    main(["cache-features", str(config), "--stage", "finetune", cache])
    reused = f"0 computed (0 replaced broken entries), {len(distinct)} reused"
    assert reused in capsys.readouterr().out


def test_shards_whose_schemas_differ_give_the_same_records(tiny, tmp_path):
    """Ids as text or integers, turns as JSON text or a list, images as bytes, a
    ``{"bytes", "path"}`` struct or a list, and a shard without an image column (text only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, records, images = tiny
    turns = records[0]["conversations"]
    picture = (images / records[0]["image"]).read_bytes()
    text_only = [{"from": "human", "value": "say hi"}, {"from": "gpt", "value": "hi"}]
    tables = [
        {"id": ["a"], "conversations": [json.dumps(turns)], "image": [picture]},
        {"id": [7], "conversations": [turns], "image": [{"bytes": picture, "path": "x.png"}]},
        {"id": ["b"], "conversations": [json.dumps(turns)], "image": [[picture, picture]]},
        {"id": [8], "conversations": [json.dumps(text_only)]},
    ]
    paths = []
    for number, table in enumerate(tables):
        paths.append(tmp_path / f"s{number}.parquet")
        pq.write_table(pa.table(table), paths[-1])
    got = [sample.record for sample in _plan(paths, 0).samples(0)]
    assert got == [
        {"id": "a", "conversations": turns, "image": picture},
        {"id": 7, "conversations": turns, "image": picture},
        {"id": "b", "conversations": turns, "image": [picture, picture]},
        {"id": 8, "conversations": text_only},
    ]


def test_a_resumed_position_inside_an_epoch_needs_the_same_process_count(tiny, tmp_path):
    """13 samples in micro-batches of 2: 7 an epoch, 4 per process on 2 processes."""
    from vlm_adapters.training.checkpoint import Position
    from vlm_adapters.training.streaming import StreamLoader, resume_stream

    _, records, images = tiny
    plan = _plan(write_parquet_shards(records, images, tmp_path / "pq", per_shard=5), 3)

    def loader(world: int) -> StreamLoader:
        stream = StreamDataset(plan, _Indices(), _collate, 0, world)  # type: ignore[arg-type]
        return StreamLoader(stream, 0, torch.device("cpu"))

    inside = Position(step=2, epoch=1, batches_in_epoch=2, world=2)
    resume_stream(loader(2), inside)
    assert (inside.epoch, inside.batches_in_epoch, inside.world) == (1, 2, 2)
    with pytest.raises(ConfigError, match="streamed to 2 processes, and this run has 1"):
        resume_stream(loader(1), Position(step=2, epoch=1, batches_in_epoch=2, world=2))
    at_end = Position(step=4, epoch=0, batches_in_epoch=4, world=2)
    resume_stream(loader(1), at_end)  # the epoch is done: the next starts on any count
    assert (at_end.epoch, at_end.batches_in_epoch, at_end.world) == (1, 0, 1)
