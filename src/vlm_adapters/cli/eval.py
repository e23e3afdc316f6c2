"""``vlm-adapters eval``: exact-match accuracy and answer loss on a LLaVA-format Q&A file, or a
benchmark metric (``--task-type``), with per-sample predictions written to ``--out``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._inference import add_trust_option, load_checkpoint
from vlm_adapters.cli._rest import positive_int
from vlm_adapters.errors import ConfigError


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
    parser.add_argument(
        "--task-type",
        choices=("exact", "vqa", "yesno", "choice", "preference"),
        default="exact",
        help="Metric: exact match + loss (default), VQAv2 soft accuracy, yes/no (POPE), "
        "multiple choice by log-likelihood (circular), reward accuracy on preference pairs; "
        "see docs/evaluation.md and docs/preference.md.",
    )
    parser.add_argument(
        "--reference",
        help="preference: the reference checkpoint (default: the checkpoint with its LoRA "
        "adapters off, or none: which answer is the more likely).",
    )
    parser.add_argument(
        "--out", help="Write predictions.jsonl (one row per sample) and summary.json here."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters._io import check_output_dir

    if args.out is not None:
        check_output_dir(args.out, protect=_ours(args))
    if args.task_type == "preference":
        return _preferences(args)
    if args.reference is not None:
        raise ConfigError("--reference: only --task-type preference uses a reference model")
    if args.task_type != "exact" or args.out is not None:
        return _score(args)
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


def _score(args: argparse.Namespace) -> int:
    """A task type's metrics; predictions and summary into ``--out`` when given."""
    from vlm_adapters._io import atomic_dir
    from vlm_adapters.data import load_records
    from vlm_adapters.inference.tasks import score

    model = load_checkpoint(args.checkpoint, args.trust_remote_code)
    records = load_records(args.data)
    scored = score(
        model,
        records,
        args.images,
        args.task_type,
        args.template,
        args.batch_size,
        args.max_new_tokens,
        source=args.data,
    )
    if args.out is not None:
        with atomic_dir(args.out, protect=_ours(args)) as tmp:
            rows = "".join(json.dumps(row) + "\n" for row in scored.samples)
            (tmp / "predictions.jsonl").write_text(rows)
            (tmp / "summary.json").write_text(json.dumps(scored.summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(scored.summary, indent=2))
        return 0
    metrics = {k: v for k, v in scored.summary.items() if isinstance(v, float)}
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  n {scored.summary['n']}")
    for row in scored.samples[: args.show]:
        print(json.dumps(row))
    if args.out is not None:
        print(f"predictions: {args.out}/predictions.jsonl")
    return 0


def _preferences(args: argparse.Namespace) -> int:
    """Reward accuracy on a file of preference pairs (docs/preference.md)."""
    from vlm_adapters._io import atomic_dir
    from vlm_adapters.data import load_records
    from vlm_adapters.inference.preference import evaluate_preferences

    model = load_checkpoint(args.checkpoint, args.trust_remote_code)
    reference = None
    if args.reference is not None:
        reference = load_checkpoint(args.reference, args.trust_remote_code)
    records = load_records(args.data)
    summary = evaluate_preferences(
        model, records, args.images, args.template, args.batch_size, reference, source=args.data
    )
    if args.out is not None:
        with atomic_dir(args.out, protect=_ours(args)) as tmp:
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"reward_accuracy {summary['reward_accuracy']:.4f}  reward_margin "
        f"{summary['reward_margin']:.4f}  n {summary['n']}  skipped {summary['skipped']}  "
        f"reference {summary['reference']}"
    )
    return 0


def _ours(args: argparse.Namespace) -> list[str]:
    """The checkpoints ``--out`` must not overlap: the one scored and any ``--reference``."""
    return [args.checkpoint, *([args.reference] if args.reference is not None else [])]
