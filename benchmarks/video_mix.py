"""The video mix of ``throughput.py --video``: real clips (photos panned and zoomed, H.264)
decoded and preprocessed, ours vs transformers, and a mixed finetune, packed vs padded.

1. Decode + preprocess (frames/s): for every clip (4 to 30 seconds, a keyframe every 2),
   the same 8 frames (the frame on screen at the centre of each of 8 equal spans) through
   (a) ours, ``sample_video`` (PyAV, seeking), then the tower's image processor on the
   frames, and (b) transformers, ``load_video`` (its PyAV backend, given those frame
   indices), then ``LlavaOnevisionVideoProcessor`` with the tower's settings. The frames
   are checked equal and the pixels close; one untimed call of each side first.
2. Finetune samples/s on a mix of video QA, long video descriptions, image VQA, several
   images and text only, the same items (decoded and preprocessed once, outside the timing):
   (c) padded batches in random order, (d) packed rows (``TokenBudgetBatchSampler`` +
   ``PackingCollator`` + ``PackedAttention``, the budget the padded batches' capacity); one
   untimed step of each first. A step: forward, backward, clipping, AdamW (tower frozen).

The composition is ``train_step.py``'s LLM (Llama 512 wide, 8 layers, 1,024 positions) with
a smaller frozen CLIP-style tower (224 px, patch 16, 256 wide, 4 layers: 196 patches; a frame
pooled 2x2 gives 49 tokens, a video of 8 frames 393) and ``vision.video``. Everything runs on
one torch thread, as in a data loader worker.
"""

from __future__ import annotations

import random
import statistics
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

