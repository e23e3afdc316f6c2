"""Packing, token-budget batches and the feature cache inside the trainer: each trains exactly
what the plain path trains, on one process and on two."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from vlm_adapters import build_vlm
from vlm_adapters.cli import main
from vlm_adapters.data.feature_cache import FeatureCache
from vlm_adapters.data.samplers import TokenBudgetBatchSampler
from vlm_adapters.errors import ConfigError
from vlm_adapters.llm import packed_attention
from vlm_adapters.llm.packed_attention import check_packing, packing_leak
from vlm_adapters.training import load_train_config, train
from vlm_adapters.training.data import checked_dataset

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import max_weight_diff, with_text_only, write_tiny_config  # noqa: E402

FINAL = "finetune/final"


def _losses(out: Path, stage: str) -> list[float]:
    lines = (out / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture
def config(tmp_path) -> Path:
    """Tiny two-stage config whose finetune data mixes text-only and image samples."""
    return with_text_only(tmp_path, write_tiny_config(tmp_path, num_train=8), "itiitiit")


def _train_packed(config: Path, out: Path, packing: bool) -> str:
    """Finetune with or without packing; the LLM's attention setting afterwards."""
    settings = load_train_config(config)
    torch.manual_seed(settings.run.seed)
    model = build_vlm(settings.model)
    overrides = [f"data.packing={str(packing).lower()}"]
    train(config, "finetune", out, overrides=overrides, model=model)
    return model.llm.causal_lm.config._attn_implementation


def test_packed_training_attends_per_sample_and_equals_padded_training(
    tmp_path, config, monkeypatch
):
    calls = []
    samples = packed_attention._samples
    monkeypatch.setattr(packed_attention, "_samples", lambda p: calls.append(1) or samples(p))
    assert _train_packed(config, tmp_path / "padded", packing=False) == "sdpa"
    assert not calls
    assert _train_packed(config, tmp_path / "packed", packing=True) == "sdpa"  # restored
    assert calls  # the packed rows went through the per-sample path
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert _losses(packed, "finetune") == pytest.approx(_losses(padded, "finetune"), abs=1e-5)
    assert max_weight_diff(packed / FINAL, padded / FINAL) < 1e-5


def test_packing_falls_back_to_the_mask_where_per_sample_attention_differs(
    tmp_path, config, monkeypatch, caplog
):
    """A per-sample path that got the sample boundaries wrong fails the check before the
    first step; the stage then trains through the masked path, as padded training does."""
    whole_rows = lambda p: [[(0, p.shape[1])] for _ in range(p.shape[0])]  # noqa: E731
    monkeypatch.setattr(packed_attention, "_samples", whole_rows)
    with caplog.at_level(logging.WARNING, logger="vlm_adapters"):
        _train_packed(config, tmp_path / "packed", packing=True)
    assert "packed rows use the masked attention path" in caplog.text
    _train_packed(config, tmp_path / "padded", packing=False)
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert _losses(packed, "finetune") == pytest.approx(_losses(padded, "finetune"), abs=1e-5)


def _even_budget(config: Path) -> int:
    """A token budget that splits the finetune data into an even number (>= 4) of batches."""
    settings = load_train_config(config)
    torch.manual_seed(0)
    dataset, _, _ = checked_dataset(settings, "finetune", build_vlm(settings.model))
    for budget in range(max(abs(n) for n in dataset.lengths), 10_000, 7):
        count = len(TokenBudgetBatchSampler(dataset.lengths, budget, seed=0))
        if count % 2 == 0 and count >= 4:
            return budget
    raise AssertionError("no budget gives an even number of batches")


def test_two_processes_packing_by_token_budget_from_one_cache_equal_one_process(tmp_path, config):
    """Two processes (packed rows, token-budget batches, the feature cache filled by both)
    train what one process does with the same batches accumulated two at a time."""
    budget = _even_budget(config)
    common = [
        "--stage",
        "finetune",
        "--fresh-connector",
        "data.packing=true",
        f"data.max_tokens_per_batch={budget}",
    ]
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = f"stages.finetune.feature_cache={tmp_path / 'cache'}"
    two = [*torchrun, *script, str(tmp_path / "two"), "--world", "2", *common, cache]
    subprocess.run(two, check=True, env=env, timeout=300)
    one = [sys.executable, *script, str(tmp_path / "one"), *common, "stages.finetune.grad_accum=2"]
    subprocess.run(one, check=True, env=env, timeout=300)
    assert _losses(tmp_path / "two", "finetune") == pytest.approx(
        _losses(tmp_path / "one", "finetune"), abs=1e-5
    )
    assert max_weight_diff(tmp_path / "two" / FINAL, tmp_path / "one" / FINAL) < 1e-5
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 5  # the image samples


def test_training_from_a_filled_cache_equals_training_without(tmp_path, config, capsys, caplog):
    """Also with two entry files swapped (valid files of the right shape, another image's
    features each): both are recomputed, and training still equals uncached training."""
    cache = tmp_path / "cache"
    setting = f"stages.align.feature_cache={cache}"
    assert main(["cache-features", str(config), "--stage", "align", setting]) == 0
    printed = capsys.readouterr().out
    assert "8 computed (0 replaced broken entries), 0 reused" in printed
    assert "MB on disk" in printed
    first, second, *_ = sorted(cache.glob("*/*.safetensors"))
    first.rename(tmp_path / "swap")
    second.rename(first)
    (tmp_path / "swap").rename(second)
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    train(config, "align", plain)
    with caplog.at_level(logging.INFO, logger="vlm_adapters"):
        train(config, "align", cached, overrides=[setting])
    assert "2 computed (2 replaced broken entries), 6 reused" in caplog.text
    assert caplog.text.count("holds the features of another image") == 2
    assert _losses(cached, "align") == pytest.approx(_losses(plain, "align"), abs=1e-6)
    assert max_weight_diff(cached / "align/final", plain / "align/final") < 1e-6
    for entry in cache.glob("*/*.safetensors"):  # the features are read, not recomputed
        doubled = 2 * load_file(str(entry))["features"]
        FeatureCache(cache, "", doubled.shape).write(entry.stem, doubled)
    train(config, "align", tmp_path / "doubled", overrides=[setting])
    assert _losses(tmp_path / "doubled", "align")[0] != pytest.approx(_losses(plain, "align")[0])


def test_a_cache_for_a_stage_that_trains_the_tower_is_a_config_error(config):
    with pytest.raises(ConfigError, match="stages.finetune.feature_cache: the vision tower trains"):
        load_train_config(
            config, ["stages.finetune.feature_cache=cache", "stages.finetune.train_vision=full"]
        )


def test_cache_features_without_a_cache_folder_says_what_to_set(config, capsys):
    assert main(["cache-features", str(config)]) == 2
    assert "stages.align.feature_cache is not set" in capsys.readouterr().err


def test_packing_is_refused_for_an_llm_whose_packed_samples_see_each_other(config):
    settings = load_train_config(config)
    llm = build_vlm(settings.model).llm
    assert packing_leak(llm) < 1e-5
    check_packing(llm)
    body = llm.body

    def ignores_positions(embeds, mask, **kwargs):  # full causal attention over the row
        return body(embeds, torch.ones(embeds.shape[:2], dtype=torch.long))

    llm.body = ignores_positions
    with pytest.raises(ConfigError, match="data.packing: .* attend to each other"):
        check_packing(llm)
