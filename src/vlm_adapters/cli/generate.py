"""``vlm-adapters generate``: one answer about an image and/or a video, streamed to the
terminal."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._inference import (
    add_generation_options,
    load_checkpoint,
    open_image,
    open_video,
    stream_answer,
)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("generate", help=COMMANDS["generate"])
    add_generation_options(parser)
    parser.add_argument("--image", help="Image file (omit for a text-only prompt).")
    parser.add_argument("--video", help="Video file (a model with vision.video).")
    parser.add_argument("--prompt", required=True, help="The question or instruction.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_checkpoint(args.checkpoint, args.trust_remote_code)
    image = open_image(args.image) if args.image else None
    video = open_video(model, args.video) if args.video else None
    stream_answer(model, [{"from": "human", "value": args.prompt}], image, args, video)
    return 0
