"""A tiny training setup for the training tests, and a script that trains it.

Usage: python tiny_train.py CONFIG OUT [--resume auto] [--world N] [--fresh-connector]
[--kill-in MODULE:FUNCTION[:N] [--kill-rank R]] [--fail-in MODULE:FUNCTION [--fail-rank R]]
[--in-order] [--record-sharding FILE] [--record-batches PREFIX]
[KEY=VALUE ...] (run under torchrun for several processes; --world checks the process count;
--kill-in SIGKILLs the run right after that function returned from its N-th call (default 1),
in process R only with --kill-rank; --fail-in makes that function raise OSError instead;
--in-order takes the samples in data-file order;
--record-sharding writes FILE.<stage>.<rank>.json from inside each stage's first step: each
parameter's and gradient's class and sizes, and the FSDP units; --record-batches writes every
micro-batch each process trains on to PREFIX.<rank>.<step>.<n>.safetensors). Set
VLM_ADAPTERS_FULLY_SHARD=1 to shard with fully_shard instead of DDP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import yaml

from vlm_adapters.demo import generate_shapes
from vlm_adapters.testing.tiny import tiny_model_config, tiny_tokenizer


def write_tiny_config(root: Path, num_train: int = 16, run: dict | None = None) -> Path:
    """Shapes data, a word tokenizer and a tiny two-stage config under `root`."""
    shapes = generate_shapes(root / "shapes", num_train=num_train, num_eval=4, image_size=32)
    config = tiny_model_config(tiny_tokenizer(root / "tokenizer"))
    stage = {"epochs": 1, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"}
    config |= {
        "data": {
            "align": {
                "path": str(shapes.align),
                "image_root": str(shapes.root),
                "template": "plain",
            },
            "finetune": {
                "path": str(shapes.finetune),
                "image_root": str(shapes.root),
                "template": "llama3",
            },
            "max_length": 256,
            "group_by_length": False,
        },
        "recipe": ["align", "finetune"],
        "stages": {"align": dict(stage), "finetune": {**stage, "lr": 3e-3}},
        "run": {"seed": 0, "log_every": 1, **(run or {})},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


REJECTED = "i do not know"


def write_pairs(root: Path, finetune: Path, count: int | None = None) -> Path:
    """A separable toy preference set (LLaVA-style pair JSON) from the shapes finetune data:
    the prompt is a sample's first question, chosen its true answer, rejected always
    `REJECTED`."""
    records = json.loads(finetune.read_text())[:count]
    pairs = [
        {
            "id": f"pair-{n}",
            "image": record["image"],
            "conversations": [record["conversations"][0]],
            "chosen": record["conversations"][1]["value"],
            "rejected": REJECTED,
        }
        for n, record in enumerate(records)
    ]
    path = root / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


def write_preference_config(
    root: Path, num_train: int = 8, stage: dict | None = None, run: dict | None = None
) -> Path:
    """`write_tiny_config` plus a preference stage on `write_pairs`, the recipe only it."""
    path = write_tiny_config(root, num_train=num_train, run=run)
    config = yaml.safe_load(path.read_text())
    finetune = config["data"]["finetune"]
    pairs = write_pairs(root, Path(finetune["path"]))
    config["data"]["preference"] = {**finetune, "path": str(pairs)}
    config["recipe"] = ["preference"]
    settings = {"epochs": 1, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0}
    config["stages"]["preference"] = {**settings, "scheduler": "constant", **(stage or {})}
    path.write_text(yaml.safe_dump(config))
    return path


TEXT_ONLY = [
    {"from": "human", "value": "what colour is the circle ?"},
    {"from": "gpt", "value": "red"},
]


def with_text_only(root: Path, config: Path, pattern: str, stage: str = "finetune") -> Path:
    """Rewrite ``stage``'s data file as ``pattern`` ("t" text-only, "i" image samples, in
    file order) and point the config at it."""
    data = yaml.safe_load(config.read_text())
    source = Path(data["data"][stage]["path"])
    images = iter(json.loads(source.read_text()))
    records = [
        {"id": f"t{n}", "conversations": TEXT_ONLY} if kind == "t" else next(images)
        for n, kind in enumerate(pattern)
    ]
    path = root / f"{stage}-{pattern}.json"
    path.write_text(json.dumps(records))
    data["data"][stage]["path"] = str(path)
    config.write_text(yaml.safe_dump(data))
    return config


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved models' weights."""
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def kill_inside(module: str, name: str, call: str = "1", rank: int | None = None) -> None:
    """Make ``module.name`` do its work, then, on its `call`-th call, SIGKILL the process (only
    process `rank` when given) before it returns."""
    import importlib
    import signal

    owner = importlib.import_module(module)
    original = getattr(owner, name)
    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return
    calls = []

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == int(call):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, killed)


