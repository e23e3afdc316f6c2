"""VisionLanguageModel: vision backbone -> connector -> visual tokens spliced into the LLM."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlm_adapters.chat.templates import DEFAULT_TEMPLATE, IGNORE_INDEX, VIDEO_MARKER
from vlm_adapters.config import ModelConfig, model_config_from_dict
from vlm_adapters.connectors.base import Connector
from vlm_adapters.data.processor import ImageInput, Turns, VLMProcessor
from vlm_adapters.errors import ConfigError
from vlm_adapters.geometry import (
    Size,
    check_tileable,
    check_token_bound,
    image_token_bound,
    tile_token_side,
)
from vlm_adapters.llm.base import LLMBackend
from vlm_adapters.model import generation, io
from vlm_adapters.plugins import get_registry
from vlm_adapters.registry import KINDS
from vlm_adapters.vision.base import ImageBatch, VariableTransform, VisionBackbone

if TYPE_CHECKING:
    from vlm_adapters.vision.tiling import TilingConfig
    from vlm_adapters.vision.video import VideoConfig, VideoSpec

VIDEO_TOKEN = VIDEO_MARKER
"""The placeholder token of video frames' visual tokens (added with ``vision.video``)."""

Images = torch.Tensor | ImageBatch
"""Pixel values ``[I, 3, H, W]``, or an :class:`ImageBatch` for variable-size vision."""


@dataclass
class VLMOutput:
    """``loss`` (mean over supervised tokens) and/or full ``logits`` ``[B, T, V]``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_tokens: int = 0
    sequence_logps: torch.Tensor | None = None
    """With ``per_sequence``: each row's summed log-probability of its labels ``[B]``."""
    sequence_tokens: torch.Tensor | None = None
    """With ``per_sequence``: each row's number of supervised tokens ``[B]``."""
    image_features: Images | None = None
    """With ``return_image_features``: the vision features the visual tokens came from
    (``[I, N, Dv]``, an :class:`ImageBatch` for variable-size vision), to reuse."""


