"""LLaVA-format data: loading, the dataset's skip policy, collation, sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_adapters.chat.templates import IGNORE_INDEX, ChatTemplate, template_vocabulary
from vlm_adapters.data import (
    ConversationDataset,
    DataCollator,
    DataError,
    LengthGroupedSampler,
    Skipped,
    load_records,
)
from vlm_adapters.data.processor import VLMProcessor
from vlm_adapters.demo import build_word_tokenizer, shapes_vocabulary
from vlm_adapters.training.skips import SkipCounter

N_IMAGE = 4


@pytest.fixture(scope="module")
def tok():
    words = [*shapes_vocabulary(), *template_vocabulary()]
    return build_word_tokenizer(words, ["<|im_start|>", "<|im_end|>", "<image>"])


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(root / "rgba.png")
    Image.new("L", (8, 8), 200).save(root / "grey.png")
    Image.new("P", (8, 8), 3).save(root / "palette.gif")
    (root / "corrupt.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "big.png")
    (root / "truncated.png").write_bytes((root / "big.png").read_bytes()[:60])
    return root


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _sample(sample_id, image, *values, roles=("human", "gpt")):
    turns = [{"from": roles[i % 2], "value": value} for i, value in enumerate(values)]
    record = {"id": sample_id, "conversations": turns}
    if image is not None:
        record["image"] = image
    return record


def _dataset(tok, image_root, records, template="chatml", **kwargs):
    image_token_id = tok.convert_tokens_to_ids("<image>")
    processor = VLMProcessor(tok, _to_tensor, N_IMAGE, image_token_id, template)
    return ConversationDataset(records, processor, image_root=image_root, max_length=64, **kwargs)


# load_records


def test_load_json_and_jsonl(tmp_path):
    records = [_sample("a", "x.png", "<image>\nhow many?", "two")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records * 2) + "\n\n")
    assert list(load_records(tmp_path / "d.json")) == records
    assert list(load_records(tmp_path / "d.jsonl")) == records * 2
    spaced = "[\n  " + ",\n  ".join(json.dumps(r, indent=2) for r in records * 3) + "\n]\n"
    (tmp_path / "spaced.json").write_text(spaced)
    loaded = load_records(tmp_path / "spaced.json")
    assert len(loaded) == 3 and loaded[-1] == records[0] and list(loaded) == records * 3
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert len(load_records(tmp_path / "empty.json")) == 0


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: data file not found"):
        load_records(tmp_path / "nope.json")


def test_load_json_that_is_not_a_list(tmp_path):
    (tmp_path / "d.json").write_text('{"conversations": []}')
    with pytest.raises(DataError, match="expected a JSON list of samples, got dict"):
        load_records(tmp_path / "d.json")


def test_load_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"conversations": []}\n{"conversations": [\n')
    before = path.read_bytes()
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON line"):
        load_records(path)
    assert path.read_bytes() == before


def test_load_record_without_conversations(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([_sample("a", None, "q", "a"), {"id": "b"}]))
    with pytest.raises(DataError, match=r"d\.json: sample 1 has no 'conversations' field"):
        load_records(tmp_path / "d.json")
    (tmp_path / "d.jsonl").write_text('{"id": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1 has no 'conversations' field"):
        load_records(tmp_path / "d.jsonl")


# ConversationDataset


@pytest.mark.parametrize("name", ["rgba.png", "grey.png", "palette.gif"])
def test_any_image_mode_becomes_rgb(tok, image_root, name):
    item = _dataset(tok, image_root, [_sample("a", name, "<image>\nhow many?", "one")])[0]
    assert item["pixel_values"].shape == (1, 3, 8, 8)
    assert item["pixel_values"].dtype == torch.float32
    assert item["id"] == "a"


def test_item_ids_labels_and_images(tok, image_root):
    record = _sample("a", ["rgba.png", "grey.png"], "<image> <image>\nhow many?", "two")
    item = _dataset(tok, image_root, [record])[0]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert item["input_ids"].dtype == torch.long
    assert (item["input_ids"] == image_id).sum() == 2 * N_IMAGE
    assert item["pixel_values"].shape == (2, 3, 8, 8)
    supervised = item["input_ids"][item["labels"] != IGNORE_INDEX]
    assert tok.decode(supervised) == "two <|im_end|>"


def test_marker_is_added_for_one_image_without_marker(tok, image_root):
    record = _sample("a", "grey.png", "how many?", "one")
    item = _dataset(tok, image_root, [record])[0]
    assert tok.decode(item["input_ids"][:6]).split() == ["<|im_start|>", "user"] + ["<image>"] * 4
    assert record["conversations"][0]["value"] == "how many?"  # the record is not modified


def test_text_only_sample(tok, image_root):
    item = _dataset(tok, image_root, [_sample("t", None, "how many?", "one")])[0]
    assert item["pixel_values"] is None


BAD_SAMPLES = [
    (_sample("m", "missing.png", "<image>\nhow many?", "one"), "image missing"),
    (_sample("c", "corrupt.png", "<image>\nhow many?", "one"), "image unreadable"),
    (_sample("t", "truncated.png", "<image>\nhow many?", "one"), "image unreadable"),
    (_sample("r", None, "how many?", "one", roles=("human", "robot")), "bad conversation"),
    (_sample("g", None, "how many?", "how many?", roles=("human", "human")), "bad conversation"),
    (_sample("x", "grey.png", "<image> <image>\nhow many?", "one"), "image marker mismatch"),
    (_sample("y", ["grey.png"] * 2, "how many?", "one"), "image marker mismatch"),
    (_sample("z", None, "<image>\nhow many?", "one"), "image marker mismatch"),
    (_sample("l", "grey.png", "<image>\n" + "the " * 60, "one"), "too long (> 64 tokens)"),
]


@pytest.mark.parametrize(("record", "reason"), BAD_SAMPLES)
def test_bad_sample_is_skipped_with_its_reason(tok, image_root, record, reason):
    item = _dataset(tok, image_root, [record])[0]
    assert isinstance(item, Skipped)
    assert (item.id, item.reason) == (record["id"], reason)


@pytest.mark.parametrize(("record", "reason"), BAD_SAMPLES)
def test_bad_sample_is_an_error_under_the_error_policy(tok, image_root, record, reason):
    dataset = _dataset(tok, image_root, [record], on_bad_sample="error")
    escaped = reason.replace("(", r"\(").replace(")", r"\)")
    pattern = rf"sample '{record['id']}' \(index 0\): {escaped}"
    with pytest.raises(DataError, match=pattern + ".*set data.on_bad_sample: skip"):
        dataset[0]


def test_sample_without_supervised_token_is_skipped(tok, image_root):
    silent = ChatTemplate(name="silent", user="{content}", assistant_prefix="", end_of_turn="")
    dataset = _dataset(tok, image_root, [_sample(None, None, "hi", "")], template=silent)
    assert dataset[0] == Skipped(
        "None", "no supervised tokens", "no assistant answer gets a label", index=0
    )


def test_lengths_are_estimated_and_signed_by_modality(tok, image_root):
    records = [
        _sample("a", "grey.png", "<image>\nhow many shapes?", "two"),
        _sample("b", "grey.png", "how many shapes?", "two"),
        _sample("c", None, "how many shapes?", "two"),
    ]
    assert _dataset(tok, image_root, records).lengths == [4 + N_IMAGE, 4 + N_IMAGE, -4]


# DataCollator and SkipCounter


def _item(ids, labels, images=None):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": images}


def test_collator_pads_right_and_concatenates_images():
    first, second = torch.zeros(1, 3, 2, 2), torch.ones(2, 3, 2, 2)
    items = [
        _item([5, 6, 7], [-100, 6, 7], first),
        Skipped("s", "image missing"),
        _item([8], [8]),
        _item([9, 10], [-100, 10], second),
    ]
    batch = DataCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]
    assert torch.equal(batch["pixel_values"], torch.cat([first, second]))
    assert batch["skipped"] == [Skipped("s", "image missing")]


def test_collator_pads_left():
    batch = DataCollator(pad_token_id=3, padding_side="left")(
        [_item([5, 6], [5, 6]), _item([8], [8])]
    )
    assert batch["input_ids"].tolist() == [[5, 6], [3, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["labels"].tolist() == [[5, 6], [-100, 8]]
    assert batch["pixel_values"] is None


def test_collator_with_only_skipped_items_gives_zero_rows():
    batch = DataCollator(pad_token_id=0)([Skipped("a", "image missing")])
    assert batch["input_ids"].shape == (0, 0) and batch["labels"].shape == (0, 0)
    assert batch["pixel_values"] is None and len(batch["skipped"]) == 1


def test_collator_needs_a_pad_token():
    with pytest.raises(DataError, match="the tokenizer has no pad token"):
        DataCollator(pad_token_id=None)


def test_skip_counter_report():
    collate, counter = DataCollator(pad_token_id=0), SkipCounter()
    rows = [_item([1], [1])] * 39
    counter.update(collate([*rows, Skipped("a", "image missing"), Skipped("b", "image missing")]))
    counter.update(collate([*rows, Skipped("c", "too long (> 512 tokens)")]))
    counter.update(collate(rows))
    assert (
        counter.report() == "skipped 3 of 120 samples: 2 image missing, 1 too long (> 512 tokens)"
    )
    counter.reset()
    assert counter.report() == "skipped 0 of 0 samples"


def test_end_to_end_loader_with_workers(tok, image_root):
    records = [_sample(str(i), "grey.png", "<image>\nhow many?", "one") for i in range(6)]
    records[2] = _sample("2", "missing.png", "<image>\nhow many?", "one")
    dataset = _dataset(tok, image_root, records)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=3,
        sampler=LengthGroupedSampler(dataset.lengths, 3, seed=1),
        collate_fn=DataCollator(tok.pad_token_id),
        num_workers=2,
    )
    counter = SkipCounter()
    for batch in loader:
        counter.update(batch)
        assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0]
    assert counter.report() == "skipped 1 of 6 samples: 1 image missing"


# LengthGroupedSampler


LENGTHS = [(10 + (i * 37) % 200) * (-1 if i % 3 == 0 else 1) for i in range(203)]


def _batches(sampler, size):
    order = list(sampler)
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_sampler_is_a_deterministic_permutation():
    sampler = LengthGroupedSampler(LENGTHS, 8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(len(LENGTHS)))
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=3)) == first
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=4)) != first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert len(sampler) == len(LENGTHS)


def test_sampler_keeps_modalities_apart_but_in_one_of_the_last_two_batches():
    batches = _batches(LengthGroupedSampler(LENGTHS, 8, seed=0), 8)
    mixed = [b for b in batches if len({LENGTHS[i] >= 0 for i in b}) > 1]
    assert len(mixed) == 1 and mixed[0] in batches[-2:]
    free = _batches(LengthGroupedSampler(LENGTHS, 8, seed=0, group_by_modality=False), 8)
    assert any(len({LENGTHS[i] >= 0 for i in b}) > 1 for b in free[:-1])


def test_sampler_groups_similar_lengths():
    def spread(batches):
        return sum(
            max(abs(LENGTHS[i]) for i in b) - min(abs(LENGTHS[i]) for i in b) for b in batches
        )

    grouped = _batches(LengthGroupedSampler(LENGTHS, 8, seed=0, megabatch_size=4), 8)
    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()
    random = [shuffled[i : i + 8] for i in range(0, len(shuffled), 8)]
    assert spread(grouped) * 3 < spread(random)


def test_the_old_dataset_name_still_imports_with_a_deprecation_warning():
    import vlm_adapters.data as data

    with pytest.warns(DeprecationWarning, match="now ConversationDataset"):
        assert data.LlavaDataset is data.ConversationDataset
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        data.Nothing  # noqa: B018


def test_a_truncated_image_is_refused_even_where_pil_was_told_to_load_them(tmp_path, monkeypatch):
    """lmms-eval sets PIL's process-wide LOAD_TRUNCATED_IMAGES on import; ours stays strict."""
    from PIL import Image, ImageFile

    from vlm_adapters.data.images import ImageProblem, open_image

    whole = tmp_path / "whole.png"
    Image.effect_noise((64, 48), 40).convert("RGB").save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert open_image(whole).size == (64, 48)
    with pytest.raises(ImageProblem, match="image unreadable"):
        open_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's setting is left as it was
