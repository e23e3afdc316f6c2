"""Train-step time and peak memory: vlm-adapters vs transformers' LlavaForConditionalGeneration.

Both sides get the same composition, the same weights and the same batch; each side is
measured in its own subprocess, so peak RSS is per side. See benchmarks/README.md.

    python benchmarks/train_step.py [--case align|full|both] [--steps N] [--warmup N] [--rounds N]
        [--compile]

``--compile`` compiles our side as ``run.compile: true`` does (each decoder layer and vision
block); transformers' side stays eager, the baseline the ratios are against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VISION = {
    "model_type": "clip_vision_model",  # CLIP ViT-B/16 at 224 px
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
}
LLM = {
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
FEATURE_LAYER = -2
BATCH, SEQ_LEN, NUM_PATCHES, SUPERVISED = 2, 512, 196, 40
SEED = 0
LOSS_TOLERANCE = 1e-4
WORDS = ["a photo of a cat on a red mat", "describe the image in one short sentence"]
RENAME_TO_LLAVA = (  # our state-dict prefixes -> LlavaForConditionalGeneration's
    ("vision.tower.", "model.vision_tower."),
    ("connector.proj.0.", "model.multi_modal_projector.linear_1."),
    ("connector.proj.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.model.", "model.language_model."),
    ("llm.model.lm_head.", "lm_head."),
)


# ---------------------------------------------------------------- parent (no torch imported)


def main() -> int:
    args = _parse_args()
    if args.worker:
        print(json.dumps(_run_worker(args)))
        return 0
    cases = ["align", "full"] if args.case == "both" else [args.case]
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        meta = _spawn("prepare", tmp, "align", args)
        results = [_compare(case, tmp, meta, args) for case in cases]
    return 0 if all(results) else 1


def _compare(case: str, tmp: str, meta: dict[str, Any], args: argparse.Namespace) -> bool:
    """Run both sides ``args.rounds`` times (alternating who goes first); print the ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    for r in range(args.rounds):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for side in order:
            runs[side].append(_spawn(side, tmp, case, args, meta["image_token_id"]))
    summary = {side: _summarise(rs) for side, rs in runs.items()}
    diff = abs(summary["ours"]["loss"] - summary["theirs"]["loss"])
    _print_case(case, summary, diff)
    if diff >= LOSS_TOLERANCE:
        print(f"  ERROR: losses differ by {diff:.2e} (>= {LOSS_TOLERANCE}); comparison invalid")
        return False
    return True


