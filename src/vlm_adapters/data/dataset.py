"""The dataset: LLaVA-format records -> token ids, labels and pixels (or cached features)."""

from __future__ import annotations

import copy
import io
import warnings
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlm_adapters.chat.templates import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    VIDEO_MARKER,
    ChatTemplate,
    DataError,
    check_template,
    with_image_markers,
)
from vlm_adapters.data.feature_cache import FeatureCache
from vlm_adapters.data.images import (
    MAX_IMAGE_PIXELS,
    ImageProblem,
    confined_path,
    decode_image,
    open_image,
)
from vlm_adapters.data.processor import (
    SampleImages,
    TokenBudgetError,
    VLMProcessor,
    with_video_markers,
    with_video_times,
)
from vlm_adapters.data.records import (
    BadSample,
    Skipped,
    checked_turns,
    record_images,
    record_videos,
    sample_id,
)
from vlm_adapters.data.video import (
    Clip,
    Timing,
    VideoHeader,
    VideoProblem,
    VideoSource,
    plan,
    read_header,
    sample_video,
)
from vlm_adapters.geometry import Sampling, Size
from vlm_adapters.vision.base import ImageBatch

Policy = Literal["skip", "error"]
ImageSource = Path | Image.Image | bytes
"""A sample's image: a checked file, a PIL image given in memory, or an image file's bytes
embedded in a shard."""


