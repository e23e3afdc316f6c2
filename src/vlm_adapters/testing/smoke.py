"""A smoke run for plugin authors: tiny synthetic data, an offline tokenizer and a training
config that trains a tiny model with their component in seconds (``vlm-adapters smoke``)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from vlm_adapters._io import atomic_write_text, check_output_dir, claim_entries
from vlm_adapters.config import apply_overrides
from vlm_adapters.errors import ConfigError
from vlm_adapters.plugins import BUILTIN_PROVIDER, get_registry
from vlm_adapters.testing.tiny import (
    IMAGE_SIZE,
    LLM_FAMILIES,
    VISION_VARIANTS,
    tiny_section,
    tiny_tokenizer,
)

CONFIG_NAME = "smoke.yaml"
RUN_NAME = "run"
ENTRIES = ("data", "tokenizer", CONFIG_NAME)
"""What :func:`write_smoke_run` writes into its directory."""

_STAGE = {"epochs": 1, "batch_size": 4, "warmup_ratio": 0.0, "scheduler": "constant"}
_REST: dict[str, Any] = {
    "recipe": ["align", "finetune"],
    "stages": {"align": {**_STAGE, "lr": 1.0e-3}, "finetune": {**_STAGE, "lr": 1.0e-3}},
    "run": {"seed": 0, "save_every": 0, "keep_last": 1, "log_every": 1},
}


TINY_VARIANTS: dict[str, tuple[str, ...]] = {"vision": VISION_VARIANTS, "llm": LLM_FAMILIES}
"""Tiny variants a smoke run takes besides the registered types (``hf_siglip``, ``qwen2``...)."""


def smoke_section(kind: str, name: str, tokenizer_dir: str) -> dict[str, Any]:
    """The section to smoke-test ``name`` of ``kind``: the tiny config of a built-in type (or a
    tiny variant such as ``hf_siglip`` / an LLM family such as ``qwen2``), else
    ``{"type": name}`` with the component's default options (an LLM also gets the tokenizer)."""
    default = {"type": name, "tokenizer": tokenizer_dir} if kind == "llm" else {"type": name}
    registry = get_registry()
    types = registry.names(kind)
    if name in types and registry.get(kind, name).provider != BUILTIN_PROVIDER:
        return default  # a plugin's component, even if its name is also a tiny variant's
    try:
        return tiny_section(kind, name, tokenizer_dir)
    except KeyError:
        if name not in types:
            raise ConfigError(_unknown(kind, name, types)) from None
        return default  # a built-in type without a tiny config: its default options


def _unknown(kind: str, name: str, types: list[str]) -> str:
    """Why ``--KIND NAME`` names nothing, with every name it takes."""
    tiny = [n for n in TINY_VARIANTS.get(kind, ()) if n not in types]
    close = difflib.get_close_matches(name, [*types, *tiny], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    variants = f"; tiny variants: {', '.join(tiny)}" if tiny else ""
    return f"--{kind} {name!r}: no such {kind} type{hint}; types: {', '.join(types)}{variants}"


def smoke_config(
    directory: str | Path,
    *,
    vision: str = "hf",
    connector: str = "mlp",
    llm: str = "hf",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The training config of a smoke run whose data and tokenizer are in ``directory``."""
    root = Path(directory).resolve()
    tokenizer = str(root / "tokenizer")
    data = str(root / "data")
    datasets = {
        stage: {"path": f"{data}/{stage}.json", "image_root": data, "template": template}
        for stage, template in (("align", "plain"), ("finetune", "chatml"), ("eval", "chatml"))
    }
    config = {
        "vision": smoke_section("vision", vision, tokenizer),
        "connector": smoke_section("connector", connector, tokenizer),
        "llm": smoke_section("llm", llm, tokenizer),
        "data": {**datasets, "on_bad_sample": "error", "num_workers": 0, "group_by_length": False},
        **_REST,
    }
    return apply_overrides(config, list(overrides))


def write_smoke_run(
    out: str | Path,
    *,
    vision: str = "hf",
    connector: str = "mlp",
    llm: str = "hf",
    overrides: Sequence[str] = (),
    num_images: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write ``out/data`` (synthetic shapes), ``out/tokenizer`` and ``out/smoke.yaml``, a
    training config (validated first) for a smoke run; return the config's path.

    Train it with ``vlm-adapters train OUT/smoke.yaml --out OUT/run``.
    """
    from vlm_adapters.demo import generate_shapes
    from vlm_adapters.training.config import train_config_from_dict

    if num_images < 1:
        raise ConfigError(f"--images {num_images}: a smoke run needs at least one image")
    out = check_output_dir(out, overwrite=overwrite)
    path = out / CONFIG_NAME
    options = {"vision": vision, "connector": connector, "llm": llm, "overrides": overrides}
    config = smoke_config(out, **options)
    train_config_from_dict(config, where=str(path))  # errors before anything is written
    out.mkdir(parents=True, exist_ok=True)
    claim_entries(out, ENTRIES)
    generate_shapes(out / "data", num_train=num_images, num_eval=2, image_size=IMAGE_SIZE)
    tiny_tokenizer(out / "tokenizer")
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path
