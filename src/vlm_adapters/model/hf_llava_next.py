"""Loading transformers' LLaVA-NeXT format (``LlavaNextForConditionalGeneration`` + its
processor) as a :class:`VisionLanguageModel` with AnyRes tiling (``vision.tiling``).

The checkpoint's ``LlavaNextImageProcessor`` becomes the tower's own image processor plus the
tile grids; the import is refused, with the reason, unless rebuilding that processor from
them gives back exactly the checkpoint's, and unless its token arithmetic is the model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm_adapters._transformers import load_or_explain
from vlm_adapters.errors import ExportError
from vlm_adapters.model.hf_llava import (
    check_source,
    check_strategy,
    copy_weights,
    load_exactly,
    model_config,
    with_template,
)
from vlm_adapters.vision.hf_processor import processor_config

if TYPE_CHECKING:
    from vlm_adapters.model.core import VisionLanguageModel

_TILING_KEYS = ("image_grid_pinpoints", "do_pad")
"""What a LLaVA-NeXT image processor adds to the tower's own."""


def load(
    cls: type[VisionLanguageModel], path: str | Path, template: str | None = None
) -> VisionLanguageModel:
    """Build ``cls`` from a transformers LLaVA-NeXT checkpoint (see
    ``VisionLanguageModel.from_hf_llava``)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    source = str(path)
    check_source(source, "llava_next")
    llava = load_exactly(LlavaNextForConditionalGeneration, source)
    processor = load_or_explain("import", source, lambda: AutoProcessor.from_pretrained(source))
    _check_token_arithmetic(llava.config, processor, source)
    theirs = processor_config(processor.image_processor)
    options = _vision_options(llava.config, theirs, source)
    model = cls.from_config(model_config(llava, processor, source, options))
    rebuilt = model.vision.transform.processor_config()
    if rebuilt != theirs:
        differs = sorted(
            k for k in rebuilt.keys() | theirs.keys() if rebuilt.get(k) != theirs.get(k)
        )
        raise ExportError(
            f"{source}: its image processor cannot be rebuilt exactly from the tower's settings "
            f"and the tile grids (it differs in {', '.join(differs)})"
        )
    check_strategy(llava.config, model.vision.backbone)
    copy_weights(llava, model, model.vision.backbone.tower)
    with torch.no_grad():
        model.connector.image_newline.copy_(llava.model.image_newline)
    return with_template(model, path, template)


def _vision_options(config: Any, data: dict[str, Any], source: str) -> dict[str, Any]:
    """The tower's image processor (the LLaVA-NeXT one without its tiling keys) and
    ``tiling`` grids from ``image_grid_pinpoints`` in tiles of the tower's input size."""
    if data.get("image_processor_type") != "LlavaNextImageProcessor":
        raise ExportError(
            f"{source}: its image processor is {data.get('image_processor_type')!r}; "
            "vlm-adapters tiles like LlavaNextImageProcessor"
        )
    tile = config.vision_config.image_size
    pinpoints = [list(p) for p in data.get("image_grid_pinpoints") or []]
    if pinpoints != [list(p) for p in config.image_grid_pinpoints]:
        raise ExportError(
            f"{source}: the image processor's image_grid_pinpoints {pinpoints} are not the "
            f"model's {config.image_grid_pinpoints}"
        )
    if any(h % tile or w % tile for h, w in pinpoints):
        raise ExportError(
            f"{source}: image_grid_pinpoints {pinpoints} are not multiples of the tower's "
            f"{tile}-pixel input, so they are no tile grids"
        )
    base = {k: v for k, v in data.items() if k not in _TILING_KEYS}
    return {
        "image_processor": {**base, "image_processor_type": "CLIPImageProcessor"},
        "tiling": {"grids": [[h // tile, w // tile] for h, w in pinpoints]},
    }


def _check_token_arithmetic(config: Any, processor: Any, source: str) -> None:
    """The processor must count a tile as the tower's patches, CLS dropped or never there."""
    vision = config.vision_config
    extra = processor.num_additional_image_tokens - (
        1 if processor.vision_feature_select_strategy == "default" else 0
    )
    if processor.patch_size != vision.patch_size or extra:
        raise ExportError(
            f"{source}: its processor counts tiles with patch_size {processor.patch_size} and "
            f"{processor.num_additional_image_tokens} extra token(s) for "
            f"{processor.vision_feature_select_strategy!r} features, which is not what the "
            f"model computes (patch_size {vision.patch_size})"
        )
    if processor.vision_feature_select_strategy != config.vision_feature_select_strategy:
        raise ExportError(
            f"{source}: the processor's vision_feature_select_strategy "
            f"{processor.vision_feature_select_strategy!r} is not the model's "
            f"{config.vision_feature_select_strategy!r}"
        )
