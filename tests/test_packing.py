"""Exact packing: a packed batch gives every sample the logits, loss and gradients it gets
alone, for rotary and absolute-position LLMs, with text-only and multi-image samples."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_adapters import build_vlm
from vlm_adapters.data import ConversationDataset, DataCollator
from vlm_adapters.data.collate import PackingCollator
from vlm_adapters.data.packing import pack_rows
from vlm_adapters.data.samplers import TokenBudgetBatchSampler
from vlm_adapters.llm import packed_attention
from vlm_adapters.testing import tiny_model_config

FAMILIES = ("llama", "qwen2", "gemma", "phi3", "gpt2")


def _records() -> list[dict]:
    ask = {"from": "human", "value": "<image>\nwhat colour is the circle ?"}
    return [
        {"id": "one", "image": "a.png", "conversations": [ask, {"from": "gpt", "value": "red"}]},
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "how many shapes are there ?"},
                {"from": "gpt", "value": "two"},
                {"from": "human", "value": "and circles ?"},
                {"from": "gpt", "value": "one"},
            ],
        },
        {
            "id": "two-images",
            "image": ["b.png", "c.png"],
            "conversations": [
                {"from": "human", "value": "<image> <image> what shape is at the top left ?"},
                {"from": "gpt", "value": "a blue square"},
            ],
        },
        {
            "id": "again",
            "image": "c.png",
            "conversations": [ask, {"from": "gpt", "value": "green"}],
        },
    ]


def _items(model, root) -> list[dict]:
    for name, size, colour in (
        ("a", (40, 30), "red"),
        ("b", (25, 60), "blue"),
        ("c", (33, 33), "green"),
    ):
        Image.new("RGB", size, colour).save(root / f"{name}.png")
    dataset = ConversationDataset.for_model(
        model,
        _records(),
        image_root=root,
        template="llama3",
        on_bad_sample="error",
    )
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("attention", ["masked", "per-sample"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_samples_equal_unpacked_ones(
    tmp_path, tokenizer_dir, family, attention, monkeypatch
):
    """``masked``: transformers' SDPA with the block-diagonal mask it derives from the position
    ids; ``per-sample``: `PackedAttention`, one SDPA call per sample."""
    calls = []
    samples = packed_attention._samples
    monkeypatch.setattr(packed_attention, "_samples", lambda p: calls.append(1) or samples(p))
    torch.manual_seed(0)
    model = build_vlm(tiny_model_config(tokenizer_dir, llm=family)).eval()  # no dropout
    model.requires_grad_(True)
    items = _items(model, tmp_path)
    lengths = [len(item["input_ids"]) for item in items]
    packed = PackingCollator(model.tokenizer.pad_token_id, max_length=sum(lengths[:3]))(items)
    assert packed["input_ids"].shape[0] < len(items)  # several samples share a row

    alone = DataCollator(model.tokenizer.pad_token_id)
    total = sum(int((item["labels"][1:] != -100).sum()) for item in items)
    model.zero_grad()
    for item in items:
        batch = alone([item])
        out = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")},
            num_items_in_batch=total,
        )
        out.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    inputs = {
        k: packed[k]
        for k in ("input_ids", "attention_mask", "pixel_values", "labels", "position_ids")
    }
    switch = packed_attention.PackedAttention(model.llm) if attention == "per-sample" else None
    try:
        model(**inputs, num_items_in_batch=total).loss.backward()
        with torch.no_grad():
            logits = model(**{**inputs, "labels": None}).logits  # [R, L, V]
    finally:
        if switch is not None:
            switch.restore()
    assert bool(calls) == (attention == "per-sample")  # every family's attention gets the ids
    assert expected
    for name, grad in expected.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-5, msg=name
        )

    with torch.no_grad():
        for index, item in enumerate(items):
            batch = alone([item])
            own = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[0]
            row, start = _where(packed, items, index)
            torch.testing.assert_close(
                logits[row, start : start + len(own)], own, rtol=1e-5, atol=1e-5
            )


def _where(packed: dict, items: list[dict], index: int) -> tuple[int, int]:
    """Row and offset of sample ``index`` in the packed batch (found from its ids)."""
    target = items[index]["input_ids"]
    for row, ids in enumerate(packed["input_ids"]):
        starts = (packed["position_ids"][row] == 0).nonzero().flatten().tolist()
        for start in starts:
            if torch.equal(ids[start : start + len(target)], target):
                return row, start
    raise AssertionError(f"sample {index} not found in the packed rows")


def test_rows_never_exceed_the_length_and_keep_every_sample_whole():
    lengths = [7, 3, 9, 2, 5, 5, 1]
    rows = pack_rows(lengths, max_length=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 32 tokens need at least 4 rows of 10
    with pytest.raises(ValueError, match="> max_length"):
        pack_rows([11], max_length=10)


def test_rows_are_balanced_so_the_batch_is_as_narrow_as_it_can_be():
    """First fit alone gives rows of 12 and 6 tokens (a batch 12 wide); spread, 9 and 9."""
    lengths = [6, 3, 3, 3, 3]
    rows = pack_rows(lengths, max_length=12)
    assert sorted(sum(lengths[i] for i in row) for row in rows) == [9, 9]


def test_token_budget_batches_follow_the_budget_and_the_epoch():
    lengths = [30, -20, 50, 10, 40, 25, 5, 60]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=70, seed=3)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(sum(abs(lengths[i]) for i in batch) <= 70 or len(batch) == 1 for batch in batches)
    assert list(sampler) == batches and len(sampler) == len(batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches
