"""LLaVA-OneVision interop: a model with AnyRes tiling and pooled video exports to plain
transformers (``LlavaOnevisionForConditionalGeneration`` + ``LlavaOnevisionProcessor``), which
computes the same logits and greedy tokens on a real clip and an AnyRes image, each side
through its own processor; the export imports back exactly; what OneVision cannot express is
refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_adapters import VisionLanguageModel, build_vlm, load
from vlm_adapters.data.video import sample_video
from vlm_adapters.errors import ExportError
from vlm_adapters.export import check_exportable, to_hf_llava
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.testing.tiny import tiny_tiled_config

pytest.importorskip("av")
pytest.importorskip("skimage")
from clips import write_clip  # noqa: E402  (tests/scripts)

GRIDS = [[1, 2], [2, 1], [2, 2], [1, 3]]
QUESTION = "what moves in the video and what is in the picture ?"


def _model(tokenizer_dir: str, vision: str = "hf_siglip", **video) -> VisionLanguageModel:
    torch.manual_seed(0)
    config = tiny_model_config(tokenizer_dir, tiny_tiled_config(vision, grids=GRIDS), "mlp")
    config["vision"]["video"] = {"num_frames": 3, "pool": 2, **video}
    model = build_vlm(config).eval()
    for param in model.connector.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.fixture(scope="module")
def exported(tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("onevision")
    model = _model(tokenizer_dir)
    directory = to_hf_llava(model, root / "out", template="chatml")
    clip = sample_video(write_clip(root / "clip.mp4", "h264"), "clip", model.video.sampling())
    photo = Image.fromarray(np.asarray(Image.open(_photo(root)).convert("RGB"))[::3, ::2])
    return model, directory, clip, photo


def _photo(root: Path) -> Path:
    from skimage import data

    path = root / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return path


def _ours(model: VisionLanguageModel, clip, photo: Image.Image) -> dict:
    turns = [{"from": "human", "value": f"<video>\n<image>\n{QUESTION}"}]
    processor = model.processor_for("chatml")
    batch = processor.prompt_batch([turns], [photo], [clip.frames])
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in batch}).logits
        tokens = model.generate_ids(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    return {**batch, "logits": logits, "tokens": tokens}


def test_transformers_computes_what_we_compute(exported) -> None:
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model, directory, clip, photo = exported
    theirs = LlavaOnevisionForConditionalGeneration.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    content = [{"type": "video"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    inputs = processor(text=text, images=photo, videos=[list(clip.frames)], return_tensors="pt")
    ours = _ours(model, clip, photo)
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    assert torch.equal(inputs["pixel_values_videos"][0], ours["video_values"].values)
    assert torch.equal(inputs["pixel_values"][0], ours["pixel_values"].values)
    with torch.no_grad():
        logits = theirs(**inputs).logits
        greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
        tokens = theirs.generate(**inputs, **greedy)[:, inputs["input_ids"].shape[1] :]
    assert (logits - ours["logits"]).abs().max().item() < 1e-4
    assert tokens.tolist() == ours["tokens"].tolist()


def test_the_export_imports_back_exactly(exported) -> None:
    model, directory, clip, photo = exported
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llava_onevision"
    assert config["vision_aspect_ratio"] == "anyres_max_4"
    again = load(directory).eval()
    assert again.video.pool == 2 and again.video_spec.token_id == model.video_spec.token_id
    assert [list(g) for g in again.vision.layout.grids] == GRIDS
    torch.testing.assert_close(
        _ours(again, clip, photo)["logits"], _ours(model, clip, photo)["logits"], rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("vision", "video", "tiled", "reason"),
    [
        ("hf_siglip", {"pool": 1}, True, "LLaVA-OneVision pools frames 2x2"),
        ("hf_siglip", {"newline": False}, True, "ends every video with a token"),
        ("hf_siglip", {}, False, "LLaVA-OneVision tiles every single image"),
        ("hf", {}, True, "resizes the shortest side and crops (CLIP style)"),
    ],
)
def test_what_onevision_cannot_express_is_refused(
    tokenizer_dir, tmp_path, vision, video, tiled, reason
) -> None:
    section = tiny_tiled_config(vision, grids=GRIDS) if tiled else vision
    config = tiny_model_config(tokenizer_dir, section, "mlp")
    config["vision"]["video"] = {"num_frames": 2, **video}
    model = build_vlm(config)
    assert reason in check_exportable(model)
    with pytest.raises(ExportError, match="save_pretrained"):
        to_hf_llava(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_onevision_checkpoint_that_shrinks_images_is_refused(exported, tmp_path) -> None:
    _, directory, _, _ = exported
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in directory.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    config = json.loads((changed / "config.json").read_text())
    config["vision_aspect_ratio"] = "anyres_max_2"
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"'anyres_max_2' shrinks images of 4 tiles"):
        load(changed)
