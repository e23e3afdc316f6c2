"""Shared by the inference commands: loading a checkpoint and the generation options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import VisionLanguageModel


def load_checkpoint(path: str) -> VisionLanguageModel:
    """A vlm-adapters checkpoint, or a transformers LLaVA checkpoint, ready for inference."""
    import torch

    from ..export import from_hf_llava
    from ..model import VisionLanguageModel

    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: no config.json; pass a checkpoint directory")
    if json.loads(config.read_text()).get("model_type") == "llava":
        model = from_hf_llava(path)
    else:
        model = VisionLanguageModel.from_pretrained(path)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def add_generation_options(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument("checkpoint", help="Checkpoint directory (vlm-adapters or HF LLaVA).")
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
    """The image at ``path`` as RGB, with a clear error when it is missing."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: image not found")
    with Image.open(path) as image:
        return image.convert("RGB")
