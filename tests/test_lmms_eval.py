"""The lmms-eval model: real lmms-eval runs on a local task (images written here, data saved with
``datasets.save_to_disk``) for an exportable, a Q-Former and a plugin composition; on an
exported twin its log-likelihoods and greedy answers equal plain transformers LLaVA's."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval not installed: pip install -e .[eval]")
datasets = pytest.importorskip("datasets", reason="datasets not installed: pip install -e .[dev]")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from vlm_adapters import VisionLanguageModel, build_vlm  # noqa: E402
from vlm_adapters.chat.templates import stop_token_ids  # noqa: E402
from vlm_adapters.errors import DataError  # noqa: E402
from vlm_adapters.export import to_hf_llava  # noqa: E402
from vlm_adapters.inference.lmms_eval import (  # noqa: E402
    VLMAdaptersChatLMM,
    VLMAdaptersLMM,
)
from vlm_adapters.testing import tiny_llm_config, tiny_model_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [  # (question, answer, label, images): one, two and no images
    ("what colour is the shape?", "red", 0, [0]),
    ("how many shapes are there?", "two", 1, [1, 2]),
    ("what shape is at the top left?", "circle", 2, []),
    ("where is the red shape?", "top left", 3, [2]),
]
CHOICES = ["red", "two", "circle", "top left"]
MAX_NEW = 4
UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc):
    return doc["question"]
"""
COMMON = """dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
"""
GEN = f"""task: vlmad_gen
output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW}
  until: ["?"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC = f"""task: vlmad_mc
output_type: multiple_choice
doc_to_choice: {CHOICES}
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
PLUGINS = ("vlm-adapters-cabstractor", "vlm-adapters-convnext")


def _plugins_installed() -> bool:
    try:
        return all(importlib.metadata.distribution(d) for d in PLUGINS)
    except importlib.metadata.PackageNotFoundError:
        return False


def _plugin_config(tokenizer_dir: str) -> dict[str, Any]:
    return {
        "vision": {
            "type": "convnext",
            "model": "convnext_atto",
            "pretrained": False,
            "image_size": 64,
            "stage": -2,
            "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
        },
        "connector": {"type": "cabstractor", "num_queries": 4, "depth": 1},
        "llm": tiny_llm_config("llama", tokenizer_dir),
    }


COMPOSITIONS = {
    "exportable": lambda tok: tiny_model_config(tok, "hf", "mlp"),
    "qformer": lambda tok: tiny_model_config(tok, "hf", "qformer"),
    "plugin": _plugin_config,
}


def tiny(config: dict[str, Any]) -> VisionLanguageModel:
    """A tiny model whose connector weights are large enough for images to move the logits."""
    torch.manual_seed(0)
    model = build_vlm(config).eval()
    for param in model.connector.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tasks (generation, 4-option multiple choice) over four docs saved on disk."""
    root = tmp_path_factory.mktemp("lmms")
    images = []
    for index in range(3):
        path = root / f"image{index}.png"
        Image.effect_noise((32, 32), 30 + 40 * index).convert("RGB").save(path)
        images.append(str(path))
    columns: dict[str, list] = {"question": [], "answer": [], "label": [], "images": []}
    for question, answer, label, which in QUESTIONS:
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["label"].append(label)
        columns["images"].append([images[i] for i in which])
    data = datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns)})
    data.save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    common = COMMON.format(data=root / "data")
    (tasks / "gen.yaml").write_text(GEN + common)
    (tasks / "mc.yaml").write_text(MC + common)
    return tasks


def run(lm: VLMAdaptersLMM, task_dir: Path, tasks: list[str]) -> dict[str, Any]:
    """lmms-eval's Python entry on ``tasks``: per-task results and per-doc responses."""
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, verbosity="WARNING")
    responses = {
        task: {s["doc_id"]: [_single(r) for r in s["resps"]] for s in samples}
        for task, samples in out["samples"].items()
    }
    return {"results": out["results"], "responses": responses}


def _single(response: Any) -> Any:
    """A request's one response (lmms-eval logs it in lists, one per repeat and filter)."""
    while isinstance(response, list) and len(response) == 1:
        response = response[0]
    return response


