"""``vlm-adapters merge``: fold a checkpoint's LoRA adapters into its base weights."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "merge", help="Merge a LoRA checkpoint's adapters into a plain checkpoint."
    )
    parser.add_argument("checkpoint", help="Checkpoint directory written by save_pretrained.")
    parser.add_argument("--out", required=True, help="Directory for the merged checkpoint.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..model import VisionLanguageModel
    from ..training.lora import has_lora, merge_lora

    model = VisionLanguageModel.from_pretrained(args.checkpoint)
    if not has_lora(model):
        raise ValueError(f"{args.checkpoint}: nothing to merge: the checkpoint has no LoRA adapter")
    merge_lora(model).save_pretrained(args.out)
    print(f"merged {args.checkpoint} -> {args.out}")
    return 0
