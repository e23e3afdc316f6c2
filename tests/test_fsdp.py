"""FSDP2 on CPU: two real processes (torchrun, gloo) shard the model with ``fully_shard`` (the
units accelerate's FSDP2 plugin makes on GPUs) and train exactly like one process; sharded
checkpoints hold every process's part, verify, and resume bit for bit after a SIGKILL.

accelerate maps every CPU launch to DDP, so these runs set ``VLM_ADAPTERS_FULLY_SHARD=1``,
which makes the trainer apply the same wrapping itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors import safe_open

from vlm_adapters import build_vlm
from vlm_adapters.errors import CheckpointError, ConfigError
from vlm_adapters.testing.tiny import tiny_model_config
from vlm_adapters.training import train
from vlm_adapters.training.checkpoint import checkpoint_problem, latest_checkpoint, load_checkpoint
from vlm_adapters.training.sharded_checkpoint import load_sharded_checkpoint
from vlm_adapters.training.sharding import block_modules, configure_fsdp_plugin

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import max_weight_diff, with_text_only, write_tiny_config  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SHARDED_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VLM_ADAPTERS_FULLY_SHARD": "1"}
TIMEOUT = 120  # a hung collective fails the test instead of blocking the suite


def _sharded(config: Path, out: Path, *args: str, check: bool = True) -> int:
    """Train in two sharded processes; returns the exit code."""
    command = [*TORCHRUN, str(SCRIPTS / "tiny_train.py"), str(config), str(out), "--world", "2"]
    done = subprocess.run([*command, *args], env=SHARDED_ENV, timeout=TIMEOUT, check=False)
    assert not check or done.returncode == 0, f"sharded run failed ({done.returncode})"
    return done.returncode


def _grad_norms(run: Path, stage: str) -> list[float]:
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["grad_norm"] for line in lines]


# ---- which modules become units -------------------------------------------------------------

UNITS = [
    ("llama", "hf", "mlp", {"LlamaDecoderLayer", "CLIPEncoderLayer"}),
    ("gpt2", "timm", "qformer", {"GPT2Block", "Block"}),
    ("qwen2", "open_clip", "linear", {"Qwen2DecoderLayer", "ResidualAttentionBlock"}),
    ("llama", "fused", "mlp", {"LlamaDecoderLayer", "SiglipEncoderLayer", "Dinov2Layer"}),
]


@pytest.mark.parametrize(("llm", "vision", "connector", "classes"), UNITS)
def test_the_units_are_the_decoder_layers_and_the_vision_blocks(
    tokenizer_dir, llm, vision, connector, classes
):
    model = build_vlm(tiny_model_config(tokenizer_dir, vision, connector, llm))
    blocks = block_modules(model)
    assert {type(block).__name__ for block in blocks} == classes
    assert len(blocks) == 2 * len(classes)  # every tiny tower and LLM has 2 layers
    inside = {id(m) for block in blocks for m in block.modules() if m is not block}
    assert not inside & {id(b) for b in blocks}  # no unit inside another
    assert not {id(m) for m in model.connector.modules()} & {id(b) for b in blocks}


def test_accelerates_fsdp2_plugin_wraps_the_same_units(tokenizer_dir):
    """On GPUs accelerate's plugin shards: given our classes, its policy picks exactly the
    modules `shard_model` wraps; FSDP 1 is refused."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = build_vlm(tiny_model_config(tokenizer_dir))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)  # no policy in the launch config
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    configure_fsdp_plugin(accelerator, model)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [id(m) for m in model.modules() if policy(m)]
    assert len(wrapped) == 4 and set(wrapped) == {id(m) for m in block_modules(model)}
    old = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        configure_fsdp_plugin(old, model)


