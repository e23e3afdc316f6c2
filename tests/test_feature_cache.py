"""The frozen-tower feature cache: exact features, keys that change with everything the
features depend on, broken entries recomputed, and concurrent writers."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vlm_adapters import build_vlm
from vlm_adapters.data import ConversationDataset, DataCollator
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


def _damage(cache: FeatureCache, key: str, damage: str, good: torch.Tensor) -> None:
    entry = cache.path(key)
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:-16])
    elif damage == "garbage":
        entry.write_bytes(b"not safetensors at all")
    elif damage == "shape":
        cache.write(key, torch.zeros(2, 2))  # with its key and hash
    elif damage == "earlier-version":  # the right features, without key and hash
        save_file({"features": good}, str(entry))
    else:  # "bytes": a flipped byte of the features, the file still well-formed
        data = bytearray(entry.read_bytes())
        data[-5] ^= 0xFF
        entry.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "truncated"),
        ("garbage", "truncated"),
        ("shape", "shape (2, 2)"),
        ("earlier-version", "no key and hash in its metadata"),
        ("bytes", "do not match their SHA-256"),
    ],
)
def test_a_broken_entry_is_recomputed_and_reported(tmp_path, tokenizer_dir, caplog, damage, reason):
    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    cache = _cache(tmp_path / "cache", model)
    _fill(cache, model, paths)
    key = cache.key(paths[2])
    good = cache.read(key).clone()
    _damage(cache, key, damage, good)
    assert cache.read(key) is None  # never trusted
    assert reason in cache.problem(key)
    report = _fill(cache, model, paths)
    assert report.replaced == [str(paths[2])] and report.computed == 1
    assert "recomputing" in caplog.text and reason in caplog.text
    assert torch.equal(cache.read(key), good)


def test_entries_swapped_between_images_are_recomputed_and_reported(tmp_path, tokenizer_dir):
    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    cache = _cache(tmp_path / "cache", model)
    _fill(cache, model, paths)
    keys = [cache.key(p) for p in paths[:2]]
    good = [cache.read(k).clone() for k in keys]
    first, second = (cache.path(k) for k in keys)
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    assert all("holds the features of another image" in cache.problem(k) for k in keys)
    report = _fill(cache, model, paths)
    assert report.replaced == [str(p) for p in paths[:2]] and report.computed == 2
    assert all(torch.equal(cache.read(k), g) for k, g in zip(keys, good))


def test_entries_follow_the_umask(tmp_path):
    cache = FeatureCache(tmp_path / "cache", "ns", (2, 3))
    previous = os.umask(0o027)
    try:
        cache.write("ab" * 32, torch.ones(2, 3))
    finally:
        os.umask(previous)
    entry = cache.path("ab" * 32)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o640
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o750


def test_the_dataset_reads_features_and_the_model_uses_them(tmp_path, tokenizer_dir):
    model, paths = _model(tokenizer_dir), _images(tmp_path / "img")
    cache = _cache(tmp_path / "cache", model)
    _fill(cache, model, paths)
    ask = {"from": "human", "value": "<image>\nwhat colour is the circle ?"}
    records = [
        {"id": p.stem, "image": p.name, "conversations": [ask, {"from": "gpt", "value": "red"}]}
        for p in paths
    ]
    processor, root = model.processor_for("llama3"), tmp_path / "img"
    from_cache = ConversationDataset(records, processor, image_root=root, feature_cache=cache)
    from_pixels = ConversationDataset(records, processor, image_root=root)
    collate = DataCollator(model.tokenizer.pad_token_id)
    cached = collate([from_cache[i] for i in range(3)])
    plain = collate([from_pixels[i] for i in range(3)])
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


KILLED_WRITER = """
import sys, torch
from vlm_adapters.data.feature_cache import FeatureCache
cache = FeatureCache(sys.argv[1], "ns", (1024, 4096))
features = torch.ones(1024, 4096)
for i in range(10_000):
    cache.write(f"{i % 50:02d}" + "k" * 62, features)
"""


def test_a_killed_writer_leaves_nothing_the_next_fill_does_not_remove(tmp_path):
    """SIGKILLed while writing 16 MB entries (mostly inside the write), a writer leaves complete
    entries and at most a temporary file of ours, which the next fill's clean removes."""
    directory = tmp_path / "cache"
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(directory)])
        deadline = time.monotonic() + 60
        while not list(directory.glob("*/*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=60) == -signal.SIGKILL
    cache = FeatureCache(directory, "ns", (1024, 4096))
    cache.clean()
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files and not [p.name for p in files if p.suffix != ".safetensors"]
    assert all(cache.problem(p.stem) is None for p in files)
