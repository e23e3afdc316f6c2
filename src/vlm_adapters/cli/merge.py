"""``vlm-adapters merge``: fold a checkpoint's LoRA adapters into its base weights."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.cli._inference import add_output_options, add_trust_option, output_dir


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "merge", help="Merge a LoRA checkpoint's adapters into a plain checkpoint."
    )
    parser.add_argument("checkpoint", help="Checkpoint directory written by save_pretrained.")
    add_output_options(parser)
    add_trust_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.errors import CheckpointError
    from vlm_adapters.model import VisionLanguageModel
    from vlm_adapters.model.lora import has_lora, merge_lora

    out = output_dir(args, args.checkpoint)
    model = VisionLanguageModel.from_pretrained(
        args.checkpoint, trust_remote_code=args.trust_remote_code
    )
    if not has_lora(model):
        raise CheckpointError(f"{args.checkpoint}: nothing to merge: it has no LoRA adapter")
    merge_lora(model).save_pretrained(out, overwrite=True, protect=(args.checkpoint,))
    print(f"merged {args.checkpoint} -> {out}")
    return 0
