"""Bad task files through the real CLI (``eval --task-type``): one line naming the file, the
record and what is wrong; nothing written, inside ``--out`` or outside it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import Call, Case, Env, Shared, check_case  # noqa: E402

from vlm_adapters import build_vlm  # noqa: E402
from vlm_adapters.testing import tiny_model_config  # noqa: E402

Edit = Callable[[dict[str, Any]], None]


def _task(task: str, edit: Edit, image: str = "ok.png") -> Callable[[Env], Call]:
    """``eval --task-type task --out OUT`` of two good records and a third changed by ``edit``."""

    def setup(env: Env) -> Call:
        images = env.tmp / "images"
        images.mkdir()
        Image.new("RGB", (16, 16), "red").save(images / "ok.png")
        records = []
        for i in range(3):
            record: dict[str, Any] = {
                "id": f"t-{i}",
                "image": "ok.png" if i < 2 else image,
                "conversations": [{"from": "human", "value": "<image>\nwhat colour?"}],
                "options": ["red", "green", "blue"],
                "answer": "A",
                "answers": ["red"] * 10,
            }
            if task in ("yesno", "exact"):
                record["conversations"].append({"from": "gpt", "value": "yes"})
            if i == 2:
                edit(record)
            records.append(record)
        data = env.tmp / "task.json"
        data.write_text(json.dumps(records))
        out = env.tmp / "scores"
        argv = ["eval", str(env.ckpt()), "--data", str(data), "--images", str(images)]
        return Call([*argv, "--task-type", task, "--out", str(out)], scratch=out, absent=(out,))

    return setup


def _set(key: str, value: Any) -> Edit:
    return lambda record: record.__setitem__(key, value)


def _keep(record: dict[str, Any]) -> None:
    pass


def _user_out(env: Env) -> Call:
    call = _task("choice", _keep)(env)
    mine = env.user_dir("scores")
    call.argv[-1] = str(mine)
    call.scratch, call.absent = None, ()
    return call


_WHERE = ("task.json", "'t-2'", "index 2")

CASES = [
    Case("choice-image-missing", _task("choice", _keep, "gone.png"), (*_WHERE, "gone.png")),
    Case("vqa-image-missing", _task("vqa", _keep, "gone.png"), (*_WHERE, "gone.png")),
    Case(
        "choice-answer-not-an-option",
        _task("choice", _set("answer", "E")),
        (*_WHERE, "'answer' 'E' is not among the 3 options"),
    ),
    Case(
        "choice-answer-text-not-an-option",
        _task("choice", _set("answer", "purple")),
        (*_WHERE, "'answer' 'purple'"),
    ),
    Case("choice-options-empty", _task("choice", _set("options", [])), (*_WHERE, "'options'")),
    Case(
        "choice-options-missing",
        _task("choice", lambda r: r.pop("options")),
        (*_WHERE, "'options' must be a list of strings"),
    ),
    Case(
        "choice-options-repeated",
        _task("choice", _set("options", ["red", "red"])),
        (*_WHERE, "repeats"),
    ),
    Case(
        "vqa-answers-wrong-count",
        _task("vqa", _set("answers", ["red"] * 3)),
        (*_WHERE, "'answers' has 3 answers", "10 annotator answers"),
    ),
    Case(
        "vqa-answers-missing",
        _task("vqa", lambda r: r.pop("answers")),
        (*_WHERE, "'answers' must be a list"),
    ),
    Case(
        "yesno-label-not-yes-or-no",
        _task("yesno", lambda r: r["conversations"][-1].update(value="maybe")),
        (*_WHERE, "'maybe' is not 'yes' or 'no'"),
    ),
    Case(
        "yesno-without-label",
        _task("yesno", lambda r: r["conversations"].pop()),
        (*_WHERE, "must end with a 'gpt' answer"),
    ),
    Case("out-is-a-users-folder", _user_out, ("scores", "not empty")),
]


@pytest.fixture(scope="module")
def checkpoint_only(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: str) -> Shared:
    """A saved tiny checkpoint (the cases need no config root or training run)."""
    ckpt = tmp_path_factory.mktemp("shared") / "ckpt"
    build_vlm(tiny_model_config(tokenizer_dir)).save_pretrained(ckpt)
    return Shared(tiny=ckpt.parent / "none", run=ckpt.parent / "none", ckpt=ckpt)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_task_input(case: Case, checkpoint_only: Shared, tmp_path: Path) -> None:
    check_case(case, checkpoint_only, tmp_path)
