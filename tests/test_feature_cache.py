"""The frozen-tower feature cache: exact features, keys that change with everything the
features depend on, broken entries recomputed, and concurrent writers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_adapters import build_vlm
from vlm_adapters.data import DataCollator, LlavaDataset
from vlm_adapters.data.feature_cache import FeatureCache, image_encoder
from vlm_adapters.testing import tiny_model_config

MAX_PIXELS = 10_000_000


def _images(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, size, colour in (
        ("a", (40, 30), "red"),
        ("b", (25, 60), "blue"),
        ("c", (33, 33), "green"),
    ):
        Image.new("RGB", size, colour).save(root / f"{name}.png")
        paths.append(root / f"{name}.png")
    return paths


def _model(tokenizer_dir: str, **vision: object):
    config = tiny_model_config(tokenizer_dir)
    config["vision"] = {**config["vision"], **vision}
    torch.manual_seed(0)
    return build_vlm(config).eval()


def _cache(directory: Path, model) -> FeatureCache:
    return FeatureCache.for_backbone(directory, model.vision)


def _fill(cache: FeatureCache, model, paths):
    return cache.fill(paths, image_encoder(model.vision, MAX_PIXELS), batch_size=2)


def test_entries_are_the_towers_features_and_are_reused(tmp_path, tokenizer_dir):
    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    cache = _cache(tmp_path / "cache", model)
    first = _fill(cache, model, paths)
    assert (first.computed, first.reused) == (3, 0)
    again = _fill(cache, model, [*paths, paths[0]])
    assert (again.computed, again.reused) == (0, 3)
    with torch.no_grad():
        direct = model.vision(model.vision.preprocess([Image.open(p) for p in paths]))
    for path, expected in zip(paths, direct):
        assert torch.equal(cache.read(cache.key(path)), expected)
    assert cache.size_on_disk() > 3 * expected.numel() * 4


@pytest.mark.parametrize(
    "change",
    [{"feature_layer": -1}, {"config": {"image_size": 48}}, {"image_mean": [0.1, 0.2, 0.3]}],
    ids=["feature-layer", "image-size", "preprocessing"],
)
def test_any_backbone_change_invalidates_every_entry(tmp_path, tokenizer_dir, change):
    base, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    _fill(_cache(tmp_path / "cache", base), base, paths)
    vision = dict(change)
    if "config" in vision:
        vision["config"] = {
            **tiny_model_config(tokenizer_dir)["vision"]["config"],
            **change["config"],
        }
    other = _model(tokenizer_dir, **vision)
    report = _fill(_cache(tmp_path / "cache", other), other, paths)
    assert (report.computed, report.reused) == (3, 0)


def test_other_weights_invalidate_every_entry(tmp_path, tokenizer_dir):
    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    _fill(_cache(tmp_path / "cache", model), model, paths)
    with torch.no_grad():
        next(model.vision.parameters()).add_(1e-3)
    report = _fill(_cache(tmp_path / "cache", model), model, paths)
    assert (report.computed, report.reused) == (3, 0)


def test_changing_one_image_invalidates_only_its_entry(tmp_path, tokenizer_dir):
    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    cache = _cache(tmp_path / "cache", model)
    _fill(cache, model, paths)
    Image.new("RGB", (40, 30), "white").save(paths[1])
    report = _fill(cache, model, paths)
    assert (report.computed, report.reused) == (1, 2)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "shape"])
def test_a_broken_entry_is_recomputed_and_reported(tmp_path, tokenizer_dir, caplog, damage):
    from safetensors.torch import save_file

    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    cache = _cache(tmp_path / "cache", model)
    _fill(cache, model, paths)
    key = cache.key(paths[2])
    good = cache.read(key).clone()
    entry = cache.path(key)
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:-16])
    elif damage == "garbage":
        entry.write_bytes(b"not safetensors at all")
    else:
        save_file({"features": torch.zeros(2, 2)}, str(entry))
    assert cache.read(key) is None  # never trusted
    report = _fill(cache, model, paths)
    assert report.replaced == [str(paths[2])] and report.computed == 1
    assert "recomputing" in caplog.text and torch.equal(cache.read(key), good)


def test_the_dataset_reads_features_and_the_model_uses_them(tmp_path, tokenizer_dir):
    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    cache = _cache(tmp_path / "cache", model)
    _fill(cache, model, paths)
    ask = {"from": "human", "value": "<image>\nwhat colour is the circle ?"}
    records = [
        {"id": p.stem, "image": p.name, "conversations": [ask, {"from": "gpt", "value": "red"}]}
        for p in paths
    ]
    options = {
        "image_root": tmp_path / "img",
        "tokenizer": model.tokenizer,
        "template": "llama3",
        "image_transform": model.vision.transform,
        "image_token_id": model.image_token_id,
        "num_image_tokens": model.num_image_tokens,
    }
    collate = DataCollator(model.tokenizer.pad_token_id)
    cached = collate([LlavaDataset(records, **options, feature_cache=cache)[i] for i in range(3)])
    plain = collate([LlavaDataset(records, **options)[i] for i in range(3)])
    assert cached["pixel_values"] is None and cached["image_features"].shape[0] == 3
    keys = ("input_ids", "attention_mask", "labels")
    with torch.no_grad():
        a = model(**{k: plain[k] for k in keys}, pixel_values=plain["pixel_values"])
        b = model(**{k: cached[k] for k in keys}, image_features=cached["image_features"])
    assert torch.equal(a.loss, b.loss)


WRITER = """
import sys, torch
from vlm_adapters.data.feature_cache import FeatureCache
cache = FeatureCache(sys.argv[1], "ns", (16, 32))
for round in range(20):
    for i in range(10):
        cache.write(f"{i:02d}" + "k" * 62, torch.full((16, 32), float(i)))
"""


def test_two_processes_writing_one_cache_do_not_corrupt_it(tmp_path):
    directory = tmp_path / "cache"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(directory)]) for _ in range(2)]
    assert all(w.wait(timeout=120) == 0 for w in writers)
    cache = FeatureCache(directory, "ns", (16, 32))
    for i in range(10):
        key = f"{i:02d}" + "k" * 62
        assert cache.problem(key) is None
        assert torch.equal(cache.read(key), torch.full((16, 32), float(i)))
    assert not [p for p in directory.rglob("*") if ".tmp-" in p.name]
