"""Opening videos safely and sampling their frames (PyAV).

A video's header is read first: it must hold a video stream with a decoder, a frame size
within ``max_pixels`` and a duration. The duration is the span of the stream's packets (its
last packets demuxed from the last keyframe, none decoded; a variable-frame-rate file's
header can be short of its last frames), else the header's. The frames to sample follow from
these alone (so a sample's visual tokens are known before anything is decoded):
``num_frames`` (or ``fps`` frames per second, at most ``max_frames``) at the centres of
equal spans of the duration.
Each chosen frame is the one on screen at its time (the last whose timestamp is not later),
found by seeking to the nearest keyframe before it rather than decoding the whole file, so a
variable frame rate is handled by the timestamps, not by frame indices.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlm_adapters.data.images import MAX_IMAGE_PIXELS, ImageProblem
from vlm_adapters.errors import InstallError
from vlm_adapters.geometry import Sampling

CONTAINERS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,ivf,m4v,h264,hevc,gif,"
    "wav,mp3,aac,flac"
)
"""The FFmpeg demuxers a video may use: media containers only. Playlists and lists of files
(HLS, concat, image sequences) would make FFmpeg open other files or URLs they name, outside
``video_root``."""
SEEK_GAP = 2.0
"""Seconds ahead of the decoder beyond which the next frame is reached by seeking."""


class VideoProblem(ImageProblem):
    """A video that cannot be used; ``reason`` is a short category for skip counts."""


@dataclass(frozen=True)
class VideoHeader:
    """What a video's header says: frame ``size`` (height, width), ``duration`` in seconds,
    about how many ``frames`` it holds (0: unknown) and its mean ``rate`` (frames/s)."""

    size: tuple[int, int]
    duration: float
    frames: int
    rate: float


@dataclass(frozen=True)
class Timing:
    """Where sampled frames lie: their ``times`` and the video's ``duration`` (seconds)."""

    times: tuple[float, ...]
    duration: float


def plan(header: VideoHeader, sampling: Sampling) -> Timing:
    """The times ``sampling`` takes frames at from a video with ``header`` (no decoding)."""
    count = sampling.count(header.duration, header.frames)
    return Timing(tuple(sampling.times(header.duration, count)), header.duration)


@dataclass(frozen=True)
class Clip:
    """Sampled frames ``[F, H, W, 3]`` uint8 RGB, the sampling ``times`` and the video's
    ``duration`` (seconds)."""

    frames: np.ndarray
    times: tuple[float, ...]
    duration: float

    def __len__(self) -> int:
        return len(self.frames)


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise InstallError(
            "videos need PyAV: pip install 'vlm-adapters[video]' (or pip install av)"
        ) from None
    return av


VideoSource = Path | bytes
"""A video file, or a video file's bytes."""


