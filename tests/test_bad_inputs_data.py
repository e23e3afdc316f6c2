"""Bad data files, eval records, run locks and resumes through the real CLI: each ends in one
line naming the file, the sample or the key and the fix, with no traceback and nothing outside
the run's ``--out`` changed (see tests/scripts/bad_input_kit.py)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import (  # noqa: E402
    Call,
    Case,
    Env,
    _write_png,
)

# --- data files that are not UTF-8 ------------------------------------------------------------

_GOOD = b'{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}'
_BAD = b'{"id": "b", "conversations": [{"from": "gpt", "value": "caf\xe9"}]}'  # Latin-1
NOT_UTF8 = {
    "latin1.json": b"[\n " + _GOOD + b",\n " + _BAD + b"\n]\n",
    "latin1.jsonl": _GOOD + b"\n" + _BAD + b"\n",
}


def _not_utf8(name: str) -> tuple[str, ...]:
    """What the error about ``NOT_UTF8[name]`` names: the file and line, the byte offset."""
    data = NOT_UTF8[name]
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    return f"{name}:{line}:", f"byte {offset}", "UTF-8"


def _train_not_utf8(name: str) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        path = env.root / "shapes" / name
        path.write_bytes(NOT_UTF8[name])
        return env.train(f"data.align.path={path}")

    return setup


def _eval(ckpt: Path, data: Path, images: Path) -> Call:
    return Call(["eval", str(ckpt), "--data", str(data), "--images", str(images)])


def _eval_not_utf8(env: Env) -> Call:
    data = env.tmp / "latin1.json"
    data.write_bytes(NOT_UTF8[data.name])
    return _eval(env.ckpt(), data, env.images)


ENCODING_CASES = [
    Case("train-data-not-utf8", _train_not_utf8("latin1.json"), _not_utf8("latin1.json")),
    Case("train-jsonl-not-utf8", _train_not_utf8("latin1.jsonl"), _not_utf8("latin1.jsonl")),
    Case("eval-data-not-utf8", _eval_not_utf8, _not_utf8("latin1.json")),
]


# --- eval: empty files and records that cannot be evaluated ------------------------------------


def _eval_text(text: str, name: str = "questions.json") -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        data = env.tmp / name
        data.write_text(text)
        return _eval(env.ckpt(), data, env.images)

    return setup


def _question(**changes: Any) -> dict[str, Any]:
    record = {
        "id": "q-7",
        "image": "cat.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is it?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    return {**record, **changes}


def _eval_records(*changes: dict[str, Any]) -> Callable[[Env], Call]:
    """``eval`` of a good record, then one changed by each of ``changes`` (ids q-8, q-9, ...)."""

    def setup(env: Env) -> Call:
        images = env.tmp / "images"
        images.mkdir()
        _write_png(images / "cat.png")
        records = [_question(), *(_question(id=f"q-{8 + i}", **c) for i, c in enumerate(changes))]
        data = env.tmp / "questions.json"
        data.write_text(json.dumps(records))
        return _eval(env.ckpt(), data, images)

    return setup


def _turns(
    human: str = "<image>\nwhat colour is it?", role: str = "gpt", answer: str = "red"
) -> dict[str, Any]:
    return {"conversations": [{"from": "human", "value": human}, {"from": role, "value": answer}]}


EVAL_CASES = [
    Case("eval-empty-json", _eval_text("[]"), ("questions.json", "no samples")),
    Case(
        "eval-empty-jsonl", _eval_text("\n", "questions.jsonl"), ("questions.jsonl", "no samples")
    ),
    Case(
        "eval-unknown-role",
        _eval_records(_turns(role="robot")),
        ("questions.json", "'q-8'", "index 1", "'robot'"),
    ),
    Case(
        "eval-marker-mismatch",
        _eval_records(_turns(human="<image>\n<image>\nwhat?")),
        ("questions.json", "'q-8'", "index 1", "2 <image> marker(s) but 1 image"),
    ),
    Case(
        "eval-image-missing-names-the-sample",
        _eval_records({"image": "gone.png"}),
        ("questions.json", "'q-8'", "gone.png"),
    ),
    Case(
        "eval-image-outside-names-the-file",
        _eval_records({"image": "../x.png"}),
        ("questions.json", "'q-8'", "../x.png"),
    ),
    Case(
        "eval-bad-image-field",
        _eval_records({"image": 5}),
        ("questions.json", "'q-8'", "'image' must be a path"),
    ),
    Case(
        "eval-conversations-not-a-list",
        _eval_records({"conversations": 5}),
        ("questions.json", "'q-8'", "conversations"),
    ),
    Case(
        "eval-no-answer-names-the-file",
        _eval_records({"conversations": [{"from": "human", "value": "what?"}]}),
        ("questions.json", "'q-8'", "'gpt' answer"),
    ),
    Case(
        "eval-answer-too-long",
        _eval_records(_turns(answer="red " * 400)),
        ("questions.json", "'q-8'", "too long"),
    ),
]


# --- run.lock ---------------------------------------------------------------------------------


def _train_into_run(spoil: Callable[[Path], Any], *extra: str) -> Callable[[Env], Call]:
    """``train --stage all`` into a copy of the shared run spoilt by ``spoil(run)``; the run
    must stay exactly as it was."""

    def setup(env: Env) -> Call:
        run = env.run()
        spoil(run)
        argv = ["train", str(env.config()), "--out", str(run), "--stage", "all", *extra]
        return Call(argv)

    return setup


def _lock_folder(run: Path) -> None:
    (run / "run.lock").mkdir()
    (run / "run.lock" / "mine.txt").write_text("not a lock\n")


def _lock_bytes(content: bytes) -> Callable[[Path], None]:
    return lambda run: (run / "run.lock").write_bytes(content)


LOCK_CASES = [
    Case("train-lock-is-a-folder", _train_into_run(_lock_folder), ("run.lock", "folder")),
    Case(
        "train-lock-garbage",
        _train_into_run(_lock_bytes(b"\x00\xff\xfe garbage")),
        ("run.lock", "cannot read", "delete"),
    ),
    Case(
        "train-lock-cut-short",
        _train_into_run(_lock_bytes(b'{"pid": 12')),
        ("run.lock", "cannot read", "delete"),
    ),
    Case(
        "train-lock-without-pid",
        _train_into_run(_lock_bytes(b'{"host": "elsewhere"}')),
        ("run.lock", "cannot read", "delete"),
    ),
]


# --- resuming after the model changed ---------------------------------------------------------


def _without_final(run: Path) -> None:
    """The align stage unfinished: resume auto takes its step-1 checkpoint."""
    shutil.rmtree(run / "align" / "final")
    shutil.rmtree(run / "align" / "connector")


RESUME_CASES = [
    Case(
        "train-resume-connector-width-changed",
        _train_into_run(
            lambda run: None, "--resume", "auto", "--allow-config-change", "connector.hidden_dim=64"
        ),
        ("connector.hidden_dim: None -> 64", "--allow-config-change", "model"),
    ),
    Case(
        "train-resume-llm-width-changed",
        _train_into_run(
            _without_final,
            "--resume",
            "auto",
            "--allow-config-change",
            "llm.config.hidden_size=64",
        ),
        ("llm.config.hidden_size: 32 -> 64", "--allow-config-change", "model"),
    ),
    Case(
        "train-resume-model-changed-without-consent",
        _train_into_run(lambda run: None, "--resume", "auto", "connector.depth=3"),
        ("connector.depth: None -> 3", "model"),
    ),
]


CASES = [*ENCODING_CASES, *EVAL_CASES, *LOCK_CASES, *RESUME_CASES]


def test_cases_are_uniquely_named() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)
