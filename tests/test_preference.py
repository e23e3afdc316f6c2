"""The preference stage: pair data, one image for two answers, references, metrics, configs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from vlm_adapters import build_vlm
from vlm_adapters.chat.templates import IGNORE_INDEX
from vlm_adapters.cli import main
from vlm_adapters.data.pairs import PairCollator, PreferenceDataset
from vlm_adapters.data.records import Skipped
from vlm_adapters.data.sources import RowList
from vlm_adapters.errors import ConfigError
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.training import train
from vlm_adapters.vision.base import VisionBackbone

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_train import write_preference_config  # noqa: E402

LORA = {"train_llm": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}


@pytest.fixture(scope="module")
def model(tokenizer_dir: str):
    return build_vlm(tiny_model_config(tokenizer_dir))


def _image(root: Path, name: str) -> str:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / name)
    return name


def _dataset(model, records, root: Path, **options: Any) -> PreferenceDataset:
    return PreferenceDataset.for_model(
        model, records, image_root=root, template="llama3", **options
    )


def _answer_span(item: dict[str, Any], answer: str) -> list[int]:
    labels = item[f"{answer}_labels"]
    return item[f"{answer}_input_ids"][labels != IGNORE_INDEX].tolist()


def test_a_multi_turn_pair_with_two_images_labels_only_its_answers(model, tmp_path: Path):
    images = [_image(tmp_path, "a.png"), _image(tmp_path, "b.png")]
    record = {
        "id": "p0",
        "image": images,
        "conversations": [
            {"from": "human", "value": "<image> what colour is the square ?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "and here <image> ?"},
        ],
        "chosen": "blue",
        "rejected": "green circle",
    }
    item = _dataset(model, [record], tmp_path)[0]
    chosen, rejected = item["chosen_input_ids"], item["rejected_input_ids"]
    prompt = model.processor_for("llama3").prompt(record["conversations"], 2)
    assert chosen[: len(prompt)].tolist() == rejected[: len(prompt)].tolist() == prompt
    assert (item["chosen_labels"][: len(prompt)] == IGNORE_INDEX).all()  # "red" too
    assert model.tokenizer.decode(_answer_span(item, "chosen")).startswith("blue")
    assert model.tokenizer.decode(_answer_span(item, "rejected")).startswith("green circle")
    image_tokens = (chosen == model.image_token_id).sum()
    assert image_tokens == 2 * model.num_image_tokens
    assert item["pixel_values"].shape[0] == 2  # the sample's images, once
    assert item["position"] == 0


def test_trl_rows_string_and_conversational_prompts_and_text_only(model, tmp_path: Path):
    image = Image.new("RGB", (32, 32), (0, 0, 200))
    rows = [
        {"prompt": "what colour is it ?", "chosen": "blue", "rejected": "red", "images": [image]},
        {
            "prompt": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "\nwhat colour is it ?"},
                    ],
                }
            ],
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "red"}],
            "images": [image],
        },
        {"prompt": "say one word", "chosen": "blue", "rejected": "red"},
    ]
    dataset = _dataset(model, RowList(rows, "rows"), tmp_path)
    kept, skipped = dataset.precheck()
    assert not skipped and len(kept) == 3
    items = [kept[i] for i in range(3)]
    assert items[0]["chosen_input_ids"].tolist() == items[1]["chosen_input_ids"].tolist()
    assert items[2]["pixel_values"] is None
    batch = PairCollator(model.tokenizer.pad_token_id)(items)
    assert batch["input_ids"].shape[0] == 6 and batch["pairs"] == 3
    assert batch["input_ids"][0].tolist()[:5] == items[0]["chosen_input_ids"].tolist()[:5]
    assert batch["input_ids"][3].tolist()[:5] == items[0]["rejected_input_ids"].tolist()[:5]
    assert batch["pixel_values"].shape[0] == 2  # two samples' images, once each
    assert batch["positions"].tolist() == [0, 1, 2]


def test_bad_pairs_are_counted_skips_with_their_reasons(model, tmp_path: Path):
    good = {"conversations": [{"from": "human", "value": "colour ?"}], "chosen": "blue"}
    records = [
        {**good, "id": "same", "rejected": "blue"},
        {**good, "id": "empty", "rejected": "  "},
        {**good, "id": "missing", "rejected": "red", "image": "nowhere.png"},
        {**good, "id": "video", "rejected": "red", "video": "clip.mp4"},
        {**good, "id": "long", "rejected": " ".join(["red"] * 80)},
        {**good, "id": "ends-with-answer", "rejected": "red",
         "conversations": [*good["conversations"], {"from": "gpt", "value": "x"}]},
        {**good, "id": "ok", "rejected": "red"},
    ]  # fmt: skip
    dataset = _dataset(model, records, tmp_path, max_length=40)
    kept, skipped = dataset.precheck()
    reasons = {s.id: s.reason for s in skipped}
    assert reasons == {
        "same": "identical answers",
        "empty": "empty answer",
        "missing": "image missing",
        "video": "video in a pair",
        "ends-with-answer": "bad pair",
    }
    items = [kept[i] for i in range(len(kept))]
    too_long = [i for i in items if isinstance(i, Skipped)]
    assert [(s.id, s.reason) for s in too_long] == [("long", "pair too long (> 40 tokens)")]


def _metrics(out: Path) -> list[dict[str, Any]]:
    lines = (out / "preference" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _train(root: Path, stage: dict | None = None, out: str = "out", **kwargs: Any) -> Path:
    config = write_preference_config(root, num_train=8, stage=stage)
    train(config, out=root / out, fresh_connector=True, **kwargs)
    return root / out


def test_the_tower_runs_once_per_sample_not_once_per_answer(tmp_path: Path, monkeypatch):
    rows: list[int] = []
    features = VisionBackbone.forward

    def counted(self, pixel_values):  # noqa: ANN001, ANN202
        rows.append(len(pixel_values))
        return features(self, pixel_values)

    monkeypatch.setattr(VisionBackbone, "forward", counted)
    _train(tmp_path, {"reference": "copy"})  # a live reference: it reuses the policy's features
    assert rows == [4, 4]  # 2 steps of 4 single-image pairs: one tower pass each


def test_the_frozen_tower_feature_cache_serves_the_preference_stage(tmp_path: Path, monkeypatch):
    plain = _metrics(_train(tmp_path / "plain", {"reference": "copy"}))
    rows: list[int] = []
    features = VisionBackbone.forward

    def counted(self, pixel_values):  # noqa: ANN001, ANN202
        rows.append(len(pixel_values))
        return features(self, pixel_values)

    monkeypatch.setattr(VisionBackbone, "forward", counted)
    cache = {"reference": "copy", "feature_cache": str(tmp_path / "cache")}
    cached = _metrics(_train(tmp_path / "cached", cache))
    # one black image (the connector's input for image-free batches), then the 8 images
    # filling the cache once; the steps read it
    assert rows == [1, 4, 4]
    for a, b in zip(plain, cached, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_precomputed_reference_gives_the_live_references_losses(tmp_path: Path):
    live = _metrics(_train(tmp_path / "live", {"reference": "copy", "epochs": 2}))
    out = _train(tmp_path / "pre", {"reference": "precomputed", "epochs": 2})
    assert (out / "preference" / "reference_logps.safetensors").is_file()
    pre = _metrics(out)
    assert len(live) == len(pre) == 4
    for a, b in zip(live, pre):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def test_a_lora_stage_after_a_lora_finetune_starts_from_the_finetuned_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    stage = {**LORA, "train_connector": False}  # the adapters alone: eval's reference is exact
    config = write_preference_config(tmp_path, num_train=8, stage=stage)
    data = yaml.safe_load(config.read_text())
    data["recipe"] = ["finetune", "preference"]
    data["stages"]["finetune"] |= LORA
    config.write_text(yaml.safe_dump(data))
    result = train(config, out=tmp_path / "out", fresh_connector=True)
    first = _metrics(tmp_path / "out")[0]
    # the reference (adapters off, the finetune adapter folded in) is the policy at step 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert result.summary["preference"]["rewards/accuracy"] == 1.0
    pairs = yaml.safe_load(config.read_text())["data"]["preference"]
    final, args = tmp_path / "out" / "preference" / "final", ["--task-type", "preference"]
    args += ["--data", pairs["path"], "--images", pairs["image_root"], "--json"]
    adapters = _eval(capsys, [str(final), *args])
    finetuned = _eval(
        capsys, [str(final), *args, "--reference", str(final.parent.parent / "finetune" / "final")]
    )
    assert adapters["reference"] == "adapters" and finetuned["reference"] == "model"
    assert adapters["reward_accuracy"] == finetuned["reward_accuracy"] == 1.0
    assert adapters["reward_margin"] == pytest.approx(finetuned["reward_margin"], abs=1e-4)
    assert adapters["n"] == 8 and adapters["skipped"] == 0
    reference = final.parent.parent / "finetune" / "final"
    weights = {f.name: f.read_bytes() for f in reference.iterdir() if f.is_file()}
    out = ["--reference", str(reference), "--out", str(reference)]  # --out is the reference
    assert main(["eval", str(final), *args, *out]) == 2
    assert "overlaps the source" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in reference.iterdir() if f.is_file()} == weights


def _eval(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, Any]:
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "connector",
    ["qformer", {"type": "cabstractor", "num_queries": 4, "depth": 1}],
    ids=["qformer", "plugin"],
)
def test_compositions_learn_a_separable_preference(tmp_path: Path, connector: Any):
    if isinstance(connector, dict):
        pytest.importorskip("vlm_adapters_cabstractor")
    config = write_preference_config(tmp_path, num_train=8, stage={"epochs": 3, **LORA})
    data = yaml.safe_load(config.read_text())
    data["connector"] = connector if isinstance(connector, dict) else {
        "type": "qformer", "num_queries": 4, "num_layers": 1, "num_heads": 4}  # fmt: skip
    config.write_text(yaml.safe_dump(data))
    result = train(config, out=tmp_path / "out", fresh_connector=True)
    steps = _metrics(tmp_path / "out")
    assert steps[0]["rewards/accuracy"] == 0.0  # policy == reference: every reward ties
    assert steps[-1]["rewards/accuracy"] == 1.0
    assert steps[-1]["rewards/margin"] > steps[1]["rewards/margin"] > 0
    summary = result.summary["preference"]
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(summary)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data.packing": True}, "does not pack its pairs"),
        ({"data.preference.streaming": True}, "preference pairs are read map-style"),
        ({"stages.preference.reference": "adapters"}, "adapters needs LoRA"),
        ({"stages.preference.objective": "kto"}, "stages.preference.objective"),
        (
            {"stages.preference.objective": "ipo", "stages.preference.label_smoothing": 0.1},
            "the ipo loss has none",
        ),
        ({"recipe": ["preference", "finetune"]}, "in the order align, finetune, preference"),
    ],
)
def test_bad_preference_configs_are_one_line_errors(tmp_path: Path, change, message):
    config = write_preference_config(tmp_path)
    overrides = [f"{k}={json.dumps(v)}" for k, v in change.items()]
    with pytest.raises(ConfigError, match=message) as error:
        train(config, out=tmp_path / "out", overrides=overrides, fresh_connector=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("recipe", [["preference"], ["finetune", "preference"]])
def test_qlora_preference_stage_starts_at_its_reference(tmp_path: Path, recipe: list[str]):
    """4-bit LLM + LoRA: alone, the reference is the model with its adapter off; after a QLoRA
    finetune (whose adapter cannot be folded into 4-bit weights) it is precomputed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm_adapters.llm import hf

    if hf.bitsandbytes_problem() is not None:
        pytest.skip(f"bitsandbytes: {hf.bitsandbytes_problem()}")
    config = write_preference_config(tmp_path, num_train=8, stage=LORA)
    data = yaml.safe_load(config.read_text())
    llama = {k: v for k, v in data["llm"]["config"].items()} | {"hidden_size": 64}
    llama["intermediate_size"] = 128  # bitsandbytes' CPU kernels need 64-wide blocks
    torch_llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llama))
    torch_llm.save_pretrained(tmp_path / "llama")
    data["llm"] = {"type": "hf", "model": str(tmp_path / "llama"),
                   "tokenizer": data["llm"]["tokenizer"], "quantization": {"bits": 4}}  # fmt: skip
    data["recipe"] = recipe
    data["stages"]["finetune"] |= LORA
    config.write_text(yaml.safe_dump(data))
    train(config, out=tmp_path / "out", fresh_connector=True)
    steps = _metrics(tmp_path / "out")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[-1]["rewards/margin"] > 0
    stored = (tmp_path / "out" / "preference" / "reference_logps.safetensors").is_file()
    assert stored == (recipe == ["finetune", "preference"])


