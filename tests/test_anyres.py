"""AnyRes tiling: LLaVA-NeXT's arithmetic, token counts known before the model runs, and a
mixed batch (tiled images of several aspect ratios, text only, several images) end to end."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_adapters import VisionLanguageModel, build_vlm, load
from vlm_adapters.config import model_config_from_dict
from vlm_adapters.data import ConversationDataset, DataCollator, LengthGroupedSampler
from vlm_adapters.data.collate import PackingCollator
from vlm_adapters.data.feature_cache import FeatureCache, image_encoder
from vlm_adapters.errors import ConfigError
from vlm_adapters.geometry import LLAVA_NEXT_GRIDS, AnyResLayout
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.testing.tiny import tiny_naflex_config, tiny_tiled_config
from vlm_adapters.vision.base import ImageBatch
from vlm_adapters.vision.tiling import TilingConfig, place

# (width, height): square, wide, tall, panorama, tower, tiny, one pixel, odd sizes, and one
# whose resized copy is padded on one side only (63x32 in a 64x32 canvas).
SIZES = [
    (32, 32), (64, 32), (32, 64), (50, 20), (20, 50), (200, 30), (30, 200), (7, 5), (5, 7),
    (1, 1), (63, 32), (33, 65), (97, 41), (100, 100), (300, 301), (45, 128),
]  # fmt: skip
# name -> (vision, connector, tiling): LLaVA-NeXT's grids, every grid of <= 6 tiles with a
# CLS-free tower, pooled tiles (2x2 tokens a tile), and a timm tower (tiles cut here).
SETTINGS = {
    "llava_next": ("hf", "mlp", {"max_tiles": None, "grids": None}),
    "max6": ("hf_siglip", "linear", {"max_tiles": 6}),
    "pool": ("hf", {"type": "pool", "factor": 2}, {"max_tiles": 4}),
    "timm": ("timm", "mlp", {"grids": [[1, 1], [1, 2], [2, 1], [2, 2]]}),
}


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 1000 + height)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _model(tokenizer_dir: str, setting: str) -> VisionLanguageModel:
    vision, connector, tiling = SETTINGS[setting]
    torch.manual_seed(0)
    config = tiny_model_config(tokenizer_dir, tiny_tiled_config(vision, **tiling), connector)
    return build_vlm(config).eval()


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_predicted_token_counts_equal_what_the_model_produces(tokenizer_dir, setting):
    model = _model(tokenizer_dir, setting)
    images = [_image(w, h) for w, h in SIZES]
    batch = model.processor(["<image> what shape ?"] * len(images), images)
    placeholders = (batch["input_ids"] == model.image_token_id).sum(1).tolist()
    with torch.no_grad():
        produced = [model.visual_tokens(model.vision.preprocess([i])).shape[0] for i in images]
        logits = model(**batch).logits  # every image's tokens fill its placeholders
    predicted = [model.image_tokens((h, w)) for w, h in SIZES]
    assert predicted == produced == placeholders
    assert len(set(predicted)) > 3 and max(predicted) <= model.num_image_tokens
    assert torch.isfinite(logits).all()


def _transformers_reference(grids, tile: int, patch: int):
    """transformers' LLaVA-NeXT selection, resizing, counting and packing, as functions."""
    from transformers import LlavaNextProcessor
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    pinpoints = [[r * tile, c * tile] for r, c in grids]
    processor = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
        patch_size=patch,
        num_additional_image_tokens=0,
    )
    processor._get_unpadded_features = functools.partial(
        LlavaNextProcessor._get_unpadded_features, processor
    )
    vision = SimpleNamespace(image_size=tile, patch_size=patch)
    model = SimpleNamespace(
        config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=pinpoints)
    )
    return SimpleNamespace(
        best=lambda h, w: select_best_resolution((h, w), pinpoints),
        fitted=lambda h, w, t: get_patch_output_size(
            np.zeros((3, h, w)), t, ChannelDimension.FIRST
        ),
        count=lambda h, w: LlavaNextProcessor._get_number_of_features(processor, h, w, tile, tile),
        pack=lambda f, h, w, nl: LlavaNextModel.pack_image_features(
            model, [f], torch.tensor([[h, w]]), "full", nl
        )[0][0],
    )