class VisionLanguageModel(nn.Module):
    """A LLaVA-style model composed of any registered vision backbone, connector and LLM.

    ``num_image_tokens`` is the visual tokens of one image: all of them for a fixed-size
    tower), where :meth:`image_tokens` gives an image's exact count from its size. With
    ``video`` (``vision.video``), videos' frames go through the tower (untiled), the connector
    and a per-frame pooling into ``<video>`` placeholders.
    """

    def __init__(
        self,
        vision: VisionBackbone,
        connector: Connector,
        llm: LLMBackend,
        component_types: dict[str, str] | None = None,
        video: VideoConfig | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.component_types = component_types or {}
        self.template: str | None = None  # chat template the model was trained with
        self.num_image_tokens = _image_tokens(vision, connector, self.component_types)
        tiling = vision.tiling
        budget = tiling.max_visual_tokens if tiling is not None else None
        check_token_bound(  # towers without a probe
            self.num_image_tokens, llm.max_positions, tiled=tiling is not None, budget=budget
        )
        self.video = video
        self.video_spec = self._video_spec(video) if video is not None else None
        self.cached_blank: Images | None = None
        """Set by training while a stage reads a feature cache (`use_cached_blank`)."""

    @classmethod
    def from_config(cls, config: ModelConfig | dict[str, Any]) -> VisionLanguageModel:
        """Build (and, for hub ids or paths, load) every component named in ``config``."""
        if isinstance(config, dict):
            config = model_config_from_dict(config)
        registry = get_registry()
        vision = registry.create("vision", config.vision)
        llm = registry.create("llm", config.llm)
        connector = registry.create(
            "connector",
            config.connector,
            in_dim=vision.hidden_size,
            out_dim=llm.hidden_size,
            num_input_tokens=vision.num_patches,
        )
        tiling = getattr(config.vision, "tiling", None)
        if tiling is not None:
            vision = _tiled(vision, connector, config.connector.type, tiling)
        types = {k: getattr(config, k).type for k in KINDS}
        return cls(vision, connector, llm, types, getattr(config.vision, "video", None))

    def _video_spec(self, video: VideoConfig) -> VideoSpec:
        """Check that frames can be pooled and laid out; add the placeholder and end token."""
        tower = self.vision.untiled()
        if isinstance(tower.transform, VariableTransform):
            raise ConfigError(
                "vision.video: the tower encodes images at their own size (NaFlex); video "
                "frames need a tower with a fixed input size"
            )
        name = self.component_types.get("connector", type(self.connector).__name__)
        side = tile_token_side(tower.num_patches, self.connector.cfg, name, "vision.video")
        if video.pool > side:
            raise ConfigError(
                f"vision.video.pool: {video.pool} is larger than the {side}x{side} token grid "
                "of a frame; use at most " + str(side)
            )
        if video.newline and self.connector.end_of_row() is None:
            self.connector.add_image_newline()
        token_id = self.llm.add_placeholder(VIDEO_TOKEN)
        return video.spec(token_id, side, tower.transform)

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.llm.image_token_id

    @property
    def processor(self) -> VLMProcessor:
        """Conversations, prompts and images -> inputs, with the model's chat template."""
        return self.processor_for(self.template or DEFAULT_TEMPLATE)

    def processor_for(self, template: str) -> VLMProcessor:
        """The processor with another chat ``template``."""
        return VLMProcessor(
            self.tokenizer,
            self.vision.transform,
            self.num_image_tokens,
            self.image_token_id,
            template,
            video=self.video_spec,
        )

    def image_tokens(self, size: Size) -> int:
        """Visual tokens (placeholders) of an image of ``size`` (height, width)."""
        return self.processor.image_tokens(size)

    def encode_images(
        self, pixel_values: Images | None = None, features: Images | None = None
    ) -> torch.Tensor:
        """Vision input rows ``[U, 3, H, W]`` (one per image, or per AnyRes tile), or the vision
        features ``[U, N, Dv]`` a feature cache holds -> visual tokens per row ``[U, M, H]``."""
        if features is None:
            features = self.vision(pixel_values)  # [U, N, Dv]
        elif isinstance(features, ImageBatch):
            features = features.values
        return self.connector(features.to(_dtype(self.connector, features.dtype)))  # [U, M, H]

    def visual_tokens(
        self, pixel_values: Images | None = None, features: Images | None = None
    ) -> torch.Tensor:
        """Every image's visual tokens, image after image ``[K, H]``: the rows' tokens laid
        out by the backbone (AnyRes: on the tile grid, unpadded, rows ended by the connector's
        ``image_newline``; NaFlex: without the padding)."""
        rows = self.encode_images(pixel_values, features)  # [U, M, H]
        images = pixel_values if features is None else features
        newline = self.connector.end_of_row()
        return self.vision.arrange(rows, images, newline)  # [K, H]

    def video_tokens(self, videos: ImageBatch, cached: bool = False) -> torch.Tensor:
        """Every video's visual tokens, video after video ``[K, H]``: its frames ``[F, 3, S, S]``
        through the (untiled) tower (or, when ``cached``, their tower features ``[F, N, Dv]``
        from a feature cache) and the connector, pooled per frame, then the end token."""
        spec = self.video_spec
        if spec is None:
            raise ValueError("this model takes no videos: build it with a vision.video section")
        values = videos.values
        features = values if cached else self.vision.untiled()(values)  # [F, N, Dv]
        rows = self.connector(features.to(_dtype(self.connector, features.dtype)))  # [F, M, H]
        return spec.arrange(rows, videos, self.connector.end_of_row())  # [K, H]

    def _with_videos(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        videos: ImageBatch | None,
        cached: ImageBatch | None = None,
    ) -> torch.Tensor:
        """``embeds`` with the videos' visual tokens (from frames, or ``cached`` features)
        written into the ``<video>`` positions."""
        from_cache = cached is not None
        videos = cached if from_cache else videos
        if self.video_spec is None:
            if videos is not None:
                raise ValueError("this model takes no videos: build it with vision.video")
            return embeds
        is_video = input_ids == self.video_spec.token_id  # [B, T]
        slots = int(is_video.sum())
        if videos is None or len(videos) == 0:
            if slots:
                raise ValueError(f"input has {slots} video placeholder tokens but no videos")
            if self.training and torch.is_grad_enabled():
                embeds = embeds + 0.0 * self._blank_tokens(video=True).sum()
                newline = self.connector.end_of_row()
                if newline is not None:
                    embeds = embeds + 0.0 * newline.sum()  # in the graph on every process
            return embeds
        visual = self.video_tokens(videos, from_cache)  # [K, H]
        if slots != visual.shape[0]:
            raise ValueError(
                f"video features and video tokens do not match: {slots} placeholder tokens for "
                f"{len(videos)} videos giving {visual.shape[0]} visual tokens"
            )
        return embeds.masked_scatter(is_video.unsqueeze(-1), visual.to(embeds.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Images | None,
        image_features: Images | None = None,
        video_values: ImageBatch | None = None,
        video_features: ImageBatch | None = None,
        *,
        shared_images: int = 1,
    ) -> torch.Tensor:
        """Text embeddings with visual tokens written into the placeholder positions, from
        ``pixel_values`` or from cached vision ``image_features``, and the frames of
        ``video_values`` (an :class:`ImageBatch`, one entry per video), or their cached
        ``video_features``, into the ``<video>`` ones. ``shared_images``: the rows are that
        many groups of the same samples (a preference pair's chosen rows, then its rejected
        rows), every group using the images once computed."""
        is_image = input_ids == self.image_token_id  # [B, T]
        is_placeholder = is_image
        if self.video_spec is not None:
            is_placeholder = is_image | (input_ids == self.video_spec.token_id)
        embeds = self.llm.embed(input_ids.masked_fill(is_placeholder, 0))  # [B, T, H]
        embeds = self._with_videos(embeds, input_ids, video_values, video_features)
        slots = int(is_image.sum())
        images = pixel_values if image_features is None else image_features
        if images is None or len(images) == 0:
            if slots:
                raise ValueError(f"input has {slots} image placeholder tokens but no pixel_values")
            if self.training and torch.is_grad_enabled():
                embeds = embeds + 0.0 * self._blank_tokens().sum()
            return embeds
        visual = self.visual_tokens(pixel_values, image_features)  # [K, H]
        if shared_images > 1:
            visual = visual.repeat(shared_images, 1)  # [groups * K, H]
        if slots != visual.shape[0]:
            raise ValueError(
                f"image features and image tokens do not match: {slots} placeholder tokens for "
                f"{len(images)} images giving {visual.shape[0]} visual tokens"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(embeds.dtype))

    def use_cached_blank(self, cached: bool) -> None:
        """While a stage reads its images' tower features from a feature cache (``cached``),
        batches without images or videos feed the connector the tower's features of one
        black image, computed here once, instead of running the tower: no process then runs
        the tower, so FSDP2's collectives stay in step across processes. Every process must
        call this (the tower runs once here)."""
        if not cached:
            self.cached_blank = None
            return
        with torch.no_grad():
            self.cached_blank = self._features(self._blank_image())

    def _blank_tokens(self, video: bool = False) -> torch.Tensor:
        """Zero-weight visual tokens that keep the connector (and, without a feature cache,
        the tower) in a batch's graph on every process."""
        if self.cached_blank is not None:
            return self.visual_tokens(None, self.cached_blank)
        if video:
            return self.video_tokens(self._blank_video())
        return self.visual_tokens(self._blank_image())

    def _blank_image(self) -> Images:
        """One black image ``[1, 3, H, W]``: a text-only training batch still runs the vision
        tower and connector (zero-weighted), so their parameters are in the graph on every
        process (DDP/FSDP collectives stay in step; an align stage can step on text)."""
        from PIL import Image

        pixels = self.vision.preprocess([Image.new("RGB", (8, 8))])
        return pixels.to(next(self.vision.parameters()).device)

    def _blank_video(self) -> ImageBatch:
        """One black frame as a video: a training batch without videos still runs the tower
        on frames (zero-weighted), so every process makes the same tower calls (FSDP2's
        all-gathers stay in step when only some processes have videos)."""
        frames = self.video_spec.transform.batch([np.zeros((1, 8, 8, 3), dtype=np.uint8)])
        return frames.to(next(self.vision.parameters()).device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: Images | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: Images | None = None,
        video_values: ImageBatch | None = None,
        video_features: ImageBatch | None = None,
        *,
        shared_images: int = 1,
        per_sequence: bool = False,
        return_image_features: bool = False,
    ) -> VLMOutput:
        """Loss (head applied only at supervised positions) when ``labels`` are given, else logits.

        ``num_items_in_batch`` divides the summed loss instead of this batch's token count, so
        gradient accumulation and data parallelism weight every token equally. Packed rows
        (:mod:`vlm_adapters.data.packing`) pass ``position_ids`` restarting at every sample and
        no ``attention_mask``: attention then stays inside each sample. ``image_features``
        (``[I, N, Dv]``, from a feature cache of the frozen tower) replaces ``pixel_values``.
        Variable-size vision (AnyRes, NaFlex) takes and caches :class:`ImageBatch` instead.
        ``video_values``: the frames of every video, one :class:`ImageBatch` entry per video
        (``video_features``: their tower features, from a feature cache).
        ``shared_images``: see :meth:`embed` (the tower and connector run once per image).
        ``per_sequence``: also each row's summed label log-probability and label count.
        ``return_image_features``: also the vision features, for a second pass to reuse.
        """
        if return_image_features and image_features is None and pixel_values is not None:
            image_features = self._features(pixel_values)
        embeds = self.embed(
            input_ids,
            pixel_values,
            image_features,
            video_values,
            video_features,
            shared_images=shared_images,
        )
        extra = {} if position_ids is None else {"position_ids": position_ids}
        hidden = self.llm.body(embeds, attention_mask, **extra)  # [B, T, H]
        kept = image_features if return_image_features else None
        if labels is None:
            return VLMOutput(logits=self.llm.logits(hidden), image_features=kept)
        targets = labels[:, 1:]  # [B, T-1]
        supervised = targets != IGNORE_INDEX
        logits = self.llm.logits(hidden[:, :-1][supervised]).float()  # [K, V]
        count = int(supervised.sum())
        denom = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
        if not per_sequence:
            loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
            return VLMOutput(loss=loss / denom, num_tokens=count, image_features=kept)
        losses = F.cross_entropy(logits, targets[supervised], reduction="none")  # [K]
        rows = supervised.nonzero()[:, 0]  # [K]: the row of each supervised token
        return VLMOutput(
            loss=losses.sum() / denom,
            num_tokens=count,
            sequence_logps=-losses.new_zeros(len(labels)).index_add(0, rows, losses),  # [B]
            sequence_tokens=supervised.sum(dim=1),  # [B]
            image_features=kept,
        )

    def _features(self, pixel_values: Images) -> Images:
        """The vision features of ``pixel_values`` (an :class:`ImageBatch` keeps its layout)."""
        features = self.vision(pixel_values)  # [U, N, Dv]
        if isinstance(pixel_values, ImageBatch):
            return replace(pixel_values, values=features)
        return features

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: Images | None = None,
        video_values: ImageBatch | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids ``[B, new]`` for left-padded prompts (KV cache on by default)."""
        embeds = self.embed(input_ids, pixel_values, video_values=video_values)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.llm.generate(embeds, attention_mask, **generate_kwargs)

    def generate(
        self,
        prompts: Sequence[str | Turns],
        images: Sequence[ImageInput] | None = None,
        *,
        raw: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Decoded answers, one per prompt.

        A prompt is a question (one human turn) or a conversation (turns ending with a human
        turn); it is rendered with the model's chat template (``template=`` overrides it) and
        generation stops at the template's end of turn, exactly as in training. ``images``
        holds one entry per prompt (an image, a list of images, or None); ``<image>`` markers
        say where they go (one image without a marker goes before the question). Keyword
        arguments: see :func:`vlm_adapters.model.generation.generate_ids`. With ``raw=True`` the
        prompts are plain text with no template (special-token strings in them stay text),
        and ``kwargs`` go to transformers' ``generate``.
        """
        if raw:
            batch = self.processor(prompts, images, padding_side="left")
            device = self.llm.device
            batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
            ids = self.generate_ids(**batch, **kwargs)
            return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        conversations = [
            [{"from": "human", "value": p}] if isinstance(p, str) else p for p in prompts
        ]
        return generation.generate(self, conversations, images, **kwargs)

    def save_pretrained(
        self, directory: str | Path, *, overwrite: bool = False, protect: tuple[Path, ...] = ()
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer, atomically.

        An earlier save to ``directory`` is replaced; other files there are kept. A non-empty
        directory we did not write is refused unless ``overwrite``, and ``protect`` (e.g. the
        checkpoint this model came from) is never written. With LoRA, ``model.safetensors``
        holds the base weights under their plain names and each adapter is written in peft's
        layout (``adapter/``, ``vision_adapter/``).
        """
        return io.save(self, directory, overwrite=overwrite, protect=protect)

    def checkpoint_config(self) -> dict[str, Any]:
        """Every component with the kwargs that rebuild it offline, plus package versions."""
        return io.checkpoint_config(self)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        trust_remote_code: bool = False,
        dtype: io.DTypeLike = None,
        device_map: io.DeviceMap = None,
        revision: str | None = None,
    ) -> VisionLanguageModel:
        """Load a directory written by :meth:`save_pretrained` (no network access needed), or a
        hub id of one (its configs, safetensors and tokenizer files are downloaded, at
        ``revision`` when given).

        ``dtype`` as in transformers: ``"auto"`` or None keeps the dtypes the checkpoint
        records; a floating torch dtype (or its name, e.g. ``"bfloat16"``) builds every
        component in it. ``device_map`` places the whole model on one device: ``"cpu"``,
        ``"cuda"``, ``"cuda:1"``, ``"mps"``, a device index, ``{"": device}``, or ``"auto"`` (the
        first accelerator, else the CPU); splitting a model across devices (other dicts,
        ``"balanced"``) is refused. A quantized (bitsandbytes) checkpoint takes neither.

        Only JSON and safetensors are read. A checkpoint never enables code: one whose config
        asks for ``trust_remote_code`` is refused unless you pass ``trust_remote_code=True``,
        and one that names weights or files outside itself is refused.
        """
        return io.load(
            cls,
            source,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            device_map=device_map,
            revision=revision,
        )


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, each module's own mode restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _image_tokens(vision: VisionBackbone, connector: Connector, types: dict[str, str]) -> int:
    """The visual tokens of one image (the most, for variable-size vision)."""
    if vision.tiling is not None:
        return vision.transform.max_tokens
    native = isinstance(vision.transform, VariableTransform)  # a NaFlex tower
    name = types.get("connector", type(connector).__name__)
    return image_token_bound(vision.num_patches, native, None, connector.cfg, name)


def _tiled(
    vision: VisionBackbone, connector: Connector, name: str, tiling: TilingConfig
) -> VisionBackbone:
    """``vision`` run on AnyRes tiles; the connector learns the end-of-row token."""
    check_tileable(isinstance(vision.transform, VariableTransform))
    side = tile_token_side(vision.num_patches, connector.cfg, name)
    connector.add_image_newline()
    return tiling.around(vision, side)


def _dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None else default
