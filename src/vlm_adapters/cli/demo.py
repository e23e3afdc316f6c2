"""``vlm-adapters demo``: the embedded end-to-end demo on synthetic shapes."""

from __future__ import annotations

import argparse
import logging

from vlm_adapters.cli import COMMANDS


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help=COMMANDS["demo"],
        description="Generates a shapes data set, builds the model of examples/configs/demo.yaml, "
        "runs stage 1 (align) and stage 2 (finetune) and reports held-out accuracy.",
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed (default 0)")
    parser.add_argument("--train-images", type=int, default=8000, help="training images")
    parser.add_argument("--eval-images", type=int, default=300, help="held-out images")
    parser.add_argument("--config", help="another demo-style YAML (default: the packaged one)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty directory not ours"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run_demo(
        args.out,
        seed=args.seed,
        num_train=args.train_images,
        num_eval=args.eval_images,
        config=args.config,
        overrides=args.overrides,
        overwrite=args.overwrite,
    )
    return 0
