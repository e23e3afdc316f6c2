"""The ``vlm-adapters`` command. Each subcommand lives in its own thin module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from vlm_adapters._env import env_flag
from vlm_adapters.errors import VLMError

DEBUG_ENV = "VLM_ADAPTERS_DEBUG"
ISSUES = "https://github.com/vlm-adapters/vlm-adapters/issues"

COMMANDS = (
    "demo",
    "list",
    "train",
    "cache-features",
    "eval",
    "generate",
    "chat",
    "export",
    "import",
    "merge",
    "new-plugin",
    "smoke",
)
MODULES = {"import": "import_hf"}  # `import` is a Python keyword


def build_parser() -> argparse.ArgumentParser:
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
    for name in COMMANDS:
        module = importlib.import_module(
            f"vlm_adapters.cli.{MODULES.get(name, name.replace('-', '_'))}"
        )
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the subcommand.

    Bad input (a :class:`~vlm_adapters.errors.VLMError`) ends in one line and exit code 2;
    anything else is a bug and prints its traceback with a request to report it (exit 1).
    ``--debug`` (or ``VLM_ADAPTERS_DEBUG=1``) shows the traceback of every error.
    """
    args = build_parser().parse_args(argv)
    nul = next((a for a in (sys.argv[1:] if argv is None else argv) if "\0" in a), None)
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