def test_asking_for_fsdp_on_cpu_warns_once_that_the_run_is_not_sharded(tmp_path, caplog):
    from vlm_adapters.training import load_train_config
    from vlm_adapters.training.engine import make_accelerator

    config = load_train_config(write_tiny_config(tmp_path, num_train=4))
    patched = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    with pytest.MonkeyPatch.context() as env, caplog.at_level(logging.WARNING):
        for key, value in patched.items():
            env.setenv(key, value)
        accelerator = make_accelerator(config, tmp_path / "out")
    assert not accelerator.is_fsdp2
    warned = [r.getMessage() for r in caplog.records if "FSDP was asked for" in r.getMessage()]
    assert len(warned) == 1 and "parameters are not sharded" in warned[0]


# ---- training under sharding ----------------------------------------------------------------


def test_two_sharded_processes_train_like_one_process(tmp_path):
    """Both stages; in finetune the LLM and the vision tower train and clipping is active.
    During the step every parameter and gradient is a DTensor holding half of the tensor;
    the final weights (gathered into an ordinary directory) and every logged grad_norm (the
    global one) equal a single process's on the same global batch. The sharded run compiles
    its blocks (``run.compile``) and the single process does not: compiled FSDP2 trains like
    eager."""
    config = write_tiny_config(tmp_path, num_train=8)
    settings = ["stages.finetune.train_vision=full", "stages.finetune.max_grad_norm=0.5"]
    # 2 processes x batch 1 x 2 accumulated = one process's batch of 4
    split = [
        f"stages.{s}.{k}" for s in ("align", "finetune") for k in ("batch_size=1", "grad_accum=2")
    ]
    record = str(tmp_path / "seen")
    compiled = "run.compile=true"
    _sharded(config, tmp_path / "two", *settings, *split, compiled, "--record-sharding", record)
    train(config, "all", tmp_path / "one", overrides=settings)
    for stage in ("align", "finetune"):
        final = f"{stage}/final"
        assert max_weight_diff(tmp_path / "two" / final, tmp_path / "one" / final) < 1e-5
        two, one = _grad_norms(tmp_path / "two", stage), _grad_norms(tmp_path / "one", stage)
        assert len(two) == len(one) == 2
        assert max(abs(a - b) / b for a, b in zip(two, one)) < 1e-5
    assert min(_grad_norms(tmp_path / "one", "finetune")) > 0.5  # clipping changed the steps
    seen = [json.loads(Path(f"{record}.finetune.{rank}.json").read_text()) for rank in (0, 1)]
    _assert_sharded(*seen)


def _assert_sharded(first: dict, second: dict) -> None:
    """What both processes saw inside a step: the units, and every parameter a DTensor whose
    two local shards together make the whole tensor; gradients DTensors too."""
    for seen in (first, second):
        units = seen["units"]
        assert units[0] == "" and sorted(units[1:]) == [  # the root, then the blocks
            "llm.model.model.layers.0",
            "llm.model.model.layers.1",
            "vision.tower.encoder.layers.0",
            "vision.tower.encoder.layers.1",
        ]
        assert {p["class"] for p in seen["params"].values()} == {"DTensor"}
        grads = {name: p["grad"] for name, p in seen["params"].items()}
        assert grads["connector.proj.0.weight"] == grads["llm.model.lm_head.weight"] == "DTensor"
        assert grads["vision.tower.encoder.layers.0.mlp.fc1.weight"] == "DTensor"
        assert set(grads.values()) <= {"DTensor", None}  # None: the tower's unused last layer
    for name, param in first["params"].items():
        other = second["params"][name]
        assert param["local"] + other["local"] == param["numel"]
        assert param["local"] < param["numel"] and other["local"] < param["numel"]


@pytest.mark.parametrize("cached", [False, True], ids=["pixels", "feature-cache"])
def test_text_only_on_one_sharded_process_and_images_on_the_other(tmp_path, cached):
    """Rank 0 gets only text-only samples, rank 1 only image samples: both finish (the tower
    and connector take part on both, so the collectives stay in step; with a feature cache
    neither runs the tower) and equal one process on the same global batch."""
    config = with_text_only(tmp_path, write_tiny_config(tmp_path, num_train=8), "ttiittii")
    args = ["--stage", "finetune", "--fresh-connector", "--in-order"]
    if cached:
        args.append(f"stages.finetune.feature_cache={tmp_path / 'cache'}")
    _sharded(config, tmp_path / "two", *args, "stages.finetune.batch_size=2")
    one = [sys.executable, str(SCRIPTS / "tiny_train.py"), str(config), str(tmp_path / "one")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*one, *args], check=True, env=env, timeout=TIMEOUT)
    final = "finetune/final"
    assert max_weight_diff(tmp_path / "two" / final, tmp_path / "one" / final) < 1e-5


