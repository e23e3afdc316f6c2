"""Bad config inputs through the real CLI: YAML that is not plain or gives a key twice,
checkpoint keys we never write, settings this machine or these samples cannot honour, smoke
names that are neither a type nor a tiny variant. Each ends in one line naming the key (or file,
or sample) and the fix, before anything trains (see tests/scripts/bad_input_kit.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import Call, Case, Edit, Env, Shared, _set  # noqa: E402

from vlm_adapters._transformers import flash_attention_available  # noqa: E402
from vlm_adapters.cli import main  # noqa: E402


def _override(id: str, override: str, *expect: str) -> Case:
    return Case(id, lambda env: env.train(override), expect)


def _duplicate_key_in_yaml(env: Env) -> Call:
    """tiny.yaml with ``recipe`` on lines 1 and 2 (and once more further down)."""
    call = env.train()
    path = env.root / "tiny.yaml"
    path.write_text("recipe: [align]\nrecipe: [align, finetune]\n" + path.read_text())
    return call


def _token_budget_below_a_sample(env: Env) -> Call:
    """Every align answer three words long (19 tokens with the 16 visual ones), but sample 5's
    thirty words (46 tokens), with a budget of 40 tokens per micro-batch."""
    records = env.records()
    for record in records:
        record["conversations"][1]["value"] = "a red circle"
    records[5]["conversations"][1]["value"] = "red " * 30
    env.write_data(records)
    return env.train("data.max_tokens_per_batch=40")


def _generate(edit: Edit) -> Callable[[Env], Call]:
    return lambda env: Call(["generate", str(env.ckpt(edit)), "--prompt", "hi"])


def _eval(edit: Edit) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        data = env.root / "shapes" / "eval.json"
        argv = ["eval", str(env.ckpt(edit)), "--data", str(data), "--images", str(data.parent)]
        return Call(argv)

    return setup


def _export(edit: Edit) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        return Call(["export", str(env.ckpt(edit)), "--out", str(env.out)], scratch=env.out)

    return setup


def _smoke(*args: str) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        out = env.tmp / "smoke"
        return Call(["smoke", str(out), *args], absent=(out,))

    return setup


_PYTHON_TAG = "run.seed=!!python/object/apply:os.system [touch pwned]"
_UNKNOWN_KEY = ("config.json", "unknown top-level key 'adapter_stack'", "upgrade")
_IMAGE_SIZE = ("vision.image_size", "48-pixel", "32 pixels", "vision.image_size: 32")

CASES = [
    _override("train-override-not-yaml", "run.seed=[1", "'run.seed=[1'", "not plain YAML"),
    # nothing runs: `touch pwned` would show as a new file in the case's folder
    _override("train-override-python-tag", _PYTHON_TAG, "!!python/object/apply:os.system"),
    _override(
        "train-override-duplicate-key",
        "run={seed: 1, seed: 2}",
        "duplicate key 'seed'",
        "give it once",
    ),
    Case(
        "train-yaml-duplicate-key",
        _duplicate_key_in_yaml,
        ("tiny.yaml:2: duplicate key 'recipe' (first on line 1)", "remove one"),
    ),
    Case("generate-unknown-checkpoint-key", _generate(_set("adapter_stack", [])), _UNKNOWN_KEY),
    Case("eval-unknown-checkpoint-key", _eval(_set("adapter_stack", [])), _UNKNOWN_KEY),
    Case("export-unknown-checkpoint-key", _export(_set("adapter_stack", [])), _UNKNOWN_KEY),
    _override("train-image-size-not-the-towers", "vision.image_size=48", *_IMAGE_SIZE, "tiny.yaml"),
    _override(
        "train-inline-processor-size-not-the-towers",
        "vision.image_processor={image_processor_type: SiglipImageProcessor, "
        "size: {height: 48, width: 48}}",
        "vision.image_processor",
        "48-pixel",
        "32 pixels",
    ),
    Case(
        "generate-image-size-not-the-towers",
        _generate(_set("vision.image_size", 48)),
        (*_IMAGE_SIZE, "config.json"),
    ),
    Case(
        "train-token-budget-below-a-sample",
        _token_budget_below_a_sample,
        (
            "data.max_tokens_per_batch: 40",
            "'align-00005'",
            "align.json",
            "46 tokens",
            "at least 46",
        ),
    ),
    Case(
        "smoke-unknown-llm-family",
        _smoke("--llm", "qwen3"),
        ("--llm 'qwen3'", "did you mean 'qwen2'", "llama, qwen2"),
    ),
    Case(
        "smoke-unknown-vision-variant",
        _smoke("--vision", "hf_sigl"),
        ("--vision 'hf_sigl'", "did you mean 'hf_siglip'"),
    ),
]

# cases whose input is only bad on some machines
NO_FLASH_ATTENTION = [
    _override(
        "train-flash-attention-2-unavailable",
        "llm.attn_implementation=flash_attention_2",
        "llm.attn_implementation",
        "flash-attn",
        "sdpa",
        "tiny.yaml",
    ),
    Case(
        "generate-inline-flash-attention-3-unavailable",
        _generate(_set("llm.config.attn_implementation", "flash_attention_3")),
        ("llm.config", "flash-attn-3", "sdpa", "config.json"),
    ),
]
CPU_ONLY = [
    _override(
        "train-fp16-on-cpu",
        "run.mixed_precision=fp16",
        "run.mixed_precision",
        "bf16",
        "CPU",
        "tiny.yaml",
    ),
]


def _ids(cases: list[Case]) -> list[str]:
    return [case.id for case in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_config_input(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)


@pytest.mark.skipif(
    flash_attention_available("flash_attention_2")
    or flash_attention_available("flash_attention_3"),
    reason="FlashAttention runs on this machine",
)
@pytest.mark.parametrize("case", NO_FLASH_ATTENTION, ids=_ids(NO_FLASH_ATTENTION))
def test_flash_attention_without_its_kernel(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="an accelerator runs fp16")
@pytest.mark.parametrize("case", CPU_ONLY, ids=_ids(CPU_ONLY))
def test_fp16_on_a_cpu(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)


def test_import_says_it_ignored_a_trust_remote_code_request(
    shared: Shared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llava = tmp_path / "llava"
    assert main(["export", str(shared.ckpt), "--out", str(llava)]) == 0
    config = json.loads((llava / "config.json").read_text())
    (llava / "config.json").write_text(json.dumps({**config, "trust_remote_code": True}))
    capsys.readouterr()
    assert main(["import", str(llava), "--out", str(tmp_path / "ours")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    notices = [line for line in lines if line.startswith("notice: ")]
    assert len(notices) == 1, lines
    assert f"{llava}: its config.json sets trust_remote_code: true, which was ignored" in notices[0]
    assert "--trust-remote-code" in notices[0]
    assert (tmp_path / "ours" / "model.safetensors").is_file()
