"""What transformers' LLaVA-OneVision format (``LlavaOnevisionForConditionalGeneration`` +
``LlavaOnevisionProcessor``) adds to the LLaVA-NeXT export and import: videos.

OneVision computes what a model with AnyRes tiling and ``vision.video`` computes when: each
video frame's tokens are pooled to ``ceil(side / 2)`` per side (``pool: 2``, bilinear), one
end token follows each video (``newline: true``), the end token of AnyRes rows is the same
learned ``image_newline``, no image is shrunk by OneVision's ``anyres_max_N`` (N is written
as the most tiles of any grid), and the tower's image processor resizes straight to its
square input (SigLIP style: OneVision's overview is the whole image resized to that square).
OneVision lays out the images of a sample with several images differently (each untiled, with
an end token); single-image samples and videos are the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_adapters.errors import ExportError
from vlm_adapters.export.hf_llava_next_read import LlavaNextFormat, tiling_options
from vlm_adapters.vision.hf_processor import processor_config, processor_from_config

if TYPE_CHECKING:
    from vlm_adapters.model.core import VisionLanguageModel

_ONEVISION_KEYS = ("image_grid_pinpoints", "do_pad", "batch_num_images")
"""What a OneVision image processor adds to the tower's own."""


def onevision_reason(model: VisionLanguageModel) -> str | None:
    """Why a video model cannot be written as LLaVA-OneVision, or None if it can."""
    spec = model.video_spec
    if spec is None:
        return None
    if model.vision.layout is None:
        return (
            "it takes videos but no AnyRes tiling (vision.tiling), and LLaVA-OneVision tiles "
            "every single image"
        )
    if spec.config.pool != 2:
        return f"vision.video.pool is {spec.config.pool}; LLaVA-OneVision pools frames 2x2"
    if not spec.config.newline:
        return "vision.video.newline is off; LLaVA-OneVision ends every video with a token"
    data = processor_config(getattr(model.vision.untiled().transform, "processor", None))
    size = data.get("size") or {}
    if "height" not in size or data.get("do_center_crop"):
        return (
            "its tower's image processor resizes the shortest side and crops (CLIP style); "
            "LLaVA-OneVision resizes images straight to the tower's square input (SigLIP style)"
        )
    return None


def onevision_config(model: VisionLanguageModel, common: dict[str, Any]) -> Any:
    """A ``LlavaOnevisionConfig`` for ``model`` from the LLaVA settings ``common``."""
    from transformers import LlavaOnevisionConfig

    layout = model.vision.layout
    pinpoints = [[r * layout.tile, c * layout.tile] for r, c in layout.grids]
    common = {k: v for k, v in common.items() if k != "image_token_index"}
    return LlavaOnevisionConfig(
        **common,
        image_token_index=model.image_token_id,
        video_token_index=model.video_spec.token_id,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=aspect_ratio(model),
    )


def aspect_ratio(model: VisionLanguageModel) -> str:
    """OneVision's ``anyres_max_N`` with N the most tiles of any grid: no image is shrunk."""
    return f"anyres_max_{max(r * c for r, c in model.vision.layout.grids)}"


def onevision_processor(model: VisionLanguageModel, tokenizer: Any, template: str) -> Any:
    """A ``LlavaOnevisionProcessor`` whose image and video processors give our pixels and whose
    ``<image>`` / ``<video>`` expansions are our token counts."""
    from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    vision = model.vision.untiled()
    tower = processor_config(vision.transform.processor)
    layout = model.vision.layout
    image = {
        **{k: v for k, v in tower.items() if k != "image_processor_type"},
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "image_grid_pinpoints": [[r * layout.tile, c * layout.tile] for r, c in layout.grids],
        "do_pad": True,
    }
    video = {k: v for k, v in tower.items() if k != "image_processor_type"}
    video.pop("do_pad", None)
    return LlavaOnevisionProcessor(
        image_processor=processor_from_config(image),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(**video, do_sample_frames=False),
        num_image_tokens=vision.num_patches + vision.num_prefix,
        vision_feature_select_strategy="default" if vision.num_prefix else "full",
        chat_template=tokenizer.chat_template,
        image_token=model.llm.image_token,
        video_token=model.tokenizer.convert_ids_to_tokens(model.video_spec.token_id),
        vision_aspect_ratio=aspect_ratio(model),
    )


