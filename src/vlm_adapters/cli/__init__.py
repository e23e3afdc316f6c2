"""The ``vlm-adapters`` command. Each subcommand lives in its own thin module in this package,
imported only when that subcommand runs: ``vlm-adapters --help`` imports no torch."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Iterable, Sequence
from types import ModuleType

from vlm_adapters._env import env_flag
from vlm_adapters.errors import VLMError

DEBUG_ENV = "VLM_ADAPTERS_DEBUG"
ISSUES = "https://github.com/vlm-adapters/vlm-adapters/issues"

COMMANDS = {
    "demo": "train a tiny VLM on synthetic shapes (both stages) and evaluate it",
    "list": "List vision backbones, connectors and LLM backends, and the plugin packages.",
    "train": "train a model (stage 1 align, stage 2 finetune)",
    "cache-features": "compute a frozen vision tower's features once, ahead of training",
    "convert-data": "LLaVA JSON + image folder -> Parquet or WebDataset shards, images embedded",
    "eval": "Accuracy and loss on a LLaVA-format Q&A file.",
    "generate": "Answer one prompt about an image (streamed).",
    "chat": "Chat about an image in the terminal.",
    "export": "Export a checkpoint for transformers' LLaVA classes.",
    "import": "Import a transformers LLaVA checkpoint to train on.",
    "merge": "Merge a LoRA checkpoint's adapters into a plain checkpoint (QLoRA: dequantized).",
    "new-plugin": "Write a ready-to-install plugin package (pyproject, stub components, tests).",
    "smoke": "write tiny data + a training config to smoke-test a (plugin's) component",
}
"""Each subcommand and its one-line summary, for ``--help`` and for its module's parser."""
MODULES = {"import": "import_hf"}  # `import` is a Python keyword


def command_module(name: str) -> ModuleType:
    """The module of subcommand ``name`` (imported now: it may import torch)."""
    return importlib.import_module(f"vlm_adapters.cli.{MODULES.get(name, name.replace('-', '_'))}")


def build_parser(full: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of every subcommand: those in ``full`` with their options (their modules
    imported), the others by name and summary only, enough for ``vlm-adapters --help``."""
    parser = argparse.ArgumentParser(
        prog="vlm-adapters",
        description="Compose, train and export LLaVA-style vision-language models.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of any error (or set {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    full = set(full)
    for name, summary in COMMANDS.items():
        if name in full:
            command_module(name).add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the subcommand.

    Bad input (a :class:`~vlm_adapters.errors.VLMError`) ends in one line and exit code 2;
    anything else is a bug and prints its traceback with a request to report it (exit 1).
    ``--debug`` (or ``VLM_ADAPTERS_DEBUG=1``) shows the traceback of every error.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(full=[_command(argv)]).parse_args(argv)
    nul = next((a for a in argv if "\0" in a), None)
    if nul is not None:
        print(
            f"vlm-adapters {args.command}: error: argument {nul!r} holds a NUL character, which "
            "no path or value may contain; remove it",
            file=sys.stderr,
        )
        return 2
    try:
        debug = args.debug or env_flag(DEBUG_ENV)
    except VLMError as exc:
        print(f"vlm-adapters: error: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except VLMError as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())  # always one line
        print(f"vlm-adapters {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: ours or a plugin's
        traceback.print_exc()
        print(
            f"vlm-adapters {args.command}: unexpected error (a bug, not your input); please "
            f"report it with the traceback above at {ISSUES}",
            file=sys.stderr,
        )
        return 1
