"""A tiny training setup for the training tests, and a script that trains it.

Usage: python tiny_train.py CONFIG OUT [--resume auto] [--world N] [--fresh-connector]
[--kill-in MODULE:FUNCTION] [--in-order] [KEY=VALUE ...] (run under torchrun for several
processes; --world checks the process count; --kill-in SIGKILLs the run right after that
function ran; --in-order takes the samples in data-file order).
"""

from __future__ import annotations

import argparse
import json
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


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved models' weights."""
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def kill_inside(module: str, name: str) -> None:
    """Make ``module.name`` do its work, then SIGKILL the process before it returns."""
    import importlib
    import os
    import signal

    owner = importlib.import_module(module)
    original = getattr(owner, name)

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, name, killed)


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
    parser.add_argument("--in-order", action="store_true", help="batches in data-file order")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    from accelerate import PartialState

    if args.kill_in:
        kill_inside(*args.kill_in.split(":"))
    if args.in_order:
        in_file_order()

    from vlm_adapters.training import train

    summary = train(
        args.config,
        args.stage,
        args.out,
        args.resume,
        args.overrides,
        fresh_connector=args.fresh_connector,
    )
    state = PartialState()
    assert state.num_processes == args.world, f"world size {state.num_processes} != {args.world}"
    if state.is_main_process:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
