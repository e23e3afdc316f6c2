"""Training from Python as a user script does it: `vlm_adapters.train` with a config dict, a
model, data in memory (PIL images, a `datasets.Dataset`), callbacks that stop and resume, the
export loaded by plain transformers; and what it refuses."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

import vlm_adapters
from vlm_adapters.chat.templates import encode_prompt
from vlm_adapters.demo import generate_shapes
from vlm_adapters.errors import ConfigError, DataError
from vlm_adapters.testing import tiny_model_config

SIZES = [(37, 29), (45, 33), (31, 52), (64, 41)]
MODES = ["RGBA", "L", "RGB", "P"]
STAGE = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"}


def _in_memory(root: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records with their image files replaced by PIL images of odd sizes and modes."""
    out = []
    for index, record in enumerate(records):
        with Image.open(root / record["image"]) as image:
            size, mode = SIZES[index % len(SIZES)], MODES[index % len(MODES)]
            pil = image.convert("RGB").resize(size).convert(mode)
        out.append({**record, "image": pil})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    shapes = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_eval=4)
    return {
        name: _in_memory(shapes.root, json.loads(getattr(shapes, name).read_text()))
        for name in ("align", "finetune", "eval")
    }


def _config(tokenizer_dir: str, **model: str) -> dict[str, Any]:
    """A user's training config as a dict: no data files (the data is given to `train`)."""
    return {
        **tiny_model_config(tokenizer_dir, **model),
        "data": {
            "align": {"template": "plain"},
            "finetune": {"template": "llama3"},
            "eval": {"template": "llama3"},
            "max_length": 256,
            "group_by_length": False,
        },
        "stages": {"align": dict(STAGE), "finetune": {**STAGE, "lr": 3e-3}},
        "run": {"seed": 0, "log_every": 1},
    }


class Recorder(vlm_adapters.TrainerCallback):
    """Records every event; stops the run at step ``stop_at`` of stage ``stop_in``."""

    def __init__(self, stop_in: str | None = None, stop_at: int = 0) -> None:
        self.stop_in, self.stop_at = stop_in, stop_at
        self.losses: dict[str, list[float]] = {}
        self.saved: list[Path] = []
        self.evaluated: list[dict[str, Any]] = []
        self.ended: list[str] = []

    def on_log(self, state, control, logs) -> None:  # noqa: ANN001
        self.losses.setdefault(state.stage, []).append(logs["loss"])
        if state.stage == self.stop_in and state.step == self.stop_at:
            control.should_stop = True

    def on_save(self, state, control, path) -> None:  # noqa: ANN001
        self.saved.append(Path(path))

    def on_evaluate(self, state, control, metrics) -> None:  # noqa: ANN001
        self.evaluated.append({"stage": state.stage, **metrics})

    def on_stage_end(self, state, control, summary) -> None:  # noqa: ANN001
        self.ended.append(summary["stage"])


def _metrics(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_user_script_trains_both_stages_stops_resumes_and_exports(
    data: dict, tokenizer_dir: str, tmp_path: Path
) -> None:
    import datasets
    from transformers import LlavaForConditionalGeneration

    from vlm_adapters.export import to_hf_llava

    config = _config(tokenizer_dir)
    finetune = datasets.Dataset.from_list(data["finetune"])
    given = {"align": data["align"], "finetune": finetune, "eval": data["eval"]}
    out = tmp_path / "run"
    recorder = Recorder(stop_in="finetune", stop_at=3)
    model = vlm_adapters.build_vlm(config)
    first = vlm_adapters.train(config, out=out, model=model, data=given, callbacks=[recorder])

    assert first.stopped and first.model is model and first.out == out
    align, stopped = first.summary["align"], first.summary["finetune"]
    assert align["steps"] == 4 and Path(align["final_dir"]).is_dir()
    assert recorder.losses["align"][-1] < recorder.losses["align"][0]
    assert recorder.losses["align"] == [r["loss"] for r in _metrics(out / "align")]
    assert stopped["steps"] == 3 and stopped["final_dir"] is None
    checkpoint = out / "finetune" / "checkpoints" / "step-000003"
    assert stopped["stopped_at"] == str(checkpoint) and checkpoint.is_dir()
    assert recorder.saved == [out / "align" / "final", checkpoint]
    assert recorder.ended == ["align", "finetune"]
    assert [e["stage"] for e in recorder.evaluated] == ["align"]  # not after a stopped stage
    assert recorder.evaluated[0]["eval_samples"] == 4 > 0 < recorder.evaluated[0]["eval_loss"]
    assert align["eval_loss"] == recorder.evaluated[0]["eval_loss"]
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert saved["finetune"]["path"] == f"<in-memory: 8 records, {finetune._fingerprint}>"
    assert saved["align"]["path"].startswith("<in-memory: 8 records, ")

    # a new process would rebuild the model from the config: resume="auto" continues the run
    again = vlm_adapters.train(config, out=out, data=given, resume="auto")
    assert not again.stopped and list(again.summary) == ["finetune"]
    assert again.summary["finetune"]["steps"] == 4
    losses = [r["loss"] for r in _metrics(out / "finetune")]
    assert [r["step"] for r in _metrics(out / "finetune")] == [1, 2, 3, 4]
    assert losses[:3] == recorder.losses["finetune"]
    assert losses[-1] < losses[0]

    to_hf_llava(again.model, tmp_path / "hf", template="llama3")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ours = again.model.eval()
    turns = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}]
    ids = encode_prompt(
        ours.tokenizer,
        "llama3",
        turns,
        image_token_id=ours.image_token_id,
        num_image_tokens=ours.num_image_tokens,
    )
    input_ids = torch.tensor([ids])
    pixels = ours.vision.preprocess([data["eval"][0]["image"].convert("RGB")])
    with torch.no_grad():
        expected = ours(input_ids, torch.ones_like(input_ids), pixels).logits
        got = theirs(input_ids=input_ids, pixel_values=pixels).logits
    assert (got - expected).abs().max().item() < 1e-4


