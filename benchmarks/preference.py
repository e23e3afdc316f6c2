"""Preference-stage step time and peak memory: vlm-adapters vs TRL's DPOTrainer on one export.

One composition (the ``train_step.py`` one: a CLIP ViT-B/16-sized tower at 224 px, an ``mlp``
connector, a 512-wide 8-layer Llama with a 32,000-token vocabulary) with random weights is
exported to transformers' LLaVA format; TRL trains ``LlavaForConditionalGeneration`` loaded
from that export, ours the model ``vlm_adapters.export.from_hf_llava`` imports from it. Both
train the connector and the LLM (tower frozen) with the DPO sigmoid loss on the same pairs
(the same token ids: each side's first loss and mean chosen log-probability must agree with
TRL's to 1e-3), fp32 on CPU. Each side runs
in its own subprocess, so ``ru_maxrss`` is that side's peak RSS. See benchmarks/README.md.

    python benchmarks/preference.py [--pairs N] [--answer-words N] [--steps N] [--warmup N]
        [--rounds N] [--threads N]

Sides: ``trl`` (DPOTrainer's ``compute_loss``, a live reference model: TRL refuses
precomputed reference log-probabilities for vision data); ``ours-live`` (a frozen copy as the
reference, the tower run once per pair and its features reused by the reference pass);
``ours-precomputed`` (the reference log-probabilities computed in one pass before training,
as ``reference: precomputed`` does; no reference model in memory); ``ours-precomputed-cache``
(the same, the tower's features read from a feature cache filled beforehand instead of
running the tower). A step is forward + backward + AdamW + ``zero_grad``.
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

sys.path.insert(0, str(Path(__file__).parent))
from train_step import LLM, SEED, VISION  # noqa: E402 (the same composition)

SIDES = ("trl", "ours-live", "ours-precomputed", "ours-precomputed-cache")
TEMPLATE = "vicuna_v1"
BETA = 0.1
TOLERANCE = 1e-3  # first loss and mean chosen log-probability (a sum over ~50 tokens)
WORDS = ["red", "green", "blue", "yellow", "square", "circle", "triangle", "one", "two"]


# ---------------------------------------------------------------- parent


def main() -> int:
    args = _parse_args()
    if args.worker:
        print(json.dumps(_run_worker(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        _spawn("prepare", tmp, args)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                runs[side].append(_spawn(side, tmp, args))
    return _report(runs)


def _report(runs: dict[str, list[dict[str, Any]]]) -> int:
    summary = {side: _summarise(results) for side, results in runs.items()}
    theirs = summary["trl"]
    head = f"{'side':24} {'loss':>9} {'logp':>10} {'step s':>8} {'CPU s':>8} {'peak MB':>8}"
    print(f"{head} {'time/TRL':>9} {'CPU/TRL':>8} {'mem/TRL':>8}")
    agree = True
    for side, row in summary.items():
        diffs = (abs(row[key] - theirs[key]) for key in ("loss", "logp"))
        agree &= max(diffs) <= TOLERANCE
        print(
            f"{side:24} {row['loss']:9.6f} {row['logp']:10.4f} {row['step_s']:8.3f} "
            f"{row['cpu_s']:8.3f} {row['peak_mb']:8.0f} {row['step_s'] / theirs['step_s']:9.3f} "
            f"{row['cpu_s'] / theirs['cpu_s']:8.3f} {row['peak_mb'] / theirs['peak_mb']:8.3f}"
        )
    print(
        "before the first step (models, data, optimizer): "
        + ", ".join(f"{side} {row['ready_mb']:.0f} MB" for side, row in summary.items())
    )
    if not agree:
        print(f"first steps differ by more than {TOLERANCE}: the comparison is void")
    return 0 if agree else 1


def _summarise(results: list[dict[str, Any]]) -> dict[str, float]:
    times = [t for result in results for t in result["times"]]
    cpu = [t for result in results for t in result["cpu"]]
    return {
        "loss": results[0]["loss"],
        "logp": results[0]["logp"],
        "step_s": statistics.median(times),
        "cpu_s": statistics.median(cpu),
        "peak_mb": max(result["peak_mb"] for result in results),
        "ready_mb": max(result["ready_mb"] for result in results),
    }


def _spawn(side: str, tmp: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its last stdout line is a JSON result."""
    cmd = [sys.executable, __file__, "--worker", side, "--dir", tmp]
    cmd += ["--pairs", str(args.pairs), "--answer-words", str(args.answer_words)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=_positive, default=2, help="Pairs per batch.")
    parser.add_argument(
        "--answer-words", type=_positive, default=48, help="Words (tokens) per answer, about."
    )
    parser.add_argument("--steps", type=_positive, default=3, help="Timed steps per run.")
    parser.add_argument("--warmup", type=_positive, default=1, help="Untimed steps first.")
    parser.add_argument(
        "--rounds", type=_positive, default=1, help="Runs per side, alternating the order."
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch threads per side (CPU time is "
        "the steadier measure on a shared machine with one thread).",
    )
    parser.add_argument("--worker", choices=["prepare", *SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
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
        return _prepare(tmp, args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    build = _trl_side if args.worker == "trl" else _our_side
    params, loss_of, chosen_logp = build(tmp, args)
    return _measure(params, loss_of, chosen_logp, args.steps, args.warmup)


def _prepare(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The export both sides train, and the pairs (JSON records + PNG images)."""
    import torch
    from PIL import Image

    from vlm_adapters import build_vlm, export
    from vlm_adapters.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(tmp / "tokenizer")
    torch.manual_seed(SEED)
    config = {
        "vision": {"type": "hf", "config": VISION, "feature_layer": -2},
        "connector": {"type": "mlp", "depth": 2, "activation": "gelu"},
        "llm": {"type": "hf", "config": LLM, "tokenizer": tokenizer},
    }
    export(build_vlm(config), tmp / "export", template=TEMPLATE)
    generator = torch.Generator().manual_seed(SEED)
    records = []
    for n in range(args.pairs):
        pixels = torch.randint(0, 256, (256, 256, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp / f"image-{n}.png")
        records.append(
            {
                "image": f"image-{n}.png",
                "conversations": [{"from": "human", "value": "<image>\nwhat shape is it?"}],
                "chosen": _answer(generator, args.answer_words),
                "rejected": _answer(generator, args.answer_words + 7 * n),
            }
        )
    (tmp / "pairs.json").write_text(json.dumps(records))
    return {}


def _answer(generator: Any, words: int) -> str:
    import torch

    picks = torch.randint(0, len(WORDS), (words,), generator=generator).tolist()
    return " ".join(WORDS[i] for i in picks)


def _records(tmp: Path) -> list[dict[str, Any]]:
    return json.loads((tmp / "pairs.json").read_text())


def _trl_side(tmp: Path, args: argparse.Namespace) -> tuple[list[Any], Any, Any]:
    """DPOTrainer on the export: the trainable parameters, its ``compute_loss`` on the batch
    its collator made, and the mean chosen log-probability of the last call."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    model = LlavaForConditionalGeneration.from_pretrained(tmp / "export")
    reference = LlavaForConditionalGeneration.from_pretrained(tmp / "export")
    model.model.vision_tower.requires_grad_(False)
    pairs = [
        {
            "prompt": [{"role": "user", "content": "what shape is it?"}],
            "chosen": [{"role": "assistant", "content": record["chosen"]}],
            "rejected": [{"role": "assistant", "content": record["rejected"]}],
            "images": [Image.open(tmp / record["image"]).convert("RGB")],
        }
        for record in _records(tmp)
    ]
    config = DPOConfig(
        output_dir=str(tmp / "trl"),
        loss_type=["sigmoid"],
        beta=BETA,
        per_device_train_batch_size=len(pairs),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=AutoProcessor.from_pretrained(tmp / "export"),
    )
    collator = DataCollatorForVisionPreference(trainer.processing_class, config.max_length)
    batch = dict(collator([dict(pair) for pair in pairs]))
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    chosen_logp = lambda: trainer._metrics["train"]["logps/chosen"][-1]  # noqa: E731
    return params, lambda: trainer.compute_loss(trainer.model, batch), chosen_logp


def _our_side(tmp: Path, args: argparse.Namespace) -> tuple[list[Any], Any, Any]:
    """The preference objective on the imported export, the reference as the side says (what
    `_trl_side` returns)."""
    import torch

    from vlm_adapters.data.pairs import PairCollator, PreferenceDataset
    from vlm_adapters.export import from_hf_llava
    from vlm_adapters.training.objectives import PreferenceObjective
    from vlm_adapters.training.preference import METRICS, PreferenceSettings
    from vlm_adapters.training.reference import evaluating, pair_forward

    model = from_hf_llava(tmp / "export")
    model.vision.requires_grad_(False)
    dataset, skipped = PreferenceDataset.for_model(
        model, _records(tmp), image_root=tmp, template=TEMPLATE
    ).precheck()
    assert not skipped
    batch = PairCollator(model.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    kind = "copy" if args.worker == "ours-live" else "precomputed"
    objective = PreferenceObjective(PreferenceSettings(loss="dpo", beta=BETA), kind)
    objective.setup(model, "preference")
    if kind == "precomputed":  # one pass of the model before it trains, as the stage does
        with torch.no_grad(), evaluating(model):
            logps = pair_forward(model, batch).sequence_logps
        batch["reference_logps"] = torch.stack(logps.chunk(2), dim=1)  # [P, 2]
    if args.worker.endswith("-cache"):  # what a filled feature cache hands the collator
        with torch.no_grad():
            batch["image_features"] = model.vision(batch.pop("pixel_values"))
        batch["pixel_values"] = None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    column = METRICS.index("logps/chosen")
    chosen_logp = lambda: float(objective.metric_sums()[column]) / batch["pairs"]  # noqa: E731
    return params, lambda: objective.loss(model, batch, denominator=batch["pairs"]), chosen_logp


def _measure(
    params: list[Any], loss_of: Any, chosen_logp: Any, steps: int, warmup: int
) -> dict[str, Any]:
    """Loss and mean chosen log-probability before any update, then ``warmup`` untimed and
    ``steps`` timed train steps."""
    import resource
    import time

    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step() -> float:
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    ready_mb = _rss_mb()
    loss = step()
    logp = chosen_logp()
    for _ in range(warmup - 1):
        step()
    times, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result = {"loss": loss, "logp": logp, "times": times, "cpu": cpu}
    return result | {"peak_mb": peak_mb, "ready_mb": ready_mb}


def _rss_mb() -> float:
    """The current resident set size (Linux)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


if __name__ == "__main__":
    sys.exit(main())
