"""Checkpoints: complete, atomic, pruned, found, and a killed run resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import save_file
from transformers import get_scheduler

from vlm_adapters import build_vlm
from vlm_adapters.testing.tiny import tiny_model_config, tiny_tokenizer
from vlm_adapters.training import checkpoint
from vlm_adapters.training.checkpoint import (
    Position,
    flatten_optimizer,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer,
)

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import max_weight_diff, write_tiny_config  # noqa: E402


def _trained_parts(tmp_path: Path):
    model = build_vlm(tiny_model_config(tiny_tokenizer(tmp_path / "tok")))
    optimizer = torch.optim.AdamW(model.connector.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    model.connector(torch.randn(2, 16, 32)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_optimizer_state_round_trips_through_flat_tensors(tmp_path):
    _, optimizer, _ = _trained_parts(tmp_path)
    tensors, rest = flatten_optimizer(optimizer.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    restored = unflatten_optimizer(tensors, rest)
    original = optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, values in original["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][index][key], value)


def test_rng_states_round_trip():
    state = rng_state()
    expected = (torch.rand(3), torch.randint(0, 1000, (3,)))
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.randint(0, 1000, (3,)), expected[1])


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trained_parts(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(checkpoints / "step-000001", model, optimizer, scheduler, Position(step=1))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        model.connector.apply(lambda m: [p.add_(1.0) for p in m.parameters(recurse=False)])
    monkeypatch.setattr(checkpoint, "save_file", crash)
    for name in ("step-000001", "step-000002"):  # overwrite, and a new one
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(checkpoints / name, model, optimizer, scheduler, Position(step=2))
    assert latest_checkpoint(checkpoints).name == "step-000001"
    assert not (checkpoints / "step-000002").exists()
    position = load_checkpoint(checkpoints / "step-000001", model, optimizer, scheduler)
    assert position.step == 1 and scheduler.last_epoch == 1
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def _fake_checkpoint(directory: Path, complete: bool = True) -> None:
    """Structurally valid checkpoint files (tiny tensors); `complete=False` truncates one."""
    (directory / "model").mkdir(parents=True)
    save_file({"w": torch.ones(4)}, str(directory / "model" / "model.safetensors"))
    (directory / "model" / "config.json").write_text("{}")
    state = {"position": {}, "rng": {}, "scheduler": {}}
    (directory / "trainer_state.json").write_text(json.dumps(state))
    optimizer = directory / "optimizer.safetensors"
    save_file({"state.0.exp_avg": torch.ones(64)}, str(optimizer))
    if not complete:
        optimizer.write_bytes(optimizer.read_bytes()[:-8])


def test_latest_is_the_newest_verified_checkpoint_and_pruning_keeps_the_last_k(tmp_path, caplog):
    for step in (1, 3, 10):
        _fake_checkpoint(tmp_path / f"step-{step:06d}")
    _fake_checkpoint(tmp_path / "step-000002", complete=False)  # half-pruned by a kill
    _fake_checkpoint(tmp_path / "step-000020", complete=False)  # truncated newest
    dead = f".step-000030.tmp-{socket.gethostname()}-999999999-abc"  # a dead writer's temp
    _fake_checkpoint(tmp_path / dead)
    assert latest_checkpoint(tmp_path).name == "step-000010"
    assert "skipping" in caplog.text and "step-000020" in caplog.text and "truncated" in caplog.text
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000003",
        "step-000010",
        "step-000020",  # newer than every complete one: kept for the user to inspect
    ]
    assert latest_checkpoint(tmp_path / "missing") is None


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


LORA_WITH_DROPOUT = [
    "stages.finetune.train_llm=lora",
    "stages.finetune.lora.r=4",
    "stages.finetune.lora.alpha=8",
    "stages.finetune.lora.dropout=0.3",
]
FINETUNE = ["--stage", "finetune", "--fresh-connector", "stages.finetune.epochs=2"]


@pytest.mark.parametrize(
    ("args", "kill"),
    [
        pytest.param([*FINETUNE, "run.save_every=2"], "step-000002", id="full-finetune"),
        pytest.param(
            [*FINETUNE, "run.save_every=2", *LORA_WITH_DROPOUT], "step-000002", id="lora-dropout"
        ),
        pytest.param(
            ["stages.align.epochs=2", "run.save_every=3", "--kill-in",
             "vlm_adapters.training.artifact:save_model", *LORA_WITH_DROPOUT],
            None,
            id="connector-save",
        ),
    ],
)  # fmt: skip
def test_a_killed_run_resumes_to_bitwise_the_same_weights(tmp_path, args, kill):
    """SIGKILL (after a checkpoint, or while the stage-1 connector is being saved), then
    ``--resume auto``: every final weight equals an uninterrupted run's, bit for bit."""
    # all runs are fresh processes, so in-process state cannot leak between them
    config = write_tiny_config(tmp_path, num_train=12)
    script = [sys.executable, str(SCRIPTS / "tiny_train.py"), str(config)]
    plain = [a for a in args if a != "--kill-in" and ":" not in a]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    uninterrupted = subprocess.Popen([*script, str(reference), *plain], stdout=subprocess.DEVNULL)
    process = subprocess.Popen([*script, str(killed), *args], stdout=subprocess.DEVNULL)
    stage = "finetune" if "--stage" in args else "align"
    if kill is not None:
        _wait_for(killed / stage / "checkpoints" / kill, process)
        process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / stage / "final").exists()

    resumed = subprocess.run([*script, str(killed), "--resume", "auto", *plain], check=False)
    assert resumed.returncode == 0 and uninterrupted.wait() == 0
    last = "finetune"
    assert max_weight_diff(killed / last / "final", reference / last / "final") == 0.0
    for stage_dir in (killed / "align", killed / "finetune"):
        steps = [json.loads(line)["step"] for line in _lines(stage_dir / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1))  # no step twice, none missing
    leftovers = [p.name for p in killed.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
