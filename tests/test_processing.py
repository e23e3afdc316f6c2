"""The one processor: `<image>` markers vs images, exact placeholder runs, padding sides, and
the same ids and pixels for training, generation and evaluation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vlm_adapters.data.processor import TokenBudgetError, VLMProcessor, pad_batch
from vlm_adapters.errors import DataError
from vlm_adapters.testing import IMAGE_SIZE
from vlm_adapters.vision import ImageTransform
from vlm_adapters.vision.base import ImageBatch, VariableTransform

M = 5  # placeholder tokens per image


@pytest.fixture(scope="module")
def processor(tokenizer_dir: str) -> VLMProcessor:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return VLMProcessor(tokenizer, ImageTransform(IMAGE_SIZE), M, image_id)


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
    ids = processor.text("<image> a <image> what colour is the circle ?<image>")
    assert _runs(ids, processor.image_token_id) == [M, M, M]
    assert _runs(processor.text("<image><image> a"), processor.image_token_id) == [2 * M]
    text = [i for i in ids if i != processor.image_token_id]
    tokenizer = processor.tokenizer
    words = tokenizer("what colour is the circle ?", add_special_tokens=False).input_ids
    assert text[-len(words) :] == words


def test_text_without_markers_is_plain_tokenization(processor: VLMProcessor) -> None:
    tokenizer = processor.tokenizer
    assert tokenizer("a").input_ids[:1] != [tokenizer.bos_token_id]  # adds no BOS itself
    plain = tokenizer("a red circle", add_special_tokens=False).input_ids
    assert processor.text("a red circle") == plain


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
    with pytest.raises(DataError, match=message):
        processor(texts, images)


def test_batch_pixel_values_follow_marker_order(processor: VLMProcessor) -> None:
    red, green, blue = _image((255, 0, 0)), _image((0, 255, 0)), _image((0, 0, 255))
    batch = processor(["<image> <image> a", "b <image>"], [[red, green], blue])
    expected = processor.images([red, green, blue])
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 3 * M
    assert processor(["a", "b"])["pixel_values"] is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(processor: VLMProcessor, side: str) -> None:
    texts = ["<image> what colour is the circle ?", "a"]
    batch = processor(texts, [_image(), None], padding_side=side)
    short = processor.text("a")
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


def test_training_generation_and_evaluation_share_ids_and_pixels(tmp_path, tokenizer_dir):
    """One sample through training collation, generation and evaluation: the prompt ids are a
    prefix of the training ids and the pixels are identical tensors."""
    from vlm_adapters import build_vlm
    from vlm_adapters.data import ConversationDataset, DataCollator
    from vlm_adapters.inference import evaluate
    from vlm_adapters.model.generation import prompt_batch
    from vlm_adapters.testing import tiny_model_config

    model = build_vlm(tiny_model_config(tokenizer_dir)).eval()
    Image.new("RGB", (61, 23), (200, 30, 90)).save(tmp_path / "wide.png")  # needs resizing
    question = {"from": "human", "value": "<image>\nwhat colour is the circle ?"}
    record = {
        "id": "s",
        "image": "wide.png",
        "conversations": [question, {"from": "gpt", "value": "red"}],
    }
    dataset = ConversationDataset.for_model(
        model,
        [record],
        image_root=tmp_path,
        template="llama3",
    )
    trained = DataCollator(model.tokenizer.pad_token_id)([dataset[0]])
    with Image.open(tmp_path / "wide.png") as image:
        prompt = prompt_batch(model, [[question]], [image.convert("RGB")], "llama3")
    seen = {}
    original = model.generate_ids

    def spy(**batch):  # noqa: ANN003, ANN202
        seen.update(batch)
        return original(**batch)

    model.generate_ids = spy
    evaluate(model, [record], tmp_path, "llama3", max_new_tokens=1)
    evaluated = {"input_ids": seen["input_ids"], "pixel_values": seen["pixel_values"]}
    ids = prompt["input_ids"][0].tolist()
    assert trained["input_ids"][0, : len(ids)].tolist() == ids
    assert evaluated["input_ids"][0].tolist() == ids
    assert torch.equal(trained["pixel_values"], prompt["pixel_values"])
    assert torch.equal(evaluated["pixel_values"], prompt["pixel_values"])
    answer = trained["labels"][0, len(ids) :]
    assert model.tokenizer.decode(answer[answer != -100][:1]) == "red"


class _ByWidth(VariableTransform):
    """Variable-size vision in miniature: an image gives width // 10 tokens."""

    max_tokens = 100
    token_budget = 30

    def num_tokens(self, size: tuple[int, int]) -> int:
        return size[1] // 10

    def __call__(self, image: Image.Image) -> ImageBatch:
        return ImageBatch(torch.zeros(1, 3, 4, 4), ((image.height, image.width),), (1,))


@pytest.fixture(scope="module")
def variable(processor: VLMProcessor) -> VLMProcessor:
    return VLMProcessor(processor.tokenizer, _ByWidth(), 100, processor.image_token_id, "llama3")


def test_each_image_gets_as_many_placeholders_as_its_size_gives(variable: VLMProcessor) -> None:
    turns = [
        {"from": "human", "value": "<image> a <image> what colour is the circle ?"},
        {"from": "gpt", "value": "red"},
    ]
    wide, narrow = Image.new("RGB", (120, 10)), Image.new("RGB", (40, 90))
    encoded = variable.encode(turns, [wide, narrow])
    assert _runs(encoded.input_ids, variable.image_token_id) == [12, 4]
    placeholders = [i for i, t in enumerate(encoded.input_ids) if t == variable.image_token_id]
    assert all(encoded.labels[i] == -100 for i in placeholders)
    assert variable.encode(turns, [(10, 120), (90, 40)]) == encoded  # sizes alone suffice
    prompt = variable.prompt(turns[:1], [wide, narrow])
    assert encoded.input_ids[: len(prompt)] == prompt
    batch = variable(["<image> a", "b <image> a <image>"], [wide, [narrow, wide]])
    assert _runs(batch["input_ids"][1].tolist(), variable.image_token_id) == [4, 12]
    assert isinstance(batch["pixel_values"], ImageBatch) and len(batch["pixel_values"]) == 3


def test_a_sample_over_the_visual_token_budget_is_refused(variable: VLMProcessor) -> None:
    turns = [{"from": "human", "value": "<image> <image> a"}, {"from": "gpt", "value": "b"}]
    with pytest.raises(TokenBudgetError, match="give 32 visual tokens, over the budget of 30"):
        variable.encode(turns, [(1, 160), (1, 160)])
    with pytest.raises(DataError, match="pass a sample's images"):
        variable.encode(turns, 2)  # a count is not enough to know the tokens


@pytest.mark.parametrize("special", [True, False])
def test_the_placeholder_token_in_the_text_itself(tokenizer_dir: str, special: bool) -> None:
    """A special placeholder written in the text is plain text; a plain added one is refused."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<im_patch>"], special_tokens=special)
    patch = tokenizer.convert_tokens_to_ids("<im_patch>")
    variable = VLMProcessor(tokenizer, _ByWidth(), 100, patch, "llama3")
    turns = [{"from": "human", "value": "<image> a <im_patch> <image> b"}]
    if special:
        assert _runs(variable.prompt(turns, [(1, 50), (1, 70)]), patch) == [5, 7]
    else:
        with pytest.raises(DataError, match="holds the image placeholder token itself"):
            variable.prompt(turns, [(1, 50), (1, 70)])
    assert _runs(variable.text("<image> a <image>", [(1, 50), (1, 70)]), patch) == [5, 7]
