"""Real photos, not synthetic squares: our preprocessing and logits against plain transformers.

The photos are scikit-image's bundled samples (shipped inside its wheel, so nothing is
downloaded), written to a temp dir as portrait, landscape, panorama and tiny crops in RGB, L,
RGBA and P modes as JPEG, PNG and GIF. Images that need resizing are the ones where a
re-implementation of the image processor would round differently from transformers'.

Two directions, each through its own processor on each side:
- a transformers LLaVA checkpoint (random weights) imported with ``from_hf_llava``;
- our tiny composed model exported with ``to_hf_llava``, run by plain transformers;
and the same for LLaVA-NeXT (AnyRes tiling), where every photo is fitted into its own tile
grid (one of them padded on one side only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.chat.jinja import chat_template_jinja
from vlm_adapters.chat.templates import stop_token_ids
from vlm_adapters.export import from_hf_llava, to_hf_llava
from vlm_adapters.model.generation import prompt_batch
from vlm_adapters.testing import tiny_model_config, tiny_vision_config
from vlm_adapters.vision.base import ImageBatch

SAMPLES = Path(skimage.data.__file__).parent  # the photos inside the wheel (no pooch fetch)
QUESTION = "what colour is the shape?"
ATOL = 1e-4
NEW_TOKENS = 4


def _sample(name: str) -> Image.Image:
    with Image.open(SAMPLES / name) as image:
        return image.copy()


def _alpha(image: Image.Image) -> Image.Image:
    """``image`` with a left-to-right alpha ramp (transparent edge, opaque edge)."""
    ramp = Image.linear_gradient("L").rotate(90).resize(image.size)
    rgba = image.convert("RGBA")
    rgba.putalpha(ramp)
    return rgba


# name -> (file, make the image from the bundled samples, expected mode when read back)
PHOTOS = {
    "portrait.jpg": (lambda: _sample("rocket.jpg").transpose(Image.Transpose.ROTATE_90), "RGB"),
    "landscape.png": (lambda: _sample("chelsea.png"), "RGB"),
    "panorama.jpg": (lambda: _sample("coffee.png").crop((0, 150, 600, 240)), "RGB"),
    "tiny.png": (lambda: _sample("astronaut.png").crop((170, 60, 195, 78)), "RGB"),
    "grey.png": (lambda: _sample("camera.png").crop((0, 80, 512, 380)), "L"),
    "alpha.png": (
        lambda: _alpha(_sample("chelsea.png").transpose(Image.Transpose.ROTATE_90)),
        "RGBA",
    ),
    "palette.gif": (lambda: _sample("coffee.png").crop((100, 0, 500, 300)).quantize(64), "P"),
    # 63x32 in a 64x32 tile grid: resized as is and padded by one column on the right only
    "one_side.png": (lambda: _sample("chelsea.png").crop((150, 60, 213, 92)), "RGB"),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image.Image]:
    """Each photo written in its format and mode, then opened from disk as a user would."""
    root = tmp_path_factory.mktemp("photos")
    opened = {}
    for name, (make, mode) in PHOTOS.items():
        make().save(root / name)
        image = Image.open(root / name)
        image.load()
        assert image.mode == mode, (name, image.mode)
        opened[name] = image
    sizes = [image.size for image in opened.values()]
    assert any(w < h for w, h in sizes) and any(w > 4 * h for w, h in sizes)  # portrait, pano
    assert any(max(w, h) < 32 for w, h in sizes)  # smaller than the towers: upsampled
    return opened


def _messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _ours(model: VisionLanguageModel, template: str, image: Image.Image) -> dict:
    """Logits and greedy tokens through our own prompt building and preprocessing."""
    turns = [{"from": "human", "value": QUESTION}]
    batch = prompt_batch(model, [turns], [image], template)
    stops = stop_token_ids(model.tokenizer, template)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        tokens = model.generate_ids(
            **batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops
        )
    return {**batch, "logits": logits, "generated": tokens}


def _theirs(llava, processor, image: Image.Image, eos: list[int]) -> dict:
    """The same with plain transformers: ``AutoProcessor`` + ``LlavaForConditionalGeneration``."""
    text = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = llava(**inputs).logits
        out = llava.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    return {**inputs, "logits": logits, "generated": out[:, inputs["input_ids"].shape[1] :]}


def _pixels(inputs: dict) -> torch.Tensor:
    """Pixel values ``[rows, 3, H, W]``: ours (an ImageBatch when tiled) or transformers'
    (LLaVA-NeXT: ``[1, tiles, 3, H, W]`` for one image)."""
    pixels = inputs["pixel_values"]
    if isinstance(pixels, ImageBatch):
        return pixels.values
    return pixels[0] if pixels.dim() == 5 else pixels


def _compare(ours: dict, theirs: dict, name: str) -> float:
    assert torch.equal(ours["input_ids"], theirs["input_ids"]), name
    mine, their_pixels = _pixels(ours), _pixels(theirs)
    same_pixels = mine.shape == their_pixels.shape and torch.equal(mine, their_pixels)
    diff = (ours["logits"] - theirs["logits"]).abs().max().item()
    assert same_pixels, (
        f"{name}: pixels differ ({tuple(mine.shape)} vs {tuple(their_pixels.shape)}; "
        f"logits by {diff:.3g})"
    )
    assert diff < ATOL, f"{name}: max abs logit difference {diff:.3g}"
    assert ours["generated"].tolist() == theirs["generated"].tolist(), name
    return diff


def _moved_by_images(logits: list[torch.Tensor]) -> None:
    """The images must matter, or equal logits would prove nothing."""
    last = [a[:, -1] for a in logits]  # the next token's (prompt lengths vary with tiling)
    spread = max((a - last[0]).abs().max().item() for a in last[1:])
    assert spread > 1e-2, f"the photos barely move the logits ({spread:.3g})"


# --- a transformers LLaVA checkpoint, imported ----------------------------------------------

# tower -> (image processor class, its settings, feature strategy, prefix tokens): a resize
# larger than the crop and a non-default resampling, which the importer must keep too.
FOREIGN = {
    "clip": (
        "CLIPImageProcessor",
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}},
        "default",
        1,
    ),
    "siglip": (
        "SiglipImageProcessor",
        {"size": {"height": 32, "width": 32}, "resample": 2, "image_mean": [0.4, 0.5, 0.6]},
        "full",
        0,
    ),
}


PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
"""LLaVA-NeXT's five grids in tiles of the tiny towers' 32 pixels."""


def build_foreign_llava(tokenizer_dir: str, tower: str, directory: Path, anyres: bool) -> None:
    """A random ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (with ``anyres``:
    ``LlavaNext...``), transformers only."""
    import transformers
    from transformers import AutoTokenizer

    processor_class, settings, strategy, prefix = FOREIGN[tower]
    kind = "LlavaNext" if anyres else "Llava"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    tokenizer.chat_template = chat_template_jinja("vicuna_v1", tokenizer)
    vision = tiny_vision_config("hf" if tower == "clip" else "hf_siglip")["config"]
    text = {**tiny_model_config(tokenizer_dir)["llm"]["config"], "pad_token_id": 3}
    config = getattr(transformers, f"{kind}Config")(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        **({"image_grid_pinpoints": PINPOINTS} if anyres else {}),
    )
    torch.manual_seed(2)
    llava = getattr(transformers, f"{kind}ForConditionalGeneration")(config)
    for param in llava.model.multi_modal_projector.parameters():
        torch.nn.init.normal_(param, std=0.5)  # large enough for the image to move the logits
    llava.save_pretrained(directory)
    if anyres:  # the tower's settings, tiled
        crop = {"do_center_crop": False, "crop_size": {"height": 32, "width": 32}}
        tiles = {**crop, **settings} if "crop_size" not in settings else dict(settings)
        tiles["image_grid_pinpoints"] = PINPOINTS
        image_processor = transformers.LlavaNextImageProcessor(**tiles)
    else:
        image_processor = getattr(transformers, processor_class)(**settings)
    getattr(transformers, f"{kind}Processor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=prefix,
        chat_template=tokenizer.chat_template,
    ).save_pretrained(directory)


@pytest.fixture(
    scope="module",
    params=[(tower, anyres) for anyres in (False, True) for tower in sorted(FOREIGN)],
    ids=lambda case: case[0] + ("-next" if case[1] else ""),
)
def imported(request, tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory):
    import transformers
    from transformers import AutoProcessor

    tower, anyres = request.param
    directory = tmp_path_factory.mktemp("llava") / tower
    build_foreign_llava(tokenizer_dir, tower, directory, anyres)
    ours = from_hf_llava(directory).eval()
    kind = "LlavaNext" if anyres else "Llava"
    theirs = getattr(transformers, f"{kind}ForConditionalGeneration").from_pretrained(directory)
    name = tower + ("-next" if anyres else "")
    return name, directory, ours, theirs.eval(), AutoProcessor.from_pretrained(directory)


def test_imported_llava_matches_transformers_on_real_photos(imported, photos) -> None:
    tower, _, ours, theirs, processor = imported
    eos = stop_token_ids(ours.tokenizer, ours.template)
    logits = []
    for name, image in photos.items():
        mine = _ours(ours, ours.template, image)
        _compare(mine, _theirs(theirs, processor, image, eos), f"{tower}/{name}")
        logits.append(mine["logits"])
    _moved_by_images(logits)


def _image_rows(image_processor, images: list[Image.Image]) -> list[torch.Tensor]:
    """The image processor's pixels for ``images`` in one call, one ``[rows, 3, H, W]`` per
    image (LLaVA-NeXT pads every image to the most tiles of the batch: cut that off)."""
    out = image_processor(images=images, return_tensors="pt")
    if "image_sizes" not in out:
        return list(out["pixel_values"][:, None])
    counts = [
        len(image_processor(images=[i], return_tensors="pt")["pixel_values"][0]) for i in images
    ]
    return [rows[:count] for rows, count in zip(out["pixel_values"], counts)]


def _our_rows(pixels: torch.Tensor | ImageBatch) -> list[torch.Tensor]:
    if isinstance(pixels, ImageBatch):
        return list(pixels.split(pixels.values))
    return list(pixels[:, None])


def test_imported_preprocessing_is_the_checkpoints_image_processor(
    imported, photos, tmp_path: Path
) -> None:
    """Batched or one by one, and after our save / load round trip: the same pixels."""
    _, _, ours, _, processor = imported
    images = list(photos.values())
    expected = _image_rows(processor.image_processor, images)
    batched = _our_rows(ours.vision.preprocess(images))
    one_by_one = [_our_rows(ours.processor.images([image]))[0] for image in images]
    assert all(map(torch.equal, batched, expected)) and len(batched) == len(expected)
    assert all(map(torch.equal, one_by_one, expected))
    ours.save_pretrained(tmp_path / "ours")
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "ours")
    assert all(map(torch.equal, _our_rows(reloaded.vision.preprocess(images)), expected))
    assert reloaded.vision.transform == ours.vision.transform


# --- our model, exported --------------------------------------------------------------------

# (vision, connector, llm, template, tiling): centre crop (CLIP), plain resize (SigLIP),
# DINOv2's; then LLaVA-NeXT's grids (AnyRes) with CLIP and with SigLIP.
EXPORTS = [
    ("hf", "mlp", "llama", "vicuna_v1", None),
    ("hf_siglip", "linear", "qwen2", "chatml", None),
    ("hf_dinov2", "mlp", "llama", "vicuna_v1", None),
    ("hf", "mlp", "llama", "vicuna_v1", {}),
    ("hf_siglip", "linear", "qwen2", "chatml", {}),
]


@pytest.fixture(
    scope="module",
    params=EXPORTS,
    ids=lambda case: case[0] + ("-next" if case[4] is not None else ""),
)
def exported(request, tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vision, connector, llm, template, tiling = request.param
    section = tiny_vision_config(vision) | ({} if tiling is None else {"tiling": tiling})
    torch.manual_seed(0)
    model = build_vlm(tiny_model_config(tokenizer_dir, section, connector, llm)).eval()
    for param in model.connector.parameters():
        torch.nn.init.normal_(param, std=0.5)
    name = vision + ("-next" if tiling is not None else "")
    directory = to_hf_llava(model, tmp_path_factory.mktemp("export") / name, template=template)
    theirs = AutoModelForImageTextToText.from_pretrained(directory).eval()
    expected = "LlavaNext" if tiling is not None else "Llava"
    assert type(theirs).__name__ == f"{expected}ForConditionalGeneration"
    return name, template, model, theirs, AutoProcessor.from_pretrained(directory)


def test_export_matches_ours_in_plain_transformers_on_real_photos(exported, photos) -> None:
    vision, template, model, theirs, processor = exported
    eos = stop_token_ids(model.tokenizer, template)
    logits = []
    for name, image in photos.items():
        mine = _ours(model, template, image)
        _compare(mine, _theirs(theirs, processor, image, eos), f"{vision}/{name}")
        logits.append(mine["logits"])
    _moved_by_images(logits)


def test_our_preprocessing_is_the_exported_image_processor(exported, photos) -> None:
    _, _, model, _, processor = exported
    images = list(photos.values())
    for image in images:
        expected = processor(images=image, text="<image>", return_tensors="pt")
        assert torch.equal(
            _pixels({"pixel_values": model.vision.preprocess([image])}), _pixels(expected)
        )
    batched = _image_rows(processor.image_processor, images)
    assert all(map(torch.equal, _our_rows(model.vision.preprocess(images)), batched))