@pytest.mark.parametrize("grids", [LLAVA_NEXT_GRIDS, TilingConfig(max_tiles=9).resolved_grids()])
def test_layout_is_llava_next_arithmetic(grids):
    tile, patch = 336, 14
    side = tile // patch
    layout, theirs = (
        AnyResLayout(tuple(grids), tile, side),
        _transformers_reference(grids, tile, patch),
    )
    rng = np.random.default_rng(0)
    sizes = [(h, w) for w, h in SIZES] + [tuple(s) for s in rng.integers(1, 2000, (300, 2))]
    for height, width in sizes:
        (rows, cols), fitted = layout.fitted(height, width)
        best = theirs.best(height, width)
        assert (rows * tile, cols * tile) == tuple(best), (height, width)
        assert fitted == theirs.fitted(height, width, best), (height, width)
        assert layout.num_tokens(height, width) == theirs.count(height, width), (height, width)
    newline = torch.randn(8)
    for height, width in [(h, w) for w, h in SIZES]:
        tiles = torch.randn(layout.num_tiles(height, width), side * side, 8)
        placed = place(layout, tiles, (height, width), newline)
        torch.testing.assert_close(
            placed, theirs.pack(tiles, height, width, newline), rtol=0, atol=0
        )


def _write(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (width, height) in sizes.items():
        _image(width, height).save(root / f"{name}.png")


ASK = {"from": "human", "value": "<image>\nwhat colour is the circle ?"}
RECORDS = [
    {"id": "wide", "image": "wide.png", "conversations": [ASK, {"from": "gpt", "value": "red"}]},
    {"id": "tall", "image": "tall.png", "conversations": [ASK, {"from": "gpt", "value": "red"}]},
    {
        "id": "text",
        "conversations": [
            {"from": "human", "value": "how many shapes are there ?"},
            {"from": "gpt", "value": "two"},
        ],
    },
    {
        "id": "two",
        "image": ["tiny.png", "square.png"],
        "conversations": [
            {"from": "human", "value": "<image> <image> what shape is at the top left ?"},
            {"from": "gpt", "value": "a blue square"},
        ],
    },
]
IMAGES = {"wide": (120, 30), "tall": (30, 90), "tiny": (9, 6), "square": (40, 40)}


def _dataset(model: VisionLanguageModel, root: Path, **options) -> ConversationDataset:
    _write(root, IMAGES)
    return ConversationDataset.for_model(
        model,
        RECORDS,
        image_root=root,
        template="llama3",
        on_bad_sample="error",
        **options,
    )


def test_a_mixed_batch_trains_and_generates(tokenizer_dir, tmp_path):
    model = _model(tokenizer_dir, "llava_next").train()
    dataset, skipped = _dataset(model, tmp_path).precheck()
    assert not skipped
    items = [dataset[i] for i in range(len(dataset))]
    visual = [int((item["input_ids"] == model.image_token_id).sum()) for item in items]
    tokens = {name: model.image_tokens(size[::-1]) for name, size in IMAGES.items()}
    assert visual == [tokens["wide"], tokens["tall"], 0, tokens["tiny"] + tokens["square"]]
    lengths = dataset.lengths  # exact visual tokens, from the image headers
    assert lengths[0] - lengths[1] == tokens["wide"] - tokens["tall"] and lengths[2] < 0
    order = list(LengthGroupedSampler(lengths, batch_size=2, seed=0))
    assert sorted(order) == [0, 1, 2, 3]
    batch = DataCollator(model.tokenizer.pad_token_id)(items)
    assert isinstance(batch["pixel_values"], ImageBatch) and len(batch["pixel_values"]) == 4
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(**inputs).loss
        loss.backward()
        assert model.connector.image_newline.grad is not None
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    model.eval()
    question = [{"from": "human", "value": "what colour is the circle ?"}]
    with Image.open(tmp_path / "wide.png") as wide, Image.open(tmp_path / "tall.png") as tall:
        answers = model.generate(
            [question, question], [wide.copy(), tall.copy()], template="llama3"
        )
    assert answers == ["red", "red"]


def test_padded_and_packed_batches_give_the_same_per_sample_loss(tokenizer_dir, tmp_path):
    model = _model(tokenizer_dir, "max6")
    items = [_dataset(model, tmp_path)[i] for i in range(len(RECORDS))]
    padded = DataCollator(model.tokenizer.pad_token_id)(items)
    total = sum(len(item["input_ids"]) for item in items)
    packed = PackingCollator(model.tokenizer.pad_token_id, max_length=total - 1)(items)
    assert 1 < packed["input_ids"].shape[0] < len(items)
    with torch.no_grad():
        rows = model(padded["input_ids"], padded["attention_mask"], padded["pixel_values"]).logits
        keys = ("input_ids", "attention_mask", "pixel_values", "position_ids")
        packs = model(**{k: packed[k] for k in keys}).logits
    for index, item in enumerate(items):
        n = len(item["input_ids"])
        row, start = _where(packed, item["input_ids"])
        alone = _loss(rows[index, : n - 1], item["labels"][1:])
        together = _loss(packs[row, start : start + n - 1], item["labels"][1:])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


def _where(packed: dict, ids: torch.Tensor) -> tuple[int, int]:
    for row, row_ids in enumerate(packed["input_ids"]):
        for start in (packed["position_ids"][row] == 0).nonzero().flatten().tolist():
            if torch.equal(row_ids[start : start + len(ids)], ids):
                return row, start
    raise AssertionError("sample not found in the packed rows")


def test_the_feature_cache_holds_every_tile(tokenizer_dir, tmp_path):
    model = _model(tokenizer_dir, "llava_next")
    plain = _dataset(model, tmp_path / "img")
    cache = FeatureCache.for_backbone(tmp_path / "cache", model.vision)
    paths = sorted((tmp_path / "img").glob("*.png"))
    report = cache.fill(paths, image_encoder(model.vision, 10**8), batch_size=3)
    assert report.computed == len(paths)
    wide = cache.read(cache.key(tmp_path / "img" / "wide.png"))
    assert wide.shape == (model.vision.layout.num_tiles(30, 120), 16, 32)  # overview + tiles
    cached = _dataset(model, tmp_path / "img", feature_cache=cache)
    collate = DataCollator(model.tokenizer.pad_token_id)
    a = collate([plain[i] for i in range(len(RECORDS))])
    b = collate([cached[i] for i in range(len(RECORDS))])
    assert b["pixel_values"] is None and b["image_features"].counts == a["pixel_values"].counts
    keys = ("input_ids", "attention_mask", "labels")
    with torch.no_grad():
        loss = model(**{k: a[k] for k in keys}, pixel_values=a["pixel_values"]).loss
        again = model(**{k: b[k] for k in keys}, image_features=b["image_features"]).loss
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=1e-6)


