"""``vlm-adapters convert-data SRC --image-root DIR --out OUT``: a LLaVA file and its image
folder as Parquet files or WebDataset shards with the images embedded."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._rest import positive_int


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "convert-data",
        help=COMMANDS["convert-data"],
        description="Write the samples of a LLaVA JSON/JSONL file (images under --image-root) "
        "into --out as Parquet files (TRL columns id, messages, images) or WebDataset tar "
        "shards, images embedded. Bad samples are listed in OUT/skipped.jsonl; rerunning the "
        "same command continues after the last complete shard. See docs/data.md.",
    )
    parser.add_argument("source", help="LLaVA JSON or JSONL file")
    parser.add_argument("--image-root", required=True, help="folder the image paths start in")
    parser.add_argument("--out", required=True, help="output folder (new, empty or ours)")
    parser.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=positive_int, help="samples per shard (default 1000)")
    size.add_argument(
        "--shard-bytes", type=positive_int, help="close a shard once it holds this many bytes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.data.convert import SKIPPED, convert

    done = convert(
        args.source,
        args.image_root,
        args.out,
        format=args.format,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        progress=not args.no_progress,
    )
    listed = f", listed in {done.out / SKIPPED}" if done.skipped else ""
    print(
        f"{done.out}: {done.samples} samples in {len(done.shards)} {args.format} shards; "
        f"{done.skipped} skipped{listed}"
    )
    return 0