def doc_images(task_dir: Path, index: int) -> list[Image.Image]:
    which = QUESTIONS[index][3]
    return [Image.open(task_dir.parent / f"image{i}.png").convert("RGB") for i in which]


def test_entry_point_gives_both_request_forms() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    group = re.search(r'\[project\.entry-points\."lmms_eval\.models"\]\n([^\[]*)', pyproject)
    assert group, "pyproject.toml registers no lmms_eval.models entry point"
    module, name = re.search(r'^vlm_adapters = "(.+):(.+)"$', group[1], re.M).groups()
    registry = ModelRegistryV2()
    registry.register_manifest(getattr(importlib.import_module(module), name))
    assert registry.get_model_class("vlm_adapters") is VLMAdaptersChatLMM
    assert registry.get_model_class("vlm_adapters", force_simple=True) is VLMAdaptersLMM
    assert re.search(r'^eval = \["lmms-eval>=0.7.3"', pyproject, re.M)


@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
def test_lmms_eval_scores_what_generate_answers(
    composition: str, tokenizer_dir: str, task_dir: Path, tmp_path: Path
) -> None:
    if composition == "plugin" and not _plugins_installed():
        pytest.skip("example plugins not installed: pip install ./plugins/*")
    model = tiny(COMPOSITIONS[composition](tokenizer_dir))
    model.save_pretrained(tmp_path / "ckpt")
    batched = run(VLMAdaptersLMM(pretrained=tmp_path / "ckpt", batch_size=3), task_dir,
                  ["vlmad_gen", "vlmad_mc"])  # fmt: skip
    assert set(batched["results"]) == {"vlmad_gen", "vlmad_mc"}
    generated = {doc: texts[0] for doc, texts in batched["responses"]["vlmad_gen"].items()}
    for index, (question, *_) in enumerate(QUESTIONS):
        prompt = "<image>\n" * len(QUESTIONS[index][3]) + question
        answer = model.generate([prompt], [doc_images(task_dir, index)], max_new_tokens=MAX_NEW)
        assert generated[index] == answer[0].split("?")[0]
    # one by one, each image through the tower once per option: the same log-likelihoods
    single = run(VLMAdaptersLMM(model=model, batch_size=1), task_dir, ["vlmad_mc"])
    for doc, scores in batched["responses"]["vlmad_mc"].items():
        expected = single["responses"]["vlmad_mc"][doc]
        assert len(scores) == len(CHOICES)
        for (ours, greedy), (theirs, greedy_single) in zip(scores, expected):
            assert ours == pytest.approx(theirs, abs=1e-5) and greedy == greedy_single
    images_matter = {round(scores[0][0], 4) for scores in single["responses"]["vlmad_mc"].values()}
    assert len(images_matter) == len(QUESTIONS)
    chat = run(VLMAdaptersChatLMM(model=model, batch_size=2), task_dir, ["vlmad_gen"])
    assert {doc: texts[0] for doc, texts in chat["responses"]["vlmad_gen"].items()} == generated


