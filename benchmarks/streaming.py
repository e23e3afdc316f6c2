"""Streaming against map-style data: training throughput, data wait and the stream's memory.

1. Throughput. The demo's shapes samples (48-px images, the demo's tiny model) are written as a
   LLaVA JSON file with an image folder, then converted by `convert-data` into Parquet and
   WebDataset shards. The finetune stage trains one epoch on each: (m) map-style from the JSON,
   (p) streamed Parquet, (w) streamed tar, each in its own subprocess with the same seed,
   ``data.num_workers`` loader workers and ``shuffle_buffer`` 1000. Printed: samples/s of the
   stage (samples over its training seconds), tokens/s and the fraction of step time spent
   waiting for data (the run summary's ``data_wait``), and the ratios p/m and w/m (target:
   at least 0.95; data wait at most 5%).
2. Memory. Text-only Parquet shards of 10K and of 1M rows; in a fresh process each, the
   stream's whole plan for one epoch (rows read, records made, micro-batches cut; nothing
   decoded, as every process does for the micro-batches that are not its own) runs to the end.
   Printed: the growth of peak RSS over the process's RSS after opening the shards, the time to
   the first micro-batch and rows/s (target: growth at most +200 MB from 10K to 1M rows).
3. First step. A streamed run over the 1M-row shards to its first optimizer step (a callback
   stops it there): seconds from the start of `train` (target: within 30 s).

    HF_HUB_OFFLINE=1 python benchmarks/streaming.py [--samples 2000] [--workers 2]
        [--rows 10000,1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


def main() -> int:
    args = _parse_args()
    if args.job:
        print(json.dumps(_JOBS[args.job](args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="vlm-streaming-") as tmp:
        root = Path(tmp)
        data = _prepare(root, args.samples)
        runs = {
            name: _spawn("train", root, args, source=name) for name in ("map", "parquet", "tar")
        }
        _print_throughput(runs, data)
        for rows in args.rows:
            _spawn("write", root, args, rows=rows)  # apart: writing would raise the peak RSS
        plans = {rows: _spawn("plan", root, args, rows=rows) for rows in args.rows}
        _print_plans(plans)
        first = _spawn("first_step", root, args, rows=max(args.rows))
        print(f"first optimizer step on {max(args.rows):,} streamed rows: "
              f"{first['seconds']:.1f} s (target <= 30 s)")  # fmt: skip
    return 0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="finetune samples")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument(
        "--rows",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[10_000, 1_000_000],
        help="rows of the text-only shards for the memory runs",
    )
    parser.add_argument("--job", choices=sorted(_JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--rows-one", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def _spawn(job: str, root: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    command = [sys.executable, str(SCRIPT), "--job", job, "--root", str(root)]
    command += ["--samples", str(args.samples), "--workers", str(args.workers)]
    if "source" in extra:
        command += ["--source", extra["source"]]
    if "rows" in extra:
        command += ["--rows-one", str(extra["rows"])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{job} {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the data


def _prepare(root: Path, samples: int) -> dict[str, Any]:
    """The demo's shapes data and tokenizer under ``root``, and its finetune set as shards."""
    from vlm_adapters.data.convert import convert
    from vlm_adapters.demo.run import _build_tokenizer
    from vlm_adapters.demo.shapes import generate_shapes

    paths = generate_shapes(root / "data", num_train=samples, num_eval=8, seed=0)
    _build_tokenizer(root / "tokenizer")
    for kind in ("parquet", "webdataset"):
        out = root / kind
        convert(paths.finetune, paths.root, out, format=kind, shard_size=500, progress=False)
    meta = {"finetune": str(paths.finetune), "images": str(paths.root)}
    (root / "meta.json").write_text(json.dumps(meta))
    return meta


def _overrides(root: Path, args: argparse.Namespace, path: str, streaming: bool) -> list[str]:
    meta = json.loads((root / "meta.json").read_text())
    return [
        f"llm.tokenizer={root / 'tokenizer'}",
        f"data.finetune.path={path}",
        f"data.finetune.image_root={meta['images']}",
        f"data.finetune.streaming={str(streaming).lower()}",
        "data.eval=null",
        f"data.num_workers={args.workers}",
        "data.shuffle_buffer=1000",
        "stages.finetune.epochs=1",
        "run.log_every=1000000",
    ]


# -- the jobs (each in its own process)


