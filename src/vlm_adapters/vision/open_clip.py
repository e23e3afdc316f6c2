"""The visual tower of open_clip models as a vision backbone, through timm's
``forward_intermediates`` (which open_clip towers implement)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from vlm_adapters.errors import ComponentError
from vlm_adapters.vision.base import ImageTransform, VisionConfig
from vlm_adapters.vision.timm import IntermediatesBackbone, allowed_kwargs, no_local_dir

OPEN_CLIP_MODEL_KWARGS = frozenset(
    {
        "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
        "init_logit_bias", "custom_text", "force_quick_gelu", "force_custom_text",
        "force_patch_dropout", "force_image_size", "force_context_length",
    }
)  # fmt: skip
"""Model options ``open_clip.create_model`` may get from a config; never ``weights_only``, a
weights path or ``cache_dir``."""
_NESTED_LOADERS = ("timm_model_pretrained", "hf_model_pretrained", "hf_model_name")


class OpenClipVisionConfig(VisionConfig):
    """The visual tower of any open_clip model; patch tokens, not the pooled vector."""

    model: str = Field(description="open_clip model name, e.g. ViT-B-16 or hf-hub:org/name.")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or file path.")
    feature_layer: int | list[int] = Field(
        -2, description="Block index (negative from the end), or a list to concatenate."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for open_clip.create_model."
    )
    load_weights: bool = Field(
        True, description="Load the weights an `hf-hub:` model ships (off when rebuilt)."
    )

    _model = field_validator("model")(no_local_dir)

    @field_validator("model_kwargs")
    @classmethod
    def _kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed_kwargs(value, OPEN_CLIP_MODEL_KWARGS, "open_clip.create_model")
        for section in ("vision_cfg", "text_cfg"):
            nested = value.get(section) or {}
            if not isinstance(nested, dict):
                raise ValueError(f"{section} must be a mapping")
            loaders = [k for k in _NESTED_LOADERS if nested.get(k)]
            if loaders:
                raise ValueError(f"{section}.{loaders[0]} would load weights; remove it")
        return value

    def sources(self) -> dict[str, Any]:
        """open_clip's pretrained weights: a tag, a file, or those of an `hf-hub:` model."""
        found: dict[str, Any] = {"pretrained": self.pretrained} if self.pretrained else {}
        if self.model.startswith("hf-hub:") and self.load_weights:
            found["model"] = self.model
        return found


class OpenClipBackbone(IntermediatesBackbone):
    """An open_clip visual tower's patch tokens."""

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (no pretrained weights)."""
        return {**self.cfg.model_dump(), "pretrained": None, "load_weights": False}


def build_open_clip(cfg: OpenClipVisionConfig) -> OpenClipBackbone:
    import open_clip

    try:
        model = open_clip.create_model(
            cfg.model,
            pretrained=cfg.pretrained,
            load_weights=cfg.load_weights,
            pretrained_text=False,  # only the visual tower is used
            **cfg.model_kwargs,
        )
    except (RuntimeError, OSError, ValueError) as error:
        raise ComponentError(f"vision.model: {str(error).splitlines()[0][:300]}") from None
    tower = model.visual
    pre = tower.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][-1]
    transform = ImageTransform(
        crop_size=size,
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        crop=pre.get("resize_mode", "shortest") == "shortest",
        interpolation=pre.get("interpolation", "bicubic"),
    )
    return OpenClipBackbone(cfg, tower, transform)
