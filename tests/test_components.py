"""Every built-in component, parametrized from the registry itself, on tiny configs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlm_adapters
from vlm_adapters.connectors.pool import PoolConfig
from vlm_adapters.plugins import BUILTIN_PROVIDER, get_registry
from vlm_adapters.testing import (
    IMAGE_SIZE,
    LLM_FAMILIES,
    NUM_PATCHES,
    VISION_VARIANTS,
    tiny_connector_config,
    tiny_model_config,
    tiny_vision_config,
)
from vlm_adapters.testing.tiny import tiny_tiled_config


def builtin_names(kind: str) -> list[str]:
    """Built-in component names of ``kind`` as the registry reports them."""
    rows = vlm_adapters.list_components(kind)
    return [r["name"] for r in rows if r["provider"] == BUILTIN_PROVIDER]


# A built-in registered without a tiny config shows up here and fails in tiny_*_config.
VISION_CASES = sorted(set(builtin_names("vision")) | set(VISION_VARIANTS))
CONNECTOR_CASES = builtin_names("connector")
LLM_CASES = [f for name in builtin_names("llm") for f in (LLM_FAMILIES if name == "hf" else [name])]


def _batch(model: vlm_adapters.VisionLanguageModel, images: int = 2) -> dict[str, torch.Tensor]:
    """Two right-padded samples; the first has ``images - 1`` images, the second one."""
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 20)]
    pics = [Image.new("RGB", (40, 36), colours[i % 3]) for i in range(images)]
    first = " ".join(["<image>"] * (images - 1)) + " what colour is the circle ? red"
    batch = model.processor(
        [first, "<image> a blue square"], [pics[:-1], [pics[-1]]], padding_side="right"
    )
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == model.image_token_id)] = -100
    labels[:, :2] = -100  # an unsupervised prompt start
    return {**batch, "labels": labels}


def _train_step(cfg: dict) -> None:
    torch.manual_seed(0)
    model = vlm_adapters.build_vlm(cfg)
    model.vision.requires_grad_(False)
    model.llm.requires_grad_(False)
    out = model(**_batch(model))
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    out.loss.backward()
    frozen = [*model.vision.parameters(), *model.llm.parameters()]
    assert all(p.grad is None for p in frozen)
    grads = [p.grad for p in model.connector.parameters()]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("vision", VISION_CASES)
def test_every_vision_trains_connector(tokenizer_dir: str, vision: str) -> None:
    _train_step(tiny_model_config(tokenizer_dir, vision=vision))


@pytest.mark.parametrize("connector", CONNECTOR_CASES)
def test_every_connector_trains(tokenizer_dir: str, connector: str) -> None:
    _train_step(tiny_model_config(tokenizer_dir, connector=connector))


@pytest.mark.parametrize("llm", LLM_CASES)
def test_every_llm_family_trains_connector(tokenizer_dir: str, llm: str) -> None:
    _train_step(tiny_model_config(tokenizer_dir, llm=llm))


def test_registry_lists_the_built_ins() -> None:
    assert {"hf", "timm", "open_clip", "fused"} <= set(builtin_names("vision"))
    assert {"linear", "mlp", "qformer", "resampler", "pool"} <= set(builtin_names("connector"))
    assert "hf" in builtin_names("llm")


# --- vision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vision", VISION_CASES)
def test_vision_features_shape(vision: str) -> None:
    backbone = get_registry().create("vision", tiny_vision_config(vision))
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    features = backbone(pixels)
    assert backbone.num_patches == NUM_PATCHES
    assert features.shape == (3, NUM_PATCHES, backbone.hidden_size)


@pytest.mark.parametrize(
    ("vision", "prefix"),
    [("hf", 1), ("hf_siglip", 0), ("hf_dinov2", 1), ("hf_dinov2_registers", 1 + 4)],
)
def test_hf_prefix_tokens_are_dropped_by_count(vision: str, prefix: int) -> None:
    backbone = get_registry().create("vision", tiny_vision_config(vision))
    assert backbone.num_prefix == prefix
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        hidden = backbone.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = backbone(pixels)
    assert hidden[-2].shape[1] == prefix + NUM_PATCHES
    torch.testing.assert_close(features, hidden[-2][:, prefix:], rtol=0, atol=0)


def test_dinov2_with_registers_model_type_exists() -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model("dinov2_with_registers", num_register_tokens=4)
    assert config.model_type == "dinov2_with_registers"


@pytest.mark.parametrize("vision", ["hf", "timm", "open_clip"])
def test_feature_layer_list_concatenates(vision: str) -> None:
    single = [
        get_registry().create("vision", {**tiny_vision_config(vision), "feature_layer": i})
        for i in (-2, -1)
    ]
    both = get_registry().create(
        "vision", {**tiny_vision_config(vision), "feature_layer": [-2, -1]}
    )
    both.load_state_dict(single[0].state_dict())
    single[1].load_state_dict(single[0].state_dict())
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = torch.cat([m(pixels) for m in single], dim=-1)  # [B, N, 2D]
        got = both(pixels)
    assert both.hidden_size == 2 * single[0].hidden_size
    assert not torch.equal(expected[..., :32], expected[..., 32:])
    torch.testing.assert_close(got, expected)


def test_frozen_backbone_output_has_no_graph() -> None:
    backbone = get_registry().create("vision", tiny_vision_config("hf"))
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert backbone(pixels).grad_fn is not None
    backbone.requires_grad_(False)
    assert backbone(pixels).grad_fn is None


@pytest.mark.parametrize("vision", VISION_CASES)
def test_preprocess_any_pil_mode(vision: str) -> None:
    backbone = get_registry().create("vision", tiny_vision_config(vision))
    modes = {"L": 128, "RGBA": (1, 2, 3, 4), "P": 7, "CMYK": (0, 50, 100, 0), "RGB": (9, 9, 9)}
    images = [Image.new(mode, (50, 40), colour) for mode, colour in modes.items()]
    pixels = backbone.preprocess(images)
    assert pixels.shape == (len(modes), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(pixels).all()


def test_preprocess_normalises_with_the_backbone_mean_and_std() -> None:
    backbone = get_registry().create("vision", tiny_vision_config("hf_siglip"))  # mean = std = 0.5
    pixels = backbone.preprocess([Image.new("RGB", (20, 30), (255, 0, 255))])
    assert torch.allclose(pixels[0, 0], torch.tensor(1.0))
    assert torch.allclose(pixels[0, 1], torch.tensor(-1.0))


def _photo_like(size: tuple[int, int] = (53, 37)) -> list[Image.Image]:
    """Non-square images in several modes: every one needs resizing, where rounding differs."""
    noise = Image.effect_noise(size, 60)
    return [noise.convert("RGB"), noise, noise.convert("RGBA"), noise.convert("P")]


@pytest.mark.parametrize(
    ("vision", "kind", "size", "crop"),
    [
        ("hf", "CLIPImageProcessor", {"shortest_edge": 32}, {"height": 32, "width": 32}),
        ("hf_siglip", "SiglipImageProcessor", {"height": 32, "width": 32}, None),
        ("hf_dinov2", "BitImageProcessor", {"shortest_edge": 36}, {"height": 32, "width": 32}),
    ],
)
def test_hf_preprocessing_is_the_towers_image_processor(
    vision: str, kind: str, size: dict, crop: dict | None
) -> None:
    from transformers import AutoImageProcessor

    from vlm_adapters.vision.hf_processor import ProcessorTransform, processor_config

    backbone = get_registry().create("vision", tiny_vision_config(vision))
    processor = backbone.image_processor
    config = processor_config(processor)
    assert isinstance(backbone.transform, ProcessorTransform)
    assert type(processor).__name__ == kind and config["size"] == size
    assert (config["crop_size"] if config.get("do_center_crop") else None) == crop
    assert backbone.transform.crop == (crop is not None)
    images = _photo_like()
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(backbone.preprocess(images), expected)
    assert torch.equal(backbone.transform(images[0]), expected[0])
    # what AutoImageProcessor reads back from its saved config gives the same pixels
    again = AutoImageProcessor.from_pretrained(_saved(processor))
    assert torch.equal(again(images=images, return_tensors="pt")["pixel_values"], expected)


def _saved(processor) -> str:
    import tempfile

    directory = tempfile.mkdtemp()
    processor.save_pretrained(directory)
    return directory


def test_hf_preprocessing_overrides_reach_the_image_processor() -> None:
    from vlm_adapters.vision.hf_processor import processor_config

    overrides = {"image_size": 48, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]}
    clip = {**tiny_vision_config("hf"), **overrides}
    clip["config"] = {**clip["config"], "image_size": 48}
    backbone = get_registry().create("vision", clip)
    config = processor_config(backbone.image_processor)
    assert config["crop_size"] == {"height": 48, "width": 48}
    assert config["size"] == {"shortest_edge": 48}
    assert config["image_mean"] == [0.1, 0.2, 0.3] and config["image_std"] == [0.3, 0.2, 0.1]
    assert backbone.transform.mean == (0.1, 0.2, 0.3) and backbone.num_patches == 36
    assert backbone.preprocess(_photo_like()).shape == (4, 3, 48, 48)


def test_hf_inline_image_processor_round_trips_through_rebuild_kwargs() -> None:
    """A non-standard processor (resize 40 before the 32 crop, bilinear) is stored in full; the
    standard one is not (size, mean and std rebuild it)."""
    custom = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "resample": 2,
    }
    spec = {**tiny_vision_config("hf"), "image_processor": custom}
    backbone = get_registry().create("vision", spec)
    assert (backbone.transform.resize, backbone.transform.interpolation) == (40, "bilinear")
    kwargs = backbone.rebuild_kwargs()
    assert kwargs["image_processor"]["size"] == {"shortest_edge": 40}
    assert "image_mean" not in kwargs and "image_size" not in kwargs
    rebuilt = get_registry().create("vision", {"type": "hf", **kwargs})
    assert rebuilt.transform == backbone.transform
    images = _photo_like()
    assert torch.equal(rebuilt.preprocess(images), backbone.preprocess(images))
    standard = get_registry().create("vision", tiny_vision_config("hf"))
    assert "image_processor" not in standard.rebuild_kwargs()
    assert standard.transform != backbone.transform


def test_hf_checkpoint_image_processor_is_used_and_stored(tmp_path) -> None:
    """A local checkpoint's own preprocessor_config.json is the preprocessing; the rebuild
    kwargs carry it, so the checkpoint directory is not needed to rebuild."""
    import shutil

    from transformers import CLIPImageProcessor

    source = get_registry().create("vision", tiny_vision_config("hf"))
    source.tower.save_pretrained(tmp_path / "tower")
    own = CLIPImageProcessor(
        size={"shortest_edge": 44}, crop_size=32, image_mean=[0.5, 0.4, 0.3], resample=2
    )
    own.save_pretrained(tmp_path / "tower")
    backbone = get_registry().create("vision", {"type": "hf", "model": str(tmp_path / "tower")})
    images = _photo_like()
    expected = own(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(backbone.preprocess(images), expected)
    kwargs = backbone.rebuild_kwargs()
    shutil.rmtree(tmp_path / "tower")
    assert "model" not in kwargs
    rebuilt = get_registry().create("vision", {"type": "hf", **kwargs})
    assert torch.equal(rebuilt.preprocess(images), expected)


def test_hf_image_processor_must_give_squares() -> None:
    from vlm_adapters.errors import ConfigError

    spec = {
        **tiny_vision_config("hf_siglip"),
        "image_processor": {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": 32, "width": 48},
        },
    }
    with pytest.raises(ConfigError, match="not a fixed square"):
        get_registry().create("vision", spec)


def test_hf_inline_image_processor_may_not_name_code() -> None:
    processor = {"image_processor_type": "X", "auto_map": {"AutoImageProcessor": "x.X"}}
    with pytest.raises(ValueError, match="may not name code"):
        get_registry().create("vision", {**tiny_vision_config("hf"), "image_processor": processor})


@pytest.mark.parametrize("vision", VISION_CASES)
def test_every_fixed_size_tower_tiles(tokenizer_dir: str, vision: str) -> None:
    """AnyRes works with any registered tower: images of three aspect ratios, every tile in
    one pass, each image's placeholders as counted, the end-of-row token trained."""
    torch.manual_seed(0)
    config = tiny_model_config(tokenizer_dir, tiny_tiled_config(vision), "linear")
    model = vlm_adapters.build_vlm(config)
    model.vision.requires_grad_(False)
    images = [Image.new("RGB", size, "red") for size in ((90, 30), (20, 60), (9, 9))]
    batch = model.processor(["<image> a red", "<image> <image> b"], [images[:1], images[1:]])
    counts = [model.image_tokens((i.height, i.width)) for i in images]
    placeholders = (batch["input_ids"] == model.image_token_id).sum(1).tolist()
    assert placeholders == [counts[0], counts[1] + counts[2]] and len(set(counts)) == 3
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels.masked_fill(labels == model.image_token_id, -100))
    out.loss.backward()
    assert model.connector.image_newline.grad is not None
    assert batch["pixel_values"].values.shape[0] == sum(
        model.vision.layout.num_tiles(i.height, i.width) for i in images
    )