def test_exported_twin_scores_equal_plain_transformers(
    tokenizer_dir: str, task_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = tiny(tiny_model_config(tokenizer_dir, "hf", "mlp"))
    to_hf_llava(model, tmp_path / "hf", template="vicuna_v1")
    ours = run(VLMAdaptersLMM(model=model, batch_size=4), task_dir, ["vlmad_gen", "vlmad_mc"])
    twin = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    stops = stop_token_ids(model.tokenizer, "vicuna_v1")
    for index, (question, *_) in enumerate(QUESTIONS):
        images = doc_images(task_dir, index)
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = processor(images=images or None, text=text, return_tensors="pt")
        with torch.no_grad():
            new = twin.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                eos_token_id=stops)[0, inputs["input_ids"].shape[1]:]  # fmt: skip
            answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
            assert ours["responses"]["vlmad_gen"][index] == [answer.split("?")[0]]
            for option, (score, greedy) in zip(CHOICES, ours["responses"]["vlmad_mc"][index]):
                cont = processor.tokenizer(option, add_special_tokens=False).input_ids
                ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)
                extra = {"pixel_values": inputs["pixel_values"]} if images else {}
                logits = twin(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
                logprobs = torch.log_softmax(logits[0, -len(cont) - 1 : -1].float(), -1)
                expected = logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item()
                assert score == pytest.approx(expected, abs=1e-4), (index, option)
                assert greedy == bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


def test_bad_arguments_are_one_clear_error(tokenizer_dir: str) -> None:
    with pytest.raises(DataError, match="exactly one of pretrained=DIR"):
        VLMAdaptersLMM()
    model = tiny(tiny_model_config(tokenizer_dir))
    with pytest.raises(DataError, match="batch_size must be a positive integer, got 'auto'"):
        VLMAdaptersLMM(model=model, batch_size="auto")


def test_images_are_encoded_once_per_question(tokenizer_dir: str, task_dir: Path) -> None:
    model = tiny(tiny_model_config(tokenizer_dir)).train()  # a live model, mid-training
    rows: list[int] = []
    model.vision.register_forward_hook(lambda _m, args, _out: rows.append(len(args[0])))
    run(VLMAdaptersLMM(model=model, batch_size=8), task_dir, ["vlmad_mc"])
    assert model.training  # evaluated in eval mode, handed back in its own
    images = sum(len(which) for *_, which in QUESTIONS)
    assert sum(rows) == images  # not once per option: len(CHOICES) * images


@pytest.mark.parametrize(
    ("context", "visual", "message"),
    [
        ("<image> <image> what shape?", "one", "2 <image> marker(s) but 1 image(s)"),
        ("what shape?", "video.mp4", "video.mp4 is a video but this model takes none"),
        ("what shape?", b"bytes", "takes images (PIL) and video files (paths) as visuals"),
    ],
)
def test_bad_doc_is_one_error_naming_it(
    tokenizer_dir: str, context: str, visual: str, message: str
) -> None:
    from lmms_eval.api.instance import Instance

    lm = VLMAdaptersLMM(model=tiny(tiny_model_config(tokenizer_dir)))
    image = Image.new("RGB", (32, 32))
    lm.task_dict = {"shapes": {"test": [{"visual": image if visual == "one" else visual}]}}
    args = (context, {"max_new_tokens": 2}, lambda doc: [doc["visual"]], 0, "shapes", "test")
    metadata = {"task": "shapes", "doc_id": 0, "repeats": 1}
    request = Instance(request_type="generate_until", arguments=args, idx=0, metadata=metadata)
    with pytest.raises(DataError, match=f"^task 'shapes', doc 0: .*{re.escape(message)}"):
        lm.generate_until([request])


def test_training_scores_lmms_eval_tasks_on_the_live_model(task_dir: Path, tmp_path: Path) -> None:
    """``data.eval_lmms``: lmms-eval's tasks every step and after each stage, on the model
    being trained; after the stage they equal lmms-eval on the saved checkpoint."""
    import json
    import sys

    from vlm_adapters.training import train

    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    from tiny_train import write_tiny_config

    config = write_tiny_config(tmp_path, num_train=8)
    settings = [
        "data.eval_lmms.tasks=[vlmad_gen, vlmad_mc]",
        f"data.eval_lmms.include_path={task_dir}",
        "stages.finetune.eval_every=1",
    ]
    result = train(config, "all", tmp_path / "run", overrides=settings)
    lines = (tmp_path / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    names = {"eval_lmms/vlmad_gen/exact_match", "eval_lmms/vlmad_mc/acc"}
    assert {k for k in first if k.startswith("eval_lmms/")} == names
    summary = result.summary["finetune"]
    saved = VLMAdaptersLMM(pretrained=summary["final_dir"])
    expected = run(saved, task_dir, ["vlmad_gen", "vlmad_mc"])["results"]
    assert summary["eval_lmms/vlmad_mc/acc"] == expected["vlmad_mc"]["acc,none"]
    assert summary["eval_lmms/vlmad_gen/exact_match"] == expected["vlmad_gen"]["exact_match,none"]


VIDEO_QUESTIONS = [("what moves?", ["h264"]), ("what is shown?", ["vp9"]), ("what moves?", [])]
VIDEO_UTILS = """def doc_to_visual(doc):
    return doc["videos"]


def doc_to_text(doc):
    return doc["question"]
"""


@pytest.fixture(scope="module")
def video_task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generation and multiple-choice tasks over docs whose visuals are video files
    (clips encoded here; one doc text only), as lmms-eval's video tasks hand them."""
    pytest.importorskip("av")
    pytest.importorskip("skimage")
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    from clips import CLIPS, write_clip

    root = tmp_path_factory.mktemp("lmms-video")
    paths = {
        name: str(write_clip(root / f"{name}.{CLIPS[name][1]}", name, photo))
        for name, photo in [("h264", "astronaut"), ("vp9", "coffee")]
    }
    columns: dict[str, list] = {"question": [], "answer": [], "label": [], "videos": []}
    for index, (question, videos) in enumerate(VIDEO_QUESTIONS):
        columns["question"].append(question)
        columns["answer"].append(CHOICES[index])
        columns["label"].append(index)
        columns["videos"].append([paths[name] for name in videos])
    data = datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns)})
    data.save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(VIDEO_UTILS)
    common = COMMON.format(data=root / "data")
    (tasks / "gen.yaml").write_text(GEN.replace("vlmad_gen", "vlmvid_gen") + common)
    (tasks / "mc.yaml").write_text(MC.replace("vlmad_mc", "vlmvid_mc") + common)
    return tasks


