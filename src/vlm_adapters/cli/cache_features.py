"""``vlm-adapters cache-features CONFIG``: fill the feature caches of a training config."""

from __future__ import annotations

import argparse
import logging

from vlm_adapters.cli import COMMANDS
from vlm_adapters.cli._rest import parse_rest, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cache-features",
        help=COMMANDS["cache-features"],
        description="Fill stages.<stage>.feature_cache of CONFIG with the frozen vision tower's "
        "features of every image the stage's data uses (entries already there and intact are "
        "kept). Training fills what is missing by itself; this does it ahead of time.",
    )
    _add_options(parser)
    parser.add_argument("config", help="training YAML")
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="config overrides"
    )
    parser.set_defaults(func=run)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        choices=("align", "finetune", "preference"),
        help="one stage (default: every stage of the recipe that has a feature_cache)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per tower pass (default 32)"
    )
    parser.add_argument("--device", help="e.g. cpu, cuda:1 (default: cuda when available)")


def _device(name: str | None) -> str:
    """The device of ``--device`` (default: cuda when available, else cpu); one that this
    machine does not have is a ConfigError naming those it has."""
    import torch

    from vlm_adapters.errors import ConfigError

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    kind = getattr(torch.accelerator.current_accelerator(), "type", None)
    count = torch.accelerator.device_count() if kind else 0
    present = device is not None and (
        device.type == "cpu" or (device.type == kind and (device.index or 0) < count)
    )
    if present:
        return name
    here = ["cpu", *(f"{kind}:{i}" for i in range(count))]
    what = "not a device name" if device is None else "not on this machine"
    raise ConfigError(f"--device {name}: {what}; use one of this machine's: {', '.join(here)}")


def run(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from vlm_adapters.errors import ConfigError
    from vlm_adapters.model.build import build_vlm
    from vlm_adapters.training.data import checked_dataset
    from vlm_adapters.training.features import (
        describe_fill,
        fill_feature_cache,
        fill_stream_cache,
    )
    from vlm_adapters.training.recipes import resolve_config
    from vlm_adapters.training.run import naming_file
    from vlm_adapters.training.streaming import streamed_images

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_rest(args, "vlm-adapters cache-features CONFIG", _add_options)
    device = _device(args.device)
    config = resolve_config(args.config, args.overrides)
    cached = [s for s in config.recipe if config.stage(s).feature_cache]
    stages = [args.stage] if args.stage else cached or config.recipe[:1]
    for stage in stages:
        if not config.stage(stage).feature_cache:
            raise ConfigError(
                f"{config.where}: stages.{stage}.feature_cache is not set; set it to a folder "
                "for the cached features"
            )
    set_seed(config.run.seed)  # the tower train builds (random weights only in tests)
    with naming_file(config.where):
        model = build_vlm(config.model)
    for stage in stages:
        folder = config.stage(stage).feature_cache
        options = {
            "max_pixels": config.data.max_image_pixels,
            "batch_size": args.batch_size,
            "device": device,
        }
        if config.dataset(stage).streaming:
            print(f"{stage}: reading the streamed shards of {config.dataset(stage).path}")
            streamed = streamed_images(config, stage, model)
            cache, report = fill_stream_cache(model.vision, folder, streamed, **options)
            print(f"{stage}: {describe_fill(cache, report, report.computed + report.reused)}")
            continue
        dataset, skipped, _ = checked_dataset(config, stage, model)
        images = dataset.image_files()
        print(f"{stage}: {len(dataset)} samples ({len(skipped)} skipped), {len(images)} images")
        cache, report = fill_feature_cache(model.vision, folder, images, **options)
        print(f"{stage}: {describe_fill(cache, report, len(images))}")
    return 0