class LlavaOnevisionFormat(LlavaNextFormat):
    """OneVision's part of the import: LLaVA-NeXT's tiling (from the OneVision image
    processor), the end token, and the ``vision.video`` settings OneVision implies."""

    def model_class(self) -> type[nn.Module]:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def vision_options(self, config: Any, processor: Any, source: str) -> dict[str, Any]:
        data = processor_config(processor.image_processor)
        if data.get("image_processor_type") != "LlavaOnevisionImageProcessor":
            raise ExportError(
                f"{source}: its image processor is {data.get('image_processor_type')!r}, not "
                "LlavaOnevisionImageProcessor"
            )
        _check_aspect_ratio(config, source)
        _check_token_arithmetic(config, processor, source)
        as_next = {**data, "image_processor_type": "LlavaNextImageProcessor"}
        options = tiling_options(config, as_next, source)
        # OneVision resizes straight to the square input, as SigLIP's own processor does
        options["image_processor"]["image_processor_type"] = "SiglipImageProcessor"
        frames = getattr(processor.video_processor, "num_frames", None) or 8
        options["video"] = {"num_frames": frames, "pool": 2, "newline": True}
        return options

    def finish(
        self, llava: nn.Module, model: VisionLanguageModel, processor: Any, source: str
    ) -> None:
        reason = onevision_reason(model)
        if reason:
            raise ExportError(f"{source}: cannot be represented exactly: {reason}")
        theirs = processor_config(processor.image_processor)
        ours = processor_config(onevision_processor(model, model.tokenizer, "").image_processor)
        differs = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differs:
            raise ExportError(
                f"{source}: its image processor cannot be rebuilt exactly from the tower's "
                f"settings and the tile grids (it differs in {', '.join(differs)})"
            )
        if model.video_spec.token_id != llava.config.video_token_index:
            raise ExportError(
                f"{source}: its video token id {llava.config.video_token_index} is not the "
                f"tokenizer's <video> ({model.video_spec.token_id})"
            )
        with torch.no_grad():
            model.connector.image_newline.copy_(llava.model.image_newline)


def _check_token_arithmetic(config: Any, processor: Any, source: str) -> None:
    """The processor must count a tile as the tower's patches (plus a CLS it drops)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    prefix = 1 if processor.vision_feature_select_strategy == "default" else 0
    if processor.num_image_tokens != side * side + prefix:
        raise ExportError(
            f"{source}: its processor counts {processor.num_image_tokens} tokens a tile, not "
            f"the tower's {side}x{side} patches (+ {prefix} for "
            f"{processor.vision_feature_select_strategy!r} features)"
        )
    if processor.vision_feature_select_strategy != config.vision_feature_select_strategy:
        raise ExportError(
            f"{source}: the processor's vision_feature_select_strategy "
            f"{processor.vision_feature_select_strategy!r} is not the model's "
            f"{config.vision_feature_select_strategy!r}"
        )


def _check_aspect_ratio(config: Any, source: str) -> None:
    """OneVision must never shrink an image: ``anyres_max_N`` with N at least any grid's
    tiles."""
    tile = config.vision_config.image_size
    most = max((h // tile) * (w // tile) for h, w in config.image_grid_pinpoints)
    ratio = str(config.vision_aspect_ratio)
    limit = ratio.removeprefix("anyres_max_")
    if not limit.isdigit() or int(limit) < most:
        raise ExportError(
            f"{source}: vision_aspect_ratio {ratio!r} shrinks images of {most} tiles, which "
            f"vlm-adapters does not; anyres_max_{most} or more is representable"
        )