SEED = 0
FRAMES = 8
BATCH = 4
MAX_LENGTH = 1024
TOWER = {
    "model_type": "clip_vision_model",
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 16,
}
LLM = {
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": MAX_LENGTH,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
# clip: (width, height, frame rate, seconds); a keyframe every 2 seconds
CLIPS = [(320, 240, 24, 4.0), (480, 270, 30, 12.0), (256, 256, 25, 30.0), (640, 360, 30, 20.0)]
# kind: (share, videos, images, question words, answer words)
KINDS = {
    "video_qa": (0.35, 1, 0, (8, 16), (1, 4)),
    "video_description": (0.15, 1, 0, (6, 12), (60, 200)),
    "image_vqa": (0.25, 0, 1, (10, 20), (1, 3)),
    "multi_image": (0.05, 0, 2, (8, 16), (5, 40)),
    "text": (0.20, 0, 0, (4, 40), (3, 160)),
}


def run(rounds: int, samples: int, say: Any) -> dict[str, Any]:
    """Both parts, ``rounds`` times each (alternating which side goes first), on one torch
    thread (a data loader worker's setting, and steady on a machine shared with other jobs)."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vlm-video-") as tmp:
        root = Path(tmp)
        clips = _write_clips(root)
        model = _model(root)
        say(f"{len(clips)} clips written; decode + preprocess, {rounds} round(s) ...")
        decode = _decode_rounds(clips, model.video_spec.transform, rounds)
        say(f"finetune mix of {samples} samples, {rounds} round(s) ...")
        train = _train_rounds(root, model, clips, samples, rounds)
    return {"decode": decode, "train": train}


def format_report(report: dict[str, Any]) -> list[str]:
    decode, train = report["decode"], report["train"]
    return [
        "",
        f"video: decode + preprocess {FRAMES} frames a clip ({decode['clips']} clips, "
        f"{decode['frames']} frames; frames equal: {decode['same_frames']}, max pixel "
        f"difference {decode['max_pixel_diff']:.2g})",
        f"  (a) ours (sample_video + tower processor)   {decode['ours_fps']:8.1f} frames/s",
        f"  (b) transformers (load_video + OneVision)    {decode['theirs_fps']:8.1f} frames/s",
        f"  ours / transformers                          {decode['ratio']:8.2f}x "
        f"(CPU time: {decode['cpu_ratio']:.2f}x)",
        f"video mix finetune ({train['samples']} samples, {train['video_share']:.0%} with a "
        f"video; lengths {train['min_len']}-{train['max_len']} tokens)",
        f"  (c) padded, random order                     {train['padded_sps']:8.3f} samples/s "
        f"({train['padded_rows']} rows, {train['padded_steps']} steps)",
        f"  (d) packed                                   {train['packed_sps']:8.3f} samples/s "
        f"({train['packed_rows']} rows, {train['packed_steps']} steps)",
        f"  packed / padded                              {train['ratio']:8.2f}x "
        f"(CPU time: {train['cpu_ratio']:.2f}x)",
    ]


# ------------------------------------------------------------------------------ clips


def _write_clips(root: Path) -> list[Path]:
    import av
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    paths = []
    for index, ((width, height, rate, seconds), photo) in enumerate(zip(CLIPS, photos)):
        path = root / f"clip{index}.mp4"
        count = int(rate * seconds)
        with av.open(str(path), "w") as container:
            options = {"g": str(2 * rate), "preset": "ultrafast"}
            stream = container.add_stream("libx264", rate=Fraction(rate), options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame_index in range(count):
                zoom = 1.0 - 0.4 * frame_index / count
                crop_h, crop_w = int(photo.shape[0] * zoom), int(photo.shape[1] * zoom)
                top = (photo.shape[0] - crop_h) * frame_index // count
                crop = photo[top : top + crop_h, :crop_w]
                picture = np.asarray(Image.fromarray(crop).resize((width, height)))
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ decode + preprocess


def _video_processor() -> Any:
    """OneVision's video processor with the tower's settings (a square resize, no crop)."""
    from transformers import LlavaOnevisionVideoProcessor

    return LlavaOnevisionVideoProcessor(size={"height": 224, "width": 224}, do_center_crop=False)


def _ours(paths: list[Path], transform: Any) -> list[Any]:
    from vlm_adapters.data.video import sample_video
    from vlm_adapters.geometry import Sampling

    out = []
    for path in paths:
        clip = sample_video(path, path.name, Sampling(FRAMES))
        out.append((clip.frames, transform(clip.frames)))
    return out


def _theirs(paths: list[Path], processor: Any) -> list[Any]:
    from transformers.video_utils import load_video

    from vlm_adapters.data.video import read_header
    from vlm_adapters.geometry import Sampling

    out = []
    for path in paths:
        header = read_header(path, path.name)
        times = Sampling(FRAMES).times(header.duration, FRAMES)
        wanted = [min(int(t * header.rate + 1e-9), header.frames - 1) for t in times]

        def indices(metadata: Any, chosen: list[int] = wanted, **kwargs: Any) -> list[int]:
            return chosen

        frames, _ = load_video(str(path), backend="pyav", sample_indices_fn=indices)
        pixels = processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
        out.append((frames, pixels))
    return out


def _decode_rounds(paths: list[Path], transform: Any, rounds: int) -> dict[str, Any]:
    import numpy as np

    video_processor = _video_processor()
    sides = {"ours": lambda: _ours(paths, transform),
             "theirs": lambda: _theirs(paths, video_processor)}  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
    results = {side: run() for side, run in sides.items()}  # warm-up (first-call costs)
    for r in range(rounds):
        for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            with _Timer() as timer:
                results[side] = sides[side]()
            times[side].append(timer.seconds)
    ours, theirs = results["ours"], results["theirs"]
    same = all(np.array_equal(a[0], b[0]) for a, b in zip(ours, theirs))
    diff = max(float((a[1] - b[1]).abs().max()) for a, b in zip(ours, theirs))
    frames = FRAMES * len(paths)
    ours, theirs = _medians(times["ours"]), _medians(times["theirs"])
    return {
        "clips": len(paths),
        "frames": frames,
        "same_frames": same,
        "max_pixel_diff": diff,
        "ours_fps": frames / ours[0],
        "theirs_fps": frames / theirs[0],
        "ratio": theirs[0] / ours[0],
        "cpu_ratio": theirs[1] / ours[1],
    }


class _Timer:
    """Wall-clock and process CPU seconds of a ``with`` block (CPU time is less sensitive to
    other jobs on the machine)."""

    def __enter__(self) -> _Timer:
        self.start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = (time.perf_counter() - self.start[0], time.process_time() - self.start[1])


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


# ----------------------------------------------------------------------------- finetune


def _model(root: Path) -> Any:
    import torch

    from vlm_adapters import build_vlm
    from vlm_adapters.testing import tiny_tokenizer

    torch.manual_seed(SEED)
    config = {
        "vision": {
            "type": "hf",
            "config": TOWER,
            "feature_layer": -2,
            "image_processor": {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"height": 224, "width": 224},
                "do_center_crop": False,
            },
            "video": {"num_frames": FRAMES, "pool": 2},
        },
        "connector": {"type": "mlp", "depth": 2},
        "llm": {"type": "hf", "config": LLM, "tokenizer": tiny_tokenizer(root / "tokenizer")},
    }
    model = build_vlm(config)
    model.vision.requires_grad_(False)
    return model


def _records(count: int, words: list[str], clips: list[Path]) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    kinds = list(KINDS)
    records = []
    for index in range(count):
        kind = rng.choices(kinds, weights=[KINDS[k][0] for k in kinds])[0]
        _, videos, images, asked, answered = KINDS[kind]

        def text(span: tuple[int, int]) -> str:
            return " ".join(rng.choice(words) for _ in range(rng.randint(*span)))

        markers = "<video>\n" * videos + "<image>\n" * images
        record: dict[str, Any] = {
            "id": f"{kind}-{index}",
            "conversations": [
                {"from": "human", "value": markers + text(asked)},
                {"from": "gpt", "value": text(answered)},
            ],
        }
        if videos:
            record["video"] = rng.choice(clips).name
        if images:
            record["image"] = [f"image{rng.randrange(4)}.png" for _ in range(images)]
        records.append(record)
    return records


def _items(root: Path, model: Any, clips: list[Path], samples: int) -> list[dict[str, Any]]:
    import numpy as np
    from PIL import Image

    from vlm_adapters.data import ConversationDataset

    rng = np.random.default_rng(SEED)
    for index in range(4):
        size = (int(rng.integers(200, 500)), int(rng.integers(200, 500)))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            root / f"image{index}.png"
        )
    vocabulary = model.tokenizer.get_vocab()
    words = sorted(w for w in vocabulary if w.isalpha() and len(w) > 2)
    records = _records(samples, words, clips)
    dataset = ConversationDataset.for_model(
        model, records, image_root=root, template="vicuna_v1", on_bad_sample="error"
    )
    return [dataset[i] for i in range(len(dataset))]


def _batches(items: list[dict[str, Any]], pad: int, packed: bool) -> list[dict[str, Any]]:
    from vlm_adapters.data import DataCollator
    from vlm_adapters.data.collate import PackingCollator
    from vlm_adapters.data.samplers import TokenBudgetBatchSampler

    lengths = [len(item["input_ids"]) for item in items]
    if packed:
        sampler = TokenBudgetBatchSampler(lengths, BATCH * MAX_LENGTH, seed=SEED)
        collate = PackingCollator(pad, MAX_LENGTH)
        return [collate([items[i] for i in batch]) for batch in sampler]
    order = list(range(len(items)))
    random.Random(SEED).shuffle(order)
    collate = DataCollator(pad_token_id=pad)
    return [
        collate([items[i] for i in order[start : start + BATCH]])
        for start in range(0, len(order), BATCH)
    ]


def _epoch(model: Any, batches: list[dict[str, Any]]) -> tuple[float, float]:
    """Wall and CPU seconds of one epoch of steps (forward, backward, clipping, AdamW) over
    ``batches``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    with _Timer() as timer:
        _steps(model, batches, params, optimizer)
    return timer.seconds


def _steps(model: Any, batches: list[dict[str, Any]], params: list, optimizer: Any) -> None:
    import torch

    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids",
            "video_values")  # fmt: skip
    for batch in batches:
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        inputs = {k: batch[k] for k in keys if k in batch}
        loss = model(**inputs, num_items_in_batch=supervised).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _train_rounds(
    root: Path, model: Any, clips: list[Path], samples: int, rounds: int
) -> dict[str, Any]:
    from vlm_adapters.llm.packed_attention import PackedAttention

    model.train()
    model.vision.eval()
    items = _items(root, model, clips, samples)
    pad = model.tokenizer.pad_token_id
    padded, packed = _batches(items, pad, False), _batches(items, pad, True)
    times: dict[str, list[tuple[float, float]]] = {"padded": [], "packed": []}
    _epoch(model, padded[:1])  # warm-up steps, untimed
    attention = PackedAttention(model.llm)
    _epoch(model, packed[:1])
    attention.restore()
    for r in range(rounds):
        for side in ("padded", "packed") if r % 2 == 0 else ("packed", "padded"):
            if side == "padded":
                times[side].append(_epoch(model, padded))
                continue
            attention = PackedAttention(model.llm)  # as the trainer packs
            times[side].append(_epoch(model, packed))
            attention.restore()
    lengths = [len(item["input_ids"]) for item in items]
    padded_s, packed_s = _medians(times["padded"]), _medians(times["packed"])
    return {
        "samples": len(items),
        "video_share": sum("video_values" in item for item in items) / len(items),
        "min_len": min(lengths),
        "max_len": max(lengths),
        "padded_rows": sum(len(b["input_ids"]) for b in padded),
        "packed_rows": sum(len(b["input_ids"]) for b in packed),
        "padded_steps": len(padded),
        "packed_steps": len(packed),
        "padded_sps": len(items) / padded_s[0],
        "packed_sps": len(items) / packed_s[0],
        "ratio": padded_s[0] / packed_s[0],
        "cpu_ratio": padded_s[1] / packed_s[1],
    }
