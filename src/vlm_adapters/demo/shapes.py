"""A synthetic shapes dataset: coloured shapes on a 2x2 grid, with captions and Q&A.

Every answer needs the image: colours, shapes, cells and counts are drawn at random. The eval
split has its own images and balanced answers, so its majority-class baseline (`chance`) is
about 31%; its answers are single words, for exact-match accuracy.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (60, 200, 70),
    "blue": (60, 100, 235),
    "yellow": (235, 215, 50),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
COUNTS: tuple[str, ...] = ("one", "two", "three")
QUESTIONS: dict[str, str] = {
    "colour": "what colour is the shape at the {position}?",
    "shape": "what shape is at the {position}?",
    "count": "how many shapes are there?",
    "position": "where is the {colour} shape?",
}
EVAL_ANSWERS: dict[str, Sequence[str]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNTS,
}
"""Question types of the eval split and their (single-word) answers."""


@dataclass(frozen=True)
class Item:
    """One shape of an image: colour, kind and grid cell (an index into POSITIONS)."""

    colour: str
    kind: str
    cell: int


@dataclass(frozen=True)
class ShapesPaths:
    """Where `generate_shapes` wrote things; image paths in the JSON are relative to `root`."""

    root: Path
    align: Path
    finetune: Path
    eval: Path
    chance: float
    """Exact-match accuracy of the per-question-type majority answer on the eval split."""


def generate_shapes(
    out_dir: str | Path, *, num_train: int, num_eval: int, image_size: int = 48, seed: int = 0
) -> ShapesPaths:
    """Write images and the align/finetune/eval JSON files under `out_dir`."""
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    align, finetune, evaluation = [], [], []
    for index in range(num_train):
        scene = _scene(rng, rng.randint(1, 3))
        image = _write_image(root, f"train_{index:05d}", scene, image_size, rng)
        align.append(_caption_record(f"align-{index:05d}", image, scene))
        finetune.append(_finetune_record(f"finetune-{index:05d}", image, scene, rng))
    for index in range(num_eval):
        kind = tuple(EVAL_ANSWERS)[index % len(EVAL_ANSWERS)]
        answers = EVAL_ANSWERS[kind]
        answer = answers[(index // len(EVAL_ANSWERS)) % len(answers)]
        scene, question = _eval_scene(rng, kind, answer)
        image = _write_image(root, f"eval_{index:05d}", scene, image_size, rng)
        evaluation.append(_eval_record(f"eval-{index:05d}", image, kind, question, answer))
    return ShapesPaths(
        root=root,
        align=_dump(root / "align.json", align),
        finetune=_dump(root / "finetune.json", finetune),
        eval=_dump(root / "eval.json", evaluation),
        chance=chance_accuracy(evaluation),
    )


def shapes_vocabulary() -> list[str]:
    """Every word the shapes data uses (sentences; `build_word_tokenizer` splits them)."""
    fillers = {"position": " ", "colour": " "}
    questions = [question.format(**fillers) for question in QUESTIONS.values()]
    return [*COLOURS, *SHAPES, *POSITIONS, *COUNTS, *questions, "a at the and"]


def chance_accuracy(eval_records: Sequence[Mapping[str, Any]]) -> float:
    """Accuracy of always giving the most frequent answer of each question type."""
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for record in eval_records:
        answers[record["question_type"]][record["conversations"][-1]["value"]] += 1
    total = sum(sum(counter.values()) for counter in answers.values())
    best = sum(counter.most_common(1)[0][1] for counter in answers.values())
    return best / total if total else 0.0


def _scene(rng: random.Random, count: int) -> list[Item]:
    """`count` shapes with distinct colours in distinct cells, sorted by cell."""
    cells = rng.sample(range(len(POSITIONS)), count)
    colours = rng.sample(list(COLOURS), count)
    items = [Item(colour, rng.choice(SHAPES), cell) for colour, cell in zip(colours, cells)]
    return sorted(items, key=lambda item: item.cell)


def _eval_scene(rng: random.Random, kind: str, answer: str) -> tuple[list[Item], str]:
    """A random scene and a question of type `kind` whose answer is `answer`."""
    count = COUNTS.index(answer) + 1 if kind == "count" else rng.randint(1, 3)
    scene = _scene(rng, count)
    target = rng.choice(scene)
    position = POSITIONS[target.cell]
    if kind == "shape":
        scene = [Item(i.colour, answer, i.cell) if i == target else i for i in scene]
    if kind == "colour":
        swap = {target.colour: answer, answer: target.colour}
        scene = [Item(swap.get(i.colour, i.colour), i.kind, i.cell) for i in scene]
    return scene, QUESTIONS[kind].format(position=position)


def _write_image(root: Path, name: str, scene: list[Item], size: int, rng: random.Random) -> str:
    """Draw `scene` on a dark background, save it as PNG; its path relative to `root`."""
    shade = rng.randint(10, 40)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for item in scene:
        _draw_item(draw, item, size // 2, rng)
    relative = f"images/{name}.png"
    image.save(root / relative)
    return relative


def _draw_item(draw: ImageDraw.ImageDraw, item: Item, cell: int, rng: random.Random) -> None:
    """Draw one shape in its cell, with a little jitter of place, size and colour."""
    row, column = divmod(item.cell, 2)
    jitter = max(1, cell // 10)
    cx = column * cell + cell // 2 + rng.randint(-jitter, jitter)
    cy = row * cell + cell // 2 + rng.randint(-jitter, jitter)
    half = round(cell * rng.uniform(0.28, 0.38))
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[item.colour])
    box = (cx - half, cy - half, cx + half, cy + half)
    if item.kind == "square":
        draw.rectangle(box, fill=colour)
    elif item.kind == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)


def _turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def _caption_record(sample_id: str, image: str, scene: list[Item]) -> dict[str, Any]:
    caption = " and ".join(f"a {i.colour} {i.kind} at the {POSITIONS[i.cell]}" for i in scene)
    return {
        "id": sample_id,
        "image": image,
        "conversations": [_turn("human", "<image>\n"), _turn("gpt", caption)],
    }


def _finetune_record(
    sample_id: str, image: str, scene: list[Item], rng: random.Random
) -> dict[str, Any]:
    """Two or three questions of different types about the image."""
    kinds = rng.sample(list(QUESTIONS), rng.randint(2, 3))
    turns = []
    for kind in kinds:
        question, answer = _question(kind, scene, rng)
        turns += [_turn("human", question), _turn("gpt", answer)]
    turns[0]["value"] = f"<image>\n{turns[0]['value']}"
    return {"id": sample_id, "image": image, "conversations": turns}


def _question(kind: str, scene: list[Item], rng: random.Random) -> tuple[str, str]:
    target = rng.choice(scene)
    position = POSITIONS[target.cell]
    answers = {
        "colour": target.colour,
        "shape": target.kind,
        "count": COUNTS[len(scene) - 1],
        "position": position,
    }
    return QUESTIONS[kind].format(position=position, colour=target.colour), answers[kind]


def _eval_record(
    sample_id: str, image: str, kind: str, question: str, answer: str
) -> dict[str, Any]:
    turns = [_turn("human", f"<image>\n{question}"), _turn("gpt", answer)]
    return {"id": sample_id, "image": image, "question_type": kind, "conversations": turns}


def _dump(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path