def read_header(source: VideoSource, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> VideoHeader:
    """The header of the video at ``source`` (called ``name`` in problems); nothing decoded.
    VideoProblem for an unreadable file, no video stream, no decoder for its codec, frames
    larger than ``max_pixels`` or no duration."""
    with _opened(source, name) as container:
        return _header(container, _stream(container, name), name, max_pixels)


def sample_video(
    source: VideoSource, name: str, sampling: Sampling, max_pixels: int = MAX_IMAGE_PIXELS
) -> Clip:
    """The frames ``sampling`` takes from the video at ``source``, header checked first."""
    with _opened(source, name) as container:
        stream = _stream(container, name)
        header = _header(container, stream, name, max_pixels)
        times = plan(header, sampling).times
        frames = list(_frames_at(container, stream, list(times), name))
    return Clip(np.stack(frames), times, header.duration)


def time_prompt(clip_times: Sequence[float], duration: float) -> str:
    """LLaVA-Video / OneVision's sentence on the sampled frames' times."""
    where = ",".join(f"{t:.2f}s" for t in clip_times)
    return (
        f"The video lasts for {duration:.2f} seconds, and {len(clip_times)} frames are "
        f"uniformly sampled from it. These frames are located at {where}. Please answer the "
        "following questions related to this video."
    )


class _opened:
    """``av.open`` of a file or bytes, errors turned into VideoProblem."""

    def __init__(self, source: VideoSource, name: str) -> None:
        self.source, self.name = source, name

    def __enter__(self) -> Any:
        av = _av()
        target = io.BytesIO(self.source) if isinstance(self.source, bytes) else str(self.source)
        if isinstance(self.source, Path) and not self.source.is_file():
            raise VideoProblem("video missing", f"{self.source} not found")
        try:
            self.container = av.open(
                target, metadata_errors="ignore", container_options={"format_whitelist": CONTAINERS}
            )
        except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as error:
            raise VideoProblem("video unreadable", f"{self.name}: {error}") from None
        return self.container

    def __exit__(self, *exc: object) -> None:
        self.container.close()


def _stream(container: Any, name: str) -> Any:
    streams = container.streams.video
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoProblem("no video stream", f"{name} holds {', '.join(kinds)} streams only")
    stream = streams[0]
    if stream.codec_context is None or stream.codec_context.codec is None:
        raise VideoProblem("video codec unsupported", f"{name}: no decoder for its video codec")
    return stream


def _header(container: Any, stream: Any, name: str, max_pixels: int) -> VideoHeader:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoProblem("video unreadable", f"{name}: its header gives no frame size")
    if width * height > max_pixels:
        raise VideoProblem(
            "video too large",
            f"{name} has {width}x{height} = {width * height:,} pixel frames, over the limit "
            f"of {max_pixels:,} (data.max_image_pixels)",
        )
    duration = _duration(container, stream)
    if duration <= 0:
        raise VideoProblem("video has no frames", f"{name}: its header gives no duration")
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    frames = int(stream.frames or round(duration * rate))
    return VideoHeader((height, width), duration, frames, rate)


def _duration(container: Any, stream: Any) -> float:
    """The stream's span, from its start to the end of its last frame as its packets give it
    (:func:`_end`), else as the header gives it (headers of variable-frame-rate files can
    be short of the last frames)."""
    claimed = _header_duration(container, stream)
    start = stream.start_time or 0
    end = _end(container, stream, start + int(claimed / stream.time_base))
    if end is not None and end > start:
        return float((end - start) * stream.time_base)
    return claimed


def _header_duration(container: Any, stream: Any) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return 0.0


def _start(stream: Any) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _end(container: Any, stream: Any, claimed: int) -> int | None:
    """When the stream's last frame ends (in its time base; None: no packet says): its
    packets are demuxed, not decoded, from the keyframe before the ``claimed`` end to the
    end of the file; the last frame lasts its packet's duration, or when the container
    stores none, the gap between the last two frames. The container is left at its start."""
    av = _av()
    with contextlib.suppress(av.FFmpegError):  # not seekable: demux from the start
        container.seek(max(claimed, 0), stream=stream, backward=True)
    last, before, lasts = None, None, 0
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            if last is None or packet.pts > last:
                last, before, lasts = packet.pts, last, packet.duration or 0
            elif before is None or packet.pts > before:
                before = packet.pts
        container.seek(stream.start_time or 0, stream=stream, backward=True)
    except av.FFmpegError:
        return None  # a damaged tail: the header's duration; decoding reports the damage
    if last is None:
        return None
    return last + (lasts or (last - before if before is not None else 0))


def _frames_at(container: Any, stream: Any, times: list[float], name: str) -> Iterator[np.ndarray]:
    """The frame on screen at each of ``times`` (ascending), seeking across long gaps."""
    av = _av()
    start = _start(stream)
    decoded = _decoded(container, stream, name)
    current, upcoming = None, next(decoded, None)
    if upcoming is None:
        raise VideoProblem("video has no frames", f"{name}: no frame could be decoded")
    for when in times:
        target = start + when
        if upcoming is not None and target - upcoming[0] > SEEK_GAP:
            try:
                container.seek(int(target / stream.time_base), stream=stream, backward=True)
            except av.FFmpegError:
                pass  # not seekable: decode on
            else:
                decoded = _decoded(container, stream, name)
                current, upcoming = None, next(decoded, None)
        while upcoming is not None and upcoming[0] <= target:
            current, upcoming = upcoming, next(decoded, None)
        chosen = current if current is not None else upcoming
        if chosen is None:
            raise VideoProblem("video has no frames", f"{name}: no frame at {when:.2f}s")
        yield chosen[1].to_ndarray(format="rgb24")


def _decoded(container: Any, stream: Any, name: str) -> Iterator[tuple[float, Any]]:
    """``(time, frame)`` of every frame from the decoder's position; a corrupt
    stream is a VideoProblem."""
    av = _av()
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            yield float(frame.pts * frame.time_base), frame
    except (av.FFmpegError, ValueError) as error:
        raise VideoProblem("video unreadable", f"{name}: {error}") from None