def _train_job(args: argparse.Namespace) -> dict[str, Any]:
    import vlm_adapters
    from vlm_adapters.demo.run import demo_config_path

    root = Path(args.root)
    meta = json.loads((root / "meta.json").read_text())
    path = {
        "map": meta["finetune"],
        "parquet": str(root / "parquet" / "shard-*.parquet"),
        "tar": str(root / "webdataset" / "shard-*.tar"),
    }[args.source]
    overrides = _overrides(root, args, path, streaming=args.source != "map")
    out = root / f"run-{args.source}"
    result = vlm_adapters.train(
        demo_config_path(), stage="finetune", out=out, overrides=overrides, fresh_connector=True
    )
    summary = result.summary["finetune"]
    return {
        "samples": args.samples,
        "step_seconds": summary["step_seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "data_wait": summary["data_wait"],
        "loss": summary.get("final_loss"),
    }


def _text_shards(root: Path, rows: int) -> str:
    return str(root / f"text-{rows}" / "shard-*.parquet")


def _write_job(args: argparse.Namespace) -> dict[str, Any]:
    """Text-only LLaVA rows as Parquet shards of 100K rows (row groups of 1,000)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = args.rows_one
    folder = Path(args.root) / f"text-{rows}"
    folder.mkdir(exist_ok=True)
    turns = json.dumps(
        [{"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a shape"}]
    )
    for start in range(0, rows, 100_000):
        count = min(100_000, rows - start)
        table = pa.table(
            {"id": [str(start + n) for n in range(count)], "conversations": [turns] * count}
        )
        pq.write_table(table, folder / f"shard-{start // 100_000:05d}.parquet", row_group_size=1000)
    return {"rows": rows}


def _plan_job(args: argparse.Namespace) -> dict[str, Any]:
    from vlm_adapters.data.streaming import StreamPlan, find_shards, read_shards

    pattern = _text_shards(Path(args.root), args.rows_one)
    shards = read_shards(find_shards(pattern))
    before = _rss_mb()
    plan = StreamPlan(shards, 0, 1000, 8, None, lambda record: 10)
    start = time.perf_counter()
    first, rows = None, 0
    for batch in plan.micro_batches(0):
        first = first if first is not None else time.perf_counter() - start
        rows += len(batch)
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "growth_mb": _peak_mb() - before,
        "first_s": first,
        "rows_per_s": rows / seconds,
    }


def _first_step_job(args: argparse.Namespace) -> dict[str, Any]:
    import vlm_adapters
    from vlm_adapters.demo.run import demo_config_path
    from vlm_adapters.training.callbacks import TrainerCallback

    pattern = _text_shards(Path(args.root), args.rows_one)

    class _StopAtFirst(TrainerCallback):
        seconds: float | None = None

        def on_log(self, state: Any, control: Any, logs: dict[str, Any]) -> None:
            type(self).seconds = time.perf_counter() - start
            control.should_stop = True

    overrides = [
        *_overrides(Path(args.root), args, pattern, streaming=True),
        "run.log_every=1",
        "run.save_every=0",
    ]
    start = time.perf_counter()
    vlm_adapters.train(
        demo_config_path(),
        stage="finetune",
        out=Path(args.root) / "run-first",
        overrides=overrides,
        fresh_connector=True,
        callbacks=[_StopAtFirst()],
    )
    return {"seconds": _StopAtFirst.seconds}


_JOBS = {
    "train": _train_job,
    "write": _write_job,
    "plan": _plan_job,
    "first_step": _first_step_job,
}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return _peak_mb()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the report


def _print_throughput(runs: dict[str, dict[str, Any]], data: dict[str, Any]) -> None:
    print(f"finetune, 1 epoch of {runs['map']['samples']} shapes samples (demo model):")
    for name, run in runs.items():
        rate = run["samples"] / run["step_seconds"]
        run["rate"] = rate
        print(
            f"  {name:8s} {rate:8.1f} samples/s  {run['tokens_per_s']:9.0f} tokens/s  "
            f"data wait {100 * run['data_wait']:5.1f}%  loss {run['loss']}"
        )
    for name in ("parquet", "tar"):
        ratio = runs[name]["rate"] / runs["map"]["rate"]
        print(f"  ratio {name}/map samples/s {ratio:.3f} (target >= 0.95)")


def _print_plans(plans: dict[int, dict[str, Any]]) -> None:
    print("the stream's plan for one epoch (no decoding), a fresh process each:")
    for rows, plan in plans.items():
        print(
            f"  {rows:>9,} rows: RSS +{plan['growth_mb']:.1f} MB, first micro-batch "
            f"{plan['first_s']:.3f} s, {plan['rows_per_s']:,.0f} rows/s"
        )
    small, large = plans[min(plans)], plans[max(plans)]
    print(
        f"  growth from {min(plans):,} to {max(plans):,} rows: "
        f"{large['growth_mb'] - small['growth_mb']:+.1f} MB (target <= +200 MB)"
    )


if __name__ == "__main__":
    sys.exit(main())