def _trl_rows(root: Path) -> list[dict[str, Any]]:
    """The toy pairs in TRL's conversational columns, with embedded images."""
    config = yaml.safe_load(write_preference_config(root).read_text())["data"]["preference"]
    rows = []
    for pair in json.loads(Path(config["path"]).read_text()):
        question = pair["conversations"][0]["value"].replace("<image>", "").strip()
        content = [{"type": "image"}, {"type": "text", "text": "\n" + question}]
        rows.append({
            "prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            "images": [Image.open(Path(config["image_root"]) / pair["image"]).convert("RGB")],
        })  # fmt: skip
    return rows


def test_trl_columns_train_from_a_saved_dataset_and_from_memory(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    rows = _trl_rows(tmp_path / "data")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    config = write_preference_config(tmp_path / "run", stage={"reference": "copy"})
    saved = ["data.preference.format=datasets", f"data.preference.path={folder}"]
    from_disk = train(config, out=tmp_path / "disk", overrides=saved, fresh_connector=True)
    in_memory = train(config, out=tmp_path / "mem", data={"preference": rows}, fresh_connector=True)
    llava = train(config, out=tmp_path / "llava", fresh_connector=True)
    losses = [r.summary["preference"]["final_loss"] for r in (from_disk, in_memory, llava)]
    assert losses == pytest.approx([losses[2]] * 3, abs=1e-6)  # the same pairs, the same ids
