"""``vlm-adapters merge``: fold a checkpoint's LoRA adapters into its base weights; a quantized
(QLoRA) checkpoint is dequantized on the way."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._inference import add_output_options, add_trust_option, output_dir


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "merge",
        help=COMMANDS["merge"],
    )
    parser.add_argument("checkpoint", help="Checkpoint directory written by save_pretrained.")
    add_output_options(parser)
    add_trust_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.errors import CheckpointError
    from vlm_adapters.model import VisionLanguageModel
    from vlm_adapters.model.lora import has_lora, is_quantized, merge_lora

    out = output_dir(args, args.checkpoint)
    model = VisionLanguageModel.from_pretrained(
        args.checkpoint, trust_remote_code=args.trust_remote_code
    )
    quantized = is_quantized(model)
    if not has_lora(model) and not quantized:
        raise CheckpointError(f"{args.checkpoint}: nothing to merge: it has no LoRA adapter")
    if quantized:
        print(
            f"warning: {args.checkpoint} is quantized; the merged checkpoint holds its "
            "dequantized weights (what the quantized layers computed with), not the original "
            "full-precision ones",
            file=sys.stderr,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="merge: dequantizing", category=UserWarning)
        merged = merge_lora(model)
    merged.save_pretrained(out, overwrite=True, protect=(args.checkpoint,))
    print(f"merged {args.checkpoint} -> {out}")
    return 0
