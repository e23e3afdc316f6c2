"""Data sources: the same samples from LLaVA JSON, Parquet (written by convert-data), WebDataset
shards (map-style and streamed) and a saved TRL dataset give the same items and losses; rows
normalised by `to_record`; mixtures; and bad sources (corrupt image member, missing column,
schema drift, truncated tar)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

import vlm_adapters
from vlm_adapters.chat.templates import with_image_markers
from vlm_adapters.data.convert import convert
from vlm_adapters.data.records import BadSample
from vlm_adapters.data.sources import Mixture, detect_format, open_source, to_record
from vlm_adapters.data.streaming import StreamPlan, find_shards, read_shards
from vlm_adapters.errors import ConfigError, DataError, InstallError
from vlm_adapters.training.config import load_train_config
from vlm_adapters.training.data import checked_dataset, read_stage_records

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_train import TEXT_ONLY, write_tiny_config  # noqa: E402

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:  # noqa: ANN001
    """`datasets` converts Parquet/Arrow files into its cache: a temporary one here."""
    cache = tmp_path_factory.getbasetemp() / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def _png(colour: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny config whose finetune data (LLaVA JSON) holds image, text-only (no `image`
    key) and two-image samples with int and str ids, and the same data as Parquet and
    WebDataset shards made by convert-data."""
    root = tmp_path_factory.mktemp("sources")
    config = write_tiny_config(root, num_train=8)
    raw = yaml.safe_load(config.read_text())
    finetune = raw["data"]["finetune"]
    records = json.loads(Path(finetune["path"]).read_text())
    images = [records[0]["image"], records[1]["image"]]
    records[2]["id"] = 7
    records[3:3] = [
        {"id": 100, "conversations": TEXT_ONLY},
        {
            "id": "two",
            "image": images,
            "conversations": [
                {"from": "human", "value": "<image> <image>\nwhat colour is the circle ?"},
                {"from": "gpt", "value": "red"},
            ],
        },
    ]
    source = root / "mixed.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw["data"]["finetune"]["path"] = str(source)
    raw["recipe"] = ["finetune"]
    config.write_text(yaml.safe_dump(raw))
    image_root = finetune["image_root"]
    parquet, tars = root / "parquet", root / "wds"
    convert(source, image_root, parquet, format="parquet", shard_size=4, progress=False)
    convert(source, image_root, tars, format="webdataset", shard_size=3, progress=False)
    return {"config": config, "raw": raw, "json": source, "parquet": parquet, "wds": tars,
            "records": records, "image_root": image_root}  # fmt: skip


def _items(config: Path, path: Path, model: Any, **extra: str) -> list[dict[str, Any]]:
    overrides = [
        f"data.finetune.path={path}",
        *(f"data.finetune.{k}={v}" for k, v in extra.items()),
    ]
    train_config = load_train_config(config, overrides)
    records = read_stage_records("finetune", train_config.dataset("finetune"))
    dataset, skipped, total = checked_dataset(train_config, "finetune", model, records)
    assert not skipped and total == len(dataset) == 10
    return [dataset[i] for i in range(len(dataset))]


def test_json_parquet_and_webdataset_give_the_same_items(made: dict[str, Any]) -> None:
    model = vlm_adapters.build_vlm(made["raw"])
    reference = _items(made["config"], made["json"], model)
    assert sorted(len(list(Path(made[k]).glob("shard-*"))) for k in ("parquet", "wds")) == [3, 4]
    for source in (made["parquet"], made["wds"], Path(made["parquet"]) / "*.parquet"):
        items = _items(made["config"], source, model)
        assert [i["id"] for i in items] == [i["id"] for i in reference]
        assert "100" in [i["id"] for i in items] and "7" in [i["id"] for i in items]
        for mine, theirs in zip(items, reference):
            assert torch.equal(mine["input_ids"], theirs["input_ids"])
            assert torch.equal(mine["labels"], theirs["labels"])
            if theirs["pixel_values"] is None:
                assert mine["pixel_values"] is None
            else:
                assert torch.equal(mine["pixel_values"], theirs["pixel_values"])
    shapes = [tuple(i["pixel_values"].shape) for i in reference if i["pixel_values"] is not None]
    assert any(s[0] == 2 for s in shapes)  # the two-image sample


