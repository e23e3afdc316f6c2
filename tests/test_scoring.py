"""The built-in metrics on hand-computed cases: VQAv2 normalisation and soft accuracy, POPE
counts, answers and MMBench's circular evaluation (pure Python, no model)."""

from __future__ import annotations

import sys

import pytest

from vlm_adapters.errors import DataError
from vlm_adapters.scoring import (
    answer_index,
    choice_metrics,
    exact_match,
    normalize_vqa,
    pope_metrics,
    rotations,
    vqa_accuracy,
    yes_no,
)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("the dog.", "dog"),  # articles and periods removed
        ("An apple", "apple"),
        ("3.5", "3.5"),  # ... except a decimal point
        ("dont know", "don't know"),  # a missing contraction apostrophe added
        ("couldnt've", "couldn't've"),
        ("its", "its"),  # a real word stays
        ("100,978", "100978"),  # a comma between digits is removed
        ("black-and-white", "black and white"),  # other punctuation -> space
        ("yes, it is", "yes it is"),  # ... removed where it touches a space
        ("no!", "no"),
        ("10:30", "10:30"),  # colons and apostrophes stay
        ("  Red\tCar \n", "red car"),
    ],
)
def test_vqa_normalisation(raw: str, normal: str) -> None:
    assert normalize_vqa(raw) == normal


def test_vqa_soft_accuracy_leaves_each_annotator_out() -> None:
    # 3 of 10 agree: leaving out one of them leaves 2 (2/3), leaving out another leaves 3 (1)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("2", ["2"] * 4 + ["x"] * 6) == 1.0
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    with pytest.raises(DataError, match="'answers' has 3 answers; .* 10 annotator answers"):
        vqa_accuracy("dog", ["dog"] * 3)


def test_yes_no_reads_the_first_word() -> None:
    assert [yes_no(t) for t in ("Yes, there is.", "yes", "No.", "there is a dog", "")] == [
        "yes",
        "yes",
        "no",
        "no",
        "no",
    ]


def test_pope_counts() -> None:
    predictions = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    labels = ["yes", "yes", "no", "yes", "no", "no", "yes", "no"]
    # TP 3, FP 1, FN 1, TN 3
    metrics = pope_metrics(predictions, labels)
    assert metrics == pytest.approx(
        {"accuracy": 6 / 8, "precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "yes_ratio": 4 / 8}
    )
    all_no = pope_metrics(["no"] * 4, ["yes", "no", "no", "no"])
    assert all_no == pytest.approx(
        {"accuracy": 3 / 4, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    )


def test_answer_index_forms() -> None:
    options = ["cat", "dog", "bird"]
    assert [answer_index(a, options) for a in ("B", "b", 2, "cat")] == [1, 1, 2, 0]
    for bad in ("D", 3, -1, "fish", None, True):
        with pytest.raises(DataError, match="not among the 3 options; give a letter A-C"):
            answer_index(bad, options)
    with pytest.raises(DataError, match="'options' is empty"):
        answer_index("A", [])


def test_rotations_keep_track_of_the_answer() -> None:
    shifts = rotations(["a", "b", "c", "d"], answer=2)
    assert [s.options for s in shifts] == [
        ("a", "b", "c", "d"),
        ("b", "c", "d", "a"),
        ("c", "d", "a", "b"),
        ("d", "a", "b", "c"),
    ]
    assert [s.answer for s in shifts] == [2, 1, 0, 3]
    assert all(s.options[s.answer] == "c" for s in shifts)
    assert [s.order[s.answer] for s in shifts] == [2, 2, 2, 2]


def test_circular_needs_every_shift_right() -> None:
    correct = [
        [True, True, True, True],  # right in every shift: counts twice
        [True, True, False, True],  # one shift wrong: plain accuracy only
        [False, True, True, True],  # unshifted wrong: neither
    ]
    assert choice_metrics(correct) == pytest.approx({"accuracy": 2 / 3, "circular_accuracy": 1 / 3})


def test_exact_match() -> None:
    assert exact_match(" Red. ", "red") and not exact_match("two", "2")


def test_scoring_imports_no_torch() -> None:
    code = "import sys, vlm_adapters.scoring; assert 'torch' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)
