"""The model card (README.md) and the vLLM serving report that export writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import vlm_adapters
from vlm_adapters import build_vlm
from vlm_adapters.cli import main
from vlm_adapters.demo import generate_shapes
from vlm_adapters.export import ExportError, check_exportable, to_hf_llava, vllm_report
from vlm_adapters.export.card import UNKNOWN, component_source
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.testing.tiny import IMAGE_SIZE, PATCH_SIZE, WIDTH

STAGE = {"epochs": 1, "batch_size": 4, "warmup_ratio": 0.0, "scheduler": "constant"}


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a card, parsed by yaml and checked by huggingface_hub."""
    from huggingface_hub import ModelCard

    text = path.read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(path)  # what the Hub reads; model-index must parse too
    assert card.data.to_dict()["pipeline_tag"] == meta["pipeline_tag"] == "image-text-to-text"
    return meta


@pytest.mark.parametrize(("vision", "llm"), [("hf", "llama"), ("hf_siglip", "qwen2")])
def test_clip_and_siglip_with_an_mlp_are_native(
    tokenizer_dir: str, tmp_path: Path, vision: str, llm: str
) -> None:
    model = build_vlm(tiny_model_config(tokenizer_dir, vision, "mlp", llm))
    report = vllm_report(model)
    assert report.native and report.line() == "vLLM: native"
    to_hf_llava(model, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "\nvLLM: native.\n" in card
    meta = front_matter(tmp_path / "out" / "README.md")
    assert meta["library_name"] == "transformers" and "llava" in meta["tags"]
    assert meta["license"] == "unknown"  # random-init parts record no licence
    assert "base_model" not in meta and "model-index" not in meta
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["architectures"] == [type(model.llm.transformers_model).__name__]


def test_a_dinov2_tower_exports_but_is_not_native(tokenizer_dir: str, tmp_path: Path) -> None:
    model = build_vlm(tiny_model_config(tokenizer_dir, "hf_dinov2", "mlp", "llama"))
    assert check_exportable(model) is None  # transformers' LLaVA loads it ...
    line = vllm_report(model).line()  # ... vLLM's does not
    assert line.startswith("vLLM: not native, because its vision tower's config is a Dinov2Config")
    assert "Unsupported vision config" in line
    assert main(["export", str(_saved(model, tmp_path)), "--out", str(tmp_path / "out")]) == 0
    assert f"{line}." in (tmp_path / "out" / "README.md").read_text()


def test_a_linear_connector_is_not_native(tokenizer_dir: str) -> None:
    model = build_vlm(tiny_model_config(tokenizer_dir, "hf", "linear", "llama"))
    assert check_exportable(model) is None
    (reason,) = vllm_report(model).reasons
    assert "projector_hidden_act 'linear'" in reason and "get_act_fn" in reason


@pytest.mark.parametrize(
    ("vision", "connector", "expected"),
    [
        ("timm", "mlp", ["vision tower (type 'timm'"]),
        ("hf", "qformer", ["connector 'qformer' is not Linear-activation-Linear"]),
        ("timm", "qformer", ["vision tower (type 'timm'", "connector 'qformer'"]),
    ],
)
def test_unexportable_models_are_not_native_and_stay_refused(
    tokenizer_dir: str, tmp_path: Path, vision: str, connector: str, expected: list[str]
) -> None:
    model = build_vlm(tiny_model_config(tokenizer_dir, vision, connector, "llama"))
    report = vllm_report(model)
    assert not report.native
    assert len(report.reasons) == len(expected) + 1  # + the export's own refusal
    for reason, wanted in zip(report.reasons, expected, strict=False):
        assert wanted in reason
    assert "does not export it to the transformers LLaVA format" in report.reasons[-1]
    assert "\n" not in report.line()
    with pytest.raises(ExportError, match="cannot export"):
        to_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _saved(model: vlm_adapters.VisionLanguageModel, tmp_path: Path) -> Path:
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _source_folders(root: Path, tokenizer_dir: str, licences: tuple[str, str]) -> tuple[Path, Path]:
    """A CLIP tower in a hub-cache-shaped folder and a llama LM in a plain one, each with a
    README whose front matter states a licence."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vision = root / "hub" / "models--acme--tiny-clip" / "snapshots" / "0123abcd"
    llm = root / "my-llm"
    torch.manual_seed(0)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
        )
    ).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(
        vision
    )
    llm_config = tiny_model_config(tokenizer_dir)["llm"]["config"]
    LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in llm_config.items() if k != "model_type"})
    ).save_pretrained(llm)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(llm)
    for folder, licence in zip((vision, llm), licences, strict=True):
        (folder / "README.md").write_text(f"---\nlicense: {licence}\n---\n# a model\n")
    return vision, llm


def test_the_card_names_base_models_and_their_licences(tokenizer_dir: str, tmp_path: Path) -> None:
    vision, llm = _source_folders(tmp_path, tokenizer_dir, ("mit", "apache-2.0"))
    config = {
        "vision": {"type": "hf", "model": str(vision)},
        "connector": {"type": "mlp"},
        "llm": {"type": "hf", "model": str(llm)},
    }
    model = build_vlm(config)
    to_hf_llava(model, tmp_path / "out")
    meta = front_matter(tmp_path / "out" / "README.md")
    assert meta["base_model"] == ["acme/tiny-clip"]  # a local folder is no hub id
    assert meta["license"] == "other"  # mit + apache-2.0: each is listed in the body
    body = (tmp_path / "out" / "README.md").read_text()
    assert f"| Vision | {vision} (`hf`, CLIPVisionConfig) | mit |" in body
    assert f"| LLM | {llm} (`LlamaForCausalLM`) | apache-2.0 |" in body


def test_licences_come_only_from_local_cards(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\n---\n")
    assert component_source(str(tmp_path)).licence == "other (llama3)"
    (tmp_path / "README.md").write_text("no front matter\n")
    assert component_source(str(tmp_path)).licence == UNKNOWN
    # a hub id that is not in the hub cache: nothing is fetched, the licence stays unknown
    source = component_source("nobody-here/not-cached-model")
    assert source.licence == UNKNOWN and source.hub_id == "nobody-here/not-cached-model"
    assert component_source(None).licence == UNKNOWN


@pytest.fixture(scope="module")
def run_dir(tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-stage training run of a tiny CLIP + MLP model on files, evaluated after each stage."""
    shapes = generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=4, num_eval=2)
    root = str(shapes.root)
    config = {
        **tiny_model_config(tokenizer_dir),
        "data": {
            "align": {"path": str(shapes.align), "image_root": root, "template": "plain"},
            "finetune": {"path": str(shapes.finetune), "image_root": root, "template": "llama3"},
            "eval": {"path": str(shapes.eval), "image_root": root, "template": "llama3"},
            "max_length": 256,
            "group_by_length": False,
        },
        "stages": {"align": {**STAGE, "lr": 0.01}, "finetune": {**STAGE, "lr": 0.003}},
        "run": {"seed": 0, "log_every": 1},
    }
    out = tmp_path_factory.mktemp("runs") / "run"
    vlm_adapters.train(config, out=out)
    return out