def _summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median step time over every timed step of every round; the largest peak RSS."""
    return {
        "loss": runs[0]["loss"],
        "step_s": statistics.median(t for run in runs for t in run["times"]),
        "peak_mb": max(run["peak_mb"] for run in runs),
    }


def _print_case(case: str, summary: dict[str, dict[str, float]], diff: float) -> None:
    ours, theirs = summary["ours"], summary["theirs"]
    print(f"case {case}:")
    print(f"  loss       ours {ours['loss']:.6f}  theirs {theirs['loss']:.6f}  |diff| {diff:.2e}")
    print(f"  step time  ours {ours['step_s']:.3f} s  theirs {theirs['step_s']:.3f} s")
    print(f"  peak RSS   ours {ours['peak_mb']:.0f} MB  theirs {theirs['peak_mb']:.0f} MB")
    print(f"  ratio step time (ours/theirs) {ours['step_s'] / theirs['step_s']:.3f}")
    print(f"  ratio peak RSS  (ours/theirs) {ours['peak_mb'] / theirs['peak_mb']:.3f}", flush=True)


def _spawn(
    side: str, tmp: str, case: str, args: argparse.Namespace, image_token_id: int = -1
) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its last stdout line is a JSON result."""
    cmd = [sys.executable, __file__, "--worker", side, "--dir", tmp, "--case", case]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--image-token-id", str(image_token_id)]
    cmd += ["--compile"] if args.compile else []
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["align", "full", "both"], default="both")
    parser.add_argument("--steps", type=_positive, default=5, help="Timed steps per run.")
    parser.add_argument("--warmup", type=_positive, default=2, help="Untimed steps first.")
    parser.add_argument(
        "--rounds", type=_positive, default=1, help="Runs per side, alternating the order."
    )
    parser.add_argument(
        "--compile", action="store_true", help="Compile our side as run.compile: true does."
    )
    parser.add_argument("--worker", choices=["prepare", "ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--image-token-id", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# ---------------------------------------------------------------- workers (one per process)


def _run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    tmp = Path(args.dir)
    if args.worker == "prepare":
        return _prepare(tmp)
    torch.manual_seed(SEED)
    build = _build_ours if args.worker == "ours" else _build_theirs
    model, step = build(tmp, args.case, args.image_token_id)
    if args.compile and args.worker == "ours":
        from vlm_adapters.training.compiling import compile_blocks

        compile_blocks(model)
    return _measure(model, step, _batch(args.image_token_id), args.steps, args.warmup)


def _our_config(tmp: Path) -> dict[str, Any]:
    return {
        "vision": {"type": "hf", "config": VISION, "feature_layer": FEATURE_LAYER},
        "connector": {"type": "mlp", "depth": 2, "activation": "gelu"},
        "llm": {"type": "hf", "config": LLM, "tokenizer": str(tmp / "tokenizer")},
    }


def _prepare(tmp: Path) -> dict[str, Any]:
    """Write the tokenizer and one set of random weights that both sides load."""
    import torch
    from safetensors.torch import save_model

    from vlm_adapters import build_vlm
    from vlm_adapters.demo import build_word_tokenizer

    build_word_tokenizer(WORDS, out_dir=tmp / "tokenizer")
    torch.manual_seed(SEED)
    model = build_vlm(_our_config(tmp))
    save_model(model, str(tmp / "weights.safetensors"))
    return {"image_token_id": model.image_token_id}


def _build_ours(tmp: Path, case: str, image_token_id: int) -> tuple[Any, Any]:
    from vlm_adapters import build_vlm

    model = build_vlm(_our_config(tmp))
    if model.image_token_id != image_token_id:
        raise RuntimeError(f"image token id {model.image_token_id} != prepared {image_token_id}")
    _load_weights(model, tmp / "weights.safetensors", lambda key: key)
    model.vision.requires_grad_(False)
    model.llm.requires_grad_(case == "full")

    def forward(batch: dict[str, Any]) -> Any:
        return model(**batch).loss

    return model, forward


def _build_theirs(tmp: Path, case: str, image_token_id: int) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=VISION,
        text_config=LLM,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    _load_weights(model, tmp / "weights.safetensors", _to_llava_key)
    model.model.vision_tower.requires_grad_(False)
    model.model.language_model.requires_grad_(case == "full")
    model.lm_head.requires_grad_(case == "full")

    def forward(batch: dict[str, Any]) -> Any:
        return model(**batch).loss

    return model, forward


def _to_llava_key(key: str) -> str:
    for ours, theirs in RENAME_TO_LLAVA:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(f"no Llava name for weight {key!r}")


def _load_weights(model: Any, path: Path, rename: Any) -> None:
    """Read every tensor of the safetensors file ``path`` straight into ``model``'s parameters.

    Plain reads (no mmap, no temporary copies), so loading adds nothing to the peak RSS.
    """
    import torch

    state = model.state_dict()
    loaded = set()
    with open(path, "rb") as f, torch.no_grad():
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for key, info in header.items():
            target = state[rename(key)]
            if info["dtype"] != "F32" or info["shape"] != list(target.shape):
                raise RuntimeError(f"{key}: {info} does not fit {target.shape} float32")
            f.seek(8 + size + info["data_offsets"][0])
            f.readinto(memoryview(target.numpy()).cast("B"))
            loaded.add(rename(key))
    missing = set(state) - loaded
    if missing:
        raise RuntimeError(f"weights not loaded: {sorted(missing)[:5]}")


def _batch(image_token_id: int) -> dict[str, Any]:
    """One image per sample at position 1, random text around it, the last tokens supervised."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    low = image_token_id + 1  # text ids above every special token of the tokenizer
    text = torch.randint(low, LLM["vocab_size"], (BATCH, SEQ_LEN - NUM_PATCHES), generator=g)
    image = torch.full((BATCH, NUM_PATCHES), image_token_id)
    input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)  # [B, T]
    labels = torch.full_like(input_ids, -100)
    labels[:, -SUPERVISED:] = input_ids[:, -SUPERVISED:]
    size = VISION["image_size"]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(BATCH, 3, size, size, generator=g),  # [B, 3, H, W]
        "labels": labels,
    }


def _measure(model: Any, forward: Any, batch: dict[str, Any], steps: int, warmup: int) -> dict:
    """Loss before any update, then ``warmup`` untimed and ``steps`` timed train steps."""
    import resource
    import time

    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        loss = forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    loss = step()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"loss": loss, "times": times, "peak_mb": peak_mb}


if __name__ == "__main__":
    sys.exit(main())
