"""The preference stage on two CPU processes (torchrun, gloo) and across a kill and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import max_weight_diff, write_preference_config  # noqa: E402

from vlm_adapters.training import train  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LORA = {"train_llm": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
FINAL = "preference/final"


@pytest.mark.parametrize(
    "stage",
    [{"reference": "copy"}, {**LORA, "reference": "precomputed"}],
    ids=["full-copy", "lora-precomputed"],
)
def test_two_processes_match_one_process(tmp_path: Path, stage: dict) -> None:
    config = write_preference_config(tmp_path, num_train=8, stage=stage)
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    two = [*TORCHRUN, *script, str(tmp_path / "two"), "--world", "2", "--fresh-connector"]
    half_batch = ["stages.preference.batch_size=2"]  # 2 processes x 2 = the one process's 4
    subprocess.run([*two, *half_batch], check=True, env=ENV, timeout=300)
    train(config, out=tmp_path / "one", fresh_connector=True)
    assert max_weight_diff(tmp_path / "two" / FINAL, tmp_path / "one" / FINAL) < 1e-5
    metrics = (tmp_path / "two" / "preference" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # 8 pairs / global batch 4


@pytest.mark.parametrize("after_finetune", [False, True], ids=["alone", "after-lora-finetune"])
def test_a_killed_run_resumes_to_bitwise_the_same_weights(
    tmp_path: Path, after_finetune: bool
) -> None:
    """SIGKILL right after the preference stage's step-2 checkpoint, ``--resume auto`` (the
    precomputed reference log-probs are reused: their key matches; a finished LoRA finetune is
    loaded with its adapter and folded in again), and the final weights equal an
    uninterrupted run's bit for bit."""
    stage = {**LORA, "reference": "precomputed", "epochs": 2}
    config = write_preference_config(tmp_path, num_train=12, stage=stage, run={"save_every": 2})
    if after_finetune:
        data = yaml.safe_load(config.read_text())
        data["recipe"] = ["finetune", "preference"]
        data["stages"]["finetune"] |= {**LORA, "epochs": 1}  # 3 steps: no checkpoint at 2
        data["run"]["save_every"] = 4
        data["stages"]["preference"]["epochs"] = 3  # steps 1-9: checkpoints at 4 and 8
        config.write_text(yaml.safe_dump(data))
    script = [sys.executable, str(SCRIPTS / "tiny_train.py"), str(config)]
    kill = ["--kill-in", "vlm_adapters.training.engine:prune_checkpoints"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run = {"check": True, "env": ENV, "timeout": 300}
    subprocess.run([*script, str(reference), "--fresh-connector"], **run)
    crashed = subprocess.run(
        [*script, str(killed), "--fresh-connector", *kill], env=ENV, timeout=300
    )
    assert crashed.returncode != 0
    store = killed / "preference" / "reference_logps.safetensors"
    written = store.stat().st_mtime_ns
    resumed = [*script, str(killed), "--fresh-connector", "--resume", "auto"]
    output = subprocess.run(resumed, capture_output=True, text=True, **run)
    assert "reference log-probs: reused" in output.stderr
    assert store.stat().st_mtime_ns == written
    assert max_weight_diff(killed / FINAL, reference / FINAL) == 0.0


@pytest.mark.parametrize(
    "stage",
    [{"reference": "precomputed"}, {**LORA, "reference": "adapters"}],
    ids=["full-precomputed", "lora-adapters"],
)
def test_two_fsdp2_processes_match_one_process(tmp_path: Path, stage: dict) -> None:
    """Sharded with ``fully_shard`` (every parameter a DTensor): the precomputed pass and the
    adapters-off reference (with the starting connector swapped in) run sharded too."""
    config = write_preference_config(tmp_path, num_train=8, stage=stage)
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    two = [*TORCHRUN, *script, str(tmp_path / "two"), "--world", "2", "--fresh-connector"]
    sharded = {**ENV, "VLM_ADAPTERS_FULLY_SHARD": "1"}
    record = ["--record-sharding", str(tmp_path / "seen"), "stages.preference.batch_size=2"]
    subprocess.run([*two, *record], check=True, env=sharded, timeout=300)
    train(config, out=tmp_path / "one", fresh_connector=True)
    assert max_weight_diff(tmp_path / "two" / FINAL, tmp_path / "one" / FINAL) < 1e-5
    seen = json.loads((tmp_path / "seen.preference.0.json").read_text())
    assert {p["class"] for p in seen["params"].values()} == {"DTensor"}
