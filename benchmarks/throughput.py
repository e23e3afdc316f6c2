"""Training and generation throughput on an instruction-mix-like dataset: ours vs transformers.

The composition of ``train_step.py`` (a CLIP ViT-B/16-sized tower at 224 px = 196 patches, a
2-layer MLP connector, a 512-wide 8-layer Llama with a 32,000-token vocabulary and 1,024
positions), the same random weights on both sides, fp32. Every configuration runs one epoch
over the same synthetic samples in its own subprocess, and reports samples/s, supervised
tokens/s and visual tokens/s; samples/s is printed as a ratio to transformers'
``LlavaForConditionalGeneration`` (and, in the ``(cpu)`` column, the same ratio from process
CPU time, less sensitive to other jobs on the machine):

- finetune (connector + LLM train, tower frozen): (a) transformers, padded batches in random
  order; (a2) transformers, padded batches in the order of transformers' own
  ``LengthGroupedSampler`` (what a ``Trainer`` user gets from
  ``train_sampling_strategy="group_by_length"``, formerly ``group_by_length=True``, over the
  samples' tokenized lengths); (b) ours, the same batches as (a); (c) ours,
  ``LengthGroupedSampler`` batches; (d) ours, packed (``TokenBudgetBatchSampler`` +
  ``PackingCollator`` + ``PackedAttention``, as the trainer packs: rows of at most
  ``max_length`` tokens, a budget of ``batch x max_length`` tokens, the padded batches'
  capacity);
- align (only the connector trains): (a') transformers and (b') ours, padded, random order;
  (e) ours reading a ``FeatureCache`` filled beforehand (the fill time is reported apart);
- generation: new tokens/s of greedy decoding, the same prompts, stop tokens and
  ``max_new_tokens`` on both sides;
- AnyRes (high resolution, ours only): (f) the finetune of (b), the same samples in the same
  padded batches, with ``vision.tiling`` on the same tower (LLaVA-NeXT's grids 1x2, 2x1, 2x2,
  1x3, 3x1 of 224-pixel tiles, at most 4 tiles plus the overview; the LLM's context raised to
  4,096 positions, which RoPE allows without new weights; ``connector.image_newline`` the only
  new weight). The synthetic images (256-640 px) mostly take the 2x2 grid: 5 tower passes
  and about 800 visual tokens an image instead of 1 and 196. Samples/s and visual tokens/s are
  printed next to (b)'s; transformers is not run for it.

A step is forward + backward + gradient clipping (1.0) + AdamW + ``zero_grad`` on the
parameters the stage trains; the loss is the sum of token losses divided by the supervised
tokens of the batch, as ``Trainer._step`` does.

The synthetic finetune mix (token counts with this benchmark's word tokenizer, where a word is
a token; 196 tokens per image; the vicuna_v1 template adds about 36 tokens and 5 per turn):

| kind | share | images | turns | question words | answer words |
|---|---|---|---|---|---|
| short VQA | 40% | 1 | 1-8 | 12-20 | 1-3 |
| grounding | 15% | 1 | 2-8 | 10-16 | 3-10 |
| conversation | 22% | 1 | 2-5 | 6-16 | 20-110 |
| description | 15% | 1 | 1 | 6-14 | 60-260 |
| text-only | 5% | 0 | 1-4 | 3-60 | 3-280 (at most 900 words in all) |
| multi-image | 3% | 2-3 | 1-2 | 8-20 | 5-60 |

What each kind imitates in LLaVA-1.5's 665K mix: short VQA = VQAv2, GQA, OCR-VQA, TextVQA
(many short questions about one image merged into one multi-turn sample, each ending with
"answer the question using a single word or phrase"); grounding = RefCOCO / Visual Genome
region questions and short region captions; conversation = LLaVA-Instruct conversation_58k;
description = detail_23k and complex_reasoning_77k (one question, one long answer); text-only
= ShareGPT (40K of the 665K samples, 6%); multi-image = interleaved data as LLaVA-NeXT adds it
(the 665K mix itself has none, but the data path must handle them).

Word counts are drawn log-uniformly inside each range (right-skewed, like real answers).
Over many samples the lengths run from about 50 tokens (a short text-only exchange) to about
900 (a long conversation or ShareGPT sample), 18x, median about 390: as in the real mix, the
short end is the text-only tail and the long end multi-turn or multi-image samples (with
LLaVA-1.5's 576-token images, VQA samples of ~650 tokens sit beside ShareGPT ones of 2,000+).
A small run holds only a few text-only samples, so its own spread (printed) is narrower.

The align stage uses caption pairs instead, as LLaVA's stage 1 does (LCS-558K: one image,
"<image>" plus an instruction in the human turn, a caption of 5-30 words as the answer, the
``plain`` template). Images: ``--images`` distinct JPEG files
(300 by default, 256-640 px a side) reused by every sample.

With the scale part (skip it with ``--skip-scale``), a 665,000-record file of the same mix is
written, and two things are measured: the seconds from starting ``vlm-adapters train`` (a tiny
model, stage finetune, vicuna_v1, one epoch, batch 256, length-grouped) to its first optimizer
step, and the resident memory that ``load_records`` + ``ConversationDataset.precheck`` +
``LengthGroupedSampler`` add in a fresh process that holds the tiny model. Not a test: see
docs/performance.md.

    python benchmarks/throughput.py [--samples N] [--rounds N] [--skip-scale] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402  (the same composition, weights and mapping)
    LLM,
    LOSS_TOLERANCE,
    SEED,
    _build_ours,
    _build_theirs,
    _our_config,
    _positive,
)

TEMPLATE, ALIGN_TEMPLATE = "vicuna_v1", "plain"
MAX_LENGTH = LLM["max_position_embeddings"]  # 1024: rows and samples never exceed it
BATCH = 4  # padded batch; the packed token budget is BATCH * MAX_LENGTH
HF_MEGA_BATCHES = 50  # transformers' LengthGroupedSampler: batches sorted together
PROMPTS, NEW_TOKENS = 8, 32  # generation: prompts (in batches of BATCH) and new tokens each
SCALE_RECORDS, SCALE_BATCH = 665_000, 256
VQA_SUFFIX = "answer the question using a single word or phrase ."
ALIGN_ASK = "render a clear and concise summary of the photo ."
# kind: (share, images (lo, hi), turns, question words, answer words); see the docstring
MIX: dict[str, tuple[float, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "vqa": (0.40, (1, 1), (1, 8), (12, 20), (1, 3)),
    "grounding": (0.15, (1, 1), (2, 8), (10, 16), (3, 10)),
    "conversation": (0.22, (1, 1), (2, 5), (6, 16), (20, 110)),
    "description": (0.15, (1, 1), (1, 1), (6, 14), (60, 260)),
    "text": (0.05, (0, 0), (1, 4), (3, 60), (3, 280)),
    "multi_image": (0.03, (2, 3), (1, 2), (8, 20), (5, 60)),
}
TEXT_ONLY_MAX_WORDS = 900
# AnyRes: LLaVA-NeXT's grids in tiles of the tower's 224 px; the LLM's context for its samples
ANYRES_GRIDS = [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]
ANYRES_MAX_TILES = 4
ANYRES_MAX_LENGTH = 4096  # 3 images x at most 1,008 visual tokens + text
ANYRES_BASE = "padded"  # the fixed-resolution run it is compared with: the same batches
# name: (side, stage, batching, feature cache, AnyRes tiling)
CONFIGS: dict[str, tuple[str, str, str, bool, bool]] = {
    "hf": ("theirs", "finetune", "random", False, False),
    "hf_grouped": ("theirs", "finetune", "hf_grouped", False, False),
    "padded": ("ours", "finetune", "random", False, False),
    "grouped": ("ours", "finetune", "grouped", False, False),
    "packed": ("ours", "finetune", "packed", False, False),
    "hf_align": ("theirs", "align", "random", False, False),
    "align": ("ours", "align", "random", False, False),
    "align_cache": ("ours", "align", "random", True, False),
    "anyres": ("ours", "finetune", "random", False, True),
}
LABELS = {
    "hf": "(a)  transformers, padded, random order",
    "hf_grouped": "(a2) transformers, padded, group_by_length",
    "padded": "(b)  ours, padded, random order",
    "grouped": "(c)  ours, padded, length-grouped",
    "packed": "(d)  ours, packed",
    "hf_align": "(a') transformers, padded, random order",
    "align": "(b') ours, padded, random order",
    "align_cache": "(e)  ours, feature cache, random order",
    "anyres": "(f)  ours, AnyRes, padded, random order",
}
RATIOS = {  # JSON key: (ours, baseline)
    "padded_vs_hf": ("padded", "hf"),
    "grouped_vs_hf": ("grouped", "hf"),
    "packed_vs_hf": ("packed", "hf"),
    "grouped_vs_hf_grouped": ("grouped", "hf_grouped"),
    "packed_vs_hf_grouped": ("packed", "hf_grouped"),
    "align_vs_hf": ("align", "hf_align"),
    "align_cache_vs_hf": ("align_cache", "hf_align"),
}
TARGETS = {
    "packed_vs_hf": 1.5,
    "packed_vs_hf_grouped": 1.3,
    "align_cache_vs_hf": 2.5,
    "generation_vs_hf": 1.0,
}
SCALE_TARGETS = {"first_step_s": 60.0, "dataset_sampler_mb": 2048.0}


# ---------------------------------------------------------------- synthetic data


class Mix:
    """LLaVA-format records of the synthetic instruction mix (see the module docstring)."""

    def __init__(self, seed: int, images: int) -> None:
        self.rng = random.Random(seed)
        self.images = [image_name(i) for i in range(images)]
        self.pool = self.rng.choices(vocabulary(), k=1 << 20)  # text is cut from this stream

    def words(self, low: int, high: int) -> str:
        """Between ``low`` and ``high`` words, log-uniformly (right-skewed, like real text)."""
        count = round(math.exp(self.rng.uniform(math.log(low), math.log(high))))
        start = self.rng.randrange(len(self.pool) - count)
        return " ".join(self.pool[start : start + count])

    def records(self, count: int) -> Iterator[dict[str, Any]]:
        """``count`` instruction samples, each kind exactly its share (largest remainders), in
        random order, so that even a small sample holds text-only and multi-image ones."""
        exact = {kind: MIX[kind][0] * count for kind in MIX}
        counts = {kind: int(share) for kind, share in exact.items()}
        short = count - sum(counts.values())
        for kind in sorted(exact, key=lambda k: counts[k] - exact[k])[:short]:
            counts[kind] += 1
        kinds = [kind for kind, n in counts.items() for _ in range(n)]
        self.rng.shuffle(kinds)
        for index, kind in enumerate(kinds):
            yield self.record(index, kind)

    def record(self, index: int, kind: str) -> dict[str, Any]:
        """One instruction sample of ``kind``: `<image>` markers only in the first human turn."""
        _, images, turns, ask, answer = MIX[kind]
        pictures = self.rng.sample(self.images, self.rng.randint(*images))
        conversation = []
        budget = TEXT_ONLY_MAX_WORDS
        for turn in range(self.rng.randint(*turns)):
            question = self.words(*ask) + (f" {VQA_SUFFIX}" if kind == "vqa" else " ?")
            reply = self.words(*answer)
            budget -= len(question.split()) + len(reply.split())
            if turn and budget < 0:
                break
            conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
        if pictures:
            markers = "<image>\n" * len(pictures)
            conversation[0]["value"] = markers + conversation[0]["value"]
        record: dict[str, Any] = {"id": f"{kind}-{index}", "conversations": conversation}
        if pictures:
            record["image"] = pictures[0] if len(pictures) == 1 else pictures
        return record

    def caption(self, index: int) -> dict[str, Any]:
        """One stage-1 sample: an image and its caption."""
        ask = {"from": "human", "value": f"<image>\n{ALIGN_ASK}"}
        answer = {"from": "gpt", "value": self.words(5, 30) + " ."}
        image = self.rng.choice(self.images)
        return {"id": f"caption-{index}", "image": image, "conversations": [ask, answer]}


def vocabulary() -> list[str]:
    """3,000 pseudo-words of 2-4 syllables (the word tokenizer makes each one token)."""
    rng = random.Random(SEED)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = ("".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(6000))
    return list(dict.fromkeys(words))[:3000]


def image_name(index: int) -> str:
    return f"images/{index // 100:03d}/{index:06d}.jpg"


def write_images(root: Path, count: int) -> None:
    """``count`` JPEGs of 256-640 px a side: random shapes on a random background."""
    from PIL import Image, ImageDraw

    rng = random.Random(SEED)
    for index in range(count):
        size = (rng.randint(256, 640), rng.randint(256, 640))
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            box = (x, y, x + rng.randint(10, 200), y + rng.randint(10, 200))
            draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        path = root / image_name(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)


def write_records(path: Path, records: Iterator[dict[str, Any]]) -> int:
    """A LLaVA JSON list, streamed one record a line; returns its size in bytes."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[\n")
        for index, record in enumerate(records):
            handle.write((",\n" if index else "") + json.dumps(record))
        handle.write("\n]\n")
    return path.stat().st_size


