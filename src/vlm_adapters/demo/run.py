"""The embedded demo: synthetic shapes data, a tiny model, both stages, before/after accuracy."""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from vlm_adapters._io import check_output_dir, claim_entries
from vlm_adapters.chat.templates import template_vocabulary
from vlm_adapters.data import load_records
from vlm_adapters.demo.shapes import generate_shapes, shapes_vocabulary
from vlm_adapters.demo.tokenizer import TEMPLATE_SPECIAL_TOKENS, build_word_tokenizer

logger = logging.getLogger("vlm_adapters.demo")
DEMO_ENTRIES = ("data", "tokenizer", "hf-llava", "summary.json")
"""What the demo writes beside the training run in its directory."""
DEMO_SEEDS = (0, 1, 2)
"""The seeds the demo is checked on: each reaches the accuracy bar (see docs)."""


def demo_config_path() -> Path:
    """The packaged copy of ``examples/configs/demo.yaml``."""
    return Path(str(resources.files("vlm_adapters.demo") / "demo.yaml"))


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    num_train: int = 8000,
    num_eval: int = 300,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate data, train both stages, evaluate before and after; write ``summary.json``.

    ``out`` must be new, empty or an earlier demo's (which is replaced); another non-empty
    directory needs ``overwrite`` (its other files are kept).
    """
    from accelerate.utils import set_seed

    from vlm_adapters.inference.evaluation import evaluate
    from vlm_adapters.model.build import build_vlm
    from vlm_adapters.training import load_train_config, train

    start = time.perf_counter()
    out = check_output_dir(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    claim_entries(out, DEMO_ENTRIES)
    data = generate_shapes(out / "data", num_train=num_train, num_eval=num_eval, seed=seed)
    tokenizer = _build_tokenizer(out / "tokenizer")
    paths = _data_overrides(data.root, tokenizer, seed)
    cfg = load_train_config(config or demo_config_path(), [*paths, *(overrides or [])])
    set_seed(seed)
    model = build_vlm(cfg.model)
    records = load_records(data.eval)
    template = cfg.data.finetune.template
    before = evaluate(model, records, data.root, template)
    _report_eval("before training", before, data.chance)
    stages = train(cfg, "all", out, model=model, overwrite=True).summary  # our earlier demo
    after = evaluate(model, records, data.root, template)
    _report_eval("after training", after, data.chance)
    _print_samples(after["samples"])
    summary = _summary(before, after, stages, data.chance, time.perf_counter() - start)
    summary["export"] = _export(model, out / "hf-llava")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, out)
    return summary


def _build_tokenizer(directory: Path) -> Path:
    words = [*shapes_vocabulary(), *template_vocabulary()]
    build_word_tokenizer(words, [*TEMPLATE_SPECIAL_TOKENS, "<image>"], out_dir=directory)
    return directory


def _data_overrides(root: Path, tokenizer: Path, seed: int) -> list[str]:
    paths = [f"data.{s}.path={root / f'{s}.json'}" for s in ("align", "finetune", "eval")]
    roots = [f"data.{s}.image_root={root}" for s in ("align", "finetune", "eval")]
    return [*paths, *roots, f"llm.tokenizer={tokenizer}", f"run.seed={seed}"]


def _summary(
    before: dict[str, Any],
    after: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    chance: float,
    seconds: float,
) -> dict[str, Any]:
    finetune = stages["finetune"]
    return {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "accuracy_per_type": after["per_type"],
        "chance": round(chance, 4),
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "eval_questions": after["n"],
        "seconds": round(seconds, 1),
        "finetune_steps_per_s": round(finetune["steps"] / finetune["seconds"], 2),
        "stages": stages,
    }


def _export(model: Any, directory: Path) -> str:
    from vlm_adapters.export import check_exportable, to_hf_llava

    reason = check_exportable(model)
    if reason:
        return f"not exported: {reason}"
    to_hf_llava(model, directory)
    return str(directory)


def _report_eval(when: str, result: dict[str, Any], chance: float) -> None:
    per_type = ", ".join(f"{k} {v:.0%}" for k, v in sorted(result["per_type"].items()))
    print(
        f"held-out accuracy {when}: {result['accuracy']:.1%} ({per_type}); "
        f"chance {chance:.1%}; loss {result['loss']:.3f}",
        flush=True,
    )


def _print_samples(samples: list[tuple[str, str, str]], count: int = 6) -> None:
    print("sample held-out questions (image unseen in training):")
    for question, reference, prediction in samples[:count]:
        mark = "ok " if prediction.strip().lower() == reference.strip().lower() else "err"
        print(f"  [{mark}] {question.replace('<image>', '').strip():<45} -> {prediction!r}")


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    print(
        f"demo done in {summary['seconds']:.0f} s: accuracy {summary['accuracy_before']:.1%} -> "
        f"{summary['accuracy_after']:.1%} (chance {summary['chance']:.1%}); "
        f"stage 2 at {summary['finetune_steps_per_s']} steps/s",
    )
    print(f"checkpoint: {out / 'finetune' / 'final'}; loss curves: {out}/*/loss.png")
    print(f"transformers LLaVA export: {summary['export']}; summary: {out / 'summary.json'}")
