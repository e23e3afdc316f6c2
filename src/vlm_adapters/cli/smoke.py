"""``vlm-adapters smoke OUT``: tiny data and a training config to smoke-test a component."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._rest import parse_rest
from vlm_adapters.testing.tiny import LLM_FAMILIES, VISION_VARIANTS


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "smoke",
        help=COMMANDS["smoke"],
        description="Writes OUT/data (synthetic shapes), OUT/tokenizer (offline word tokenizer) "
        "and OUT/smoke.yaml: a tiny model with the chosen components that trains both stages "
        "on a CPU in seconds. Built-in types get tiny configs; any other registered component "
        "(a plugin's) gets its default options, changed with KEY=VALUE overrides. Prints the "
        "`vlm-adapters train` command that runs it (or runs it with --train).",
    )
    _add_options(parser)
    parser.add_argument("out", metavar="OUT", help="directory to write (new, empty or ours)")
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="e.g. connector.window=4"
    )
    parser.set_defaults(func=run)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vision",
        default="hf",
        help="vision type, or a tiny variant of a built-in one: "
        f"{', '.join(VISION_VARIANTS)} (default: hf, a tiny CLIP)",
    )
    parser.add_argument("--connector", default="mlp", help="connector type (default: mlp)")
    parser.add_argument(
        "--llm",
        default="hf",
        help=f"LLM type, or a tiny family: {', '.join(LLM_FAMILIES)} (default: hf, a tiny Llama)",
    )
    parser.add_argument(
        "--images", type=int, default=8, help="synthetic training images (default: 8)"
    )
    parser.add_argument("--train", action="store_true", help="also run the training command")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty directory not ours"
    )


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.cli import main
    from vlm_adapters.testing.smoke import RUN_NAME, write_smoke_run

    opts = parse_rest(args, "vlm-adapters smoke OUT", _add_options)
    config = write_smoke_run(
        args.out,
        vision=opts.vision,
        connector=opts.connector,
        llm=opts.llm,
        overrides=opts.overrides,
        num_images=opts.images,
        overwrite=opts.overwrite,
    )
    command = ["train", str(config), "--out", str(config.parent / RUN_NAME)]
    print(f"wrote {config} (data and tokenizer beside it)")
    print(f"{'training' if opts.train else 'next'}: vlm-adapters {shlex.join(command)}")
    return main(command) if opts.train else 0