class ConversationDataset(Dataset):
    """LLaVA-format samples as token ids, labels and pixel tensors; images load lazily.

    One policy, `on_bad_sample`, covers every unusable sample: a missing, unreadable or too
    large image, an image path that leaves `image_root`, a bad conversation (unknown role, no
    assistant turn), `<image>` in an answer, markers that do not match the images, more than
    `max_length` tokens (visual tokens are never cut: the whole sample goes), more visual
    tokens than the per-sample budget, or no supervised token. With "skip" the item is a
    `Skipped` (the collator drops and reports it); with "error" a DataError names the sample
    and the reason. ``processor`` encodes the samples (ids, labels, pixels, visual tokens).
    `source` (the data file) and `positions` (each item's index in it) name skipped samples.
    :meth:`precheck` finds the problems that need no decoding or tokenizing, for the whole
    file, up front.
    A record's ``image`` may hold PIL images instead of paths (records given in memory); they
    pass the same checks, but not through a feature cache, which keys on files.
    A single-image sample without a marker gets `<image>\\n` before its first human turn.
    With variable-size vision (a processor whose transform counts tokens per image size:
    AnyRes, NaFlex), each image's placeholders follow its size (read from the file's header).
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        processor: VLMProcessor,
        *,
        image_root: str | Path,
        max_length: int | None = None,
        on_bad_sample: Policy = "skip",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        source: str | Path = "",
        positions: Sequence[int] | None = None,
        feature_cache: FeatureCache | None = None,
        video_root: str | Path | None = None,
    ) -> None:
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
        check_template(processor.tokenizer, processor.template)
        self.records = records
        self.processor = processor
        self.image_root = Path(image_root)
        self.video_root = Path(video_root) if video_root is not None else self.image_root
        self._headers: dict[Path, VideoHeader] = {}  # checked video file -> its header
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.max_image_pixels = max_image_pixels
        self.source = str(source)
        self.feature_cache = feature_cache
        self._keys: dict[tuple[str, Path], str] = {}  # (cache namespace, file) -> key
        self._files: dict[tuple[str, str], Path] = {}  # (kind, path in a record) -> file
        self._sizes: dict[Path, Size] = {}  # checked file -> (height, width), for variable vision
        self._lengths: array | None = None
        self.positions = list(positions) if positions is not None else list(range(len(records)))

    @classmethod
    def for_model(
        cls,
        model: Any,
        records: Sequence[Mapping[str, Any]],
        *,
        image_root: str | Path,
        template: str | ChatTemplate,
        **options: Any,
    ) -> ConversationDataset:
        """A dataset encoded for ``model`` (a :class:`~vlm_adapters.VisionLanguageModel`) by its
        processor with ``template``; ``max_length`` defaults to the LLM's context.
        ``options``: the other keyword arguments of the constructor."""
        options.setdefault("max_length", model.llm.max_positions)
        return cls(records, model.processor_for(template), image_root=image_root, **options)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        return self._guarded(index, self._item)

    def encode(
        self, record: Mapping[str, Any], position: int, source: str
    ) -> dict[str, Any] | Skipped:
        """A record given directly (a streamed sample: ``position`` is its index in the
        stream, ``source`` its shard), encoded as an item is."""
        return self._guarded_record(record, position, source, self._item)

    def images_of(self, record: Mapping[str, Any]) -> list[ImageSource]:
        """A record's images: checked files (inside `image_root`, present), PIL images or
        embedded bytes; a BadSample when they cannot be."""
        return self._image_files(record)

    def estimate(self, record: Mapping[str, Any]) -> int:
        """A record's token estimate as `lengths` gives it without a precheck (the most visual
        tokens for variable-size vision); nothing is decoded."""
        return self._estimate(record)

    def _guarded(self, index: int, work: Callable[[Mapping[str, Any], str], Any]) -> Any:
        position = self.positions[index]
        try:
            record = self.records[position]  # a row of a datasets source may be a bad one
        except BadSample as bad:
            return self._bad(bad, f"#{position}", position, self.source)
        return self._guarded_record(record, position, self.source, work)

    def _guarded_record(
        self,
        record: Mapping[str, Any],
        position: int,
        source: str,
        work: Callable[[Mapping[str, Any], str], Any],
    ) -> Any:
        """``work(record, id)``, with a bad sample turned into a Skipped or a DataError."""
        name = sample_id(record, position)
        try:
            return work(record, name)
        except BadSample as bad:
            return self._bad(bad, name, position, source)

    def _bad(self, bad: BadSample, name: str, position: int, source: str) -> Skipped:
        """A bad sample's Skipped, or with ``on_bad_sample: error`` the DataError naming it."""
        if self.on_bad_sample == "error":
            where = f"{source}: " if source else ""
            raise DataError(
                f"{where}sample {name!r} (index {position}): {bad}; fix the sample or set "
                "data.on_bad_sample: skip"
            ) from None
        return Skipped(name, bad.reason, bad.detail, position, source)

    def precheck(self) -> tuple[ConversationDataset, list[Skipped]]:
        """Check every sample without decoding images or tokenizing: the image field, paths
        (inside `image_root`, present), roles, markers (none in answers) and their counts.
        Returns the dataset of the samples that pass and the Skipped ones (with "error", the
        first problem raises)."""
        results = [self._guarded(i, self._check) for i in range(len(self))]
        skipped = [r for r in results if isinstance(r, Skipped)]
        kept = [(p, r) for p, r in zip(self.positions, results) if not isinstance(r, Skipped)]
        subset = copy.copy(self)
        subset.positions = [p for p, _ in kept]
        subset._lengths = array("q", (length for _, length in kept))
        return subset, skipped

    def _check(self, record: Mapping[str, Any], name: str) -> int:
        """Raise for a bad sample; return its length estimate (one decode serves both)."""
        paths = self._image_files(record)
        turns = with_image_markers(checked_turns(record), len(paths))
        markers = sum(str(turn.get("value", "")).count(IMAGE_MARKER) for turn in turns)
        if markers != len(paths):
            raise BadSample(
                "image marker mismatch", f"{markers} {IMAGE_MARKER} markers but {len(paths)} images"
            )
        videos = self._video_files(record)
        if videos:
            counts = self._token_counts(paths)
            frames = self._frames(videos, sum(counts))
            visual = sum(counts) + sum(self.processor.video_tokens(f) for f in frames)
            return self._estimate(record, visual)
        if not self.processor.variable:
            return self._estimate(record)
        return self._estimate(record, sum(self._token_counts(paths)))

    def _video_files(self, record: Mapping[str, Any]) -> list[VideoSource]:
        """A record's videos (checked files inside `video_root`, or bytes), markers matched."""
        videos = [self._video_file(v) if isinstance(v, str) else v for v in record_videos(record)]
        turns = with_video_markers(checked_turns(record), len(videos))
        markers = sum(str(turn.get("value", "")).count(VIDEO_MARKER) for turn in turns)
        if markers != len(videos):
            detail = f"{markers} {VIDEO_MARKER} markers but {len(videos)} videos"
            raise BadSample("video marker mismatch", detail)
        if videos and self.processor.video is None:
            raise BadSample("video without vision.video", "the model takes no videos")
        return videos

    def _video_file(self, relative: str) -> Path:
        """The checked file of ``relative`` (inside video_root, present), remembered."""
        return self._confined_file("video", relative)

    def _header(self, video: VideoSource) -> VideoHeader:
        """A video's header (no frame decoded), remembered for files."""
        name = "an embedded video" if isinstance(video, bytes) else str(video)
        if isinstance(video, bytes) or video not in self._headers:
            try:
                header = read_header(video, name, self.max_image_pixels)
            except VideoProblem as problem:
                raise BadSample(problem.reason, problem.detail) from None
            if isinstance(video, bytes):
                return header
            self._headers[video] = header
        return self._headers[video]

    def _frames(self, videos: list[VideoSource], fixed: int) -> list[int]:
        """Frames sampled from each video, fewer where the per-sample visual-token budget
        (``vision.video.max_visual_tokens``, beside ``fixed`` image tokens) needs it."""
        spec = self.processor.video
        assert spec is not None  # checked by _video_files
        sampling = spec.config.sampling()
        wanted = [sampling.count(h.duration, h.frames) for h in map(self._header, videos)]
        frames = spec.fit(wanted, fixed)
        if frames is None:
            raise BadSample(
                "too many visual tokens",
                f"{len(videos)} video(s) beside {fixed} image tokens cannot fit "
                f"vision.video.max_visual_tokens={spec.config.max_visual_tokens} with one "
                "frame each",
            )
        return frames

    def _image_files(self, record: Mapping[str, Any]) -> list[ImageSource]:
        images = record_images(record)
        return [self._image_file(i) if isinstance(i, str) else i for i in images]

    def _image_file(self, relative: str) -> Path:
        """The checked file of ``relative`` (inside image_root, present), remembered: an
        instruction mix reuses a few hundred thousand images over many samples."""
        return self._confined_file("image", relative)

    def _confined_file(self, kind: str, relative: str) -> Path:
        """The checked ``kind`` file of ``relative`` (inside its root, present), remembered
        per kind: an image and a video named alike resolve under their own roots."""
        key = (kind, relative)
        if key not in self._files:
            root = self.image_root if kind == "image" else self.video_root
            try:
                path = confined_path(root, relative, kind)
            except ImageProblem as problem:
                raise BadSample(problem.reason, problem.detail) from None
            if not path.is_file():
                raise BadSample(f"{kind} missing", str(path))
            self._files[key] = path
        return self._files[key]

    def image_files(self) -> list[Path]:
        """The distinct image files of the samples (checked ones after `precheck`), in order
        of first use; in-memory images are not files (a DataError)."""
        files: dict[Path, None] = {}
        for position in self.positions:
            for image in self._image_files(self.records[position]):
                if not isinstance(image, Path):
                    raise DataError(
                        f"{self.source}: sample {position} holds an in-memory or embedded "
                        "image, which a feature cache (keyed on image files) cannot key; give "
                        "the images as files or use no cache"
                    )
                files[image] = None
        return list(files)

    @property
    def lengths(self) -> list[int]:
        """Estimated token counts without tokenizing; negative for text-only samples (known
        from :meth:`precheck` when it ran, with the exact visual tokens of every image)."""
        if self._lengths is not None:
            return list(self._lengths)
        return [self._estimate(self.records[p]) for p in self.positions]

    def _estimate(self, record: Mapping[str, Any], visual: int | None = None) -> int:
        """Words plus ``visual`` tokens (default: ``num_image_tokens`` per marker, the most
        for variable-size vision)."""
        turns = record.get("conversations") or []
        text = " ".join(str(turn.get("value", "")) for turn in turns if isinstance(turn, Mapping))
        num_images, num_videos = text.count(IMAGE_MARKER), text.count(VIDEO_MARKER)
        words = len(text.replace(IMAGE_MARKER, " ").replace(VIDEO_MARKER, " ").split())
        has_images = bool(num_images or record.get("image"))
        has_videos = bool(num_videos or record.get("video"))
        if not has_images and not has_videos:
            return -max(words, 1)
        if visual is not None:
            return words + visual
        per_image = self.processor.num_image_tokens
        video = self.processor.video
        per_video = video.tokens(video.config.max_frames) if video is not None else 0
        images = max(num_images, 1) * per_image if has_images else 0
        return words + images + (max(num_videos, 1) * per_video if has_videos else 0)

    def _sample_images(self, paths: list[ImageSource]) -> SampleImages:
        """What the processor counts tokens from: image sizes for variable vision."""
        return [self._size(path) for path in paths] if self.processor.variable else len(paths)

    def _token_counts(self, paths: list[ImageSource]) -> list[int]:
        try:
            return self.processor.token_counts(self._sample_images(paths))
        except TokenBudgetError as error:
            raise BadSample("too many visual tokens", str(error)) from None

    def _size(self, path: ImageSource) -> Size:
        """(height, width) of an image file from its header (no decoding), remembered; of an
        in-memory image from the image."""
        if isinstance(path, Image.Image):
            return self._within_limit("an in-memory image", path.height, path.width)
        if isinstance(path, bytes):
            return self._header_size(io.BytesIO(path), "an embedded image")
        if path not in self._sizes:
            self._sizes[path] = self._header_size(path, str(path))
        return self._sizes[path]

    def _header_size(self, source: Path | io.BytesIO, name: str) -> Size:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(source) as image:
                    height, width = image.height, image.width
        except Image.DecompressionBombError as error:
            raise BadSample("image too large", f"{name}: {error}") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise BadSample("image unreadable", f"{name}: {error}") from None
        return self._within_limit(name, height, width)

    def _within_limit(self, name: str, height: int, width: int) -> Size:
        if height * width > self.max_image_pixels:
            detail = f"{name} is {width}x{height}, over data.max_image_pixels"
            raise BadSample("image too large", detail)
        return height, width

    def _item(self, record: Mapping[str, Any], name: str) -> dict[str, Any]:
        paths = self._image_files(record)
        videos = self._video_files(record)
        turns = checked_turns(record)
        counts = self._token_counts(paths)  # the per-sample budget, as its own reason
        frames = self._frames(videos, sum(counts)) if videos else []
        if videos and self.processor.video.config.timestamps:  # type: ignore[union-attr]
            turns = with_video_times(turns, [self._timing(v, f) for v, f in zip(videos, frames)])
        try:
            encoded = self.processor.encode(turns, self._sample_images(paths), frames)
        except DataError as error:
            raise BadSample("bad conversation", str(error)) from None
        if encoded.num_images != len(paths) + len(videos):
            raise BadSample(
                "image marker mismatch",
                f"{encoded.num_images} {IMAGE_MARKER} markers but {len(paths)} images",
            )
        self._check_length(encoded.input_ids, encoded.labels)
        return {
            "id": name,
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            **self._images(paths),
            **(self._videos(videos, frames) if videos else {}),
        }

    def _timing(self, video: VideoSource, frames: int) -> Timing:
        """Where the ``frames`` sampled from ``video`` lie (from its header)."""
        return plan(self._header(video), self._sampling(frames))

    def _sampling(self, frames: int) -> Sampling:
        spec = self.processor.video
        assert spec is not None  # checked by _video_files
        return spec.config.sampling(frames)

    def _videos(self, videos: list[VideoSource], frames: list[int]) -> dict[str, ImageBatch | None]:
        """``video_values`` (the sampled frames' pixels), or ``video_features`` read from the
        feature cache (one entry per video and sampling; an unusable one makes the sample a
        bad one)."""
        if self.feature_cache is None:
            clips = [self._clip(video, count) for video, count in zip(videos, frames)]
            return {"video_values": self.processor.videos([clip.frames for clip in clips])}
        entries = []
        for video, count in zip(videos, frames):
            cache = self.feature_cache.for_videos(self._sampling(count).key())
            key = self._cache_key(cache, video)
            entry = cache.read(key)
            if entry is None:
                name = "an embedded video" if isinstance(video, bytes) else video
                raise BadSample("feature cache entry unusable", f"{name}: {cache.problem(key)}")
            entries.append(entry)
        sizes = tuple(self._header(video).size for video in videos)
        batch = ImageBatch(torch.cat(entries), sizes, tuple(len(e) for e in entries))
        return {"video_features": batch}

    def video_entries(self) -> list[tuple[VideoSource, Sampling]]:
        """Each distinct (video, sampling) of the samples (checked ones after `precheck`), in
        order of first use: what a feature cache holds for them."""
        entries: dict[tuple[VideoSource, str], tuple[VideoSource, Sampling]] = {}
        for position in self.positions:
            record = self.records[position]
            try:
                videos = self._video_files(record)
                counts = self._token_counts(self._image_files(record)) if videos else []
                frames = self._frames(videos, sum(counts)) if videos else []
            except BadSample:
                continue  # a skipped sample's videos need no entry
            for video, count in zip(videos, frames):
                sampling = self._sampling(count)
                entries.setdefault((video, sampling.key()), (video, sampling))
        return list(entries.values())

    def _clip(self, video: VideoSource, frames: int) -> Clip:
        """``frames`` frames sampled from the video (its header checked first)."""
        name = "an embedded video" if isinstance(video, bytes) else str(video)
        try:
            return sample_video(video, name, self._sampling(frames), self.max_image_pixels)
        except VideoProblem as problem:
            raise BadSample(problem.reason, problem.detail) from None

    def _images(self, paths: list[ImageSource]) -> dict[str, torch.Tensor | ImageBatch | None]:
        """``pixel_values`` ``[I, 3, H, W]``, or ``image_features`` ``[I, N, D]`` read from the
        feature cache (an entry that cannot be trusted makes the sample a bad one); an
        :class:`ImageBatch` of either for variable-size vision (one cache entry per image,
        ``[tiles, N, D]``)."""
        if self.feature_cache is None or not paths:
            return {"pixel_values": self._pixels(paths)}
        features = []
        for path in paths:
            key = self._cache_key(self.feature_cache, path)
            entry = self.feature_cache.read(key)
            if entry is None:
                problem = self.feature_cache.problem(key)
                name = "an embedded image" if isinstance(path, bytes) else path
                raise BadSample("feature cache entry unusable", f"{name}: {problem}")
            features.append(entry)
        if not self.processor.variable:
            return {"pixel_values": None, "image_features": torch.stack(features)}
        sizes = tuple(self._size(path) for path in paths)
        rows = tuple(len(entry) for entry in features)
        batch = ImageBatch(torch.cat(features), sizes, rows)
        return {"pixel_values": None, "image_features": batch}

    def _cache_key(self, cache: FeatureCache, source: ImageSource | VideoSource) -> str:
        """The feature cache key of an image or video file (remembered per cache namespace:
        a video's includes its sampling) or of embedded bytes."""
        if isinstance(source, bytes):
            return cache.key(source)
        memo = (cache.namespace, source)
        if memo not in self._keys:
            self._keys[memo] = cache.key(source)
        return self._keys[memo]

    def _check_length(self, input_ids: list[int], labels: list[int]) -> None:
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise BadSample(f"too long (> {self.max_length} tokens)", f"{len(input_ids)} tokens")
        if all(label == IGNORE_INDEX for label in labels):
            raise BadSample("no supervised tokens", "no assistant answer gets a label")

    def _pixels(self, paths: list[ImageSource]) -> torch.Tensor | ImageBatch | None:
        if not paths:
            return None
        images = [self._open(path) for path in paths]
        return self.processor.images(images)  # [num_images, 3, H, W] or an ImageBatch

    def _open(self, image: ImageSource) -> Image.Image:
        """The image as RGB, decoded (a file's size checked before decoding)."""
        if isinstance(image, (Path, bytes)):
            try:
                if isinstance(image, bytes):
                    return decode_image(image, "an embedded image", self.max_image_pixels)
                return open_image(image, self.max_image_pixels)
            except ImageProblem as problem:
                raise BadSample(problem.reason, problem.detail) from None
        self._size(image)
        try:
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise BadSample("image unreadable", f"an in-memory image: {error}") from None
