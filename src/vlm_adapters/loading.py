"""The one loader users call (``vlm_adapters.load``): a vlm-adapters checkpoint or a transformers
LLaVA / LLaVA-NeXT directory (or a hub id of either), told apart by its ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from vlm_adapters.errors import CheckpointError
from vlm_adapters.export.hf_llava_read import MODEL_TYPES, from_hf_llava
from vlm_adapters.model import io
from vlm_adapters.model.core import VisionLanguageModel


def load(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: io.DTypeLike = None,
    device_map: io.DeviceMap = None,
    revision: str | None = None,
) -> VisionLanguageModel:
    """Open a vlm-adapters checkpoint or a transformers LLaVA / LLaVA-NeXT directory alike, or
    a hub id of either (configs, safetensors and tokenizer files downloaded, at ``revision``).

    A transformers checkpoint is recognised from its ``config.json`` (``model_type: llava``
    or ``llava_next``; any other transformers model is refused with the reason); anything else
    must be a vlm-adapters checkpoint. ``dtype`` and ``device_map`` work as in
    :meth:`VisionLanguageModel.from_pretrained`. See it and
    :func:`vlm_adapters.export.from_hf_llava` for what is refused.
    """
    torch_dtype, device = io.placement(dtype, device_map)
    directory = io.checkpoint_dir(path, revision)
    config = directory / io.CONFIG_NAME
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config}: not valid JSON ({error})") from None
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind in MODEL_TYPES:
        return io.place(from_hf_llava(directory), torch_dtype, device)
    if kind is not None and data.get("format") != io.FORMAT:
        raise CheckpointError(
            f"{directory}: a transformers {kind!r} checkpoint; vlm-adapters loads transformers "
            f"LLaVA ({', '.join(MODEL_TYPES)}) checkpoints and its own"
        )
    return VisionLanguageModel.from_pretrained(
        directory, trust_remote_code=trust_remote_code, dtype=dtype, device_map=device_map
    )
