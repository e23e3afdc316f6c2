"""``run.compile``: each decoder layer and vision block compiled with ``torch.compile`` trains
with eager's losses (LoRA, packing and gradient checkpointing on), and nothing compiled
outlives the stage."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from torch._dynamo.utils import counters

from vlm_adapters.model.build import build_vlm, load_config
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.training import train
from vlm_adapters.training.compiling import compile_blocks
from vlm_adapters.training.sharding import block_modules

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_train import max_weight_diff, write_tiny_config  # noqa: E402

SETTINGS = [
    "stages.finetune.train_llm=lora",
    "data.packing=true",
    "run.gradient_checkpointing=true",
    "stages.finetune.batch_size=2",
]


def _losses(run: Path) -> list[float]:
    lines = (run / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _model(config: Path) -> VisionLanguageModel:
    torch.manual_seed(0)
    return build_vlm(load_config(config))


def test_a_compiled_stage_trains_like_eager_and_leaves_nothing_compiled(tmp_path):
    config = write_tiny_config(tmp_path, num_train=8)
    eager = train(config, "finetune", tmp_path / "eager", overrides=SETTINGS, model=_model(config))
    model = _model(config)
    graphs = counters["stats"]["unique_graphs"]
    settings = [*SETTINGS, "run.compile=true"]
    compiled = train(config, "finetune", tmp_path / "compiled", overrides=settings, model=model)
    assert counters["stats"]["unique_graphs"] > graphs  # inductor really compiled blocks
    assert compiled.summary["finetune"]["steps"] == eager.summary["finetune"]["steps"] == 4
    losses, expected = _losses(tmp_path / "compiled"), _losses(tmp_path / "eager")
    assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) < 1e-5
    final = Path("finetune/final")
    assert max_weight_diff(tmp_path / "compiled" / final, tmp_path / "eager" / final) < 1e-5
    assert not [b for b in block_modules(model) if "forward" in vars(b)]  # compilation undone


def test_every_block_is_compiled_once_and_the_undo_restores_the_class_forward(tokenizer_dir):
    from vlm_adapters.testing.tiny import tiny_model_config

    model = build_vlm(tiny_model_config(tokenizer_dir))
    names = {name for name, _ in model.state_dict().items()}
    undo = compile_blocks(model)
    blocks = block_modules(model)
    assert len(blocks) == 4  # two decoder layers, two vision blocks
    assert all("forward" in vars(block) for block in blocks)
    assert set(model.state_dict()) == names  # no _orig_mod. in the weights' names
    undo()
    assert all(type(b).forward is b.forward.__func__ for b in blocks)
    assert torch.compiler.is_compiling() is False