def test_a_contradicting_model_section_is_refused_naming_both(
    tokenizer_dir: str, data: dict, tmp_path: Path
) -> None:
    model = vlm_adapters.build_vlm(tiny_model_config(tokenizer_dir, connector="mlp", llm="qwen2"))
    config = _config(tokenizer_dir, connector="linear", llm="llama")
    with pytest.raises(ConfigError) as error:
        vlm_adapters.train(config, out=tmp_path / "run", model=model, data=data["align"])
    message = str(error.value)
    assert "\n" not in message
    assert "connector.type: 'linear' in the config, 'mlp' in the model" in message
    assert "llm.config.model_type: 'llama' in the config, 'qwen2' in the model" in message
    assert not (tmp_path / "run").exists()


def test_the_run_records_the_models_sections_and_a_resume_rebuilds_it(
    tokenizer_dir: str,
    data: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    model = vlm_adapters.build_vlm(tiny_model_config(tokenizer_dir, connector="mlp", llm="qwen2"))
    config = {k: v for k, v in _config(tokenizer_dir).items() if k not in ("vision", "llm")}
    config["connector"] = {"type": "mlp"}  # agrees with the model: accepted
    config["recipe"] = ["align"]
    del config["data"]["eval"], config["data"]["finetune"]
    out = tmp_path / "run"
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # a script that set up no logging
    first = vlm_adapters.train(
        config, out=out, model=model, data=data["align"], callbacks=[Recorder("align", 1)]
    )
    assert first.stopped
    assert "align step 1/4 loss" in capsys.readouterr().err  # INFO lines without any setup
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["connector"]["type"] == "mlp"
    assert saved["llm"]["config"]["model_type"] == "qwen2"

    with pytest.raises(ConfigError, match="stands for records given in Python"):
        vlm_adapters.train(out / "config.yaml", out=out, resume="auto")
    other = [{**record, "id": f"other-{i}"} for i, record in enumerate(data["align"])]
    with pytest.raises(ConfigError, match=r"data\.align\.path: '<in-memory: 8 records, "):
        vlm_adapters.train(out / "config.yaml", out=out, resume="auto", data=other)
    again = vlm_adapters.train(out / "config.yaml", out=out, resume="auto", data=data["align"])
    assert again.summary["align"]["steps"] == 4
    assert again.model.component_types["connector"] == "mlp"
    assert again.model.llm.model.config.model_type == "qwen2"


def test_in_memory_data_errors_are_one_line(tokenizer_dir: str, data: dict, tmp_path: Path) -> None:
    import datasets

    config = _config(tokenizer_dir)
    config["data"] = {"align": {"template": "plain"}, "max_length": 256}
    cases = [
        ({"alig": data["align"]}, ConfigError, "data: 'alig' is not a stage"),
        ([{"image": "a.png"}], DataError, "data['align'][0] has no 'conversations' field"),
        ("not-a-file.json", ConfigError, "data.align.path: not-a-file.json not found"),
        (
            datasets.Dataset.from_list([{"text": "hi"}]),
            DataError,
            "data['align']: the dataset has no 'conversations' column (it has text)",
        ),
        (42, DataError, "expected a data file, a list of records or a datasets.Dataset, got int"),
    ]
    for given, kind, expected in cases:
        with pytest.raises(kind) as error:
            vlm_adapters.train(config, "align", out=tmp_path / "run", data=given)
        assert expected in str(error.value) and "\n" not in str(error.value)
    cached = {**config, "stages": {"align": {**STAGE, "feature_cache": str(tmp_path / "f")}}}
    with pytest.raises(ConfigError, match=r"stages\.align\.feature_cache: the stage's data is"):
        vlm_adapters.train(cached, "align", out=tmp_path / "run", data=data["align"])
    with pytest.raises(ConfigError, match="callbacks: Recorder is not a TrainerCallback instance"):
        vlm_adapters.train(config, "align", out=tmp_path / "run", callbacks=[Recorder])
    assert not (tmp_path / "run").exists()