# ---------------------------------------------------------------- parent (no torch imported)


def main() -> int:
    args = _parse_args()
    if args.worker:
        print(json.dumps(_run_worker(args)))
        return 0
    if args.video:
        return _video(args)
    with tempfile.TemporaryDirectory(prefix="vlm-throughput-") as tmp:
        report = _benchmark(Path(tmp), args)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if report["loss_check_ok"] and report["generation"]["same_ids"] else 1


def _video(args: argparse.Namespace) -> int:
    """The video mix (see ``video_mix.py``): decode + preprocess and packed vs padded."""
    import video_mix

    report = video_mix.run(args.rounds, args.video_samples, _printer(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(video_mix.format_report(report)))
    return 0 if report["decode"]["same_frames"] else 1


def _benchmark(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    loads = [os.getloadavg()[0]]
    say = _printer(args)
    say(f"preparing {args.samples} samples, {args.images} images in {tmp} ...")
    data = _spawn(args, "prepare", tmp)
    say(_describe_data(data))
    fill = _spawn(args, "fill", tmp)
    say(
        f"feature cache filled: {fill['computed']} images in {fill['fill_s']:.1f} s "
        f"(+ {fill['namespace_s']:.1f} s hashing the tower's weights), "
        f"{fill['bytes'] / 2**20:.0f} MiB on disk"
    )
    runs = _rounds(tmp, args, loads, say)
    report = _report(data, fill, runs, loads, args)
    if not args.skip_scale:
        report["scale"] = _scale(tmp, args, say)
    report["loads_1min"] = loads + [os.getloadavg()[0]]
    say(_format(report, args))
    return report


def _rounds(
    tmp: Path, args: argparse.Namespace, loads: list[float], say: Any
) -> dict[str, list[dict[str, Any]]]:
    """Every configuration once per round, the order rotated and reversed between rounds."""
    jobs = [*CONFIGS, "gen_hf", "gen_ours"]
    runs: dict[str, list[dict[str, Any]]] = {job: [] for job in jobs}
    for r in range(args.rounds):
        shift = r % len(jobs)
        order = jobs[shift:] + jobs[:shift]
        for job in order if r % 2 == 0 else order[::-1]:
            loads.append(os.getloadavg()[0])
            result = _spawn(args, job, tmp)
            runs[job].append(result)
            say(f"  round {r + 1} {job:12s} {result['seconds']:7.1f} s  (load {loads[-1]:.1f})")
    return runs


def _spawn(args: argparse.Namespace, job: str, tmp: Path) -> dict[str, Any]:
    """Run one job in a fresh interpreter; its last stdout line is a JSON result."""
    cmd = [sys.executable, __file__, "--worker", job, "--dir", str(tmp)]
    for option in ("samples", "images", "batch", "new_tokens", "scale_records"):
        cmd += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"worker {job} failed (exit {done.returncode}); see its stderr above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report(
    data: dict[str, Any],
    fill: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    loads: list[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    configs = {name: _summarise(runs[name], data) for name in CONFIGS}
    generation = _generation(runs["gen_ours"], runs["gen_hf"])
    ratios = {
        key: configs[ours]["samples_per_s"] / configs[base]["samples_per_s"]
        for key, (ours, base) in RATIOS.items()
    }
    ratios["generation_vs_hf"] = generation["ratio"]
    by_cpu = {  # the same ratios from process CPU time: less sensitive to other jobs' load
        key: configs[base]["cpu_seconds"] / configs[ours]["cpu_seconds"]
        for key, (ours, base) in RATIOS.items()
    }
    checks = _loss_checks(configs)
    return {
        **ratios,
        "anyres": _anyres(configs["anyres"], configs[ANYRES_BASE]),
        "cpu_time_ratios": by_cpu,
        "targets": {key: {"target": t, "met": ratios[key] >= t} for key, t in TARGETS.items()},
        "configs": configs,
        "generation": generation,
        "feature_cache_fill": fill,
        "data": data,
        "loss_checks": checks,
        "loss_check_ok": all(check["ok"] for check in checks),
        "settings": {k: getattr(args, k) for k in ("samples", "rounds", "batch", "images")}
        | {"max_length": MAX_LENGTH, "new_tokens": args.new_tokens, "dtype": "float32"},
        "machine": {"cpus": os.cpu_count(), "threads": runs["hf"][0]["threads"]},
    }


def _summarise(runs: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    """Medians over the rounds; the epoch's token counts are the same in every round."""
    stage = "finetune" if runs[0]["stage"] == "finetune" else "align"
    seconds = statistics.median(run["seconds"] for run in runs)
    first = runs[0]
    tokens = first["tokens"] or data[stage]["tokens"]  # packed rows: the tokenized lengths
    return {
        "samples_per_s": first["samples"] / seconds,
        "supervised_tokens_per_s": first["supervised"] / seconds,
        "visual_tokens_per_s": first["visual"] / seconds,
        "seconds": seconds,
        "seconds_per_round": [run["seconds"] for run in runs],
        "data_seconds": statistics.median(run["data_s"] for run in runs),
        "samples": first["samples"],
        "supervised_tokens": first["supervised"],
        "visual_tokens": first["visual"],
        "tokens": tokens,
        "images": first["images"],
        "tower_rows": first["tower_rows"],
        "steps": first["steps"],
        "rows": first["rows"],
        "padding_efficiency": tokens / first["cells"],
        "lengths": _spread(first["lengths"]),
        "loss0": first["loss0"],
        "cpu_seconds": statistics.median(run["cpu_s"] for run in runs),
        "cpu_share": statistics.median(run["cpu_s"] / run["seconds"] for run in runs),
        "peak_rss_mb": max(run["peak_mb"] for run in runs),
    }


def _spread(ordered: list[int]) -> dict[str, int] | None:
    """min / median / p90 / max of sorted sample lengths (None when not measured)."""
    if not ordered:
        return None
    last = len(ordered) - 1
    return {
        "min": ordered[0],
        "median": ordered[len(ordered) // 2],
        "p90": ordered[int(0.9 * last)],
        "max": ordered[-1],
    }


def _anyres(tiled: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """The AnyRes run next to the fixed-resolution one over the same samples and batches."""
    keys = ("samples_per_s", "visual_tokens_per_s", "supervised_tokens_per_s", "seconds")

    def side(run: dict[str, Any]) -> dict[str, Any]:
        images = max(run["images"], 1)
        return {
            **{key: run[key] for key in keys},
            "images": run["images"],
            "visual_tokens_per_image": run["visual_tokens"] / images,
            "tower_passes_per_image": run["tower_rows"] / images,
            "lengths": run["lengths"],
        }

    return {
        **side(tiled),
        "fixed": side(fixed) | {"config": ANYRES_BASE},
        "samples_ratio": tiled["samples_per_s"] / fixed["samples_per_s"],
        "visual_tokens_ratio": tiled["visual_tokens_per_s"] / fixed["visual_tokens_per_s"],
        "grids": ANYRES_GRIDS,
        "max_tiles": ANYRES_MAX_TILES,
        "max_length": ANYRES_MAX_LENGTH,
    }


def _generation(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    rate = {
        side: statistics.median(run["new_tokens"] / run["seconds"] for run in runs)
        for side, runs in (("ours", ours), ("theirs", theirs))
    }
    same = all(run["ids"] == ours[0]["ids"] for run in ours + theirs)
    return {
        "ours_tokens_per_s": rate["ours"],
        "theirs_tokens_per_s": rate["theirs"],
        "ratio": rate["ours"] / rate["theirs"],
        "new_tokens": ours[0]["new_tokens"],
        "same_ids": same,
    }


def _loss_checks(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The first batch's loss before any update: the same batch must give the same loss."""
    pairs = [("padded", "hf"), ("align", "hf_align"), ("align_cache", "hf_align")]
    checks = []
    for ours, theirs in pairs:
        diff = abs(configs[ours]["loss0"] - configs[theirs]["loss0"])
        checks.append({"pair": f"{ours}/{theirs}", "diff": diff, "ok": diff < LOSS_TOLERANCE})
    return checks


# ---------------------------------------------------------------- scale (665K records)


def _scale(tmp: Path, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    say(f"scale: writing {args.scale_records:,} records ...")
    written = _spawn(args, "scale_data", tmp)
    say(f"  {written['bytes'] / 1e9:.2f} GB in {written['seconds']:.0f} s; timing the trainer ...")
    first = _first_step(tmp, args)
    say(f"  first optimizer step after {first['first_step_s']} s; measuring memory ...")
    memory = _spawn(args, "scale_memory", tmp)
    met = {
        "first_step_s": first["first_step_s"] is not None
        and first["first_step_s"] <= SCALE_TARGETS["first_step_s"],
        "dataset_sampler_mb": memory["rss_added_mb"] <= SCALE_TARGETS["dataset_sampler_mb"],
    }
    return {"data": written, "first_step": first, "memory": memory, "targets_met": met}


def _first_step(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds from starting ``vlm-adapters train`` to the first line of
    finetune/metrics.jsonl (written after the first optimizer step, with ``run.log_every=1``);
    the trainer's log lines are kept with the second they appeared at."""
    out = tmp / "scale_run"
    metrics = out / "finetune" / "metrics.jsonl"
    command = [*_cli(), "train", str(tmp / "scale.yaml"), "--out", str(out), "--fresh-connector"]
    command += ["run.log_every=1", "stages.finetune.epochs=1"]
    command += [f"stages.finetune.batch_size={SCALE_BATCH}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=_read_lines, args=(proc, start, lines), daemon=True)
    reader.start()
    seconds = _wait_for_line(metrics, proc, start, args.first_step_timeout)
    proc.kill()
    proc.wait()
    reader.join(timeout=5)
    return {
        "first_step_s": None if seconds is None else round(seconds, 1),
        "exit_code_before_step": proc.returncode if seconds is None else None,
        "log": [f"{t:6.1f}s {line}" for t, line in lines[-25:]],
        "command": " ".join(command),
    }


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("vlm-adapters")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vlm_adapters.cli"]


def _read_lines(proc: subprocess.Popen, start: float, lines: list[tuple[float, str]]) -> None:
    for line in proc.stdout:
        if line.strip() and "\r" not in line:
            lines.append((time.perf_counter() - start, line.rstrip()))


def _wait_for_line(path: Path, proc: subprocess.Popen, start: float, timeout: float) -> Any:
    while time.perf_counter() - start < timeout:
        if path.is_file() and path.read_text().strip():
            return time.perf_counter() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


# ---------------------------------------------------------------- output


def _printer(args: argparse.Namespace) -> Any:
    def say(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    return say


def _describe_data(data: dict[str, Any]) -> str:
    ft, al = data["finetune"], data["align"]
    return (
        f"finetune mix: {ft['samples']} samples, tokens min {ft['min']} / median {ft['median']} "
        f"/ p90 {ft['p90']} / max {ft['max']} ({ft['max'] / ft['min']:.1f}x), mean "
        f"{ft['tokens'] / ft['samples']:.0f}; {ft['text_only']} text-only, {ft['multi_image']} "
        f"multi-image; {ft['supervised']} supervised tokens; the length estimates the samplers "
        f"use are {ft['estimate_error']:+.1%} off\n"
        f"align captions: {al['samples']} samples, tokens {al['min']}-{al['max']}"
    )


def _format(report: dict[str, Any], args: argparse.Namespace) -> str:
    configs, loads = report["configs"], report["loads_1min"]
    lines = [
        "",
        f"{report['machine']['cpus']} CPUs, {report['machine']['threads']} torch threads, fp32; "
        f"{args.rounds} round(s), medians; load average (1 min) min {min(loads):.1f} / median "
        f"{statistics.median(loads):.1f} / max {max(loads):.1f}",
        "",
        f"{'':42s} {'samples/s':>9s} {'sup tok/s':>9s} {'steps':>5s} {'rows':>5s} "
        f"{'pad eff':>7s} {'cpu':>4s}  {'vs hf':>6s} {'(cpu)':>6s}  {'vs a2':>6s} {'(cpu)':>6s}",
    ]
    for stage, names in (("finetune", ("hf", "hf_grouped", "padded", "grouped", "packed")),
                         ("align", ("hf_align", "align", "align_cache"))):  # fmt: skip
        trains = "connector + LLM" if stage == "finetune" else "connector only"
        lines.append(f"{stage} ({trains} train; {configs[names[0]]['samples']} samples)")
        bases = [configs[names[0]]] + ([configs["hf_grouped"]] if stage == "finetune" else [])
        for name in names:
            c = configs[name]
            ratios = "".join(
                f"  {c['samples_per_s'] / b['samples_per_s']:5.2f}x "
                f"{b['cpu_seconds'] / c['cpu_seconds']:5.2f}x"
                for b in bases
            )
            lines.append(
                f"  {LABELS[name]:40s} {c['samples_per_s']:9.3f} "
                f"{c['supervised_tokens_per_s']:9.1f} {c['steps']:5d} {c['rows']:5d} "
                f"{c['padding_efficiency']:7.2f} {c['cpu_share']:4.2f}{ratios}"
            )
    lines += _format_anyres(report["anyres"])
    lines += _format_generation(report["generation"])
    lines += _format_checks(report)
    if "scale" in report:
        lines += _format_scale(report["scale"])
    return "\n".join(lines)


def _format_anyres(anyres: dict[str, Any]) -> list[str]:
    grids = ", ".join(f"{r}x{c}" for r, c in anyres["grids"])
    lines = [
        f"anyres (finetune, the same samples and padded batches as {LABELS[ANYRES_BASE][:3]}; "
        f"grids {grids} of 224 px tiles, at most {anyres['max_tiles']} + overview)",
        f"  {'':40s} {'samples/s':>9s} {'vis tok/s':>9s} {'vis tok/img':>11s} "
        f"{'passes/img':>10s} {'median len':>10s}",
    ]
    for label, side in ((LABELS[ANYRES_BASE], anyres["fixed"]), (LABELS["anyres"], anyres)):
        median = side["lengths"]["median"] if side["lengths"] else 0
        lines.append(
            f"  {label:40s} {side['samples_per_s']:9.3f} {side['visual_tokens_per_s']:9.1f} "
            f"{side['visual_tokens_per_image']:11.0f} {side['tower_passes_per_image']:10.2f} "
            f"{median:10d}"
        )
    lines.append(
        f"  AnyRes / fixed: samples/s {anyres['samples_ratio']:.2f}x, visual tokens/s "
        f"{anyres['visual_tokens_ratio']:.2f}x"
    )
    return lines


def _format_generation(gen: dict[str, Any]) -> list[str]:
    return [
        f"generation ({gen['new_tokens']} new tokens, greedy): ours "
        f"{gen['ours_tokens_per_s']:.1f} tok/s, transformers {gen['theirs_tokens_per_s']:.1f} "
        f"tok/s, {gen['ratio']:.2f}x; identical ids: {'yes' if gen['same_ids'] else 'NO'}",
    ]


def _format_checks(report: dict[str, Any]) -> list[str]:
    lines = ["loss of the first batch before any update (same batch, same weights):"]
    for check in report["loss_checks"]:
        state = "ok" if check["ok"] else f"MISMATCH (>= {LOSS_TOLERANCE})"
        lines.append(f"  {check['pair']:22s} |diff| {check['diff']:.2e}  {state}")
    lines.append("targets (ours / transformers, samples or tokens per second):")
    for key, target in report["targets"].items():
        met = "met" if target["met"] else "NOT met"
        lines.append(f"  {key:18s} {report[key]:5.2f}x  (target >= {target['target']}x: {met})")
    return lines


def _format_scale(scale: dict[str, Any]) -> list[str]:
    data, first, memory = scale["data"], scale["first_step"], scale["memory"]
    seconds, code = first["first_step_s"], first["exit_code_before_step"]
    reached = f"{seconds:.1f} s" if seconds is not None else "not reached"
    if code is not None:
        reached += f" (the trainer exited with {code})"
    lines = [
        f"scale: {data['records']:,} records ({data['bytes'] / 1e9:.2f} GB JSON, "
        f"{data['text_only']:,} text-only, {data['multi_image']:,} multi-image, "
        f"{data['images']} distinct images)",
        f"  first optimizer step after start: {reached} "
        f"(target <= {SCALE_TARGETS['first_step_s']:.0f} s: "
        f"{'met' if scale['targets_met']['first_step_s'] else 'NOT met'})",
        f"  dataset + sampler: +{memory['rss_added_mb']:.0f} MB resident "
        f"(peak +{memory['peak_added_mb']:.0f} MB; target <= "
        f"{SCALE_TARGETS['dataset_sampler_mb']:.0f} MB: "
        f"{'met' if scale['targets_met']['dataset_sampler_mb'] else 'NOT met'})",
        f"  in that process: load_records {memory['load_s']:.1f} s, precheck "
        f"{memory['precheck_s']:.1f} s, sampler + first index {memory['sampler_s']:.1f} s "
        f"({memory['kept']:,} kept, {memory['skipped']} skipped)",
        "  length estimates (words + image tokens, no template): min {min} / median {median}"
        " / p90 {p90} / max {max}".format(**memory["length_estimates"]),
        "  trainer log (seconds after start):",
    ]
    return lines + [f"    {line}" for line in first["log"]]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=_positive, default=64, help="Samples per stage.")
    parser.add_argument(
        "--rounds", type=_positive, default=1, help="Runs per configuration, order rotated."
    )
    parser.add_argument("--images", type=_positive, default=300, help="Distinct image files.")
    parser.add_argument("--batch", type=_positive, default=BATCH, help="Padded batch size.")
    parser.add_argument("--new-tokens", type=_positive, default=NEW_TOKENS)
    parser.add_argument("--skip-scale", action="store_true", help="Skip the 665K-record part.")
    parser.add_argument("--scale-records", type=_positive, default=SCALE_RECORDS)
    parser.add_argument("--first-step-timeout", type=_positive, default=600)
    parser.add_argument("--json", action="store_true", help="Print one JSON object at the end.")
    parser.add_argument(
        "--video", action="store_true", help="Run the video mix only (video_mix.py)."
    )
    parser.add_argument("--video-samples", type=_positive, default=48)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------- workers (one per process)


def _run_worker(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(args.dir)
    jobs = {
        "prepare": _prepare,
        "fill": _fill,
        "gen_hf": lambda t, a: _generate(t, a, "theirs"),
        "gen_ours": lambda t, a: _generate(t, a, "ours"),
        "scale_data": _scale_data,
        "scale_memory": _scale_memory,
    }
    if args.worker in CONFIGS:
        return _train(tmp, args)
    return jobs[args.worker](tmp, args)


def _prepare(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Tokenizer, weights (saved for every side), images, both data files and the prompts."""
    import torch
    from safetensors.torch import save_model

    from vlm_adapters import build_vlm
    from vlm_adapters.chat.templates import template_vocabulary
    from vlm_adapters.demo import build_word_tokenizer

    words = [*vocabulary(), *template_vocabulary(), "? . ,", VQA_SUFFIX, ALIGN_ASK]
    build_word_tokenizer(words, out_dir=tmp / "tokenizer")
    torch.manual_seed(SEED)
    model = build_vlm(_our_config(tmp))
    save_model(model, str(tmp / "weights.safetensors"))
    write_images(tmp, args.images)
    mix = Mix(SEED, args.images)
    finetune = list(mix.records(args.samples))
    align = [mix.caption(i) for i in range(args.samples)]
    write_records(tmp / "finetune.json", iter(finetune))
    write_records(tmp / "align.json", iter(align))
    _write_prompts(tmp, model, finetune, args.batch)
    meta = {"image_token_id": model.image_token_id, "vocabulary": len(model.tokenizer)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    return {
        "finetune": _stats(model, finetune, TEMPLATE),
        "align": _stats(model, align, ALIGN_TEMPLATE),
        **meta,
    }


def _stats(model: Any, records: list[dict[str, Any]], template: str) -> dict[str, Any]:
    """Token lengths of the records (tokenized as training does) and what the samplers see."""
    from vlm_adapters.data.records import image_paths

    processor = model.processor_for(template)
    lengths, supervised, estimates = [], 0, []
    for record in records:
        count = len(image_paths(record))
        encoded = processor.encode(record["conversations"], count)
        lengths.append(len(encoded.input_ids))
        supervised += sum(label != -100 for label in encoded.labels[1:])
        text = " ".join(turn["value"] for turn in record["conversations"])
        words = len(text.replace("<image>", " ").split())
        estimates.append(words + count * model.num_image_tokens)
    ordered = sorted(lengths)
    return {
        "samples": len(records),
        "tokens": sum(lengths),
        "supervised": supervised,
        "min": ordered[0],
        "median": ordered[len(ordered) // 2],
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
        "text_only": sum("image" not in r for r in records),
        "multi_image": sum(isinstance(r.get("image"), list) for r in records),
        "estimate_error": sum(estimates) / sum(lengths) - 1,
    }


def _write_prompts(tmp: Path, model: Any, records: list[dict[str, Any]], batch: int) -> None:
    """The first human turns of the first PROMPTS samples, as left-padded batches."""
    import torch

    from vlm_adapters.data.images import open_image
    from vlm_adapters.data.records import image_paths

    processor = model.processor_for(TEMPLATE)
    chosen = records[:PROMPTS]
    turns = [[r["conversations"][0]] for r in chosen]
    images = [[open_image(tmp / p) for p in image_paths(r)] for r in chosen]
    batches = [
        processor.prompt_batch(turns[i : i + batch], images[i : i + batch])
        for i in range(0, len(chosen), batch)
    ]
    torch.save(batches, tmp / "prompts.pt")


def _meta(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "meta.json").read_text())


def _train(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of one configuration: a warmup step on its first batch (its loss is loss0,
    before any update), then every batch timed."""
    import resource

    import torch

    side, stage, batching, cached, tiled = CONFIGS[args.worker]
    torch.manual_seed(SEED)
    model, step = _trainable(tmp, side, stage, tiled)
    ours = model if side == "ours" else None
    if batching == "packed":  # as the trainer does: packed rows attend per sample
        from vlm_adapters.llm.packed_attention import PackedAttention

        PackedAttention(model.llm)
    loader = _loader(tmp, stage, batching, cached, args.batch, ours)
    loss0 = step(next(iter(loader)))
    result = _timed_epoch(step, loader, _meta(tmp)["image_token_id"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    threads = torch.get_num_threads()
    return {**result, "loss0": loss0, "stage": stage, "peak_mb": peak_mb, "threads": threads}


def _trainable(tmp: Path, side: str, stage: str, tiled: bool = False) -> tuple[Any, Any]:
    """The model of ``side`` set up for ``stage`` and its train step (batch -> loss)."""
    import torch

    case = "full" if stage == "finetune" else "align"
    build = _build_anyres if tiled else _build_ours if side == "ours" else _build_theirs
    model, _ = build(tmp, case, _meta(tmp)["image_token_id"])
    model.train()
    (model.vision if side == "ours" else model.model.vision_tower).eval()  # frozen, as trained
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(batch: dict[str, Any]) -> float:
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**_inputs(batch, side), num_items_in_batch=supervised).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def _anyres_config(tmp: Path) -> dict[str, Any]:
    """``train_step``'s composition with ``vision.tiling`` and a 4,096-position context."""
    config = _our_config(tmp)
    tiling = {"grids": ANYRES_GRIDS, "max_tiles": ANYRES_MAX_TILES}
    config["vision"] = {**config["vision"], "tiling": tiling}
    config["llm"] = {
        **config["llm"],
        "config": LLM | {"max_position_embeddings": ANYRES_MAX_LENGTH},
    }
    return config


def _build_anyres(tmp: Path, case: str, image_token_id: int) -> tuple[Any, Any]:
    """The tiled model with the saved weights (the tower now under ``vision.backbone``); the
    end-of-row token ``connector.image_newline``, which the fixed model lacks, stays as built
    from the seed. Frozen and trained parts as ``train_step._build_ours``."""
    import torch
    from safetensors import safe_open

    from vlm_adapters import build_vlm

    model = build_vlm(_anyres_config(tmp))
    if model.image_token_id != image_token_id:
        raise RuntimeError(f"image token id {model.image_token_id} != prepared {image_token_id}")
    state = model.state_dict()
    loaded = set()
    with safe_open(str(tmp / "weights.safetensors"), framework="pt") as handle, torch.no_grad():
        names = handle.keys()
        for key in names:
            name = key.replace("vision.", "vision.backbone.", 1)
            state[name].copy_(handle.get_tensor(key))
            loaded.add(name)
    if set(state) - loaded != {"connector.image_newline"}:
        raise RuntimeError(f"weights not loaded: {sorted(set(state) - loaded)[:5]}")
    model.vision.requires_grad_(False)
    model.llm.requires_grad_(case == "full")
    return model, None


def _inputs(batch: dict[str, Any], side: str) -> dict[str, Any]:
    keys = ["input_ids", "attention_mask", "pixel_values", "labels"]
    if side == "ours":
        keys += [key for key in ("position_ids", "image_features") if key in batch]
    return {key: batch[key] for key in keys}


def _loader(
    tmp: Path, stage: str, batching: str, cached: bool, batch: int, ours: Any = None
) -> Any:
    """The stage's DataLoader: padded (random or length-grouped order) or packed."""
    from torch.utils.data import DataLoader

    from vlm_adapters.data import DataCollator, LengthGroupedSampler
    from vlm_adapters.data.collate import PackingCollator
    from vlm_adapters.data.samplers import TokenBudgetBatchSampler

    dataset, pad = _dataset(tmp, stage, cached, ours)
    if batching == "hf_grouped":
        return _hf_grouped_loader(dataset, pad, batch)
    if batching == "packed":
        sampler = TokenBudgetBatchSampler(dataset.lengths, batch * MAX_LENGTH, seed=SEED)
        collate = PackingCollator(pad, dataset.max_length)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    grouped = batching == "grouped"
    lengths = dataset.lengths if grouped else [0] * len(dataset)  # zeros: a plain shuffle
    order = LengthGroupedSampler(lengths, batch, seed=SEED, group_by_modality=grouped)
    collate = DataCollator(pad_token_id=pad)
    return DataLoader(dataset, batch_size=batch, sampler=order, collate_fn=collate)


def _hf_grouped_loader(dataset: Any, pad: int, batch: int) -> Any:
    """Padded batches in the order transformers' ``LengthGroupedSampler`` gives a ``Trainer``
    with ``train_sampling_strategy="group_by_length"`` (``get_length_grouped_indices``): the
    lengths of the samples' ``input_ids`` (the Trainer reads them from the dataset, as here),
    shuffled, cut into mega-batches of 50 batches, each sorted longest first, the longest
    sample first. The sampler itself shrinks mega-batches to a quarter of a small dataset
    (one batch at 16 samples: no grouping at all); 50 batches, what any real dataset gets,
    is the stronger baseline."""
    import torch
    from torch.utils.data import DataLoader
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from vlm_adapters.data import DataCollator

    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    generator = torch.Generator().manual_seed(SEED)
    order = get_length_grouped_indices(lengths, batch, HF_MEGA_BATCHES, generator=generator)
    collate = DataCollator(pad_token_id=pad)
    return DataLoader(dataset, batch_size=batch, sampler=order, collate_fn=collate)


def _dataset(tmp: Path, stage: str, cached: bool, ours: Any = None) -> tuple[Any, int]:
    """The checked ConversationDataset of ``stage`` (and the pad id), built with our processor (with
    ``ours``, the trained model's: AnyRes counts each image's tokens from its size); the
    feature cache is that of ``ours`` (whose weights key the entries)."""
    from vlm_adapters import build_vlm
    from vlm_adapters.data import ConversationDataset, load_records
    from vlm_adapters.data.feature_cache import FeatureCache

    vlm = ours or build_vlm(_our_config(tmp))  # for tokenizer, transform and token counts
    cache = FeatureCache.for_backbone(tmp / "cache", vlm.vision) if cached else None
    name, template = ("finetune", TEMPLATE) if stage == "finetune" else ("align", ALIGN_TEMPLATE)
    dataset = ConversationDataset.for_model(  # max_length: MAX_LENGTH; ANYRES_MAX_LENGTH for AnyRes
        vlm,
        load_records(tmp / f"{name}.json"),
        image_root=tmp,
        template=template,
        on_bad_sample="error",
        feature_cache=cache,
    )
    checked, _ = dataset.precheck()
    return checked, vlm.tokenizer.pad_token_id


def _timed_epoch(step: Any, loader: Any, image_token_id: int) -> dict[str, Any]:
    """One timed epoch; besides the time, what it processed: samples, supervised and visual
    tokens (placeholders), images and the tower's input rows (AnyRes: overview + tiles), the
    batches' cells and rows, and the tokens (padded batches: the attention mask's ones)."""
    from vlm_adapters.vision.base import ImageBatch

    totals = dict.fromkeys(("samples", "supervised", "visual", "images", "tower_rows"), 0)
    totals |= dict.fromkeys(("cells", "rows", "steps"), 0) | {"tokens": 0, "data_s": 0.0}
    lengths: list[int] = []
    cpu, start = time.process_time(), time.perf_counter()
    fetched = start
    for batch in loader:
        totals["data_s"] += time.perf_counter() - fetched
        ids, mask = batch["input_ids"], batch["attention_mask"]
        totals["samples"] += batch.get("num_samples", len(ids))
        totals["supervised"] += int((batch["labels"][:, 1:] != -100).sum())
        totals["visual"] += int((ids == image_token_id).sum())
        images = batch.get("image_features", batch["pixel_values"])
        if isinstance(images, ImageBatch):
            totals["images"] += len(images.counts)
            totals["tower_rows"] += len(images.values)
        elif images is not None:
            totals["images"] += len(images)
            totals["tower_rows"] += len(images)
        totals["cells"] += ids.numel()
        totals["rows"] += len(ids)
        totals["steps"] += 1
        if mask is not None:
            lengths += mask.sum(1).tolist()
        step(batch)
        fetched = time.perf_counter()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    totals["tokens"] = sum(lengths) if lengths else None
    return {**totals, "lengths": sorted(lengths), "seconds": seconds, "cpu_s": cpu}


def _fill(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fill the feature cache with the tower's features of every align image."""
    from vlm_adapters.data import load_records
    from vlm_adapters.data.feature_cache import FeatureCache, image_encoder
    from vlm_adapters.data.images import MAX_IMAGE_PIXELS
    from vlm_adapters.data.records import image_paths

    model, _ = _build_ours(tmp, "align", _meta(tmp)["image_token_id"])
    model.eval()
    start = time.perf_counter()
    cache = FeatureCache.for_backbone(tmp / "cache", model.vision)
    hashed = time.perf_counter()
    images = [tmp / p for r in load_records(tmp / "align.json") for p in image_paths(r)]
    report = cache.fill(images, image_encoder(model.vision, MAX_IMAGE_PIXELS), batch_size=16)
    return {
        "namespace_s": hashed - start,
        "fill_s": time.perf_counter() - hashed,
        "computed": report.computed,
        "bytes": cache.size_on_disk(),
        "seconds": time.perf_counter() - start,
    }


def _generate(tmp: Path, args: argparse.Namespace, side: str) -> dict[str, Any]:
    """Greedy generation over the prepared prompt batches (one untimed warmup call first)."""
    import torch

    from vlm_adapters.chat.templates import stop_token_ids

    image_token_id = _meta(tmp)["image_token_id"]
    batches = torch.load(tmp / "prompts.pt")
    ours, _ = _build_ours(tmp, "full", image_token_id)
    stops = stop_token_ids(ours.tokenizer, TEMPLATE)
    options = {
        "do_sample": False, "temperature": None, "top_p": None, "eos_token_id": stops,
        "pad_token_id": ours.tokenizer.pad_token_id, "use_cache": True,
    }  # fmt: skip
    model = ours if side == "ours" else _build_theirs(tmp, "full", image_token_id)[0]
    model.eval()

    def generate(batch: dict[str, Any], new: int) -> torch.Tensor:
        with torch.no_grad():
            if side == "ours":
                return model.generate_ids(**batch, max_new_tokens=new, **options)
            out = model.generate(**batch, max_new_tokens=new, **options)
            return out[:, batch["input_ids"].shape[1] :]  # the new tokens only, like ours

    generate(batches[0], 2)
    start = time.perf_counter()
    ids = [
        _until_stop(row, stops) for b in batches for row in generate(b, args.new_tokens).tolist()
    ]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "new_tokens": sum(map(len, ids)), "ids": ids}


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    cut = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:cut]


def _scale_data(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The 665K-record file and a tiny-model training config that reads it."""
    start = time.perf_counter()
    mix = Mix(SEED + 1, args.images)
    counts = {"text_only": 0, "multi_image": 0}

    def records() -> Iterator[dict[str, Any]]:
        for record in mix.records(args.scale_records):
            counts["text_only"] += "image" not in record
            counts["multi_image"] += isinstance(record.get("image"), list)
            yield record

    size = write_records(tmp / "scale.json", records())
    _write_scale_config(tmp)
    seconds = time.perf_counter() - start
    return {
        "records": args.scale_records,
        "images": args.images,
        "bytes": size,
        "seconds": seconds,
        **counts,
    }


def _scale_model(tmp: Path) -> dict[str, Any]:
    """A tiny model (2 layers, 32 wide, 16 tokens an image) with this benchmark's tokenizer."""
    from vlm_adapters.testing import tiny_model_config

    config = tiny_model_config(str(tmp / "tokenizer"))
    size = _meta(tmp)["vocabulary"]
    config["llm"]["config"] |= {"vocab_size": size + 8, "max_position_embeddings": MAX_LENGTH}
    return config


def _write_scale_config(tmp: Path) -> None:
    import yaml

    config = _scale_model(tmp)
    finetune = {"path": str(tmp / "scale.json"), "image_root": str(tmp), "template": TEMPLATE}
    config["data"] = {"finetune": finetune, "max_length": MAX_LENGTH, "group_by_length": True}
    config["recipe"] = ["finetune"]
    (tmp / "scale.yaml").write_text(yaml.safe_dump(config))


def _scale_memory(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Resident memory that the 665K dataset and its sampler add to a process holding the
    tiny model, as the trainer builds them (load_records, precheck, LengthGroupedSampler)."""
    import gc

    from vlm_adapters import build_vlm
    from vlm_adapters.data import ConversationDataset, LengthGroupedSampler, load_records

    vlm = build_vlm(_scale_model(tmp))
    gc.collect()
    before = _rss_mb()
    start = time.perf_counter()
    records = load_records(tmp / "scale.json")
    loaded = time.perf_counter()
    dataset = ConversationDataset.for_model(
        vlm, records, image_root=tmp, template=TEMPLATE, max_length=MAX_LENGTH
    )
    dataset, skipped = dataset.precheck()
    checked = time.perf_counter()
    sampler = LengthGroupedSampler(dataset.lengths, SCALE_BATCH, seed=SEED)
    next(iter(sampler))
    done = time.perf_counter()
    gc.collect()
    after = _rss_mb()
    estimates = sorted(abs(length) for length in dataset.lengths)
    return {
        "length_estimates": {
            "min": estimates[0],
            "median": estimates[len(estimates) // 2],
            "p90": estimates[int(0.9 * (len(estimates) - 1))],
            "max": estimates[-1],
        },
        "rss_before_mb": before["rss"],
        "rss_after_mb": after["rss"],
        "rss_added_mb": after["rss"] - before["rss"],
        "peak_added_mb": after["peak"] - before["rss"],
        "load_s": loaded - start,
        "precheck_s": checked - loaded,
        "sampler_s": done - checked,
        "kept": len(dataset),
        "skipped": len(skipped),
    }


def _rss_mb() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in MB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


if __name__ == "__main__":
    sys.exit(main())
