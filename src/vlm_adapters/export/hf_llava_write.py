"""Writing transformers' LLaVA format (``LlavaForConditionalGeneration`` + ``LlavaProcessor``);
with AnyRes tiling (``vision.tiling``), LLaVA-NeXT's (``LlavaNextForConditionalGeneration`` +
``LlavaNextProcessor``); with videos too (``vision.video``), LLaVA-OneVision's
(``LlavaOnevisionForConditionalGeneration`` + ``LlavaOnevisionProcessor``, see
:mod:`~vlm_adapters.export.hf_llava_onevision`).

A model exports when transformers' class can compute exactly what it computes: a transformers
vision tower with a fixed input size and at most one prefix token (CLS) to drop, a ``linear``
connector or a depth-2 ``mlp`` whose inner width is the LLM width, and a causal LM whose
decoder transformers' ``AutoModel`` builds, with a bias-free output head and no logit
soft-capping. A tiled model's tile grids become ``image_grid_pinpoints`` (grids times the
tower's input size) and the connector's ``image_newline`` LLaVA-NeXT's.

Beside the weights and the processor, the export holds a model card (``README.md``, see
:mod:`vlm_adapters.export.card`) with the vLLM serving report (:mod:`~.serving`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_adapters._io import atomic_dir, package_versions, written_by_us
from vlm_adapters.chat.jinja import chat_template_jinja
from vlm_adapters.chat.templates import DEFAULT_TEMPLATE, stop_token_ids
from vlm_adapters.connectors.simple import MLPConnector
from vlm_adapters.errors import ExportError
from vlm_adapters.export.card import CARD_NAME, RunRecord, model_card, read_run
from vlm_adapters.export.hf_llava_onevision import onevision_config, onevision_processor
from vlm_adapters.export.hf_llava_read import META_NAME
from vlm_adapters.export.serving import vllm_report
from vlm_adapters.export.support import check_exportable
from vlm_adapters.vision.base import VisionBackbone
from vlm_adapters.vision.hf import HFVisionBackbone

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

_HINT = "the vlm-adapters format (`model.save_pretrained(dir)`) holds any composition"


def to_hf_llava(
    model: VisionLanguageModel,
    out_dir: str | Path,
    template: str | None = None,
    *,
    overwrite: bool = False,
    protect: tuple[Path, ...] = (),
    run: str | Path | RunRecord | None = None,
    stage: str | None = None,
) -> Path:
    """Write ``model`` for ``LlavaForConditionalGeneration`` / ``AutoProcessor.from_pretrained``,
    with a model card (``README.md``) that holds the vLLM serving report.

    ``template`` (default: the model's training template, else vicuna_v1) becomes the
    processor's and tokenizer's Jinja chat template. LoRA adapters are merged into ``model``
    in place first. ``overwrite`` and ``protect`` work as in ``save_pretrained``; a
    ``README.md`` in ``out_dir`` that vlm-adapters did not write is refused. ``run``: the
    training run folder the model comes from (``stage``: which stage's weights, default the
    last that ran) or that folder read (:func:`~vlm_adapters.export.card.find_run`), whose
    data, stages and evaluation the card describes.
    """
    from vlm_adapters.model.lora import has_lora, is_quantized, merge_lora

    reason = check_exportable(model)
    if reason:
        raise ExportError(f"cannot export to the transformers LLaVA format: {reason}; {_HINT}")
    record = read_run(run, stage) if isinstance(run, (str, Path)) else run
    _refuse_foreign_card(Path(out_dir))
    if has_lora(model) or is_quantized(model):
        merge_lora(model)
    template = template or model.template or DEFAULT_TEMPLATE
    report = vllm_report(model)
    with atomic_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
        llava = _llava_model(model)
        _set_stop_tokens(llava, model.tokenizer, template)
        llava.save_pretrained(tmp)
        _processor(model, template).save_pretrained(tmp)
        meta = {
            "template": template,
            "vllm_native": report.native,
            "vllm_reasons": list(report.reasons),
            "versions": package_versions("vlm-adapters", "transformers"),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
        name = Path(out_dir).resolve().name
        card = model_card(
            model,
            report,
            name=name,
            template=template,
            llava_class=type(llava).__name__,
            run=record,
        )
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
    return Path(out_dir)


def _refuse_foreign_card(out: Path) -> None:
    """An ExportError when ``out`` holds a ``README.md`` that an earlier export did not write
    (the model card would replace it)."""
    card = out / CARD_NAME
    if (card.exists() or card.is_symlink()) and CARD_NAME not in (written_by_us(out) or ()):
        raise ExportError(
            f"{card} exists and was not written by vlm-adapters; the export writes its model "
            "card there: move it, or choose another --out"
        )


def _tower(model: VisionLanguageModel) -> nn.Module:
    """The vision backbone that runs the tower (under AnyRes tiling, the tiled one)."""
    return model.vision.untiled()


def _llava_config(model: VisionLanguageModel) -> Any:
    from transformers import LlavaConfig, LlavaNextConfig

    vision, connector = _tower(model), model.connector
    two_layers = isinstance(connector, MLPConnector) and connector.cfg.depth == 2
    text_config = model.llm.transformers_model.config.to_dict()
    text_config["tie_word_embeddings"] = _tied(model.llm.transformers_model)
    # servers (vLLM) pick the LLM class by name; a config built in memory records none
    text_config["architectures"] = [type(model.llm.transformers_model).__name__]
    common = {
        "vision_config": vision.tower.config.to_dict(),
        "text_config": text_config,
        "image_token_index": model.image_token_id,
        "projector_hidden_act": connector.cfg.activation if two_layers else "linear",
        "vision_feature_select_strategy": "default" if vision.num_prefix else "full",
        "vision_feature_layer": _negative_layers(vision),
        "multimodal_projector_bias": True,
        "tie_word_embeddings": text_config["tie_word_embeddings"],
        "dtype": vision.dtype,
    }
    layout = model.vision.layout
    if model.video_spec is not None:
        return onevision_config(model, common)
    if layout is None:
        return LlavaConfig(**common, image_seq_length=model.num_image_tokens)
    pinpoints = [[r * layout.tile, c * layout.tile] for r, c in layout.grids]
    tile_tokens = connector.num_output_tokens(vision.num_patches)
    return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints, image_seq_length=tile_tokens)


def _negative_layers(vision: HFVisionBackbone) -> int | list[int]:
    """Feature layers counted from the end: transformers treats ``vision_feature_layer=0`` as
    "no hidden states wanted" (it is falsy), so index 0 must be written as ``-(L + 1)``."""
    count = vision.tower.config.num_hidden_layers + 1  # embeddings + every layer
    layers = vision.cfg.feature_layer
    if isinstance(layers, int):
        return layers - count if layers >= 0 else layers
    return [layer - count if layer >= 0 else layer for layer in layers]


def _llava_model(model: VisionLanguageModel) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` (``LlavaNext...``) whose parameters are ``model``'s
    (no copy)."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    tiled = model.vision.tiling is not None
    kind = LlavaNextForConditionalGeneration if tiled else LlavaForConditionalGeneration
    if model.video_spec is not None:
        kind = LlavaOnevisionForConditionalGeneration
    with torch.device("meta"):
        llava = kind(_llava_config(model))
    llm = model.llm.transformers_model
    llava.model.vision_tower.load_state_dict(_tower(model).tower.state_dict(), assign=True)
    if tiled:
        llava.model.image_newline = nn.Parameter(model.connector.image_newline.detach())
    llava.model.language_model.load_state_dict(llm.get_decoder().state_dict(), assign=True)
    head = llm.get_output_embeddings().state_dict()
    if not _tied(llm):  # LLaVA ties only `embed_tokens`: store a separate copy otherwise
        head = {k: v.clone() for k, v in head.items()}
    llava.lm_head.load_state_dict(head, assign=True)
    projector = _projector_state(model.connector)
    llava.model.multi_modal_projector.load_state_dict(projector, assign=True)
    return llava


def _set_stop_tokens(llava: nn.Module, tokenizer: Any, template: str) -> None:
    """Servers stop on ``generation_config.eos_token_id``: make it the template's end of turn."""
    from transformers import GenerationConfig

    llava.generation_config = GenerationConfig(
        eos_token_id=stop_token_ids(tokenizer, template),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _tied(llm: nn.Module) -> bool:
    """Whether the exported head can stay tied (LLaVA ties it to ``embed_tokens`` by name)."""
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    return tied and hasattr(llm.get_decoder(), "embed_tokens")


def _projector_state(connector: nn.Module) -> dict[str, torch.Tensor]:
    """linear_1/linear_2 weights: the MLP's two layers, or the linear layer then an identity."""
    layers = [m for m in connector.proj if isinstance(m, nn.Linear)]
    first = layers[0]
    if len(layers) == 2:
        second = layers[1]
    else:
        eye = torch.eye(first.out_features, dtype=first.weight.dtype)
        second = nn.Linear(first.out_features, first.out_features, dtype=first.weight.dtype)
        second.load_state_dict({"weight": eye, "bias": torch.zeros_like(second.bias)})
    return {
        "linear_1.weight": first.weight,
        "linear_1.bias": first.bias,
        "linear_2.weight": second.weight.detach(),
        "linear_2.bias": second.bias.detach(),
    }


def _processor(model: VisionLanguageModel, template: str) -> Any:
    """A ``LlavaProcessor`` (``LlavaNextProcessor``) that expands ``<image>`` to exactly the
    visual tokens our processor counts for the image."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = chat_template_jinja(template, tokenizer)
    if model.video_spec is not None:
        return onevision_processor(model, tokenizer, template)
    vision = _tower(model)
    kind = LlavaProcessor if model.vision.tiling is None else LlavaNextProcessor
    return kind(
        image_processor=_image_processor(model.vision),
        tokenizer=tokenizer,
        patch_size=vision.tower.config.patch_size,
        vision_feature_select_strategy="default" if vision.num_prefix else "full",
        chat_template=tokenizer.chat_template,
        image_token=model.llm.image_token,
        num_additional_image_tokens=vision.num_prefix,
    )


def _image_processor(vision: VisionBackbone) -> Any:
    """The image processor our preprocessing runs (a copy): the tower's own, so transformers'
    pixels are ours exactly (CLIP-style crop, SigLIP-style resize, DINOv2's, a checkpoint's),
    or the ``LlavaNextImageProcessor`` that tiles with its settings."""
    if vision.tiling is not None:
        return copy.deepcopy(vision.transform.processor)
    return copy.deepcopy(vision.image_processor)
