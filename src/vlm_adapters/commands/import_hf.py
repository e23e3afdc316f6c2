"""``vlm-adapters import``: turn a transformers LLaVA checkpoint into a vlm-adapters one."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("import", help="Import a transformers LLaVA checkpoint to train on.")
    parser.add_argument("source", help="Directory (or hub id) of a LLaVA checkpoint.")
    parser.add_argument("--out", required=True, help="Directory for the vlm-adapters checkpoint.")
    parser.add_argument(
        "--template", help="Chat template to record; default: the exported one, else vicuna_v1."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import from_hf_llava

    from_hf_llava(args.source, template=args.template).save_pretrained(args.out)
    print(f"imported {args.source} -> {args.out}")
    return 0
