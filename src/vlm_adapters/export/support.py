"""What the transformers LLaVA export supports: :func:`check_exportable` names every component
of a model that transformers' LLaVA (LLaVA-NeXT when tiled) classes cannot compute exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vlm_adapters.connectors.simple import LinearConnector, MLPConnector
from vlm_adapters.export.hf_llava_onevision import onevision_reason
from vlm_adapters.geometry import AnyResLayout
from vlm_adapters.llm.hf import HFLLM
from vlm_adapters.vision.base import VisionBackbone
from vlm_adapters.vision.hf import HFVisionBackbone
from vlm_adapters.vision.hf_processor import NaFlexTransform, ProcessorTransform

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel


def check_exportable(model: VisionLanguageModel) -> str | None:
    """Why ``model`` cannot be written as a transformers LLaVA (LLaVA-NeXT when tiled)
    checkpoint, every unsupported component named (``; ``-separated), or None if it can."""
    layout = model.vision.layout
    reasons = [
        _tiling_reason(layout, model.vision.untiled()) if layout is not None else None,
        _vision_reason(model.vision.untiled()),
        _connector_reason(model),
        _llm_reason(model.llm),
        onevision_reason(model),
    ]
    return "; ".join(reason for reason in reasons if reason) or None


def _tiling_reason(layout: AnyResLayout, backbone: VisionBackbone) -> str | None:
    tower = getattr(backbone, "tower", None)
    size = getattr(getattr(tower, "config", None), "image_size", None)
    if size is not None and size != layout.tile:
        return (
            f"its tiles are {layout.tile} pixels but the tower's config says image_size "
            f"{size}, which LLaVA-NeXT takes as the tile size"
        )
    return None


def _vision_reason(vision: nn.Module) -> str | None:
    if not isinstance(vision, HFVisionBackbone):
        return (
            f"the vision backbone is a {type(vision).__name__}, not a transformers vision model; "
            "LLaVA needs a tower such as CLIP or SigLIP (vision type `hf`)"
        )
    if isinstance(vision.transform, NaFlexTransform):
        return (
            "its NaFlex tower (SigLIP2) needs each image's patch grid, which transformers' LLaVA "
            "classes do not give their vision tower"
        )
    if vision.num_prefix > 1:
        return (
            f"the vision tower puts {vision.num_prefix} prefix tokens (CLS + registers) before "
            "the patches, and LLaVA's feature selection can drop only one"
        )
    if not isinstance(vision.transform, ProcessorTransform):
        return (
            f"its preprocessing is a {type(vision.transform).__name__}, not a transformers "
            "image processor that the LLaVA processor could hold"
        )
    return None


def _connector_reason(model: VisionLanguageModel) -> str | None:
    connector = model.connector
    if isinstance(connector, LinearConnector):
        return None
    if not isinstance(connector, MLPConnector):
        return (
            f"the connector {model.component_types.get('connector', type(connector).__name__)!r} "
            "has no counterpart in LLaVA's projector (linear, activation, linear); use "
            "connector type `linear` or `mlp`"
        )
    cfg = connector.cfg
    if cfg.depth > 2:
        return f"the mlp connector has depth {cfg.depth}; LLaVA's projector has two layers"
    if cfg.depth == 2 and cfg.hidden_dim not in (None, connector.out_dim):
        return (
            f"the mlp connector's inner width is {cfg.hidden_dim}; LLaVA's projector uses the "
            f"LLM width ({connector.out_dim})"
        )
    return None


def _llm_reason(llm: nn.Module) -> str | None:
    from transformers import MODEL_MAPPING

    if not isinstance(llm, HFLLM):
        return (
            f"the LLM backend is a {type(llm).__name__}, not a transformers causal LM (llm "
            "type `hf`)"
        )
    config = llm.transformers_model.config
    base = MODEL_MAPPING.get(type(config), None)
    if base is None or not isinstance(llm.transformers_model.get_decoder(), base):
        return f"transformers' AutoModel cannot rebuild the decoder of {config.model_type!r}"
    if getattr(llm.transformers_model.get_output_embeddings(), "bias", None) is not None:
        return "the LLM's output head has a bias, which LLaVA's lm_head lacks"
    if _head_post_processes(llm):
        return (
            f"the {config.model_type!r} LLM post-processes its head output (logit scaling, "
            "soft-capping or a head transform), which LLaVA's plain lm_head does not"
        )
    return None


def _head_post_processes(llm: HFLLM) -> bool:
    """Whether the LLM's logits differ from its bare output embeddings (checked on a probe)."""
    head = llm.transformers_model.get_output_embeddings()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, llm.hidden_size, generator=generator).to(head.weight)  # [K, H]
    with torch.no_grad():
        return not torch.allclose(llm.logits(hidden), head(hidden), rtol=1e-5, atol=1e-6)
