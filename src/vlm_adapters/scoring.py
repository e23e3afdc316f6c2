"""Standard benchmark metrics, pure Python (no torch): exact match, VQAv2 soft accuracy with its
answer normalisation, yes/no (POPE) counts, multiple choice with MMBench's circular evaluation.

Written from the published definitions:

- VQAv2 (visualqa.org evaluation): answers are lower-cased, punctuation replaced by a space
  (removed where it touches a space, or everywhere in a text with a digit comma such as
  ``100,978``), periods dropped except as decimal points, number words turned into digits,
  articles removed and missing contraction apostrophes added; a prediction's accuracy is
  ``min(1, matches / 3)`` against 9 of the 10 annotator answers, averaged over the 10 ways of
  leaving one out.
- POPE: yes is the positive class; accuracy, precision, recall, F1 and the share of yes answers.
- MMBench circular evaluation: a question with N options is asked N times, its options rotated
  by 0..N-1 places; it counts as correct only if every rotation is answered correctly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from vlm_adapters.errors import DataError

VQA_ANNOTATORS = 10
"""Annotator answers per VQAv2 question (also TextVQA, VizWiz, OK-VQA)."""

_TRAILING_PUNCT = re.compile(r"[\s.!?,;:]+$")
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"\d,\d")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = (  # noqa: SIM905
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's i'd've isn't it'd it'd've it'll "
    "let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't shan't she'd've she'll she's should've shouldn't shouldn't've somebody'd "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we're we've weren't "
    "what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_REAL_WORDS = {"its", "ill", "id", "wed", "well", "were", "hell", "shell", "shed", "lets", "twas"}


def _apostrophe_variants(word: str) -> set[str]:
    """``word`` with every non-empty subset of its apostrophes removed."""
    places = [i for i, char in enumerate(word) if char == "'"]
    variants = set()
    for size in range(1, len(places) + 1):
        for dropped in combinations(places, size):
            variants.add("".join(c for i, c in enumerate(word) if i not in dropped))
    return variants


_FIX_CONTRACTION = {
    variant: word
    for word in _CONTRACTIONS
    for variant in _apostrophe_variants(word)
    if variant not in _REAL_WORDS
}


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation (for exact-match comparison)."""
    return _TRAILING_PUNCT.sub("", " ".join(text.lower().split()))


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def normalize_vqa(text: str) -> str:
    """The VQAv2 answer normalisation (see the module docstring)."""
    text = " ".join(text.replace("\n", " ").replace("\t", " ").split()).lower()
    strip_all = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        text = text.replace(mark, "" if touches_space or strip_all else " ")
    text = _NON_DECIMAL_PERIOD.sub("", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    words = [_FIX_CONTRACTION.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy of ``prediction`` against the 10 annotator ``answers``: the mean
    over leaving each annotator out of ``min(1, matches among the other 9 / 3)``."""
    if len(answers) != VQA_ANNOTATORS:
        raise DataError(
            f"'answers' has {len(answers)} answers; VQA soft accuracy needs the "
            f"{VQA_ANNOTATORS} annotator answers (use --task-type exact for one reference)"
        )
    guess = normalize_vqa(prediction)
    hits = [normalize_vqa(answer) == guess for answer in answers]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


def yes_no(text: str) -> str:
    """``"yes"`` when the first word of ``text`` is yes (any case, punctuation ignored), else
    ``"no"``."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return "yes" if words and words[0] == "yes" else "no"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes is positive) and yes ratio of ``predictions``
    (already ``"yes"``/``"no"``) against ``labels`` (``"yes"``/``"no"``); 0 where undefined."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    tn = len(pairs) - tp - fp - fn
    n = max(len(pairs), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
    }


@dataclass(frozen=True)
class Rotation:
    """One circular shift of a question's options: ``options`` in shown order, ``answer`` the
    index of the correct one among them, ``order[i]`` the original index of ``options[i]``."""

    options: tuple[str, ...]
    answer: int
    order: tuple[int, ...]


def option_letter(index: int) -> str:
    """A, B, C, ... for option ``index``."""
    return chr(ord("A") + index)


def answer_index(answer: object, options: Sequence[str]) -> int:
    """The index of ``answer`` among ``options``: a letter (``"B"``), an index (``1``) or the
    option's text; a DataError when it is none of them."""
    if not options:
        raise DataError("'options' is empty; list the choices, e.g. ['cat', 'dog']")
    if isinstance(answer, bool):
        pass
    elif isinstance(answer, int) and 0 <= answer < len(options):
        return answer
    elif isinstance(answer, str):
        letters = [option_letter(i) for i in range(len(options))]
        if answer.strip().upper() in letters:
            return letters.index(answer.strip().upper())
        if answer in options:
            return list(options).index(answer)
    raise DataError(
        f"'answer' {answer!r} is not among the {len(options)} options; give a letter "
        f"A-{option_letter(len(options) - 1)}, an index 0-{len(options) - 1} or an option's text"
    )


def rotations(options: Sequence[str], answer: int) -> list[Rotation]:
    """The circular shifts of ``options`` (shift 0 first), as MMBench's circular evaluation
    asks them."""
    n = len(options)
    out = []
    for shift in range(n):
        order = tuple((i + shift) % n for i in range(n))
        out.append(Rotation(tuple(options[i] for i in order), order.index(answer), order))
    return out


def choice_metrics(correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """``accuracy`` (the unshifted question right) and ``circular_accuracy`` (every shift
    right) from ``correct[question][shift]``."""
    n = max(len(correct), 1)
    return {
        "accuracy": sum(bool(shifts[0]) for shifts in correct) / n,
        "circular_accuracy": sum(all(shifts) for shifts in correct) / n,
    }
