"""Real video clips for the video tests: photos panned and zoomed, encoded by PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage import data as skimage_data

VFR_PTS = [0, 40, 200, 260, 700, 760]
# name -> (codec, container, pixel format, (width, height), frame rate, frames, pts in ms)
CLIPS = {
    "h264": ("libx264", "mp4", "yuv444p", (131, 97), Fraction(7), 6, None),
    "mpeg4": ("mpeg4", "mp4", "yuv420p", (97, 61), Fraction(13, 2), 5, None),
    "vp9": ("libvpx-vp9", "webm", "yuv420p", (75, 53), Fraction(11), 7, None),
    "vfr": ("libx264", "mkv", "yuv444p", (64, 45), Fraction(25), 6, VFR_PTS),
    "long": ("libx264", "mp4", "yuv444p", (40, 30), Fraction(10), 60, None),
    "vfr-mp4": ("libx264", "mp4", "yuv444p", (64, 45), Fraction(25), 6, VFR_PTS),
}  # vfr-mp4 stores no frame durations, and its header claims less time than its frames span
PHOTOS = ("astronaut", "coffee", "chelsea")


def _codec(name: str) -> str:
    """The codec, or the MPEG-4 part 2 fallback when PyAV's FFmpeg lacks it."""
    return name if name in av.codecs_available else "mpeg4"


def _frames(photo: np.ndarray, size: tuple[int, int], count: int) -> list[np.ndarray]:
    """A pan across ``photo`` and a zoom into it: ``count`` RGB frames of ``size``."""
    width, height = size
    frames = []
    for index in range(count):
        zoom = 1.0 - 0.4 * index / max(count - 1, 1)
        crop_h, crop_w = int(photo.shape[0] * zoom), int(photo.shape[1] * zoom)
        top = (photo.shape[0] - crop_h) * index // max(count - 1, 1)
        left = (photo.shape[1] - crop_w) // 2
        crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
        frames.append(np.asarray(crop.resize((width, height), Image.BILINEAR)))
    return frames


def write_clip(path: Path, name: str, photo: str = "astronaut") -> Path:
    """Encode the clip ``name`` of :data:`CLIPS` at ``path``."""
    codec, _, pix_fmt, size, rate, count, pts = CLIPS[name]
    codec = _codec(codec)
    pix_fmt = pix_fmt if codec == "libx264" else "yuv420p"
    image = getattr(skimage_data, photo)()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options={"g": "10"})
        stream.width, stream.height, stream.pix_fmt = *size, pix_fmt
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for index, frame in enumerate(_frames(image, size, count)):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if pts is not None:
                picture.pts, picture.time_base = pts[index], Fraction(1, 1000)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def with_videos(config: Path, pattern: str, stage: str = "finetune") -> Path:
    """Rewrite ``stage``'s data file of a ``tiny_train`` config as ``pattern`` ("i" an image
    sample of the file, "v" a video sample, "t" text only, in file order), write the clips
    beside the images and give the model a ``vision.video`` section (2 frames, pool 2)."""
    import json

    import yaml

    data = yaml.safe_load(config.read_text())
    root = Path(data["data"][stage]["image_root"])
    write_clip(root / "pan.mp4", "h264")
    write_clip(root / "zoom.webm", "vp9", "coffee")
    images = iter(json.loads(Path(data["data"][stage]["path"]).read_text()))
    videos = iter([("pan.mp4", "the camera"), ("zoom.webm", "a cup")] * len(pattern))
    records = []
    for n, kind in enumerate(pattern):
        if kind == "i":
            records.append(next(images))
            continue
        question, answer, media = "what colour is the circle ?", "red", {}
        if kind == "v":
            name, answer = next(videos)
            question, media = "<video> what moves ?", {"video": name}
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        records.append({"id": f"{kind}{n}", **media, "conversations": turns})
    path = root / f"{stage}-{pattern}.json"
    path.write_text(json.dumps(records))
    data["data"][stage] |= {"path": str(path), "video_root": str(root)}
    data["vision"]["video"] = {"num_frames": 2, "pool": 2}
    config.write_text(yaml.safe_dump(data))
    return config
