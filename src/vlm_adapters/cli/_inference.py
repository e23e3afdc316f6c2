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


def stream_answer(
    model: VisionLanguageModel,
    turns: list[dict[str, str]],
    image: Any,
    args: argparse.Namespace,
    video: Any = None,
) -> str:
    """The answer to ``turns`` about ``image`` and ``video`` (a sampled
    :class:`~vlm_adapters.data.video.Clip`; None: neither), printed to stdout as it is
    generated, and returned. If the streamer received nothing (an LLM backend whose
    ``generate`` ignores ``streamer``), the answer is printed once it is complete."""
    from transformers import TextStreamer

    from vlm_adapters.data.processor import with_video_times
    from vlm_adapters.model.generation import generate_ids

    # The prompt reaches the LLM as embeddings: transformers' first put (the prompt's ids) is
    # empty and a backend need not make it, so no put is skipped as the prompt.
    streamer = _Counting(TextStreamer(model.tokenizer, skip_special_tokens=True))
    kwargs = generation_kwargs(args)
    videos = None
    if video is not None:
        videos = [video.frames]
        if model.video is not None and model.video.timestamps:
            turns = with_video_times(turns, [video])
    ids = generate_ids(model, [turns], [image], streamer=streamer, videos=videos, **kwargs)[0]
    answer = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
    if not streamer.tokens:
        print(answer, flush=True)
    return answer


class _Counting:
    """A streamer that passes tokens on to ``streamer`` and counts them."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer
        self.tokens = 0

    def put(self, value: Any) -> None:
        self.tokens += value.numel()
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def open_image(path: str) -> Any:
    """The image at ``path`` as RGB; a one-line error when it is missing, corrupt or too big."""
    from vlm_adapters.data.images import open_image as open_checked

    return open_checked(path)


def open_video(model: VisionLanguageModel, path: str) -> Any:
    """The frames the model's ``vision.video`` settings sample from the video at ``path``
    (a :class:`~vlm_adapters.data.video.Clip`); a one-line error when the model takes no
    videos, or the file is missing, unreadable, holds no video or is too big."""
    from pathlib import Path

    from vlm_adapters.data.video import sample_video
    from vlm_adapters.errors import DataError

    if model.video is None:
        raise DataError(
            f"--video {path}: this model takes no videos (its config has no vision.video)"
        )
    return sample_video(Path(path), path, model.video.sampling())