def test_video_docs_score_what_generate_and_the_loss_give(
    tokenizer_dir: str, video_task_dir: Path
) -> None:
    """Video files as a doc's visuals, for a model with ``vision.video`` (its frame times in
    the prompt): generate_until answers what ``model.generate`` answers on the same sampled
    frames and prompt (simple and chat forms), and each option's log-likelihood is minus the
    model's summed loss on that continuation (1e-5)."""
    from vlm_adapters.data.processor import with_video_times
    from vlm_adapters.data.video import sample_video

    config = tiny_model_config(tokenizer_dir, "hf", "mlp")
    config["vision"]["video"] = {"num_frames": 3, "pool": 2, "timestamps": True}
    model = tiny(config)
    out = run(VLMAdaptersLMM(model=model, batch_size=2), video_task_dir,
              ["vlmvid_gen", "vlmvid_mc"])  # fmt: skip
    docs = datasets.load_from_disk(str(video_task_dir.parent / "data"))["test"]
    processor = model.processor_for("vicuna_v1")
    scores = []
    for index, doc in enumerate(docs):
        clips = [sample_video(Path(p), p, model.video.sampling()) for p in doc["videos"]]
        turns = [{"from": "human", "value": doc["question"]}]
        turns = with_video_times(turns, clips) if clips else turns
        frames = [clip.frames for clip in clips]
        answer = model.generate([turns], videos=[frames], max_new_tokens=MAX_NEW)[0]
        assert out["responses"]["vlmvid_gen"][index] == [answer.split("?")[0]]
        prompt = processor.prompt(turns, [], [len(f) for f in frames])
        for option, (score, _) in zip(CHOICES, out["responses"]["vlmvid_mc"][index]):
            cont = model.tokenizer(option, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + cont])
            labels = torch.tensor([[-100] * len(prompt) + cont])
            with torch.no_grad():
                loss = model(ids, torch.ones_like(ids), labels=labels,
                             video_values=processor.videos(frames)).loss  # fmt: skip
            assert score == pytest.approx(-loss.item() * len(cont), abs=1e-5), (index, option)
            scores.append(score)
    assert len({round(s, 4) for s in scores[:: len(CHOICES)]}) == len(docs)  # videos matter
    chat = run(VLMAdaptersChatLMM(model=model, batch_size=2), video_task_dir, ["vlmvid_gen"])
    assert chat["responses"]["vlmvid_gen"] == out["responses"]["vlmvid_gen"]


def test_a_video_doc_for_a_model_without_video_is_one_line(
    tokenizer_dir: str, video_task_dir: Path
) -> None:
    lm = VLMAdaptersLMM(model=tiny(tiny_model_config(tokenizer_dir)))
    with pytest.raises(DataError) as error:
        run(lm, video_task_dir, ["vlmvid_mc"])
    message = str(error.value)
    assert message.startswith("task 'vlmvid_mc', doc 0: ") and "\n" not in message
    assert (
        "h264.mp4 is a video but this model takes none (its config has no vision.video)" in message
    )
