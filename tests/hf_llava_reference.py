"""Run exported checkpoints with plain transformers only (a subprocess of tests/test_export.py).

Usage: python hf_llava_reference.py JOBS.json, where JOBS.json lists
{"checkpoint", "image", "messages", "eos_token_id", "max_new_tokens", "out"}; for each job it
writes ``out`` (safetensors: input_ids, pixel_values, logits, generated).
"""

from __future__ import annotations

import json
import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration


def run(job: dict) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(job["checkpoint"]).eval()
    processor = AutoProcessor.from_pretrained(job["checkpoint"])
    text = processor.apply_chat_template(job["messages"], add_generation_prompt=True)
    inputs = processor(images=Image.open(job["image"]), text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(
            **inputs,
            max_new_tokens=job["max_new_tokens"],
            do_sample=False,
            eos_token_id=job["eos_token_id"],
        )
    new = generated[:, inputs["input_ids"].shape[1] :]
    tensors = {**inputs, "logits": logits, "generated": new}
    save_file({k: v.contiguous() for k, v in tensors.items()}, job["out"])


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    for job in jobs:
        run(job)
    if "vlm_adapters" in sys.modules:
        raise SystemExit("vlm_adapters was imported; the reference must use transformers only")
