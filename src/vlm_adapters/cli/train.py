"""``vlm-adapters train CONFIG``: run the training recipe (or one stage) of a YAML config."""

from __future__ import annotations

import argparse
import json
import logging

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._rest import parse_rest


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help=COMMANDS["train"],
        description="Train the model of CONFIG. For several GPUs: `accelerate launch "
        "--config_file examples/accelerate/ddp.yaml -m vlm_adapters.cli train CONFIG ...`.",
    )
    _add_options(parser)
    parser.add_argument("config", help="training YAML (model, data, recipe, stages, run)")
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="e.g. stages.align.lr=1e-4"
    )
    parser.set_defaults(func=run)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage", default="all", choices=("all", "align", "finetune", "preference")
    )
    parser.add_argument("--out", default="runs/vlm", help="run directory (default: runs/vlm)")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint) or a checkpoint")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train stages again whose results are in --out, or use a non-empty --out",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the one the run started with",
    )
    parser.add_argument(
        "--fresh-connector",
        action="store_true",
        help="--stage finetune without a stage-1 connector in --out (starts untrained)",
    )


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from vlm_adapters.training import train

    opts = parse_rest(args, "vlm-adapters train CONFIG", _add_options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = train(
        args.config,
        stage=opts.stage,
        out=opts.out,
        resume=opts.resume,
        overrides=opts.overrides,
        overwrite=opts.overwrite,
        allow_config_change=opts.allow_config_change,
        fresh_connector=opts.fresh_connector,
    )
    if PartialState().is_main_process:
        print(json.dumps(result.summary, indent=2))
    return 0
