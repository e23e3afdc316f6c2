"""Any transformers vision model (CLIP, SigLIP/SigLIP2, DINOv2, ...) as a vision backbone.

Its preprocessing is the tower's own transformers image processor
(:class:`~vlm_adapters.vision.hf_processor.ProcessorTransform`): the checkpoint's
``AutoImageProcessor`` for a hub id / local path, else the one transformers would ship with
the tower. Export writes that processor, so the pixels a transformers LLaVA sees are ours,
bit for bit.

A SigLIP2 NaFlex tower (``siglip2_vision_model``) encodes each image at its own aspect ratio:
its processor resizes the image to at most ``max_num_patches`` patches and pads the patch
sequence (:class:`~vlm_adapters.vision.hf_processor.NaFlexTransform`); the tower gets the
patch mask and each image's patch grid, and every image gives as many visual tokens as it
has patches.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from vlm_adapters._transformers import (
    check_dtype,
    check_inline_config,
    inline_config,
    load_or_explain,
)
from vlm_adapters.errors import ConfigError
from vlm_adapters.vision.base import ImageBatch, VisionBackbone, VisionConfig, select_layers
from vlm_adapters.vision.hf_processor import (
    NAFLEX_PATCHES,
    NaFlexTransform,
    ProcessorTransform,
    as_triple,
    checkpoint_processor,
    inline_size,
    naflex_processor,
    processor_config,
    processor_from_config,
    resized_processor,
    standard_processor,
)


class HFVisionConfig(VisionConfig):
    """A transformers vision tower, from a hub id / local path or an inline config."""

    model: str | None = Field(None, description="Hub id or local directory of the checkpoint.")
    config: dict[str, Any] | None = Field(
        None, description="Inline transformers config (with `model_type`); random weights."
    )
    feature_layer: int | list[int] = Field(
        -2, description="Hidden-state index to use, or a list of indices to concatenate."
    )
    image_size: int | None = Field(
        None,
        description="Input resolution; default: the model's. Only a tower that resizes its "
        "position embeddings (DINOv2) takes another size than its config's image_size.",
    )
    image_mean: tuple[float, float, float] | None = Field(
        None, description="Override normalisation."
    )
    image_std: tuple[float, float, float] | None = Field(
        None, description="Override normalisation."
    )
    image_processor: dict[str, Any] | None = Field(
        None,
        description="Inline transformers image-processor config (a preprocessor_config.json, "
        "with `image_processor_type`); default: the checkpoint's own, else the tower's standard "
        "one. `image_size`, `image_mean` and `image_std` override it.",
    )
    max_num_patches: int | None = Field(
        None,
        ge=1,
        description="NaFlex towers (SigLIP2): most patches per image, each image resized to "
        "fit with its aspect ratio kept; default: the checkpoint's processor's, else 256.",
    )
    revision: str | None = Field(None, description="Hub revision of `model`.")
    dtype: str | None = Field(None, description="e.g. float32, bfloat16; default: float32.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the checkpoint.")

    _inline = field_validator("config")(check_inline_config)
    _dtype = field_validator("dtype")(check_dtype)

    @field_validator("image_processor")
    @classmethod
    def _processor_type(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        check_inline_config(value, "image_processor")
        if value is not None and not isinstance(value.get("image_processor_type"), str):
            raise ValueError(
                "an inline image processor needs `image_processor_type` (e.g. CLIPImageProcessor)"
            )
        return value

    def sources(self) -> dict[str, Any]:
        """The hub id / path of the weights, when set."""
        return {"model": self.model} if self.model else {}

    @model_validator(mode="after")
    def _one_source(self) -> HFVisionConfig:
        if (self.model is None) == (self.config is None):
            raise ValueError("set exactly one of `model` (hub id or path) or `config` (inline)")
        return self

    def hf_config(self) -> Any:
        """The transformers config of the vision tower (the vision part of a CLIP/SigLIP)."""
        from transformers import AutoConfig

        if self.config is not None:
            config = inline_config(self.config, "vision.config")
        else:
            config = load_or_explain(
                "vision.model",
                self.model,
                lambda: AutoConfig.from_pretrained(
                    self.model, revision=self.revision, trust_remote_code=self.trust_remote_code
                ),
            )
        return getattr(config, "vision_config", config)

    def probe(self) -> tuple[int, int]:
        """``(num_patches, hidden_size)`` from the config alone, without building the model
        (for a NaFlex tower: the most patches per image)."""
        config = self.hf_config()
        check_feature_layers(self.feature_layer, config.num_hidden_layers + 1)
        check_resolution_options(self, config)
        width = config.hidden_size * (
            1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        )
        if is_naflex(config):
            inline = (self.image_processor or {}).get("max_num_patches")
            return self.max_num_patches or inline or NAFLEX_PATCHES, width
        size = self.image_size or inline_size(self.image_processor) or _default_size(config)
        return (size // config.patch_size) ** 2, width

    def native_resolution(self) -> bool:
        return is_naflex(self.hf_config())


class HFVisionBackbone(VisionBackbone):
    """Hidden states of a transformers vision model, prefix tokens dropped."""

    def __init__(self, cfg: HFVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        config = cfg.hf_config()
        check_feature_layers(cfg.feature_layer, config.num_hidden_layers + 1)
        check_resolution_options(cfg, config)
        self.tower = _build_tower(cfg, config)
        processor = _image_processor(cfg, config)
        self.transform: ProcessorTransform | NaFlexTransform
        if is_naflex(config):
            self.transform = NaFlexTransform.of(processor, config.patch_size)
            self.num_patches = self.transform.max_num_patches
        else:
            self.transform = ProcessorTransform.of(processor)
            self.num_patches = (self.transform.crop_size // config.patch_size) ** 2
        self.num_prefix = num_prefix_tokens(self.tower)
        width = config.hidden_size
        self.hidden_size = width * (
            1 if isinstance(cfg.feature_layer, int) else len(cfg.feature_layer)
        )

    @property
    def image_processor(self) -> Any:
        """The transformers image processor that preprocesses for this tower."""
        return self.transform.processor

    def features(self, pixel_values: torch.Tensor | ImageBatch) -> torch.Tensor:
        if isinstance(self.transform, NaFlexTransform):
            return self._naflex_features(pixel_values)
        if isinstance(pixel_values, ImageBatch):
            raise TypeError(f"a {self.tower.config.model_type!r} tower takes [B, 3, H, W] pixels")
        out = self.tower(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        hidden = out.hidden_states  # tuple of [B, P + N, D]
        if hidden[0].shape[1] != self.num_prefix + self.num_patches:
            raise ConfigError(
                f"vision tower returned {hidden[0].shape[1]} tokens, expected {self.num_prefix} "
                f"prefix + {self.num_patches} patches; check `image_size`"
            )
        return select_layers(hidden, self.cfg.feature_layer, self.num_prefix)  # [B, N, D]

    def _naflex_features(self, images: torch.Tensor | ImageBatch) -> torch.Tensor:
        """Padded patch sequences ``[I, P, 3*p*p]`` -> ``[I, P, D]``, the padding masked."""
        if not isinstance(images, ImageBatch):
            raise TypeError("a NaFlex tower takes the ImageBatch its transform makes")
        values = images.values.to(self.dtype)
        grids = [self.transform.patch_grid(size) for size in images.sizes]
        shapes = torch.tensor(grids, dtype=torch.long, device=values.device)  # [I, 2]
        positions = torch.arange(values.shape[1], device=values.device)
        mask = (positions[None] < shapes.prod(-1)[:, None]).to(torch.int32)  # [I, P]
        out = self.tower(
            pixel_values=values,
            pixel_attention_mask=mask,
            spatial_shapes=shapes,
            output_hidden_states=True,
        )
        return select_layers(out.hidden_states, self.cfg.feature_layer, self.num_prefix)

    def arrange(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | ImageBatch,
        newline: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each image's patch tokens without the padding (NaFlex), image after image."""
        if not isinstance(images, ImageBatch):
            return super().arrange(tokens, images, newline)
        counts = [self.transform.num_tokens(size) for size in images.sizes]
        return torch.cat([row[:count] for row, count in zip(tokens, counts)])  # [K, H]

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture offline (weights loaded separately).

        The image processor is written out in full (``image_processor``) unless it is the
        standard one for the tower, which ``image_size`` / ``image_mean`` / ``image_std`` rebuild.
        """
        exclude = {"model", "revision", "trust_remote_code", "image_processor", "max_num_patches"}
        kwargs = self.cfg.model_dump(exclude=exclude, exclude_none=True)
        config = self.tower.config.to_dict()
        config.pop("dtype", None)
        kwargs["config"] = config
        t = self.transform
        if isinstance(t, NaFlexTransform):  # the processor holds max_num_patches and the rest
            kwargs = {k: v for k, v in kwargs.items() if k not in ("image_mean", "image_std")}
            return {**kwargs, "image_processor": t.processor_config()}
        standard = standard_processor(self.tower.config, t.crop_size, t.mean, t.std)
        if processor_config(processor_from_config(standard)) != t.processor_config():
            for key in ("image_size", "image_mean", "image_std"):
                kwargs.pop(key, None)
            return {**kwargs, "image_processor": t.processor_config()}
        if t.crop_size != _default_size(self.tower.config):
            kwargs["image_size"] = t.crop_size
        return {**kwargs, "image_mean": list(t.mean), "image_std": list(t.std)}


def check_feature_layers(layers: int | list[int], count: int) -> None:
    """``feature_layer`` must index one of the ``count`` hidden states (embeddings + blocks)."""
    for layer in [layers] if isinstance(layers, int) else layers:
        if not -count <= layer < count:
            raise ConfigError(
                f"vision.feature_layer: {layer} is out of range; this tower has {count} hidden "
                f"states (embeddings + {count - 1} blocks), so use -{count}..{count - 1}"
            )


def is_naflex(config: Any) -> bool:
    """Whether the transformers vision config is a NaFlex tower (SigLIP2's native resolution)."""
    return config.model_type == "siglip2_vision_model"


def check_resolution_options(cfg: HFVisionConfig, config: Any) -> None:
    """``image_size`` only for fixed-size towers, ``max_num_patches`` only for NaFlex ones."""
    kind = config.model_type
    if is_naflex(config) and cfg.image_size is not None:
        raise ConfigError(
            f"vision.image_size: the {kind!r} tower (NaFlex) has no fixed input size; it keeps "
            "each image's aspect ratio: bound it with vision.max_num_patches instead"
        )
    if not is_naflex(config) and cfg.max_num_patches is not None:
        raise ConfigError(
            f"vision.max_num_patches: only NaFlex towers (siglip2_vision_model) take it; the "
            f"{kind!r} tower has a fixed input size (vision.image_size)"
        )
    check_input_size(cfg, config)


def check_input_size(cfg: HFVisionConfig, config: Any) -> None:
    """A tower whose position embeddings are for one image size (CLIP, SigLIP, ViT...)
    refuses any other at its first forward: ``image_size`` (else an inline image processor)
    must give that size. DINOv2 interpolates its embeddings to any size."""
    fixed = getattr(config, "image_size", None)
    if is_naflex(config) or config.model_type.startswith("dinov2") or not isinstance(fixed, int):
        return
    key, size = "image_size", cfg.image_size
    if size is None:
        key, size = "image_processor", inline_size(cfg.image_processor)
    if size is not None and size != fixed:
        raise ConfigError(
            f"vision.{key}: gives {size}-pixel images, but the {config.model_type!r} tower's "
            f"position embeddings are for {fixed} pixels (its config's image_size); set "
            f"vision.image_size: {fixed}, or leave it unset for the tower's own size"
        )


def _default_size(config: Any) -> int:
    return 224 if config.model_type.startswith("dinov2") else config.image_size


def _build_tower(cfg: HFVisionConfig, config: Any) -> nn.Module:
    from transformers import AutoModel

    dtype = getattr(torch, cfg.dtype) if cfg.dtype else torch.float32
    if cfg.model is None:
        return AutoModel.from_config(config, dtype=dtype)
    return load_or_explain(
        "vision.model",
        cfg.model,
        lambda: AutoModel.from_pretrained(
            cfg.model,
            config=config,
            revision=cfg.revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        ),
    )


def num_prefix_tokens(tower: nn.Module) -> int:
    """How many non-patch tokens (CLS, registers) the tower puts before the patches."""
    embeddings = next(m for n, m in tower.named_modules() if n.endswith("embeddings"))
    count = int(any(hasattr(embeddings, a) for a in ("class_embedding", "cls_token")))
    registers = getattr(embeddings, "register_tokens", None)
    return count + (registers.shape[-2] if registers is not None else 0)


def _image_processor(cfg: HFVisionConfig, config: Any) -> Any:
    """The tower's image processor (inline config, else the checkpoint's, else the standard one
    for its model type) with the ``image_size`` / ``image_mean`` / ``image_std`` overrides."""
    data = None
    if cfg.image_processor is not None:  # as transformers reads it (legacy keys, int sizes)
        data = processor_config(processor_from_config(cfg.image_processor))
    elif cfg.model is not None:
        loaded = checkpoint_processor(cfg.model, cfg.revision)
        data = processor_config(loaded) if loaded is not None else None
    if data is None and is_naflex(config):
        data = naflex_processor(config)
    if data is None:
        data = standard_processor(config, cfg.image_size or _default_size(config))
    if cfg.image_size is not None:
        data = resized_processor(data, cfg.image_size)
    if cfg.max_num_patches is not None:
        data = {**data, "max_num_patches": cfg.max_num_patches}
    if cfg.image_mean is not None or cfg.image_std is not None:
        mean = cfg.image_mean or as_triple(data.get("image_mean", 0.0))
        std = cfg.image_std or as_triple(data.get("image_std", 1.0))
        data = {**data, "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}
    return processor_from_config(data)
