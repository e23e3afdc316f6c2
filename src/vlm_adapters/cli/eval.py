"""``vlm-adapters eval``: exact-match accuracy and answer loss on a LLaVA-format Q&A file."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._inference import add_trust_option, load_checkpoint
from vlm_adapters.cli._rest import positive_int


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("eval", help=COMMANDS["eval"])
    parser.add_argument("checkpoint", help="Checkpoint directory (vlm-adapters or HF LLaVA).")
    add_trust_option(parser)
    parser.add_argument("--data", required=True, help="LLaVA JSON/JSONL; last turn = reference.")
    parser.add_argument("--images", required=True, help="Directory the image paths start from.")
    parser.add_argument("--template", help="Chat template; default: the checkpoint's.")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--show", type=int, default=5, help="Print this many sample answers.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.data import load_records
    from vlm_adapters.inference.evaluation import evaluate

    model = load_checkpoint(args.checkpoint, args.trust_remote_code)
    records = load_records(args.data)
    result = evaluate(
        model,
        records,
        args.images,
        args.template,
        args.batch_size,
        args.max_new_tokens,
        source=args.data,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}  n {result['n']}")
    for kind, accuracy in result["per_type"].items():
        print(f"  {kind:<12} {accuracy:.4f}")
    for question, reference, prediction in result["samples"][: args.show]:
        print(f"Q: {question} | reference: {reference} | prediction: {prediction}")
    return 0
