"""A cache of frozen vision features: computed once per image, then read memory-mapped.

An entry is keyed by the SHA-256 of the image file's bytes (a file, or the same bytes embedded
in a shard) and of a *namespace* that covers
everything else the features depend on: the backbone's preprocessing settings, a hash of its
weights and its rebuild options (feature layers included). Changing any of them changes every
key, so stale entries are never read; changing one image's bytes changes only its own key.

Each entry is one safetensors file (``features`` ``[N, D]``; ``[rows, N, D]`` for
variable-size vision: an image's AnyRes overview and tiles, or its NaFlex patch sequence)
under a two-level fan-out (``ab/abcdef....safetensors``), its metadata naming its key and the
SHA-256 of its features' bytes. It is written under a temporary name of ours (with the umask's
permissions) and renamed into place, so several processes (DDP ranks) can fill one directory
at once. An entry that is missing, truncated, corrupt, of the wrong shape, another key's or
whose features do not match their hash (an earlier version's entry has neither) is recomputed
and reported, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from vlm_adapters._io import atomic_write_bytes, remove_stale_temps, safetensors_problem
from vlm_adapters.data.images import ImageProblem, decode_image, open_image
from vlm_adapters.vision.base import ImageBatch, VariableTransform

logger = logging.getLogger("vlm_adapters.data")
SUFFIX = ".safetensors"


@dataclass
class FillReport:
    """What :meth:`FeatureCache.fill` did."""

    computed: int = 0
    reused: int = 0
    replaced: list[str] | None = None
    """Entries that were present but broken (corrupt, truncated, other shape, another key's, a
    hash mismatch, an earlier version's), recomputed."""

    def __str__(self) -> str:
        broken = len(self.replaced or [])
        return f"{self.computed} computed ({broken} replaced broken entries), {self.reused} reused"


class FeatureCache:
    """Features of one frozen vision backbone, on disk.

    ``namespace`` identifies the backbone (see :func:`backbone_namespace`); ``shape`` is the
    ``(N, D)`` every entry must have; with ``rows`` (variable-size vision) an entry is
    ``[rows, N, D]``, one row per tile (or patch sequence) of its image.
    """

    def __init__(
        self, directory: str | Path, namespace: str, shape: tuple[int, int], rows: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.namespace = namespace
        self.shape = tuple(shape)
        self.rows = rows

    @classmethod
    def for_backbone(cls, directory: str | Path, vision: torch.nn.Module) -> FeatureCache:
        """The cache of ``vision`` (a frozen :class:`~vlm_adapters.vision.VisionBackbone`)."""
        shape = (vision.num_patches, vision.hidden_size)
        rows = isinstance(vision.transform, VariableTransform)
        return cls(directory, backbone_namespace(vision), shape, rows)

    def for_videos(self, sampling: str) -> FeatureCache:
        """The same folder's entries of videos' frames ``[F, N, D]`` sampled as ``sampling``
        says (:meth:`Sampling.key <vlm_adapters.geometry.Sampling.key>`): keyed by the video
        file's bytes and the sampling, so other settings never read them."""
        namespace = f"{self.namespace}:video-frames:{sampling}"
        return FeatureCache(self.directory, namespace, self.shape, rows=True)

    def key(self, image: str | Path | bytes) -> str:
        """The entry key of the image file ``image`` (or of its bytes, embedded: the same)."""
        digest = hashlib.sha256(self.namespace.encode())
        if isinstance(image, bytes):
            digest.update(image)
            return digest.hexdigest()
        with open(image, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def problem(self, key: str) -> str | None:
        """Why the entry ``key`` cannot be used (missing, broken, other shape, another key's,
        features that do not match their hash), or None."""
        return self._load(key)[1]

    def read(self, key: str) -> torch.Tensor | None:
        """The verified features ``[N, D]`` (``[rows, N, D]``) of ``key``, or None when the
        entry cannot be trusted (the caller recomputes it)."""
        return self._load(key)[0]

    def _load(self, key: str) -> tuple[torch.Tensor | None, str | None]:
        """The features of ``key`` after every check, or None and why the entry fails one."""
        path = self.path(key)
        if not path.is_file():
            return None, "missing"
        broken = safetensors_problem(path)
        if broken:
            return None, broken
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                shape = tuple(handle.get_slice("features").get_shape())
                problem = _key_problem(metadata, key) or self._shape_problem(shape)
                features = None if problem else handle.get_tensor("features")
        except (SafetensorError, KeyError, OSError) as error:
            return None, f"{path}: unreadable ({error})"
        if features is not None and content_hash(features) != metadata["sha256"]:
            problem = "its features do not match their SHA-256 (changed after they were written)"
        return (None, f"{path}: {problem}") if problem else (features, None)

    def _shape_problem(self, shape: tuple[int, ...]) -> str | None:
        if shape[-2:] == self.shape and len(shape) == 2 + self.rows and 0 not in shape:
            return None
        expected = f"(rows, {self.shape[0]}, {self.shape[1]})" if self.rows else str(self.shape)
        return f"shape {shape}, expected {expected}"

    def write(self, key: str, features: torch.Tensor) -> None:
        """Store ``features`` under ``key`` with its key and hash, atomically (safe with
        concurrent writers; a killed writer leaves only a temporary file :meth:`clean` knows)."""
        features = features.detach().cpu().contiguous()
        metadata = {"key": key, "sha256": content_hash(features)}
        data = save({"features": features}, metadata=metadata)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)  # not save_file: its own 0600 temp file would outlive a kill

    def fill(
        self,
        images: Iterable[str | Path | bytes],
        encode: Callable[[list[Any]], Sequence[torch.Tensor | None]],
        *,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
        mine: Callable[[str], bool] | None = None,
    ) -> FillReport:
        """Compute the entries of ``images`` (files, or embedded bytes) that are missing or
        broken, ``batch_size`` images at a time with ``encode`` (images -> one entry per
        image: ``[I, N, D]``, or a list of ``[rows, N, D]``; None leaves an image out);
        report what it did. ``mine``:
        which keys this caller fills (default: all). Images are read as they come, so a
        stream of them is never held (a file is taken once; embedded bytes met again are
        reused entries)."""
        report = FillReport(replaced=[])
        todo: list[tuple[Path | bytes, str]] = []
        files: set[Path] = set()
        for image in images:
            if not isinstance(image, bytes):
                image = Path(image)
                if image in files:
                    continue
                files.add(image)
            key = self.key(image)
            if mine is not None and not mine(key):
                continue
            problem = self.problem(key)
            if problem is None:
                report.reused += 1
                if progress:
                    progress(1)
                continue
            if problem != "missing":
                name = "an embedded image" if isinstance(image, bytes) else image
                logger.warning("feature cache: recomputing %s: %s", name, problem)
                report.replaced.append(str(self.path(key) if isinstance(image, bytes) else image))
            todo.append((image, key))
            if len(todo) == batch_size:
                self._compute(todo, encode, report, progress)
        self._compute(todo, encode, report, progress)
        return report

    def _compute(
        self,
        todo: list[tuple[Path | bytes, str]],
        encode: Callable[[list[Any]], Sequence[torch.Tensor | None]],
        report: FillReport,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Encode and write ``todo``'s entries, then empty it."""
        if not todo:
            return
        features = encode([image for image, _ in todo])  # [I, N, D] or I x [rows, N, D]
        for (_, key), row in zip(todo, features):
            if row is not None:  # None: an unusable image, left out
                self.write(key, row)
                report.computed += 1
        if progress:
            progress(len(todo))
        todo.clear()

    def size_on_disk(self) -> int:
        """Bytes used by the entries."""
        return sum(p.stat().st_size for p in self.directory.glob(f"*/*{SUFFIX}"))

    def clean(self) -> None:
        """Remove temporary files that dead writers left behind."""
        for folder in self.directory.glob("*/"):
            remove_stale_temps(folder)


def content_hash(features: torch.Tensor) -> str:
    """SHA-256 of the bytes of ``features`` as stored (contiguous, on the CPU)."""
    data = features.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _key_problem(metadata: dict[str, str], key: str) -> str | None:
    """Why an entry's metadata does not bind it to ``key``, or None."""
    if "key" not in metadata or "sha256" not in metadata:
        return "no key and hash in its metadata (an entry of an earlier vlm-adapters version)"
    if metadata["key"] != key:
        return f"holds the features of another image (key {metadata['key'][:16]}...)"
    return None


def backbone_namespace(vision: torch.nn.Module) -> str:
    """What a backbone's features depend on besides the image: its preprocessing, its rebuild
    options (feature layers included) and its weights, as one digest."""
    digest = hashlib.sha256()
    transform = vision.transform
    processor = getattr(transform, "processor_config", None)
    options = {
        "transform": repr(transform),
        "processor": processor() if callable(processor) else None,
        "rebuild": vision.rebuild_kwargs(),
    }
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vision.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_encoder(
    vision: torch.nn.Module, max_pixels: int, tolerant: bool = False
) -> Callable[[list[Any]], Any]:
    """Paths (or embedded image bytes) -> ``[I, N, D]`` features with ``vision`` (its
    preprocessing, no gradients); for variable-size vision one ``[rows, N, D]`` per image,
    every tile encoded in one pass. ``tolerant``: an image that cannot be used gets None
    (no entry: its samples are skipped when met) instead of an ImageProblem."""

    def opened(image: Path | bytes) -> Any:
        try:
            if isinstance(image, bytes):
                return decode_image(image, "an embedded image", max_pixels)
            return open_image(image, max_pixels)
        except ImageProblem:
            if tolerant:
                return None
            raise

    @torch.no_grad()
    def encode(paths: Sequence[Path | bytes]) -> Sequence[torch.Tensor | None]:
        images = [opened(path) for path in paths]
        usable = [image for image in images if image is not None]
        if not usable:
            return [None] * len(images)
        pixels = vision.preprocess(usable)
        device = next(vision.parameters()).device
        features = vision(pixels.to(device)).float()  # [U, N, D]
        rows = iter(pixels.split(features) if isinstance(pixels, ImageBatch) else features)
        return [None if image is None else next(rows) for image in images]

    return encode
