"""timm models as vision backbones, through timm's ``forward_intermediates``."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from vlm_adapters.errors import ComponentError, ConfigError
from vlm_adapters.vision.base import ImageTransform, VisionBackbone, VisionConfig

TIMM_MODEL_KWARGS = frozenset(
    {
        "img_size", "patch_size", "in_chans", "embed_dim", "dims", "depth", "depths",
        "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "ls_init_value",
        "layer_scale_init_value", "class_token", "reg_tokens", "no_embed_class", "pre_norm",
        "final_norm", "fc_norm", "global_pool", "dynamic_img_size", "dynamic_img_pad",
        "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
        "drop_path_rate", "act_layer", "norm_layer", "conv_mlp", "stem_type", "output_stride",
        "window_size", "use_abs_pos", "use_rope", "use_rot_pos_emb", "ref_feat_shape",
        "head_init_scale", "kernel_sizes", "patch_norm",
    }
)  # fmt: skip
"""Architecture options ``timm.create_model`` may get from a config; never a loader option
(``checkpoint_path``, ``pretrained_cfg``, ``cache_dir``...)."""
_LOCAL_SCHEMA = "local-dir:"


def allowed_kwargs(kwargs: dict[str, Any], allowed: frozenset[str], library: str) -> dict[str, Any]:
    """``kwargs`` for ``library``'s model constructor; a ValueError naming any not ``allowed``."""
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} not allowed: {library} may only get architecture options "
            f"({', '.join(sorted(allowed))}); weights come from `pretrained` or a checkpoint"
        )
    return kwargs


def check_timm_model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validator for ``model_kwargs`` bound for ``timm.create_model`` (also for plugins):
    architecture options from :data:`TIMM_MODEL_KWARGS` only, never a loader option."""
    return allowed_kwargs(kwargs, TIMM_MODEL_KWARGS, "timm.create_model")


def no_local_dir(model: str) -> str:
    """Validator for a timm / open_clip model name: never a ``local-dir:`` one."""
    if model.startswith(_LOCAL_SCHEMA):
        raise ValueError(
            "a `local-dir:` model would load files (possibly pickles) from that folder; "
            "use a model name and `pretrained`"
        )
    return model


class TimmVisionConfig(VisionConfig):
    """Any timm model (ViT, ConvNeXt, ...); conv feature maps are flattened to tokens."""

    model: str = Field(description="timm model name, e.g. vit_base_patch16_224 or hf-hub:org/name.")
    pretrained: bool = Field(True, description="Load timm's pretrained weights.")
    feature_layer: int | list[int] = Field(
        -2, description="Block/stage index (negative from the end), or a list to concatenate."
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for timm.create_model."
    )

    _kwargs = field_validator("model_kwargs")(lambda v: check_timm_model_kwargs(v))
    _model = field_validator("model")(no_local_dir)

    def sources(self) -> dict[str, Any]:
        """timm's pretrained weights, when asked for."""
        return {"pretrained": True} if self.pretrained else {}


class IntermediatesBackbone(VisionBackbone):
    """Wraps a module with timm's ``forward_intermediates`` API (timm and open_clip towers)."""

    def __init__(self, cfg: Any, tower: nn.Module, transform: ImageTransform) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = tower
        self.transform = transform
        layers = cfg.feature_layer
        self.indices = [layers] if isinstance(layers, int) else list(layers)
        size = transform.crop_size
        with torch.no_grad():
            try:
                probe = self.features(torch.zeros(1, 3, size, size))  # [1, N, D]
            except (IndexError, AssertionError, ValueError) as error:
                raise ConfigError(
                    f"vision.feature_layer: {layers} does not fit {cfg.model} ({error}); "
                    "use a block index in range, e.g. -2"
                ) from None
        self.num_patches, self.hidden_size = probe.shape[1], probe.shape[2]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.tower.forward_intermediates(
            pixel_values.to(self.dtype), indices=self.indices, intermediates_only=True
        )
        if isinstance(maps, dict):  # open_clip returns a dict
            maps = maps["image_intermediates"]
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]  # each [B, H*W, C]
        return tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=-1)

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this timm architecture offline (no pretrained
        weights); a tower of another library overrides it."""
        kwargs = self.cfg.model_dump()
        args = {
            k: v
            for k, v in getattr(self.tower, "_model_args", {}).items()
            if k in TIMM_MODEL_KWARGS
        }
        architecture = getattr(self.tower, "pretrained_cfg", {}).get("architecture")
        return {
            **kwargs,
            "model": architecture or self.cfg.model,
            "pretrained": False,
            "model_kwargs": {**kwargs["model_kwargs"], **args},
        }


def build_timm(cfg: TimmVisionConfig) -> IntermediatesBackbone:
    import timm

    try:
        tower = timm.create_model(
            cfg.model, pretrained=cfg.pretrained, num_classes=0, **cfg.model_kwargs
        )
    except RuntimeError as error:  # unknown model name
        raise ComponentError(f"vision.model: {str(error).splitlines()[0][:300]}") from None
    data = timm.data.resolve_model_data_config(tower)
    # a ViT built with a non-default `img_size` accepts only that size
    fixed = getattr(getattr(tower, "patch_embed", None), "img_size", None)
    size = fixed[-1] if fixed else data["input_size"][-1]
    transform = ImageTransform(
        crop_size=size,
        resize=int(size / data.get("crop_pct", 1.0)),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=data.get("interpolation", "bicubic"),
    )
    return IntermediatesBackbone(cfg, tower, transform)
