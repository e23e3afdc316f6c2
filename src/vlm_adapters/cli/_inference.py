"""Shared by the inference commands: loading a checkpoint and the generation options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_adapters._io import check_output_dir, is_empty_dir
from vlm_adapters.errors import OutputError

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel


def load_checkpoint(path: str, trust_remote_code: bool = False) -> VisionLanguageModel:
    """A vlm-adapters checkpoint, or a transformers LLaVA checkpoint, ready for inference."""
    import torch

    from vlm_adapters.loading import load

    model = load(path, trust_remote_code=trust_remote_code)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Accept a checkpoint that asks to run code shipped with its model (never implied).",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="Output directory (new or empty).")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Write into a non-empty --out: replace what we write there, keep the rest.",
    )


def output_dir(args: argparse.Namespace, source: str) -> Path:
    """``--out``, checked before any work: never the source, never a non-empty directory
    unless ``--overwrite``."""
    out = check_output_dir(args.out, overwrite=True, protect=[source])  # overlap, a file
    if is_empty_dir(out) or not out.exists() or args.overwrite:
        return out
    raise OutputError(
        f"--out {out} exists and is not empty; choose a new directory, or pass --overwrite "
        "(only the files vlm-adapters writes are replaced; yours are kept)"
    )


def add_generation_options(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument("checkpoint", help="Checkpoint directory (vlm-adapters or HF LLaVA).")
    add_trust_option(parser)
    parser.add_argument(
        "--template", help="Chat template; default: the checkpoint's, else vicuna_v1."
    )
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling.")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "template": args.template,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def open_image(path: str) -> Any:
    """The image at ``path`` as RGB; a one-line error when it is missing, corrupt or too big."""
    from vlm_adapters.data.images import open_image as open_checked

    return open_checked(path)
