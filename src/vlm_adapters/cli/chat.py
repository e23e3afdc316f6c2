"""``vlm-adapters chat``: a multi-turn conversation about an image, read from stdin."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._inference import (
    add_generation_options,
    load_checkpoint,
    open_image,
    stream_answer,
)
from vlm_adapters.errors import DataError

HELP = "commands: /image PATH (new image, new conversation), /reset, /quit"


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("chat", help=COMMANDS["chat"])
    add_generation_options(parser)
    parser.add_argument("--image", help="Image file to talk about.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.model.generation import resolve_template

    model = load_checkpoint(args.checkpoint, args.trust_remote_code)
    image = open_image(args.image) if args.image else None
    turns: list[dict[str, str]] = []
    print(f"template {resolve_template(model, args.template)}; {HELP}")
    while (line := _read()) is not None and line != "/quit":
        if line.startswith("/"):
            image, turns = _command(line, image, turns)
        elif line:
            turns.append({"from": "human", "value": line})
            turns.append({"from": "gpt", "value": _answer(model, turns, image, args)})
    return 0


def _read() -> str | None:
    try:
        return input("you> ").strip()
    except EOFError:
        return None


def _answer(model: Any, turns: list[dict[str, str]], image: Any, args: argparse.Namespace) -> str:
    """Stream the assistant's answer to stdout and return it."""
    print("assistant> ", end="", flush=True)
    return stream_answer(model, turns, image, args)


def _command(line: str, image: Any, turns: list[dict[str, str]]) -> tuple[Any, list]:
    """Handle /reset and /image PATH; anything else prints the help."""
    if line == "/reset":
        print("(conversation cleared)")
        return image, []
    if line.startswith("/image "):
        try:
            image = open_image(line.removeprefix("/image ").strip())
        except DataError as exc:
            print(f"error: {exc}")
            return image, turns
        print("(new image; conversation cleared)")
        return image, []
    print(HELP)
    return image, turns