def _parts(text: str) -> list[dict[str, Any]]:
    """TRL content parts of a LLaVA turn's text."""
    pieces = text.split("<image>")
    parts: list[dict[str, Any]] = [{"type": "text", "text": pieces[0]}]
    for piece in pieces[1:]:
        parts += [{"type": "image", "text": None}, {"type": "text", "text": piece}]
    return parts


def _losses(out: Path) -> list[float]:
    lines = (out / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def _train(made: dict[str, Any], out: Path, **data: Any) -> list[float]:
    raw = json.loads(json.dumps(made["raw"]))
    raw["data"]["finetune"] = {**raw["data"]["finetune"], **data}
    vlm_adapters.train(raw, out=out, fresh_connector=True)
    return _losses(out)


def test_json_parquet_and_webdataset_train_to_the_same_losses(
    made: dict[str, Any], tmp_path: Path
) -> None:
    reference = _train(made, tmp_path / "json")
    assert len(reference) == 3  # 10 samples, batches of 4
    for name in ("parquet", "wds"):
        losses = _train(made, tmp_path / name, path=str(made[name]))
        assert losses == pytest.approx(reference, abs=1e-6, rel=0)
    saved = yaml.safe_load((tmp_path / "wds" / "config.yaml").read_text())
    assert saved["data"]["finetune"]["path"] == str(made["wds"])


def _streamed(made: dict[str, Any], name: str) -> list[Any]:
    """The samples of convert-data's shards streamed in file order (no shuffle buffer)."""
    shards = read_shards(find_shards(str(Path(made[name]) / "shard-*")))
    plan = StreamPlan(shards, 0, 0, 1, None, lambda record: 1)
    return list(plan.samples(0))


def test_streamed_parquet_and_webdataset_give_the_json_items(made: dict[str, Any]) -> None:
    model = vlm_adapters.build_vlm(made["raw"])
    reference = _items(made["config"], made["json"], model)
    train_config = load_train_config(made["config"], [f"data.finetune.path={made['json']}"])
    dataset, _, _ = checked_dataset(train_config, "finetune", model)
    for name in ("parquet", "wds"):
        samples = _streamed(made, name)
        assert len(samples) == len(reference)
        for sample, theirs in zip(samples, reference):
            mine = dataset.encode(sample.record, sample.index, sample.source)
            assert mine["id"] == theirs["id"]
            assert torch.equal(mine["input_ids"], theirs["input_ids"])
            assert torch.equal(mine["labels"], theirs["labels"])
            if theirs["pixel_values"] is None:
                assert mine["pixel_values"] is None
            else:
                assert torch.equal(mine["pixel_values"], theirs["pixel_values"])


def test_streamed_parquet_and_webdataset_train_to_the_same_losses(
    made: dict[str, Any], tmp_path: Path
) -> None:
    """In file order (shuffle_buffer 0): shuffled, the order depends on how the samples are
    cut into shards, and the two conversions cut them differently (4 and 3 per shard)."""
    made = {**made, "raw": {**made["raw"], "data": {**made["raw"]["data"], "shuffle_buffer": 0}}}
    runs = {
        name: _train(made, tmp_path / name, path=str(Path(made[name]) / "shard-*"), streaming=True)
        for name in ("parquet", "wds")
    }
    assert len(runs["parquet"]) == 3  # 10 samples, batches of 4
    assert runs["wds"] == pytest.approx(runs["parquet"], abs=1e-6, rel=0)


def _trl_dataset(made: dict[str, Any]) -> Any:
    """The finetune samples in TRL's columns, PIL images in a datasets.Image column, none on
    text-only rows."""
    rows = []
    for record in made["records"]:
        paths = record.get("image") or []
        paths = paths if isinstance(paths, list) else [paths]
        images = [Image.open(Path(made["image_root"]) / p).convert("RGB") for p in paths]
        turns = with_image_markers(record["conversations"], len(paths))
        messages = [
            {"role": "user" if t["from"] == "human" else "assistant", "content": _parts(t["value"])}
            for t in turns
        ]
        rows.append({"id": str(record["id"]), "messages": messages, "images": images})
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List(
                        {"type": datasets.Value("string"), "text": datasets.Value("string")}
                    ),
                }
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def test_a_trl_dataset_saved_with_save_to_disk_or_given_in_python_trains(
    made: dict[str, Any], tmp_path: Path
) -> None:
    saved = tmp_path / "trl"
    trl = _trl_dataset(made)
    trl.save_to_disk(str(saved))
    assert detect_format(str(saved)) == "datasets"
    losses = _train(made, tmp_path / "run", path=str(saved))
    reference = _train(made, tmp_path / "json")
    assert losses == pytest.approx(reference, abs=1e-6, rel=0)
    vlm_adapters.train(
        made["raw"], out=tmp_path / "given", fresh_connector=True, data={"finetune": trl}
    )
    assert _losses(tmp_path / "given") == pytest.approx(reference, abs=1e-6, rel=0)
    recorded = yaml.safe_load((tmp_path / "given" / "config.yaml").read_text())["data"]
    assert recorded["finetune"]["path"] == f"<in-memory: 10 records, {trl._fingerprint[:16]}>"


