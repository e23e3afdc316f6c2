"""The training engine: one Accelerator per run, mixed precision on CPU, text-only batches in
every stage and on every process, and the shipped recipes running on tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig

from vlm_adapters.cli import main
from vlm_adapters.training import Trainer, load_train_config, train

SCRIPTS = Path(__file__).parent / "scripts"
EXAMPLES = Path(__file__).parent.parent / "examples" / "configs"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import (  # noqa: E402
    max_weight_diff,
    with_text_only,
    write_pairs,
    write_tiny_config,
)


def test_a_text_only_batch_trains_in_every_stage(tmp_path):
    config = write_tiny_config(tmp_path, num_train=8)
    with_text_only(tmp_path, config, "tttttttt", stage="align")
    with_text_only(tmp_path, config, "tttttttt", stage="finetune")
    summary = train(config, "all", tmp_path / "out").summary
    assert summary["align"]["steps"] == 2 and summary["finetune"]["steps"] == 2


def test_two_processes_with_text_only_on_one_and_images_on_the_other(tmp_path):
    """Rank 0 gets only text-only samples, rank 1 only image samples: both finish (the
    vision tower and connector take part on both) and equal one process on the same batch."""
    config = with_text_only(tmp_path, write_tiny_config(tmp_path, num_train=8), "ttiittii")
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    args = ["--stage", "finetune", "--fresh-connector", "--in-order", "data.group_by_length=false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [*torchrun, *script, str(tmp_path / "two"), "--world", "2", *args]
    subprocess.run([*two, "stages.finetune.batch_size=2"], check=True, env=env, timeout=300)
    one = [sys.executable, *script, str(tmp_path / "one"), *args]
    subprocess.run(one, check=True, env=env, timeout=300)
    final = "finetune/final"
    assert max_weight_diff(tmp_path / "two" / final, tmp_path / "one" / final) < 1e-5


def _output_dtypes(model, config, stage: str, out: Path) -> set[torch.dtype]:
    """Dtypes of the LLM's first linear layer outputs during one stage."""
    seen: set[torch.dtype] = set()
    layer = next(m for m in model.llm.modules() if isinstance(m, torch.nn.Linear))
    handle = layer.register_forward_hook(lambda _m, _i, output: seen.add(output.dtype))
    try:
        Trainer(model, config, stage, out).fit()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_autocasts_on_cpu(tmp_path, precision, dtype):
    from vlm_adapters import build_vlm

    path = write_tiny_config(tmp_path, num_train=4)
    config = load_train_config(path, [f"run.mixed_precision={precision}"])
    model = build_vlm(config.model)
    assert _output_dtypes(model, config, "align", tmp_path / "out") == {dtype}
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.mark.parametrize(
    "precision",
    [
        "bf16",
        pytest.param(
            "fp16",
            marks=pytest.mark.skipif(
                not torch.accelerator.is_available(), reason="fp16 needs an accelerator"
            ),
        ),
    ],
)
def test_mixed_precision_from_the_command_line_runs_both_stages(tmp_path, capsys, precision):
    config = write_tiny_config(tmp_path, num_train=4)
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out), f"run.mixed_precision={precision}"]) == 0
    assert (out / "finetune" / "final" / "model.safetensors").is_file()


def test_the_vision_tower_checkpoints_its_activations_when_it_trains(tmp_path):
    from vlm_adapters import build_vlm

    path = write_tiny_config(tmp_path, num_train=4)
    overrides = ["run.gradient_checkpointing=true", "stages.finetune.train_vision=full"]
    config = load_train_config(path, overrides)
    model = build_vlm(config.model)
    Trainer(model, config, "finetune", tmp_path / "out").fit()
    assert model.vision.tower.is_gradient_checkpointing
    assert model.llm.model.is_gradient_checkpointing


def _tiny_local_models(root: Path) -> tuple[Path, Path]:
    """A CLIP vision tower and a Llama saved like hub checkpoints (with a tokenizer)."""
    from vlm_adapters.testing import tiny_tokenizer

    vision, llm = root / "clip", root / "llama"
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    AutoModel.from_config(clip).save_pretrained(vision)
    llama = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(llama).save_pretrained(llm)
    tiny_tokenizer(llm)
    return vision, llm


