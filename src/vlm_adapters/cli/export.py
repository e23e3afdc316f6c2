"""``vlm-adapters export``: write a checkpoint in the transformers LLaVA format."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._inference import add_output_options, add_trust_option, output_dir


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("export", help=COMMANDS["export"])
    parser.add_argument("checkpoint", help="Checkpoint directory written by save_pretrained.")
    parser.add_argument("--format", choices=["hf-llava"], default="hf-llava")
    add_output_options(parser)
    add_trust_option(parser)
    parser.add_argument(
        "--template", help="Chat template to ship; default: the checkpoint's, else vicuna_v1."
    )
    parser.add_argument(
        "--run",
        help="Training run folder (`train --out`) the checkpoint comes from, for the model "
        "card; default: found when the checkpoint is RUN/STAGE/final or a RUN/STAGE checkpoint.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.export import to_hf_llava, vllm_report
    from vlm_adapters.export.card import CARD_NAME, find_run, read_run
    from vlm_adapters.model import VisionLanguageModel

    out = output_dir(args, args.checkpoint)
    run_record = read_run(args.run) if args.run else find_run(args.checkpoint)
    model = VisionLanguageModel.from_pretrained(
        args.checkpoint, trust_remote_code=args.trust_remote_code
    )
    to_hf_llava(
        model,
        out,
        template=args.template,
        overwrite=True,
        protect=(args.checkpoint,),
        run=run_record,
    )
    kind = (
        "LlavaNextForConditionalGeneration"
        if model.vision.tiling
        else "LlavaForConditionalGeneration"
    )
    print(f"exported {args.checkpoint} -> {out} ({kind}); model card: {out}/{CARD_NAME}")
    print(vllm_report(model).line())
    return 0