def test_llava_rows_in_parquet_with_no_image_on_text_rows_train(
    made: dict[str, Any], tmp_path: Path
) -> None:
    """LLaVA columns in Parquet, ``image`` null on text-only rows (what breaks
    ``load_dataset("json")`` on LLaVA files), ids made strings by Arrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": str(r["id"]), "conversations": r["conversations"], "image": r.get("image")}
        for r in made["records"]
        if not isinstance(r.get("image"), list)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "llava.parquet")
    records = open_source(str(tmp_path / "llava.parquet"))
    assert len(records) == 9 and "image" not in records[3]
    made = {**made, "raw": json.loads(json.dumps(made["raw"]))}
    made["raw"]["stages"]["finetune"]["feature_cache"] = str(tmp_path / "cache")  # path images
    losses = _train(made, tmp_path / "run", path=str(tmp_path / "llava.parquet"))
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 8  # one per image file


class _StopAt(vlm_adapters.TrainerCallback):
    def on_log(self, state, control, logs) -> None:  # noqa: ANN001
        control.should_stop = state.step == 2


def test_a_run_on_webdataset_shards_resumes_to_the_uninterrupted_losses(
    made: dict[str, Any], tmp_path: Path
) -> None:
    raw = json.loads(json.dumps(made["raw"]))
    raw["data"]["finetune"]["path"] = str(made["wds"])
    raw["stages"]["finetune"] |= {"epochs": 2}
    raw["run"]["save_every"] = 1
    whole = tmp_path / "whole"
    vlm_adapters.train(raw, out=whole, fresh_connector=True)
    out = tmp_path / "stopped"
    first = vlm_adapters.train(raw, out=out, fresh_connector=True, callbacks=[_StopAt()])
    assert first.stopped
    vlm_adapters.train(raw, out=out, resume="auto", fresh_connector=True)
    assert len(_losses(whole)) == 6
    assert _losses(out) == pytest.approx(_losses(whole), abs=1e-6, rel=0)


# to_record


def test_to_record_turns_trl_rows_into_llava_records() -> None:
    row = {
        "id": 3,
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": " and "},
                    {"type": "image", "text": None},
                    {"type": "text", "text": "?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        ],
        "images": [{"bytes": _png(), "path": "a.png"}, {"bytes": None, "path": "b/c.png"}],
    }
    record = to_record(row, "row 0")
    assert record["id"] == 3
    assert record["conversations"] == [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image> and <image>?"},
        {"from": "gpt", "value": "two"},
    ]
    first, second = record["image"]
    assert isinstance(first, Image.Image) and first.size == (8, 8) and second == "b/c.png"
    text_only = to_record({"conversations": TEXT_ONLY, "image": None, "id": "t"}, "row 1")
    assert text_only == {"id": "t", "conversations": TEXT_ONLY}
    raw = to_record({"conversations": TEXT_ONLY, "image": _png()}, "row 2")
    assert isinstance(raw["image"], Image.Image)
    inline = {"type": "image", "image": {"bytes": _png(), "path": None}}
    question = {"role": "user", "content": [inline, {"type": "text", "text": "?"}]}
    parts = to_record({"messages": [question, {"role": "assistant", "content": "red"}]}, "row 3")
    assert parts["conversations"][0]["value"] == "<image>?" and len(parts["image"]) == 1


@pytest.mark.parametrize(
    ("row", "reason", "words"),
    [
        ({"text": "hi"}, "bad row", "row 5: no 'messages'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "bad conversation", "message 0"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "bad conversation",
            "content part",
        ),
        ({"conversations": TEXT_ONLY, "image": b"not an image"}, "image unreadable", "row 5"),
        ({"conversations": TEXT_ONLY, "image": 12}, "bad image field", "got int"),
    ],
)
def test_to_record_refuses_bad_rows_with_a_reason(row: dict, reason: str, words: str) -> None:
    with pytest.raises(BadSample) as caught:
        to_record(row, "row 5")
    assert caught.value.reason == reason and words in str(caught.value)


# format detection and mixtures


def test_format_detection(made: dict[str, Any], tmp_path: Path) -> None:
    assert detect_format(str(made["json"])) == "llava"
    assert detect_format(str(made["parquet"])) == "parquet"
    assert detect_format(str(made["wds"]) + "/*.tar") == "webdataset"
    assert detect_format("someone/some-dataset") == "hub"
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cannot tell its format .*\.parquet, \.tar.*set format"):
        detect_format(str(tmp_path))
    with pytest.raises(ConfigError, match="format 'csv' is unknown"):
        detect_format(str(tmp_path), "csv")


def test_a_mixture_repeats_and_halves_its_sources_by_weight(
    made: dict[str, Any], tmp_path: Path
) -> None:
    raw = json.loads(json.dumps(made["raw"]))
    raw["data"]["finetune"].pop("path")
    raw["data"]["finetune"]["sources"] = [
        {"path": str(made["json"]), "weight": 2},
        {"path": str(made["wds"]), "weight": 0.5},
    ]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(raw))
    config = load_train_config(tmp_path / "mix.yaml")
    mixed = read_stage_records("finetune", config.dataset("finetune"), seed=0)
    assert isinstance(mixed, Mixture) and len(mixed) == 2 * 10 + 5
    ids = [str(mixed[i].get("id")) for i in range(len(mixed))]
    assert ids[:10] == ids[10:20] == [str(r["id"]) for r in made["records"]]
    again = read_stage_records("finetune", config.dataset("finetune"), seed=0)
    other = read_stage_records("finetune", config.dataset("finetune"), seed=1)
    assert [str(again[i].get("id")) for i in range(len(again))] == ids
    assert [str(other[i].get("id")) for i in range(20, 25)] != ids[20:]  # seeded half
    losses = _train(made, tmp_path / "run", path=None, sources=raw["data"]["finetune"]["sources"])
    assert len(losses) == 7  # 25 samples, batches of 4
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["finetune"]
    assert [s["weight"] for s in saved["sources"]] == [2, 0.5] and saved["path"] is None


def test_path_and_sources_together_are_refused(made: dict[str, Any], tmp_path: Path) -> None:
    raw = json.loads(json.dumps(made["raw"]))
    raw["data"]["finetune"]["sources"] = [{"path": str(made["json"])}]
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="set path .* or sources .*, not both"):
        load_train_config(tmp_path / "both.yaml")


# bad sources


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_a_corrupt_image_member_is_a_counted_skip_naming_shard_and_sample(
    made: dict[str, Any], tmp_path: Path
) -> None:
    question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}
    row = {"messages": [question, {"role": "assistant", "content": "red"}]}
    shard = tmp_path / "bad.tar"
    _tar(
        shard,
        {
            "a.json": json.dumps({**row, "id": "good"}).encode(),
            "a.0.png": _png(),
            "b.json": json.dumps({**row, "id": "broken"}).encode(),
            "b.0.png": b"\x89PNG but not really",
        },
    )
    model = vlm_adapters.build_vlm(made["raw"])
    config = load_train_config(made["config"], [f"data.finetune.path={shard}"])
    records = read_stage_records("finetune", config.dataset("finetune"))
    kept, skipped, total = checked_dataset(config, "finetune", model, records)
    assert total == 2 and len(kept) == 1 and len(skipped) == 1
    assert skipped[0].reason == "image unreadable"
    assert f"{shard} sample 'b'" in skipped[0].detail


def test_a_truncated_tar_names_the_shard_and_the_last_whole_sample(tmp_path: Path) -> None:
    shard = tmp_path / "cut.tar"
    _tar(shard, {"a.json": b'{"conversations": []}', "b.json": b"{}" * 400, "b.0.png": _png()})
    shard.write_bytes(shard.read_bytes()[:1200])
    with pytest.raises(DataError, match=r"cut\.tar: truncated after sample 'a'"):
        open_source(str(shard))


def _parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_a_parquet_file_without_the_turns_column_or_with_drifted_columns(tmp_path: Path) -> None:
    good = {"id": "a", "conversations": TEXT_ONLY}
    _parquet(tmp_path / "0.parquet", [{**good, "image": "x.png"}])
    _parquet(tmp_path / "1.parquet", [good])
    with pytest.raises(DataError, match=r"1\.parquet: column 'image' is missing \(it is in .*0\."):
        open_source(str(tmp_path))
    _parquet(tmp_path / "0.parquet", [good])
    _parquet(tmp_path / "1.parquet", [{"id": "b", "text": "hi"}])
    with pytest.raises(DataError, match=r"1\.parquet: no 'messages' \(TRL\) or 'conversations'"):
        open_source(str(tmp_path))
    _parquet(tmp_path / "1.parquet", [{"id": 2, "conversations": TEXT_ONLY}])
    with pytest.raises(DataError, match=r"1\.parquet: column 'id' is int64, but string in .*0\."):
        open_source(str(tmp_path))
    (tmp_path / "1.parquet").unlink()
    _parquet(tmp_path / "0.parquet", [{"id": "b", "text": "hi"}])
    with pytest.raises(DataError, match=r"0\.parquet: no 'messages' \(TRL\) or 'conversations'"):
        open_source(str(tmp_path))


def test_a_feature_cache_refuses_embedded_images(made: dict[str, Any]) -> None:
    model = vlm_adapters.build_vlm(made["raw"])
    config = load_train_config(made["config"], [f"data.finetune.path={made['parquet']}"])
    dataset, _, _ = checked_dataset(config, "finetune", model)
    with pytest.raises(DataError, match="embedded image, which a feature cache .* cannot key"):
        dataset.image_files()


def test_training_refuses_a_feature_cache_for_embedded_images(
    made: dict[str, Any], tmp_path: Path
) -> None:
    raw = json.loads(json.dumps(made["raw"]))
    raw["data"]["finetune"]["path"] = str(made["wds"])
    raw["stages"]["finetune"]["feature_cache"] = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"stages\.finetune\.feature_cache: .* embedded image"):
        vlm_adapters.train(raw, out=tmp_path / "run", fresh_connector=True)


def test_without_datasets_installed_a_parquet_source_is_one_install_error(
    made: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        InstallError, match=r"needs the `datasets` library; pip install 'vlm-adapters\[data\]'"
    ):
        open_source(str(made["parquet"]))
    assert len(open_source(str(made["wds"]))) == 10  # shards need no datasets


def test_a_hub_id_that_cannot_be_loaded_is_one_error_naming_it() -> None:
    with pytest.raises(DataError, match="someone/missing-dataset: cannot load the data: "):
        open_source("someone/missing-dataset")  # offline in the tests