def test_a_sample_over_the_visual_token_budget_is_skipped(tokenizer_dir, tmp_path):
    vision = tiny_tiled_config("hf", max_visual_tokens=100)  # one image: at most 96
    model = build_vlm(tiny_model_config(tokenizer_dir, vision)).eval()
    dataset = _dataset(model, tmp_path)
    dataset.on_bad_sample = "skip"
    kept, skipped = dataset.precheck()
    assert [s.id for s in skipped] == ["two"] and skipped[0].reason == "too many visual tokens"
    assert len(kept) == 3 and dataset[3].reason == "too many visual tokens"


def test_a_tiled_checkpoint_round_trips(tokenizer_dir, tmp_path):
    model = _model(tokenizer_dir, "pool")
    torch.nn.init.normal_(model.connector.image_newline)
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["vision"]["tiling"]["max_tiles"] == 4 and saved["vision"]["type"] == "hf"
    again = load(tmp_path / "ckpt").eval()
    image = _image(70, 20)
    batch = model.processor(["<image> a"], [image])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert torch.equal(again.connector.image_newline, model.connector.image_newline)


def _config(tokenizer_dir: str, vision: dict, connector: str | dict = "mlp", **llm) -> dict:
    config = tiny_model_config(tokenizer_dir, vision, connector)
    config["llm"]["config"].update(llm)
    return config


@pytest.mark.parametrize(
    ("vision", "connector", "llm", "message"),
    [
        (
            tiny_tiled_config("hf", grids=[[1, 2], [2, 2]], max_tiles=3),
            "mlp",
            {},
            r"vision.tiling: .*grids: 2x2 has 4 tiles, over max_tiles=3",
        ),
        (
            tiny_tiled_config("hf", max_visual_tokens=90),
            "mlp",
            {},
            r"vision.tiling.max_visual_tokens: 90 is below one image's worst case of 96",
        ),
        (
            tiny_tiled_config("hf"),
            "mlp",
            {"max_position_embeddings": 64},
            r"connector: 96 visual tokens per image \(with tiling, at most\) do not fit .* 64",
        ),
        (
            tiny_tiled_config("hf"),
            "qformer",
            {},
            r"vision.tiling: the 'qformer' connector's tokens have no place on the patch grid, "
            r"so tiles cannot be laid out; use linear, mlp or pool, or implement "
            r"`output_grid\(rows, cols\)` on the connector's config",
        ),
        (
            tiny_tiled_config("hf"),
            {"type": "pool", "factor": 3},
            {},
            r"connector: pool factor 3 does not divide the 4x4 patch grid",
        ),
        ({**tiny_tiled_config("hf"), "tiling": {"grid": [[1, 2]]}}, "mlp", {}, "tiling.grid"),
        (
            {**tiny_naflex_config(), "tiling": {}},
            "mlp",
            {},
            r"vision.tiling: this tower encodes images at their own size \(NaFlex\)",
        ),
    ],
)
def test_impossible_tilings_fail_when_the_config_is_read(
    tokenizer_dir, vision, connector, llm, message
):
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(_config(tokenizer_dir, vision, connector, **llm))