# ---- sharded checkpoints --------------------------------------------------------------------

RESUMABLE = [
    "--stage",
    "finetune",
    "--fresh-connector",
    "stages.finetune.epochs=2",
    "stages.finetune.batch_size=2",
    "run.save_every=2",
]  # 12 samples, global batch 4: 6 steps, checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted sharded run (and its config) with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("sharded")
    config = write_tiny_config(root, num_train=12)
    _sharded(config, root / "reference", *RESUMABLE)
    return config, root / "reference"


KILLS = [
    pytest.param(["vlm_adapters.training.engine:prune_checkpoints", "0"], 2, id="after-checkpoint"),
    pytest.param(
        ["vlm_adapters.training.sharded_checkpoint:_write_synced:2", "1"], 2, id="rank-1-saving"
    ),
]


@pytest.mark.parametrize(("kill", "resumed_from"), KILLS)
def test_a_killed_sharded_run_resumes_to_bitwise_the_same_weights(
    tmp_path, reference, kill, resumed_from, capfd
):
    """SIGKILL process 0 right after the step-2 checkpoint, or process 1 while the step-4
    one is written (its part is on disk, process 0's is not complete): step 4 never appears,
    ``--resume auto`` continues from step 2 and every final weight equals the uninterrupted
    run's, bit for bit."""
    config, uninterrupted = reference
    killed = tmp_path / "killed"
    where, rank = kill
    code = _sharded(
        config, killed, *RESUMABLE, "--kill-in", where, "--kill-rank", rank, check=False
    )
    assert code != 0 and not (killed / "finetune" / "final").exists()
    checkpoints = killed / "finetune" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step-000002"]
    assert checkpoint_problem(checkpoints / "step-000002") is None
    capfd.readouterr()
    _sharded(config, killed, *RESUMABLE, "--resume", "auto")
    assert f"resumed from {checkpoints / f'step-{resumed_from:06d}'}" in capfd.readouterr().err
    final = "finetune/final"
    assert max_weight_diff(killed / final, uninterrupted / final) == 0.0
    steps = [json.loads(line)["step"] for line in (killed / "finetune/metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]
    leftovers = [p.name for p in killed.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_process_failing_to_write_its_part_fails_the_save_everywhere(tmp_path, rank, capfd):
    """Process `rank` cannot write its random states: no process hangs, both stop with an
    error, and no checkpoint (nor any temporary directory) is left."""
    config = write_tiny_config(tmp_path, num_train=8)
    out = tmp_path / "out"
    fail = ["--fail-in", "vlm_adapters.training.sharded_checkpoint:_write_synced"]
    args = ["--stage", "finetune", "--fresh-connector", "stages.finetune.batch_size=1"]
    code = _sharded(config, out, *args, "run.save_every=1", *fail, "--fail-rank", rank, check=False)
    assert code != 0
    errors = capfd.readouterr().err
    assert "injected failure in _write_synced" in errors
    assert "CheckpointError: checkpoint not written: another process could not" in errors
    assert list((out / "finetune" / "checkpoints").iterdir()) == []


def test_a_sharded_checkpoint_holds_each_process_part_and_nothing_pickled(reference):
    _, run = reference
    step = run / "finetune" / "checkpoints" / "step-000004"
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
    shards = [f"shards/shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    ranks = ["rng-rank-00000.json", "rng-rank-00001.json"]
    assert files == sorted([".vlm_adapters_files.json", *ranks, *shards, "trainer_state.json"])
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2
    assert {name: part["rank"] for name, part in state["files"].items()} == {
        shards[0]: 0, shards[1]: 1, ranks[0]: 0, ranks[1]: 1
    }  # fmt: skip
    keys: dict[str, list[list[int]]] = {}
    for shard in shards:
        with safe_open(str(step / shard), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                keys.setdefault(key, []).append(handle.get_slice(key).get_shape())
    weight, moment = "model.llm.model.lm_head.weight", "optimizer.llm.model.lm_head.weight.exp_avg"
    assert keys[weight] == keys[moment] == [[64, 32], [64, 32]]  # [128, 32], half per process
    model = build_vlm(tiny_model_config(str(run.parent / "tokenizer")))
    assert {f"model.{name}" for name in model.state_dict()} <= set(keys)


def test_the_final_model_of_a_sharded_run_loads_in_one_process(reference):
    import vlm_adapters

    _, run = reference
    model = vlm_adapters.load(run / "finetune" / "final")
    from safetensors.torch import load_file

    saved = load_file(str(run / "finetune" / "final" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model(input_ids=torch.tensor([[4, 5, 6]])).logits.shape == (1, 3, 128)


def _copy_checkpoints(run: Path, to: Path) -> Path:
    checkpoints = to / "checkpoints"
    shutil.copytree(run / "finetune" / "checkpoints", checkpoints)
    return checkpoints


def _drop(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-16])


def _foreign(path: Path) -> None:
    shutil.copy(path, path.with_name("shard-00003-model-00001-of-00001.safetensors"))


DAMAGE = [
    pytest.param("shards/shard-00002-model-00001-of-00001.safetensors", _drop,
                 "shard-00002-model-00001-of-00001.safetensors (the part of process 1) is missing",
                 id="a-shard-missing"),
    pytest.param("shards/shard-00001-model-00001-of-00001.safetensors", _truncate,
                 "(the part of process 0) has", id="a-shard-truncated"),
    pytest.param("rng-rank-00001.json", _drop, "rng-rank-00001.json (the part of process 1) is "
                 "missing", id="rng-missing"),
    pytest.param("shards/shard-00001-model-00001-of-00001.safetensors", _foreign,
                 "shard-00003-model-00001-of-00001.safetensors is not a part", id="extra-shard"),
    pytest.param("trainer_state.json", _drop, "trainer_state.json is missing",
                 id="never-completed"),
]  # fmt: skip


@pytest.mark.parametrize(("part", "damage", "message"), DAMAGE)
def test_a_sharded_checkpoint_missing_a_part_is_refused_and_resume_falls_back(
    tmp_path, reference, part, damage, message, caplog
):
    checkpoints = _copy_checkpoints(reference[1], tmp_path)
    damage(checkpoints / "step-000004" / part)
    problem = checkpoint_problem(checkpoints / "step-000004")
    assert problem is not None and message in problem
    assert checkpoint_problem(checkpoints / "step-000002") is None
    assert latest_checkpoint(checkpoints).name == "step-000002"
    assert "skipping" in caplog.text and "step-000004" in caplog.text


def test_a_checkpoint_is_refused_by_a_run_of_the_other_kind_or_size(tmp_path, reference):
    from transformers import get_scheduler

    from vlm_adapters.training.checkpoint import Position, save_checkpoint

    step = _copy_checkpoints(reference[1], tmp_path) / "step-000004"
    with pytest.raises(CheckpointError, match="sharded .FSDP2. run of 2 processes"):
        load_checkpoint(step, None, None, None)
    two, three = (SimpleNamespace(num_processes=n, process_index=0) for n in (2, 3))
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 3"):
        load_sharded_checkpoint(step, None, None, None, three)
    model = build_vlm(tiny_model_config(str(reference[1].parent / "tokenizer")))
    optimizer = torch.optim.AdamW(model.connector.parameters())
    scheduler = get_scheduler("constant", optimizer)
    plain = save_checkpoint(
        tmp_path / "plain" / "step-000001", model, optimizer, scheduler, Position()
    )
    assert checkpoint_problem(plain) is None
    with pytest.raises(CheckpointError, match="written by an unsharded run"):
        load_sharded_checkpoint(plain, None, None, None, two)
