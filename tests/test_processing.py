"""The processor: `<image>` markers vs images, exact placeholder runs, padding sides."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vlm_adapters.data.processor import VLMProcessor, pad_batch
from vlm_adapters.testing import IMAGE_SIZE
from vlm_adapters.vision import ImageTransform

M = 5  # placeholder tokens per image


@pytest.fixture(scope="module")
def processor(tokenizer_dir: str) -> VLMProcessor:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    return VLMProcessor(tokenizer, ImageTransform(IMAGE_SIZE), num_image_tokens=M)


def _image(colour: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (48, 40), colour)


def _runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the consecutive runs of ``token`` in ``ids``."""
    runs, current = [], 0
    for i in [*ids, None]:
        if i == token:
            current += 1
        elif current:
            runs, current = [*runs, current], 0
    return runs


def test_each_marker_becomes_exactly_m_placeholders(processor: VLMProcessor) -> None:
    ids = processor.encode("<image> a <image> what colour is the circle ?<image>")
    assert _runs(ids, processor.image_token_id) == [M, M, M]
    assert _runs(processor.encode("<image><image> a"), processor.image_token_id) == [2 * M]
    text = [i for i in ids if i != processor.image_token_id]
    tokenizer = processor.tokenizer
    words = tokenizer("what colour is the circle ?", add_special_tokens=False).input_ids
    assert text[-len(words) :] == words


def test_text_without_markers_is_plain_tokenization(processor: VLMProcessor) -> None:
    tokenizer = processor.tokenizer
    assert (
        processor.encode("a red circle", add_bos=False)
        == tokenizer("a red circle", add_special_tokens=False).input_ids
    )


@pytest.mark.parametrize(
    ("texts", "images", "message"),
    [
        (["<image> a red circle"], [None], r"prompt 0: 1 <image> marker\(s\) but 0 image\(s\)"),
        (["a red circle"], [_image()], r"prompt 0: 0 <image> marker\(s\) but 1 image\(s\)"),
        (["a", "<image> <image> b"], [None, [_image()]], r"prompt 1: 2 <image> marker\(s\) but 1"),
        (["<image> a", "b"], [_image()], "got 2 prompts but 1 image entries"),
    ],
)
def test_marker_image_mismatch_raises(
    processor: VLMProcessor, texts: list[str], images: list, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        processor(texts, images)


def test_batch_pixel_values_follow_marker_order(processor: VLMProcessor) -> None:
    red, green, blue = _image((255, 0, 0)), _image((0, 255, 0)), _image((0, 0, 255))
    batch = processor(["<image> <image> a", "b <image>"], [[red, green], blue])
    expected = processor.transform.batch([red, green, blue])
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 3 * M
    assert processor(["a", "b"])["pixel_values"] is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(processor: VLMProcessor, side: str) -> None:
    texts = ["<image> what colour is the circle ?", "a"]
    batch = processor(texts, [_image(), None], padding_side=side)
    short = processor.encode("a")
    ids, mask = batch["input_ids"][1], batch["attention_mask"][1]
    pad = ids.shape[0] - len(short)
    assert pad > 0 and int(mask.sum()) == len(short)
    real = slice(pad, None) if side == "left" else slice(0, len(short))
    padding = slice(0, pad) if side == "left" else slice(len(short), None)
    assert ids[real].tolist() == short and mask[real].eq(1).all()
    assert ids[padding].eq(processor.tokenizer.pad_token_id).all() and mask[padding].eq(0).all()
    assert batch["attention_mask"][0].eq(1).all()


def test_pad_batch_shapes() -> None:
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
