"""Throughput metrics of training: tokens/s (all and supervised), data wait and MFU in every
line of metrics.jsonl, the progress line and the stage's summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vlm_adapters import build_vlm
from vlm_adapters.training import load_train_config, loop, throughput, train
from vlm_adapters.training.recipes import configure_stage
from vlm_adapters.training.throughput import FlopModel, lookup_peak

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_train import write_tiny_config  # noqa: E402

SLEEP = 0.05  # seconds the recording collator adds to each batch


class Recording:
    """A collator that notes each batch's counts (and takes `SLEEP` longer)."""

    def __init__(self, collator: Any, image_token_id: int) -> None:
        self.collator, self.image_token_id, self.batches = collator, image_token_id, []

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        batch = self.collator(items)
        time.sleep(SLEEP)
        ids, mask, images = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        self.batches.append(
            {
                "tokens": int(mask.sum()) if mask is not None else batch["num_tokens"],
                "supervised": int((batch["labels"] != -100).sum()),
                "visual": int((ids == self.image_token_id).sum()),
                "rows": 0 if images is None else len(images),
            }
        )
        return batch


def _train(tmp_path: Path, monkeypatch, stage: str, overrides: list[str]) -> dict[str, Any]:
    """Train ``stage`` of the tiny config (8 samples) with a recording collator; returns the
    model, the metrics records, the summary and the recorded batches."""
    config = write_tiny_config(tmp_path, num_train=8)
    settings = load_train_config(config)
    torch.manual_seed(0)
    model = build_vlm(settings.model)
    recorders: list[Recording] = []
    make_collator = loop.make_collator

    def recording(*args: Any) -> tuple[Recording, Any]:
        collator, attention = make_collator(*args)
        recorders.append(Recording(collator, model.image_token_id))
        return recorders[-1], attention

    monkeypatch.setattr(loop, "make_collator", recording)
    out = tmp_path / "out"
    overrides = [f"stages.{stage}.batch_size=2", f"stages.{stage}.grad_accum=2", *overrides]
    result = train(config, stage, out, overrides=overrides, model=model, fresh_connector=True)
    lines = (out / stage / "metrics.jsonl").read_text().splitlines()
    return {
        "model": model,
        "records": [json.loads(line) for line in lines],
        "summary": result.summary[stage],
        "batches": recorders[0].batches,
    }


def _steps(batches: list[dict[str, int]], per_step: int = 2) -> list[dict[str, int]]:
    """The recorded batches' counts summed per optimizer step."""
    groups = [batches[i : i + per_step] for i in range(0, len(batches), per_step)]
    return [{key: sum(b[key] for b in group) for key in group[0]} for group in groups]


def test_token_counts_rates_and_data_wait_in_metrics_log_and_summary(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="vlm_adapters"):
        run = _train(tmp_path, monkeypatch, "align", [])
    records, summary = run["records"], run["summary"]
    steps = _steps(run["batches"])
    assert len(records) == len(steps) == 2  # 8 samples, 2 per micro-batch, 2 micro-batches
    for record, counted in zip(records, steps, strict=True):
        assert record["tokens"] == counted["tokens"]
        assert record["supervised_tokens"] == counted["supervised"] > 0
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["step_seconds"])
        assert record["supervised_tokens_per_s"] == pytest.approx(
            record["supervised_tokens"] / record["step_seconds"]
        )
        assert 0 <= record["data_wait"] <= 1
        assert record["data_wait"] * record["step_seconds"] >= SLEEP * 0.9  # a batch or two
        assert "mfu" not in record  # a CPU: no peak to divide by
    assert summary["tokens"] == sum(step["tokens"] for step in steps)
    assert summary["supervised_tokens"] == sum(step["supervised"] for step in steps)
    seconds = sum(record["step_seconds"] for record in records)
    assert summary["step_seconds"] == pytest.approx(seconds)
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / seconds)
    assert summary["supervised_tokens_per_s"] == pytest.approx(
        summary["supervised_tokens"] / seconds
    )
    waited = sum(record["data_wait"] * record["step_seconds"] for record in records)
    assert summary["data_wait"] == pytest.approx(waited / seconds)
    # the collator's sleeps, in whichever step's wait accelerate fetched each batch ahead
    assert waited >= len(run["batches"]) * SLEEP * 0.9
    assert "mfu" not in summary
    assert "sup tok/s" in caplog.text and "data wait" in caplog.text
    assert "MFU" not in caplog.text


