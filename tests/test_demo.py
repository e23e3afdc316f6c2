"""The embedded demo end to end at tiny sizes; its export answers alike in plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlm_adapters.cli import main

EVAL_SCRIPT = Path(__file__).parents[1] / "examples" / "eval_hf_llava.py"


def test_demo_trains_both_stages_and_its_export_answers_alike(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--train-images", "192", "--eval-images", "24"]
    assert main([*args, "stages.finetune.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy before training" in printed and "demo done in" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert {"accuracy_before", "accuracy_after", "seconds", "chance"} <= set(summary)
    assert summary["stages"]["finetune"]["steps"] == 3  # 192 samples / batch 64
    assert summary["chance"] <= 0.4
    assert (out / "finetune" / "loss.png").is_file()
    assert summary["export"] == str(out / "hf-llava")
    result = subprocess.run(
        [
            sys.executable,
            str(EVAL_SCRIPT),
            summary["export"],
            str(out / "data/eval.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert theirs["n"] == summary["eval_questions"] == 24
    assert theirs["accuracy"] == summary["accuracy_after"]
