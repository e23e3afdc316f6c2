"""Answer held-out questions with an exported checkpoint through plain transformers only.

    python examples/eval_hf_llava.py runs/demo/hf-llava runs/demo/data/eval.json [--json]

Reads a LLaVA-format file whose samples end with a short gpt answer, asks each question with
``LlavaForConditionalGeneration`` + ``AutoProcessor`` (no vlm_adapters import) and prints the
exact-match accuracy, the same metric as ``vlm-adapters eval``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def normalize(text: str) -> str:
    return re.sub(r"[.!?,;:]+$", "", " ".join(text.lower().split()))


def messages(record: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"][:-1]]


def answer(model, processor, record: dict, root: Path) -> str:
    text = processor.apply_chat_template(messages(record), add_generation_prompt=True)
    image = Image.open(root / record["image"]).convert("RGB")
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--images", help="image root (default: the data file's folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = LlavaForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, backend="pil")
    records = json.loads(Path(args.data).read_text())
    root = Path(args.images or Path(args.data).parent)
    predictions = [answer(model, processor, r, root) for r in records]
    correct = [
        normalize(p) == normalize(r["conversations"][-1]["value"])
        for p, r in zip(predictions, records)
    ]
    result = {
        "accuracy": sum(correct) / len(records),
        "n": len(records),
        "predictions": predictions,
    }
    assert "vlm_adapters" not in sys.modules
    print(
        json.dumps(result) if args.json else f"accuracy {result['accuracy']:.1%} on {len(records)}"
    )


if __name__ == "__main__":
    main()
