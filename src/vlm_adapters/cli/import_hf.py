"""``vlm-adapters import``: turn a transformers LLaVA checkpoint into a vlm-adapters one."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.cli._inference import add_output_options, output_dir


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("import", help="Import a transformers LLaVA checkpoint to train on.")
    parser.add_argument("source", help="Directory (or hub id) of a LLaVA checkpoint.")
    add_output_options(parser)
    parser.add_argument(
        "--template", help="Chat template to record; default: the exported one, else vicuna_v1."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.export import from_hf_llava

    out = output_dir(args, args.source)
    model = from_hf_llava(args.source, template=args.template)
    model.save_pretrained(out, overwrite=True, protect=(args.source,))
    print(f"imported {args.source} -> {out}")
    return 0