def test_fused_preprocessing_is_the_first_members_without_normalisation() -> None:
    fused = get_registry().create("vision", tiny_vision_config("fused"))
    first = fused.members[0]
    images = _photo_like()
    mean = torch.tensor(first.transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(first.transform.std).view(1, 3, 1, 1)
    assert fused.transform.mean == (0.0, 0.0, 0.0) and fused.transform.std == (1.0, 1.0, 1.0)
    torch.testing.assert_close(
        (fused.preprocess(images) - mean) / std, first.preprocess(images), rtol=0, atol=1e-5
    )


# --- connectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("connector", CONNECTOR_CASES)
def test_connector_output_matches_num_output_tokens(connector: str) -> None:
    module = get_registry().create(
        "connector",
        tiny_connector_config(connector),
        in_dim=24,
        out_dim=40,
        num_input_tokens=NUM_PATCHES,
    )
    out = module(torch.randn(3, NUM_PATCHES, 24))
    assert out.shape == (3, module.num_output_tokens(NUM_PATCHES), 40)
    assert module.num_output_tokens() == module.num_output_tokens(NUM_PATCHES)


def _proj_input(mode: str, features: torch.Tensor) -> torch.Tensor:
    """What the pool connector feeds its projection for ``features`` ``[B, 16, D]``."""
    cfg = {"type": "pool", "mode": mode, "factor": 2}
    module = get_registry().create(
        "connector", cfg, in_dim=features.shape[-1], out_dim=8, num_input_tokens=16
    )
    seen = []
    module.proj.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    assert module(features).shape == (features.shape[0], 4, 8)
    return seen[0]


def test_pool_avg_averages_each_2x2_block() -> None:
    features = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    grid = features.reshape(2, 4, 4, 3)  # [B, row, col, D]
    block = grid[:, 0:2, 2:4].reshape(2, 4, 3).mean(dim=1)  # top-right block
    pooled = _proj_input("avg", features)  # [B, 4, D]
    torch.testing.assert_close(pooled[:, 1], block)


def test_pool_pixel_shuffle_stacks_each_2x2_block() -> None:
    features = torch.randn(2, 16, 3)
    grid = features.reshape(2, 4, 4, 3)
    stacked = _proj_input("pixel_shuffle", features)  # [B, 4, 4D]
    assert stacked.shape == (2, 4, 12)
    block = grid[:, 2:4, 0:2]  # bottom-left block [B, 2, 2, D]
    expected = block.permute(0, 3, 1, 2).reshape(2, 12)  # channel-major, as pixel_unshuffle
    torch.testing.assert_close(stacked[:, 2], expected)


def test_pool_factor_must_divide_the_grid() -> None:
    with pytest.raises(ValueError, match="pool factor 3 does not divide the 4x4 patch grid"):
        PoolConfig(factor=3).num_output_tokens(16)
    with pytest.raises(ValueError, match="pool factor 3"):
        get_registry().create(
            "connector", {"type": "pool", "factor": 3}, in_dim=8, out_dim=8, num_input_tokens=16
        )
    with pytest.raises(ValueError, match="square patch grid, got 12"):
        PoolConfig(factor=2).num_output_tokens(12)


def test_query_connector_heads_must_divide_width() -> None:
    with pytest.raises(ValueError, match="num_heads=3 must divide the query width 8"):
        get_registry().create(
            "connector",
            {"type": "qformer", "num_heads": 3},
            in_dim=8,
            out_dim=8,
            num_input_tokens=16,
        )
