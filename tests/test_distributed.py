"""Two real CPU processes (torchrun, gloo) train exactly like one process on the same batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import max_weight_diff, write_tiny_config  # noqa: E402

from vlm_adapters.training import train  # noqa: E402


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    config = write_tiny_config(tmp_path, num_train=8)
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    args = ["--stage", "finetune", "--fresh-connector"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [*torchrun, *script, str(tmp_path / "two"), "--world", "2", *args]
    half_batch = ["stages.finetune.batch_size=2"]  # 2 processes x 2 = the one process's 4
    subprocess.run([*two, *half_batch], check=True, env=env, timeout=300)
    train(config, "finetune", tmp_path / "one", fresh_connector=True)
    final = "finetune/final"
    assert max_weight_diff(tmp_path / "two" / final, tmp_path / "one" / final) < 1e-5
    metrics = (tmp_path / "two" / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # 8 samples / global batch 4


def test_a_killed_two_process_run_resumes_to_bitwise_the_same_weights(tmp_path):
    """DDP writes unsharded checkpoints from the main process: SIGKILL process 0 right after
    the step-2 checkpoint, ``--resume auto``, and the final weights equal an uninterrupted
    two-process run's bit for bit."""
    config = write_tiny_config(tmp_path, num_train=12)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = [*torchrun, str(SCRIPTS / "tiny_train.py"), str(config)]
    args = ["--world", "2", "--stage", "finetune", "--fresh-connector", "stages.finetune.epochs=2"]
    args += ["stages.finetune.batch_size=2", "run.save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill = ["--kill-in", "vlm_adapters.training.engine:prune_checkpoints", "--kill-rank", "0"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([*script, str(reference), *args], check=True, env=env, timeout=300)
    crashed = subprocess.run([*script, str(killed), *args, *kill], env=env, timeout=300)
    assert crashed.returncode != 0
    assert [p.name for p in (killed / "finetune" / "checkpoints").iterdir()] == ["step-000002"]
    resumed = [*script, str(killed), *args, "--resume", "auto"]
    subprocess.run(resumed, check=True, env=env, timeout=300)
    final = "finetune/final"
    assert max_weight_diff(killed / final, reference / final) == 0.0