RECIPES = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    return _tiny_local_models(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_runs_two_steps_on_tiny_local_models(tmp_path, local_models, recipe):
    """Only model paths, sizes and data paths change; precision, LoRA, checkpointing, templates
    and schedules are the recipe's own."""
    vision, llm = local_models
    data = yaml.safe_load(write_tiny_config(tmp_path, num_train=4).read_text())["data"]
    recipe_data = yaml.safe_load((EXAMPLES / recipe).read_text())
    if recipe_data["vision"]["type"] == "hf" and "model" in recipe_data["vision"]:
        size = [f"vision.model={vision}", "vision.image_size=32"]
    else:
        size = []
    overrides = [
        *size,
        f"llm.model={llm}",
        "data.max_length=256",
        "data.num_workers=0",
        *[
            f"data.{s}.{k}={data[s][k]}"
            for s in ("align", "finetune")
            for k in ("path", "image_root")
        ],
        *[f"stages.{s}.batch_size=2" for s in ("align", "finetune")],
        *[f"stages.{s}.epochs=1" for s in ("align", "finetune")],
        "stages.finetune.lora.r=4",
        "stages.finetune.lora.alpha=8",
    ]
    if "preference" in recipe_data["recipe"]:  # 4 toy pairs from the finetune data
        pairs = write_pairs(tmp_path, Path(data["finetune"]["path"]))
        overrides += [f"data.preference.path={pairs}"]
        overrides += [f"data.preference.image_root={data['finetune']['image_root']}"]
        overrides += ["stages.preference.batch_size=2", "stages.preference.epochs=1"]
        overrides += ["stages.preference.lora.r=4", "stages.preference.lora.alpha=8"]
    if recipe_data["data"].get("eval"):  # evaluated after each stage
        root = data["align"]["image_root"]
        overrides += [f"data.eval.path={root}/eval.json", f"data.eval.image_root={root}"]
    if "config" in recipe_data["llm"]:
        overrides = [o for o in overrides if not o.startswith("llm.model=")]
        overrides += [f"llm.tokenizer={llm}"]
    summary = train(EXAMPLES / recipe, "all", tmp_path / "out", overrides=overrides).summary
    assert all(stage["steps"] == 2 for stage in summary.values()), summary
    if recipe_data["data"].get("eval"):
        assert all(stage["eval_samples"] == 4 for stage in summary.values()), summary


def test_tower_parameters_after_the_feature_layer_are_frozen(tmp_path):
    """CLIP's last block (features come from layer -2) and post-norm get no gradient: they are
    frozen so that DDP, which refuses unused parameters, can train the tower."""
    from vlm_adapters import build_vlm
    from vlm_adapters.training.recipes import configure_stage

    config = load_train_config(
        write_tiny_config(tmp_path, num_train=4), ["stages.finetune.train_vision=full"]
    )
    model = build_vlm(config.model)
    configure_stage(model, "finetune", config.stages.finetune)
    frozen = {n for n, p in model.vision.named_parameters() if not p.requires_grad}
    assert frozen and all(".layers.1." in n or "post_layernorm" in n for n in frozen)
    assert any(p.requires_grad for n, p in model.vision.named_parameters() if ".layers.0." in n)


def test_two_processes_train_the_vision_tower(tmp_path):
    config = write_tiny_config(tmp_path, num_train=8)
    script = [str(SCRIPTS / "tiny_train.py"), str(config)]
    args = ["--stage", "finetune", "--fresh-connector", "stages.finetune.train_vision=full"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [*torchrun, *script, str(tmp_path / "two"), "--world", "2", *args]
    subprocess.run([*two, "stages.finetune.batch_size=2"], check=True, env=env, timeout=300)
    train(config, "finetune", tmp_path / "one", overrides=args[3:], fresh_connector=True)
    final = "finetune/final"
    assert max_weight_diff(tmp_path / "two" / final, tmp_path / "one" / final) < 1e-5
