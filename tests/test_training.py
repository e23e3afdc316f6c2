"""Training recipes: losses fall, freezing is exact, lr groups, accumulation, config errors."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_model

from vlm_adapters import build_vlm
from vlm_adapters.cli import main
from vlm_adapters.config import ConfigError
from vlm_adapters.training import Trainer, load_train_config, train
from vlm_adapters.training.recipes import carry_connector, configure_stage

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_train import max_weight_diff, write_tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run(config_path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    settings = ["run.save_every=1", "run.keep_last=2"]
    return out, train(config_path, "all", out, overrides=settings).summary


def _losses(stage_dir: Path) -> list[float]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_both_stages_lower_the_loss_and_write_results(run):
    out, summary = run
    assert list(summary) == ["align", "finetune"]
    for stage in ("align", "finetune"):
        losses = _losses(out / stage)
        assert len(losses) == summary[stage]["steps"] == 4
        assert losses[-1] < losses[0]
        assert summary[stage]["final_loss"] == pytest.approx(losses[-1])
        assert summary[stage]["skipped"] == 0
        assert (out / stage / "loss.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / stage / "final" / "model.safetensors").is_file()
    saved = {s: json.loads((out / s / "final" / "config.json").read_text()) for s in summary}
    assert saved["align"]["template"] == "plain"  # generation uses the stage's own template
    assert saved["finetune"]["template"] == "llama3"
    record = json.loads((out / "align" / "metrics.jsonl").read_text().splitlines()[0])
    throughput = {"tokens", "supervised_tokens", "step_seconds", "tokens_per_s"}
    throughput |= {"supervised_tokens_per_s", "data_wait"}  # no "mfu" on a CPU
    assert set(record) == {"step", "epoch", "loss", "lr", "grad_norm", "seconds", *throughput}
    assert load_train_config(out / "config.yaml").recipe == ["align", "finetune"]


def test_keep_last_checkpoints(run):
    out, _ = run
    names = sorted(p.name for p in (out / "finetune" / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000003"]  # step 4 is the final model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, model) -> set[str]:
    after = model.state_dict()
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


def test_align_trains_only_the_connector_and_finetune_adds_the_llm(config_path, tmp_path):
    config = load_train_config(config_path, ["stages.finetune.connector_lr=1e-3"])
    model = build_vlm(config.model)
    before = _snapshot(model)
    Trainer(model, config, "align", tmp_path).fit()
    assert _changed(before, model) == {"connector"}
    connector = {k: v for k, v in _snapshot(model).items() if k.startswith("connector.")}
    before = _snapshot(model)
    trainer = Trainer(model, config, "finetune", tmp_path)
    trainer.fit()
    assert _changed(before, model) == {"connector", "llm"}
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in connector.items())
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == {
        "connector": 1e-3,
        "connector.no_decay": 1e-3,
        "llm": 3e-3,
        "llm.no_decay": 3e-3,
    }


def test_accumulating_two_half_batches_equals_one_full_batch(config_path, tmp_path):
    small = ["stages.finetune.batch_size=2", "stages.finetune.grad_accum=2"]
    full = train(config_path, "finetune", tmp_path / "full", fresh_connector=True)
    accum = train(
        config_path, "finetune", tmp_path / "accum", overrides=small, fresh_connector=True
    )
    full, accum = full.summary["finetune"], accum.summary["finetune"]
    assert full["steps"] == accum["steps"] == 4
    assert accum["final_loss"] == pytest.approx(full["final_loss"], abs=1e-5)
    assert max_weight_diff(Path(full["final_dir"]), Path(accum["final_dir"])) < 1e-5


def test_unknown_stage_in_recipe_is_a_config_error(config_path):
    with pytest.raises(ConfigError, match=r"tiny\.yaml: recipe: .*unknown stage 'pretrain'"):
        load_train_config(config_path, ["recipe=[align, pretrain]"])


def test_config_errors_name_the_key_and_the_file(config_path):
    with pytest.raises(ConfigError, match=r"tiny\.yaml: stages\.align\.lr: .*greater than 0"):
        load_train_config(config_path, ["stages.align.lr=-1"])
    with pytest.raises(ConfigError, match=r"tiny\.yaml: run\.save_evry: unknown key"):
        load_train_config(config_path, ["run.save_evry=5"])
    with pytest.raises(ConfigError, match=r"data\.eval: missing"):
        load_train_config(config_path).dataset("eval")


def test_cli_reports_a_bad_override_in_one_line(config_path, tmp_path, capsys):
    argv = ["train", str(config_path), "--out", str(tmp_path), "stages.align.scheduler=cosin"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stages.align.scheduler" in err and err.count("\n") == 1


def test_skipped_samples_are_counted_and_an_all_skipped_batch_takes_no_step(tmp_path):
    config = write_tiny_config(tmp_path, num_train=8)
    images = sorted((tmp_path / "shapes" / "images").glob("train_*"))
    for image in images[1:]:  # 7 of 8 images are corrupt: one batch of 4 is all skipped
        image.write_bytes(b"not a png")
    summary = train(
        config, "align", tmp_path / "out", overrides=["data.max_skip_fraction=1"]
    ).summary
    assert summary["align"]["skipped"] == 7 and summary["align"]["steps"] == 1
    assert len((tmp_path / "out" / "align" / "metrics.jsonl").read_text().splitlines()) == 1
    listed = (tmp_path / "out" / "align" / "skipped.jsonl").read_text().splitlines()
    assert {json.loads(line)["reason"] for line in listed} == {"image unreadable"}
    assert sorted(json.loads(line)["index"] for line in listed) == list(range(1, 8))


def test_the_epoch_skip_count_is_the_rows_of_skipped_jsonl(tmp_path, caplog):
    config = write_tiny_config(tmp_path, num_train=8)
    images = sorted((tmp_path / "shapes" / "images").glob("train_*"))
    images[0].unlink()  # dropped by the up-front check
    images[1].unlink()
    images[2].write_bytes(b"not a png")  # skipped when its batch is built
    caplog.set_level(logging.INFO, logger="vlm_adapters.training")
    summary = train(
        config, "align", tmp_path / "out", overrides=["data.max_skip_fraction=1"]
    ).summary
    rows = (tmp_path / "out" / "align" / "skipped.jsonl").read_text().splitlines()
    assert len(rows) == summary["align"]["skipped"] == 3
    assert "align epoch 0: skipped 3 of 8 samples: 2 image missing, 1 image unreadable" in (
        caplog.text
    )


def test_finetune_alone_carries_the_stage1_connector_and_lora_trains(run, config_path, tmp_path):
    out, _ = run
    lora = [
        "stages.finetune.train_llm=lora",
        "stages.finetune.lora.r=4",
        "stages.finetune.lora.alpha=8",
    ]
    (tmp_path / "align").symlink_to(out / "align")
    result = train(config_path, "finetune", tmp_path, overrides=lora, overwrite=True)
    summary = result.summary["finetune"]
    losses = _losses(tmp_path / "finetune")
    assert summary["steps"] == 4 and losses[-1] < losses[0]
    config = load_train_config(config_path, lora)
    model = build_vlm(config.model)
    assert carry_connector(model, out / "align" / "connector")
    final = build_vlm(config.model)
    load_model(final, str(out / "align" / "final" / "model.safetensors"))
    for key, value in final.connector.state_dict().items():
        assert torch.equal(model.connector.state_dict()[key], value)


def test_vision_lora_trains_adapters_on_the_tower_and_keeps_its_base_frozen(config_path):
    config = load_train_config(
        config_path, ["stages.finetune.train_vision=lora", "stages.finetune.train_llm=frozen"]
    )
    model = build_vlm(config.model)
    configure_stage(model, "finetune", config.stages.finetune)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    vision = [n for n, p in model.vision.named_parameters() if p.requires_grad]
    assert trainable == {"vision", "connector"}
    assert vision and all(".lora_" in n for n in vision)
