"""The ``vlm-adapters`` command. Each subcommand lives in its own thin module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = (
    "demo",
    "list",
    "train",
    "eval",
    "generate",
    "chat",
    "export",
    "import",
    "merge",
    "new-plugin",
)
MODULES = {"import": "import_hf"}  # `import` is a Python keyword


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-adapters",
        description="Compose, train and export LLaVA-style vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(
            f"vlm_adapters.cli.{MODULES.get(name, name.replace('-', '_'))}"
        )
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv``, run the subcommand, turn known errors into one line."""
    from vlm_adapters.errors import VLMError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (VLMError, FileNotFoundError, ValueError) as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"vlm-adapters {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
