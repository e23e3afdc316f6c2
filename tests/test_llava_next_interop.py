"""LLaVA-NeXT interop: what an AnyRes export writes, the one loader for both transformers
formats, and every checkpoint it cannot represent exactly refused with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlm_adapters import build_vlm, load
from vlm_adapters.cli import main
from vlm_adapters.errors import CheckpointError, ConfigError, ExportError
from vlm_adapters.export import check_exportable, to_hf_llava
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.testing.tiny import tiny_tiled_config
from vlm_adapters.vision.tiling import AnyResBackbone

GRIDS = [[1, 2], [2, 1], [2, 2], [1, 3]]


def _tiled(tokenizer_dir: str, vision: str = "hf", connector: str | dict = "mlp"):
    torch.manual_seed(0)
    section = tiny_tiled_config(vision, grids=GRIDS)
    model = build_vlm(tiny_model_config(tokenizer_dir, section, connector)).eval()
    for param in model.connector.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.fixture(scope="module")
def exported(tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory):
    model = _tiled(tokenizer_dir)
    directory = to_hf_llava(model, tmp_path_factory.mktemp("next") / "out", template="chatml")
    return model, directory


def _copy(directory: Path, target: Path) -> Path:
    target.mkdir()
    for path in directory.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_export_is_a_llava_next_checkpoint(exported) -> None:
    model, directory = exported
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llava_next"
    assert config["image_grid_pinpoints"] == [[32 * r, 32 * c] for r, c in GRIDS]
    assert config["vision_feature_select_strategy"] == "default"
    processor = json.loads((directory / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaNextProcessor"
    assert processor["image_processor"]["image_processor_type"] == "LlavaNextImageProcessor"
    weights = load_file(directory / "model.safetensors")
    assert torch.equal(weights["image_newline"], model.connector.image_newline)


def test_the_export_imports_back_exactly(exported) -> None:
    model, directory = exported
    again = load(directory).eval()  # the one loader recognises LLaVA-NeXT
    assert isinstance(again.vision, AnyResBackbone) and again.template == "chatml"
    assert [list(g) for g in again.vision.layout.grids] == GRIDS
    image = Image.effect_noise((70, 24), 60).convert("RGB")
    batch = model.processor(["<image> what shape ?"], [image])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def test_the_command_line_exports_and_imports_tiled_models(exported, tokenizer_dir, tmp_path):
    model, directory = exported
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava_next"
    assert main(["import", str(directory), "--out", str(tmp_path / "ours")]) == 0
    assert "tiling" in json.loads((tmp_path / "ours" / "config.json").read_text())["vision"]


def test_other_transformers_checkpoints_are_refused_by_the_loader(tokenizer_dir, tmp_path):
    llm = build_vlm(tiny_model_config(tokenizer_dir)).llm.transformers_model
    llm.save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match=r"a transformers 'llama' checkpoint; .*llava_next"):
        load(tmp_path / "llama")


def _refused(directory: Path, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        load(directory)


def test_a_checkpoint_whose_weights_do_not_fit_its_class_is_never_half_loaded(exported, tmp_path):
    _, directory = exported
    as_llava = _copy(directory, tmp_path / "as_llava")  # LLaVA-NeXT weights labelled LLaVA
    _edit_json(
        as_llava / "config.json",
        model_type="llava",
        architectures=["LlavaForConditionalGeneration"],
    )
    _refused(
        as_llava,
        r"do not fit LlavaForConditionalGeneration \(unexpected keys: image_newline\)",
    )
    missing = _copy(directory, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    del weights["image_newline"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    _refused(
        missing, r"do not fit LlavaNextForConditionalGeneration \(missing keys: .*image_newline"
    )


@pytest.mark.parametrize(
    ("config", "image", "processor", "message"),
    [
        (
            {"image_grid_pinpoints": [[32, 48]]},
            {"image_grid_pinpoints": [[32, 48]]},
            {},
            r"image_grid_pinpoints \[\[32, 48\]\] are not multiples of the tower's 32-pixel",
        ),
        (
            {},
            {"image_grid_pinpoints": [[32, 64]]},
            {},
            r"the image processor's image_grid_pinpoints \[\[32, 64\]\] are not the model's",
        ),
        ({}, {"do_pad": False}, {}, r"cannot be rebuilt exactly .* differs in do_pad"),
        ({}, {}, {"patch_size": 4}, r"counts tiles with patch_size 4"),
        ({}, {}, {"num_additional_image_tokens": 0}, r"0 extra token\(s\) for 'default'"),
        (
            {},
            {"image_processor_type": "CLIPImageProcessor"},
            {},
            r"tiles like LlavaNextImageProcessor",
        ),
    ],
)
def test_llava_next_checkpoints_we_cannot_represent_are_refused(
    exported, tmp_path, config, image, processor, message
) -> None:
    _, directory = exported
    changed = _copy(directory, tmp_path / "changed")
    _edit_json(changed / "config.json", **config)
    saved = json.loads((changed / "processor_config.json").read_text())
    image = {**saved["image_processor"], **image}  # transformers nests the image processor
    _edit_json(changed / "processor_config.json", **processor, image_processor=image)
    _refused(changed, message)


@pytest.mark.parametrize(
    ("vision", "connector", "overrides", "reason"),
    [
        ("hf", {"type": "pool", "factor": 2}, {}, "'pool' has no counterpart"),
        ("timm", "mlp", {}, "not a transformers vision model"),
        ("hf_dinov2_registers", "mlp", {}, "5 prefix tokens"),
        ("hf_dinov2", "mlp", {"image_size": 16}, "tiles are 16 pixels but the tower's config"),
    ],
)
def test_unexportable_tiled_compositions_say_why(
    tokenizer_dir, tmp_path, vision, connector, overrides, reason
) -> None:
    section = {**tiny_tiled_config(vision, grids=GRIDS), **overrides}
    model = build_vlm(tiny_model_config(tokenizer_dir, section, connector))
    assert reason in check_exportable(model)
    with pytest.raises(ExportError, match="save_pretrained"):
        to_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tiling_needs_a_tower_with_a_square_patch_grid(tokenizer_dir) -> None:
    section = tiny_tiled_config("hf", grids=GRIDS)
    with pytest.raises(ConfigError, match="the 'resampler' connector's tokens have no place"):
        build_vlm(tiny_model_config(tokenizer_dir, section, "resampler"))
