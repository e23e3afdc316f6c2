"""``vlm-adapters export``: write a checkpoint in the transformers LLaVA format."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("export", help="Export a checkpoint for transformers' LLaVA classes.")
    parser.add_argument("checkpoint", help="Checkpoint directory written by save_pretrained.")
    parser.add_argument("--format", choices=["hf-llava"], default="hf-llava")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument(
        "--template", help="Chat template to ship; default: the checkpoint's, else vicuna_v1."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import to_hf_llava
    from ..model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(args.checkpoint)
    to_hf_llava(model, args.out, template=args.template)
    print(f"exported {args.checkpoint} -> {args.out} (LlavaForConditionalGeneration)")
    return 0