def test_an_export_from_a_run_describes_its_stages_data_and_evaluation(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = json.loads((run_dir / "finetune" / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["steps"] == 1 and "eval_loss" in summary
    out = tmp_path / "my-vlm"
    assert main(["export", str(run_dir / "finetune" / "final"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model card" in printed and "\nvLLM: native\n" in printed
    meta = front_matter(out / "README.md")
    (index,) = meta["model-index"]
    assert index["name"] == "my-vlm"
    (result,) = index["results"]
    assert result["task"]["type"] == "image-text-to-text"
    assert result["dataset"]["name"] == "eval.json"
    (metric,) = result["metrics"]
    assert metric["type"] == "loss" and metric["value"] == pytest.approx(summary["eval_loss"])
    body = (out / "README.md").read_text()
    assert "exported weights: stage `finetune`" in body
    assert "| lr | 0.01 |" in body and "| lr | 0.003 |" in body  # align's, then finetune's
    assert body.index("| lr | 0.01 |") < body.index("**finetune**") < body.index("| lr | 0.003 |")
    assert "| train_llm | full |" in body and "| lora.r |" in body
    assert f"| finetune | {run_dir.parent}" not in body  # the source path, not the run's
    assert "| finetune | " in body and "finetune.json" in body and "| 4 | 0 |" in body
    align = json.loads((run_dir / "align" / "summary.json").read_text())
    assert f"| align | after the stage | eval_loss | {align['eval_loss']:.6g} |" in body


def test_export_of_a_merged_checkpoint_takes_the_run_by_option(
    run_dir: Path, tmp_path: Path
) -> None:
    model = vlm_adapters.load(run_dir / "align" / "final")
    checkpoint = _saved(model, tmp_path)  # outside the run folder: no run is found
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "plain")]) == 0
    assert "## Training\n\nNot recorded" in (tmp_path / "plain" / "README.md").read_text()
    args = ["export", str(checkpoint), "--out", str(tmp_path / "with-run"), "--run", str(run_dir)]
    assert main(args) == 0
    assert "| lr | 0.003 |" in (tmp_path / "with-run" / "README.md").read_text()
    assert main([*args[:3], str(tmp_path / "x"), "--run", str(tmp_path)]) == 2  # not a run
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="stage 'align2' recorded no results there"):
        to_hf_llava(model, tmp_path / "y", run=run_dir, stage="align2")
    assert not (tmp_path / "y").exists()
    to_hf_llava(model, tmp_path / "z", run=run_dir, stage="align")  # Python: run and stage
    assert "exported weights: stage `align`." in (tmp_path / "z" / "README.md").read_text()


def test_a_readme_of_the_users_in_out_is_kept(tokenizer_dir: str, tmp_path: Path) -> None:
    model = build_vlm(tiny_model_config(tokenizer_dir))
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    with pytest.raises(ExportError, match="README.md exists and was not written by vlm-adapters"):
        to_hf_llava(model, out, overwrite=True)
    assert (out / "README.md").read_text() == "mine" and len(list(out.iterdir())) == 1
    (out / "README.md").unlink()
    to_hf_llava(model, out, overwrite=True)
    to_hf_llava(model, out, overwrite=True)  # our own card is replaced
    assert (out / "README.md").read_text().startswith("---\n")


def test_a_checkpoint_of_a_run_gets_the_run_but_not_the_stages_final_scores(
    run_dir: Path, tokenizer_dir: str, tmp_path: Path
) -> None:
    from huggingface_hub import ModelCard

    from vlm_adapters.export.card import find_run, model_card

    record = find_run(run_dir / "finetune" / "checkpoints" / "step-000001")
    assert record is not None and record.exported_stage == "finetune"
    assert record.checkpoint == "step-000001"
    assert find_run(run_dir / "finetune" / "final").checkpoint is None
    assert find_run(tmp_path) is None
    model = build_vlm(tiny_model_config(tokenizer_dir))
    text = model_card(
        model,
        vllm_report(model),
        name="ckpt",
        template="plain",
        llava_class="LlavaForConditionalGeneration",
        run=record,
    )
    card = ModelCard(text)
    assert card.data.eval_results is None  # the after-stage scores are not this checkpoint's
    assert "stage `finetune`, checkpoint `step-000001`" in text


def test_hub_dataset_ids_go_into_the_front_matter(tokenizer_dir: str, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from vlm_adapters.export.card import RunRecord, model_card

    local = tmp_path / "data" / "train.json"
    local.parent.mkdir()
    local.write_text("[]")
    config = {
        "data": {
            "align": {"path": "liuhaotian/LLaVA-Pretrain"},
            "finetune": {"path": str(local)},
            "eval": {"path": "some/file.jsonl"},
        }
    }
    model = build_vlm(tiny_model_config(tokenizer_dir, "hf_siglip"))
    run = RunRecord(tmp_path, config)
    text = model_card(
        model, vllm_report(model), name="x", template="plain", llava_class="L", run=run
    )
    assert ModelCard(text).data.datasets == ["liuhaotian/LLaVA-Pretrain"]


def test_a_tiled_clip_model_is_native_as_llava_next(tokenizer_dir: str) -> None:
    from vlm_adapters.testing.tiny import tiny_tiled_config

    model = build_vlm(tiny_model_config(tokenizer_dir, tiny_tiled_config("hf"), "mlp", "llama"))
    assert check_exportable(model) is None and vllm_report(model).native
