"""Evaluation during training (``data.eval``, ``stages.<stage>.eval_every``): the live model
is scored without a second copy, in two processes as in one, with the numbers a scoring of
the saved checkpoint gives afterwards; a broken eval file or a failing evaluation is one
error line, and training finishes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from vlm_adapters.data.records import load_records
from vlm_adapters.inference.evaluation import answer_loss
from vlm_adapters.inference.tasks import score
from vlm_adapters.loading import load
from vlm_adapters.model.files import WEIGHTS_NAME
from vlm_adapters.model.lora import load_weights
from vlm_adapters.training import train

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import write_tiny_config  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _eval_settings(root: Path, every: int = 1) -> list[str]:
    shapes = root / "shapes"
    return [
        f"data.eval.path={shapes}/eval.json",
        f"data.eval.image_root={shapes}",
        "data.eval.template=llama3",
        "data.eval_task=exact",
        f"stages.finetune.eval_every={every}",
    ]


def _metrics(run: Path) -> list[dict]:
    lines = (run / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _summary(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_evaluate_the_live_model_like_the_saved_one_afterwards(tmp_path, sharded):
    config = write_tiny_config(tmp_path, num_train=8)
    split = ["stages.finetune.batch_size=2", "stages.align.batch_size=2"]  # 2 x 2 = 4 a step
    split += ["run.save_every=1"]  # the checkpoint of step 1, which was evaluated live
    command = [*TORCHRUN, str(SCRIPTS / "tiny_train.py"), str(config), str(tmp_path / "two")]
    done = subprocess.run(
        [*command, "--world", "2", *_eval_settings(tmp_path), *split],
        env={**os.environ, "OMP_NUM_THREADS": "1", "VLM_ADAPTERS_FULLY_SHARD": str(int(sharded))},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = _metrics(tmp_path / "two")
    assert [r["step"] for r in records] == [1, 2]
    assert [r["step"] for r in records if "eval_loss" in r] == [1]  # step 2: after the stage
    assert records[0]["eval_samples"] == 4 and 0.0 <= records[0]["eval_accuracy"] <= 1.0
    reported = _summary(done.stdout)["finetune"]
    model = load(tmp_path / "two" / "finetune" / "final")
    shapes = tmp_path / "shapes"
    loss = answer_loss(model, load_records(shapes / "eval.json"), shapes, "llama3")
    accuracy = score(model, load_records(shapes / "eval.json"), shapes, "exact", "llama3")
    assert reported["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert reported["eval_accuracy"] == accuracy.summary["accuracy"]
    assert records[0]["eval_loss"] != pytest.approx(reported["eval_loss"], abs=1e-3)
    if not sharded:  # a sharded checkpoint holds each process's part; the final is whole
        step1 = tmp_path / "two" / "finetune" / "checkpoints" / "step-000001" / "model"
        load_weights(model, step1, WEIGHTS_NAME)
        loss = answer_loss(model, load_records(shapes / "eval.json"), shapes, "llama3")
        assert records[0]["eval_loss"] == pytest.approx(loss, abs=1e-5)
    for when in ("step 1", "step end"):  # the main process reports
        assert done.stderr.count(f"finetune: eval at {when}: eval_loss") == 1


@pytest.mark.parametrize("broken", ["unreadable file", "missing image"])
def test_a_broken_evaluation_is_one_error_line_and_training_finishes(tmp_path, caplog, broken):
    config = write_tiny_config(tmp_path, num_train=8)
    shapes = tmp_path / "shapes"
    records = json.loads((shapes / "eval.json").read_text())
    records[1]["image"] = "nowhere.png"
    bad = tmp_path / "eval-bad.json"
    bad.write_text("[{" if broken == "unreadable file" else json.dumps(records))
    settings = [*_eval_settings(tmp_path), f"data.eval.path={bad}"]
    with caplog.at_level(logging.INFO, logger="vlm_adapters"):
        result = train(config, "all", tmp_path / "run", overrides=settings)
    assert result.summary["finetune"]["steps"] == 2  # trained to the end
    assert "eval_loss" not in result.summary["finetune"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    if broken == "unreadable file":
        assert len(errors) == 1 and errors[0].startswith("data.eval: ")
        assert errors[0].endswith("training goes on without it")
    else:  # each evaluation (after align; finetune's step 1 and end) fails on its own
        assert len(errors) == 3 and all("nowhere.png" in e for e in errors)
        assert errors[1].startswith("finetune: evaluation at step 1 failed, training goes on: ")
    assert all("\n" not in e for e in errors)
    assert not [r for r in _metrics(tmp_path / "run") if "eval_loss" in r]


def test_lmms_eval_tasks_without_lmms_eval_installed_are_one_error_line(
    tmp_path, caplog, monkeypatch
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "lmms_eval" else find_spec(name, *a),
    )
    config = write_tiny_config(tmp_path, num_train=8)
    settings = ["data.eval_lmms.tasks=[mme]", "stages.finetune.eval_every=1"]
    with caplog.at_level(logging.INFO, logger="vlm_adapters"):
        result = train(config, "all", tmp_path / "run", overrides=settings)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "data.eval_lmms: lmms-eval is not installed (pip install 'vlm-adapters[eval]'); "
        "training goes on without it"
    ]
    assert result.summary["finetune"]["steps"] == 2
    assert not [k for k in result.summary["finetune"] if k.startswith("eval")]
