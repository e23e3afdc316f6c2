"""Filling a stage's feature cache (``stages.<stage>.feature_cache``) with its frozen tower."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlm_adapters.data.feature_cache import FeatureCache, FillReport, image_encoder
from vlm_adapters.data.video import VideoProblem, sample_video
from vlm_adapters.geometry import Sampling

logger = logging.getLogger("vlm_adapters.training")


def fill_feature_cache(
    vision: torch.nn.Module,
    directory: str | Path,
    images: Sequence[Path],
    *,
    max_pixels: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> tuple[FeatureCache, FillReport]:
    """Compute the missing or broken entries of ``images`` with the frozen ``vision`` tower.

    With ``world`` processes, each fills every ``world``-th image from ``rank`` (the writes are
    atomic, so the processes share one folder); ``progress`` shows a bar of this share.
    """
    mine = list(images)[rank::world]
    options = {"max_pixels": max_pixels, "batch_size": batch_size, "device": device}
    return _fill(vision, directory, mine, len(mine), None, progress, **options)


def fill_stream_cache(
    vision: torch.nn.Module,
    directory: str | Path,
    images: Iterable[Path | bytes],
    *,
    max_pixels: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> tuple[FeatureCache, FillReport]:
    """`fill_feature_cache` for a stream of images (files or embedded bytes) that every
    process reads whole: each fills the entries whose key falls to ``rank``, never holding
    the stream. An image that cannot be used gets no entry (its samples are skipped when met)."""

    def mine(key: str) -> bool:
        return int(key[:12], 16) % world == rank

    options = {"max_pixels": max_pixels, "batch_size": batch_size, "device": device}
    return _fill(vision, directory, images, None, mine, progress, **options)


def _fill(
    vision: torch.nn.Module,
    directory: str | Path,
    images: Iterable[Path | bytes],
    total: int | None,
    mine: Callable[[str], bool] | None,
    progress: bool,
    *,
    max_pixels: int,
    batch_size: int,
    device: torch.device | str,
) -> tuple[FeatureCache, FillReport]:
    was_training = vision.training
    vision.eval().to(device)
    cache = FeatureCache.for_backbone(directory, vision)
    cache.clean()
    bar = tqdm(total=total, desc="feature cache", unit="image", disable=not progress)
    try:
        encode = image_encoder(vision, max_pixels, tolerant=mine is not None)
        report = cache.fill(images, encode, batch_size=batch_size, progress=bar.update, mine=mine)
    finally:
        bar.close()
        vision.train(was_training)
    return cache, report


def describe_fill(cache: FeatureCache, report: FillReport, images: int) -> str:
    """E.g. "feature cache runs/f: 300 images, 300 computed (...), 0 reused; 41.2 MB"."""
    size = cache.size_on_disk() / 1e6
    return f"feature cache {cache.directory}: {images} images, {report}; {size:.1f} MB on disk"


def fill_video_features(
    model: torch.nn.Module,
    cache: FeatureCache,
    entries: Sequence[tuple[Path | bytes, Sampling]],
    *,
    max_pixels: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
) -> FillReport:
    """Compute the missing or broken entries of videos' sampled frames ``[F, N, D]`` (one per
    video and sampling) with the frozen (untiled) tower of ``model``; each of ``world``
    processes fills every ``world``-th entry from ``rank``. A video that cannot be read gets
    no entry (its samples are skipped when met)."""
    tower, spec = model.vision.untiled(), model.video_spec
    report = FillReport(replaced=[])
    was_training = tower.training
    tower.eval().to(device)
    try:
        for video, sampling in list(entries)[rank::world]:
            videos = cache.for_videos(sampling.key())
            key = videos.key(video)
            problem = videos.problem(key)
            if problem is None:
                report.reused += 1
                continue
            if problem != "missing":
                report.replaced.append(str(videos.path(key)))
            name = "an embedded video" if isinstance(video, bytes) else str(video)
            try:
                clip = sample_video(video, name, sampling, max_pixels)
            except VideoProblem as error:
                logger.warning("feature cache: %s", error)
                continue
            with torch.no_grad():
                features = tower(spec.transform(clip.frames).to(device)).float()  # [F, N, D]
            videos.write(key, features)
            report.computed += 1
    finally:
        tower.train(was_training)
    return report
