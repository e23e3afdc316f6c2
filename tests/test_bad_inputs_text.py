"""Bad inputs through the real CLI, text part: an `<image>` marker inside an answer is a bad
sample (skipped and listed, or the one-line error of ``data.on_bad_sample: error``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import Call, Case, Env, SkipLog  # noqa: E402


def _marker_in_answer(env: Env, indices: tuple[int, ...]) -> None:
    """Samples ``indices`` of align.json get their one `<image>` marker in the answer instead
    (so markers and images still match)."""
    records = env.records()
    for index in indices:
        question, answer = records[index]["conversations"]
        question["value"] = question["value"].replace("<image>", "")
        answer["value"] = f"<image> {answer['value']}"
    env.write_data(records)


def _skipped(env: Env) -> Call:
    """Sample 3 spoilt: listed in skipped.jsonl, and the run fails (over the skip fraction)."""
    _marker_in_answer(env, (3,))
    call = env.train()
    log = env.out / "align" / "skipped.jsonl"
    call.skipped = SkipLog(log, "align.json", "image marker in an answer", (3,))
    return call


def _refused(env: Env) -> Call:
    _marker_in_answer(env, (4,))
    return env.train("data.on_bad_sample=error")


CASES: list[Case] = [
    Case("train-image-marker-in-answer", _skipped, ("skipped.jsonl", "data.max_skip_fraction")),
    Case(
        "train-error-policy-image-marker-in-answer",
        _refused,
        ("align.json", "'align-00004'", "index 4", "turn 1 (an assistant answer) holds <image>"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)
