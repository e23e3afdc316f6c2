"""``vlm-adapters chat``: a multi-turn conversation about an image or a video, read from
stdin."""

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
from vlm_adapters.errors import DataError

HELP = (
    "commands: /image PATH (new image, new conversation), /video PATH (new video, new "
    "conversation), /reset, /quit"
)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("chat", help=COMMANDS["chat"])
    add_generation_options(parser)
    parser.add_argument("--image", help="Image file to talk about.")
    parser.add_argument("--video", help="Video file to talk about (a model with vision.video).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlm_adapters.model.generation import resolve_template

    model = load_checkpoint(args.checkpoint, args.trust_remote_code)
    image = open_image(args.image) if args.image else None
    media = {"image": image, "video": open_video(model, args.video) if args.video else None}
    turns: list[dict[str, str]] = []
    print(f"template {resolve_template(model, args.template)}; {HELP}")
    while (line := _read()) is not None and line != "/quit":
        if line.startswith("/video "):
            turns = _new_video(model, line.removeprefix("/video ").strip(), media, turns)
        elif line.startswith("/"):
            media["image"], turns = _command(line, media["image"], turns)
        elif line:
            turns.append({"from": "human", "value": line})
            turns.append({"from": "gpt", "value": _answer(model, turns, media, args)})
    return 0


def _new_video(model: Any, path: str, media: dict[str, Any], turns: list) -> list:
    """Sample the video at ``path`` into ``media``; a new conversation (the old one kept when
    the video cannot be read)."""
    try:
        media["video"] = open_video(model, path)
    except DataError as exc:
        print(f"error: {exc}")
        return turns
    print("(new video; conversation cleared)")
    return []


def _read() -> str | None:
    try:
        return input("you> ").strip()
    except EOFError:
        return None


def _answer(
    model: Any, turns: list[dict[str, str]], media: dict[str, Any], args: argparse.Namespace
) -> str:
    """Stream the assistant's answer to stdout and return it."""
    print("assistant> ", end="", flush=True)
    return stream_answer(model, turns, media["image"], args, media["video"])


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