def _expected_flops(model: Any, stage: str, counted: dict[str, int]) -> float:
    """The documented formula, from the tiny Llama's parts: 2N forward per token; backward
    4N where parameters train, 2N where gradients only pass through, 0 for the frozen tower."""
    llm = model.llm.causal_lm
    embedding, head = llm.model.embed_tokens.weight, llm.lm_head.weight
    assert embedding is not head  # untied in the tiny config: the head is its own part
    body = sum(p.numel() for p in llm.parameters()) - embedding.numel() - head.numel()
    vision = sum(p.numel() for p in model.vision.parameters())
    connector = sum(p.numel() for p in model.connector.parameters())
    llm_factor = 4 if stage == "align" else 6  # frozen with gradients through it, or trained
    return (
        2 * vision * model.vision.num_patches * counted["rows"]
        + 6 * connector * counted["visual"]
        + llm_factor * body * counted["tokens"]
        + llm_factor * head.numel() * counted["supervised"]
    )


@pytest.mark.parametrize(
    ("stage", "overrides"),
    [("align", []), ("finetune", ["data.packing=true"])],
    ids=["align-padded", "finetune-packed"],
)
def test_mfu_with_a_known_device_equals_the_formula(tmp_path, monkeypatch, stage, overrides):
    """Faked as an H100 SXM (fp32 on the CPU: its 67 TFLOP/s plain FP32 peak)."""
    monkeypatch.setattr(throughput, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    run = _train(tmp_path, monkeypatch, stage, overrides)
    records, steps, model = run["records"], _steps(run["batches"]), run["model"]
    assert len(records) == len(steps) >= 1
    flops = []
    for record, counted in zip(records, steps, strict=True):
        assert record["tokens"] == counted["tokens"]
        flops.append(_expected_flops(model, stage, counted))
        assert record["mfu"] == pytest.approx(flops[-1] / record["step_seconds"] / 67e12)
    summary = run["summary"]
    assert summary["mfu"] == pytest.approx(sum(flops) / summary["step_seconds"] / 67e12)


def test_flops_count_a_trained_tower_and_nothing_for_cached_features(tmp_path):
    config = load_train_config(write_tiny_config(tmp_path, num_train=4))
    model = build_vlm(config.model)
    configure_stage(
        model, "finetune", config.stage("finetune").model_copy(update={"train_vision": "full"})
    )
    vision = sum(p.numel() for p in model.vision.parameters())
    trained = sum(p.numel() for p in model.vision.parameters() if p.requires_grad)
    assert 0 < trained < vision  # the layers after the feature layer stay frozen
    per_patch = 6 * trained + 4 * (vision - trained)  # trained: 2 + 4; passed through: 2 + 2
    assert FlopModel.of(model).vision_row == per_patch * model.vision.num_patches
    configure_stage(model, "align", config.stage("align"))
    assert FlopModel.of(model).vision_row == 2 * vision * model.vision.num_patches  # frozen
    ids = torch.tensor([[model.image_token_id, 5, 6]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([[-100, -100, 6]]),
        "pixel_values": None,
        "image_features": torch.zeros(1, 4, 8),
    }
    counts = throughput.step_counts([batch], model.image_token_id, torch.device("cpu"))
    assert counts.tolist() == [3, 1, 1, 0]  # tokens, supervised, visual, tower rows


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "fp16", 989e12),
        ("NVIDIA H100 NVL", "bf16", 835e12),
        ("NVIDIA A100-SXM4-80GB", "no", 19.5e12),
        ("NVIDIA A10", "bf16", 125e12),  # not taken for an A100
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores
        ("Tesla T4", "fp16", 65e12),
        ("NVIDIA GeForce RTX 4090", "bf16", None),  # not in the table: no guess
        ("NVIDIA H100 80GB HBM3", "fp8", None),
    ],
)
def test_device_peaks(name, precision, peak):
    assert lookup_peak(name, precision) == peak


def test_no_peak_on_a_cpu():
    assert throughput.peak_flops(torch.device("cpu"), "bf16") is None