def fail_inside(module: str, name: str, rank: int | None = None) -> None:
    """Make ``module.name`` raise OSError instead of doing its work (in process `rank` only
    when given)."""
    import importlib

    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return

    def failed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(f"injected failure in {name}")

    setattr(importlib.import_module(module), name, failed)


def record_sharding(path: str) -> None:
    """In each stage's first optimizer step (after backward, before clipping) write to
    ``path.<stage>.<rank>.json`` each parameter's class, local and global size and gradient
    class, and the names of the modules that are FSDP units."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from vlm_adapters.training.loop import Trainer

    original = Trainer._update

    def local(tensor):  # noqa: ANN001, ANN202
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def update(self):  # noqa: ANN001, ANN202
        out = Path(f"{path}.{self.stage}.{os.environ.get('RANK', '0')}.json")
        if not out.exists():
            params = {
                name: {
                    "class": type(p).__name__,
                    "local": local(p).numel(),
                    "numel": p.numel(),
                    "grad": type(p.grad).__name__ if p.grad is not None else None,
                }
                for name, p in self.engine.wrapped.named_parameters()
            }
            wrapped = self.engine.wrapped.named_modules()
            units = [n for n, m in wrapped if isinstance(m, FSDPModule)]
            out.write_text(json.dumps({"params": params, "units": units}))
        return original(self)

    Trainer._update = update


def record_batches(prefix: str) -> None:
    """Write every micro-batch of every optimizer step (tensors, and the streamed sample
    indices as metadata) to ``prefix.<rank>.<step>.<n>.safetensors``."""
    import torch
    from safetensors.torch import save_file

    from vlm_adapters.training.loop import Trainer

    original = Trainer._step

    def step(self, window, *rest):  # noqa: ANN001, ANN002, ANN202
        rank = os.environ.get("RANK", "0")
        for n, batch in enumerate(window):
            tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            meta = {"samples": json.dumps(batch.get("samples", []))}
            name = f"{prefix}.{rank}.{self._steps_done:04d}.{n}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, name, metadata=meta)
        return original(self, window, *rest)

    Trainer._step = step


def in_file_order() -> None:
    """Make every epoch yield the samples in data-file order (to place samples on ranks)."""
    from vlm_adapters.data import LengthGroupedSampler

    LengthGroupedSampler.__iter__ = lambda self: iter(range(len(self.lengths)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--stage", default="all")
    parser.add_argument("--resume")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--fresh-connector", action="store_true")
    parser.add_argument("--kill-in", help="MODULE:FUNCTION to SIGKILL this process in")
    parser.add_argument("--kill-rank", type=int, help="only this process is killed")
    parser.add_argument("--fail-in", help="MODULE:FUNCTION that raises OSError instead")
    parser.add_argument("--fail-rank", type=int, help="only this process fails")
    parser.add_argument("--record-sharding", help="file prefix for what the first step sees")
    parser.add_argument("--in-order", action="store_true", help="batches in data-file order")
    parser.add_argument("--record-batches", help="file prefix for every micro-batch trained on")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    from accelerate import PartialState

    if args.kill_in:
        kill_inside(*args.kill_in.split(":"), rank=args.kill_rank)
    if args.fail_in:
        fail_inside(*args.fail_in.split(":"), rank=args.fail_rank)
    if args.record_sharding:
        record_sharding(args.record_sharding)
    if args.in_order:
        in_file_order()
    if args.record_batches:
        record_batches(args.record_batches)

    from vlm_adapters.training import train

    logging.basicConfig(format="%(message)s")
    logging.getLogger("vlm_adapters").setLevel(logging.INFO)
    summary = train(
        args.config,
        args.stage,
        args.out,
        args.resume,
        args.overrides,
        fresh_connector=args.fresh_connector,
    ).summary
    state = PartialState()
    assert state.num_processes == args.world, f"world size {state.num_processes} != {args.world}"
    if state.is_main_process:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
