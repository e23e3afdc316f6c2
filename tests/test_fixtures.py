"""The checkpoints of every format version still resume and load.

``tests/fixtures/v<N>/<kind>/`` was written by ``tests/fixtures/make_fixtures.py`` with the code
of format version N: a tiny run cut back to a mid-stage checkpoint, the losses and final model
of the same run uninterrupted, and that model's logits on a fixed input. ``--resume auto`` must
finish the cut run with the recorded losses and final weights, and the recorded final must
give the recorded logits, to fp32 rounding but not bitwise: the fixtures were recorded on
another machine, and CPUs of another kind (AVX2 or AVX-512 kernels) round the last bits of a
matmul differently (1e-7 here). A wrong load, a lost optimizer state or a shifted data position
moves them by far more than the tolerances below. Bitwise resume on one machine is proved by the
kill-and-resume tests, which record and resume in the same place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

import vlm_adapters
from vlm_adapters.errors import CheckpointError
from vlm_adapters.model.files import FORMAT_VERSION
from vlm_adapters.training import train

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_fixtures import ROOT  # noqa: E402

CASES = sorted(FIXTURES.glob("v*/*/"))
IDS = [f"{case.parent.name}-{case.name}" for case in CASES]
NEWER = "was written by a newer vlm-adapters"


def _copy(fixture: Path, tmp_path: Path) -> Path:
    """The fixture copied under ``tmp_path``, its YAML paths pointing at the copy."""
    copy = tmp_path / "fixture"
    shutil.copytree(fixture, copy)
    for path in (copy / "data" / "tiny.yaml", copy / "run" / "config.yaml"):
        path.write_text(path.read_text().replace(ROOT, str(copy)))
    return copy


def _losses(metrics: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, metrics.read_text().splitlines())]


def _close_losses(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """The same steps, each loss within fp32 rounding of the recorded one."""
    return [step for step, _ in got] == [step for step, _ in want] and all(
        a == pytest.approx(b, rel=1e-5) for (_, a), (_, b) in zip(got, want)
    )


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model (base weights and adapters), by file and name."""
    return {
        f"{path.relative_to(model_dir)}:{name}": tensor
        for path in sorted(model_dir.rglob("*.safetensors"))
        for name, tensor in load_file(str(path)).items()
    }


def test_every_format_version_has_a_plain_and_a_lora_fixture() -> None:
    versions = sorted({case.parent.name for case in CASES})
    assert versions and all((FIXTURES / v / "plain").is_dir() for v in versions)
    assert all((FIXTURES / v / "lora").is_dir() for v in versions)


@pytest.mark.parametrize("fixture", CASES, ids=IDS)
def test_a_run_cut_mid_stage_resumes_to_the_recorded_losses(fixture: Path, tmp_path: Path) -> None:
    copy = _copy(fixture, tmp_path)
    run = copy / "run"
    cut = _losses(run / "finetune" / "metrics.jsonl")[-1][0]
    config = str(copy / "data" / "tiny.yaml")
    command = [sys.executable, "-m", "vlm_adapters.cli", "train", config, "--out", str(run)]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, "--resume", "auto"], capture_output=True, text=True, env=one_thread
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("align", "finetune"):
        assert _close_losses(
            _losses(run / stage / "metrics.jsonl"), _losses(copy / "metrics" / f"{stage}.jsonl")
        )
    assert cut < len(_losses(copy / "metrics" / "finetune.jsonl"))  # resumed mid-stage
    resumed, recorded = _weights(run / "finetune" / "final"), _weights(copy / "final")
    assert resumed.keys() == recorded.keys()
    for key in recorded:
        torch.testing.assert_close(resumed[key], recorded[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("fixture", CASES, ids=IDS)
def test_a_final_model_gives_the_recorded_logits(fixture: Path) -> None:
    inputs = load_file(str(fixture / "logits.safetensors"))
    recorded = inputs.pop("logits")
    model = vlm_adapters.load(fixture / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, recorded, rtol=1e-5, atol=1e-5)


def test_a_config_without_format_version_loads_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    final = tmp_path / "final"
    shutil.copytree(FIXTURES / "v1" / "plain" / "final", final)
    path = final / "config.json"
    config = json.loads(path.read_text())
    assert config.pop("format_version") == 1
    path.write_text(json.dumps(config))  # as releases before format_version wrote it
    vlm_adapters.load(final)
    path.write_text(json.dumps({**config, "format_version": 999}))
    with pytest.raises(CheckpointError) as info:
        vlm_adapters.load(final)
    assert str(info.value) == (
        f"{path}: format_version 999 {NEWER} (this one reads up to {FORMAT_VERSION}); upgrade"
    )


def test_a_training_checkpoint_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    copy = _copy(FIXTURES / "v1" / "lora", tmp_path)
    state = copy / "run" / "finetune" / "checkpoints" / "step-000004" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "format_version": 999}))
    with pytest.raises(CheckpointError, match=f"^{state}: format_version 999 {NEWER} .*; upgrade$"):
        train(copy / "data" / "tiny.yaml", "all", copy / "run", "auto")
