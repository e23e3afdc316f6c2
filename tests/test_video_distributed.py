"""Video samples (with image and text-only ones) on two CPU processes (torchrun, gloo): DDP
and FSDP2 each train exactly like one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("skimage")

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from clips import with_videos  # noqa: E402
from tiny_train import max_weight_diff, write_tiny_config  # noqa: E402

from vlm_adapters.training import train  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FINAL = "finetune/final"


def _losses(run: Path) -> list[float]:
    lines = (run / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_train_a_video_mix_like_one_process(tmp_path: Path, sharded: bool) -> None:
    """8 samples (3 videos, 3 image samples, 2 text only), global batch 4: the two-process
    run (``--world 2`` asserts the process count) logs the same losses and ends with the same
    weights as one process (1e-5); under FSDP2 every parameter is a DTensor."""
    config = with_videos(write_tiny_config(tmp_path, num_train=8), "ivtvivti")
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    args = ["--stage", "finetune", "--fresh-connector"]
    two = [*TORCHRUN, *script, str(tmp_path / "two"), "--world", "2", *args]
    record = ["--record-sharding", str(tmp_path / "seen")] if sharded else []
    env = {**ENV, "VLM_ADAPTERS_FULLY_SHARD": "1"} if sharded else ENV
    half_batch = ["stages.finetune.batch_size=2"]  # 2 processes x 2 = the one process's 4
    subprocess.run([*two, *record, *half_batch], check=True, env=env, timeout=300)
    train(config, "finetune", tmp_path / "one", fresh_connector=True)
    assert max_weight_diff(tmp_path / "two" / FINAL, tmp_path / "one" / FINAL) < 1e-5
    two_losses, one_losses = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two_losses) == len(one_losses) == 2
    assert max(abs(a - b) for a, b in zip(two_losses, one_losses)) < 1e-5
    saved = json.loads((tmp_path / "two" / FINAL / "config.json").read_text())
    assert saved["vision"]["video"]["num_frames"] == 2
    if sharded:
        seen = json.loads((tmp_path / "seen.finetune.0.json").read_text())
        assert {p["class"] for p in seen["params"].values()} == {"DTensor"}
