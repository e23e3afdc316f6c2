"""What transformers' LLaVA-NeXT format (``LlavaNextForConditionalGeneration`` + its processor)
adds to the LLaVA import (:mod:`vlm_adapters.export.hf_llava_read`): AnyRes tiling
(``vision.tiling``) and the connector's end-of-row token.

The checkpoint's ``LlavaNextImageProcessor`` becomes the tower's own image processor plus the
tile grids; the import is refused, with the reason, unless rebuilding that processor from
them gives back exactly the checkpoint's, and unless its token arithmetic is the model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_adapters.errors import ExportError
from vlm_adapters.vision.hf_processor import processor_config

if TYPE_CHECKING:
    from vlm_adapters.model.core import VisionLanguageModel
    from vlm_adapters.vision.hf import HFVisionBackbone

_TILING_KEYS = ("image_grid_pinpoints", "do_pad")
"""What a LLaVA-NeXT image processor adds to the tower's own."""


class LlavaNextFormat:
    """LLaVA-NeXT's part of the import: tiling from the image processor, checked both ways,
    and the end-of-row token."""

    def model_class(self) -> type[nn.Module]:
        """transformers' class for this format."""
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def vision_options(self, config: Any, processor: Any, source: str) -> dict[str, Any]:
        """The tower's image processor and the tile grids, once the processor's token
        arithmetic is found to be the model's."""
        _check_token_arithmetic(config, processor, source)
        return tiling_options(config, processor_config(processor.image_processor), source)

    def backbone(self, model: VisionLanguageModel) -> HFVisionBackbone:
        """The transformers tower's backbone, under the tiling."""
        return model.vision.backbone

    def finish(
        self, llava: nn.Module, model: VisionLanguageModel, processor: Any, source: str
    ) -> None:
        """Refuse a model whose rebuilt image processor is not the checkpoint's; copy the
        end-of-row token."""
        theirs = processor_config(processor.image_processor)
        rebuilt = model.vision.transform.processor_config()
        if rebuilt != theirs:
            differs = sorted(
                k for k in rebuilt.keys() | theirs.keys() if rebuilt.get(k) != theirs.get(k)
            )
            raise ExportError(
                f"{source}: its image processor cannot be rebuilt exactly from the tower's "
                f"settings and the tile grids (it differs in {', '.join(differs)})"
            )
        with torch.no_grad():
            model.connector.image_newline.copy_(llava.model.image_newline)


def tiling_options(config: Any, data: dict[str, Any], source: str) -> dict[str, Any]:
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
