"""``vlm-adapters import``: turn a transformers LLaVA checkpoint into a vlm-adapters one."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._inference import add_output_options, output_dir


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("import", help=COMMANDS["import"])
    parser.add_argument("source", help="Directory (or hub id) of a LLaVA checkpoint.")
    add_output_options(parser)
    parser.add_argument(
        "--template", help="Chat template to record; default: the exported one, else vicuna_v1."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.export import from_hf_llava
    from vlm_adapters.export.hf_llava_read import ignored_code_request

    out = output_dir(args, args.source)
    model = from_hf_llava(args.source, template=args.template)
    model.save_pretrained(out, overwrite=True, protect=(args.source,))
    print(f"imported {args.source} -> {out}")
    asked = ignored_code_request(args.source)
    if asked:
        print(
            f"notice: {args.source}: its config.json sets {asked}: true, which was ignored (no "
            "code of the checkpoint ran); vlm-adapters takes trust_remote_code only from you, "
            "your config or a command's --trust-remote-code flag, never from a checkpoint",
            file=sys.stderr,
        )
    return 0
