"""Reading transformers' LLaVA and LLaVA-NeXT formats (``Llava(Next)ForConditionalGeneration`` +
its processor) as a :class:`VisionLanguageModel`: config.json is checked first, only safetensors
are read, and a checkpoint whose weights do not match its class exactly (missing, unexpected or
reshaped tensors) is refused, never half-loaded. One import serves both formats; what LLaVA-NeXT
adds (tiling, the end-of-row token) is :mod:`vlm_adapters.export.hf_llava_next_read`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_adapters._transformers import load_or_explain
from vlm_adapters.chat.templates import DEFAULT_TEMPLATE, TEMPLATES
from vlm_adapters.connectors.base import ACTIVATIONS
from vlm_adapters.errors import ExportError
from vlm_adapters.export.hf_llava_next_read import LlavaNextFormat
from vlm_adapters.export.hf_llava_onevision import LlavaOnevisionFormat
from vlm_adapters.model.core import VisionLanguageModel
from vlm_adapters.model.io import asks_for_remote_code
from vlm_adapters.vision.hf import HFVisionBackbone
from vlm_adapters.vision.hf_processor import processor_config

META_NAME = "vlm_adapters.json"
"""Written beside an export: the chat template name and package versions."""
PROJECTOR_ACTIVATIONS = tuple(ACTIVATIONS)
"""LLaVA projector activations that have an ``mlp`` connector counterpart."""


class LlavaFormat:
    """What the plain LLaVA format adds to the common import: the checkpoint's image processor
    as the tower's preprocessing, nothing more."""

    def model_class(self) -> type[nn.Module]:
        """transformers' class for this format."""
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def vision_options(self, config: Any, processor: Any, source: str) -> dict[str, Any]:
        """The vision section's preprocessing: the checkpoint's image processor as it stands."""
        return {"image_processor": processor_config(processor.image_processor)}

    def backbone(self, model: VisionLanguageModel) -> HFVisionBackbone:
        """The transformers tower's backbone: ``model.vision`` itself."""
        return model.vision

    def finish(
        self, llava: nn.Module, model: VisionLanguageModel, processor: Any, source: str
    ) -> None:
        """Checks and weights beyond the tower, LLM and projector (none here)."""


FORMATS = {
    "llava": LlavaFormat(),
    "llava_next": LlavaNextFormat(),
    "llava_onevision": LlavaOnevisionFormat(),
}
"""Each transformers ``model_type`` vlm-adapters imports, with what it adds."""
MODEL_TYPES = tuple(FORMATS)
"""The transformers ``model_type`` values vlm-adapters imports."""


def from_hf_llava(path: str | Path, template: str | None = None) -> VisionLanguageModel:
    """Load a transformers LLaVA or LLaVA-NeXT checkpoint (directory or hub id) as a trainable
    model; anything it cannot represent exactly is refused with the reason.

    ``template`` (default: the one recorded by the export, else vicuna_v1) is the chat
    template the model is used with from then on. Only safetensors weights are read.
    """
    from transformers import AutoProcessor

    source = str(path)
    form = FORMATS[check_source(source)]
    llava = load_exactly(form.model_class(), source)
    processor = load_or_explain("import", source, lambda: AutoProcessor.from_pretrained(source))
    options = form.vision_options(llava.config, processor, source)
    model = VisionLanguageModel.from_config(model_config(llava, processor, source, options))
    form.finish(llava, model, processor, source)
    backbone = form.backbone(model)
    check_strategy(llava.config, backbone)
    copy_weights(llava, model, backbone.tower)
    return with_template(model, path, template)


def check_source(source: str) -> str:
    """Read only ``config.json`` and refuse anything but a LLaVA (or LLaVA-NeXT) checkpoint
    with safetensors weights, before any model is built; returns its ``model_type``."""
    from transformers import AutoConfig

    local = Path(source)
    if local.is_dir():
        model_type = _local_model_type(local)
    else:
        config = load_or_explain("import", source, lambda: AutoConfig.from_pretrained(source))
        model_type = config.model_type
    if model_type not in MODEL_TYPES:
        classes = (
            "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration or "
            "LlavaOnevisionForConditionalGeneration"
        )
        raise ExportError(
            f"{source}: not a transformers LLaVA checkpoint (model_type {model_type!r}); "
            f"import reads {classes} checkpoints"
        )
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ExportError(
            f"{source}: no .safetensors weights; vlm-adapters never unpickles .bin files: "
            "convert them with transformers (save_pretrained writes safetensors) first"
        )
    return model_type


def load_exactly(model_class: Any, source: str) -> nn.Module:
    """``model_class.from_pretrained(source)`` from safetensors, refused unless every weight
    of the checkpoint is one of the class's, in its shape, and none is missing."""
    model, info = load_or_explain(
        "import",
        source,
        lambda: model_class.from_pretrained(source, use_safetensors=True, output_loading_info=True),
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ExportError(
                f"{source}: the weights do not fit {model_class.__name__} "
                f"({kind.replace('_', ' ')}: {shown}); refusing to load it half"
            )
    return model


def with_template(
    model: VisionLanguageModel, path: str | Path, template: str | None
) -> VisionLanguageModel:
    """``model`` with its chat template: ``template``, else the export's, else vicuna_v1."""
    model.template = template or _recorded_template(Path(path)) or DEFAULT_TEMPLATE
    if model.template not in TEMPLATES:
        raise ExportError(f"{path}: unknown chat template {model.template!r}; pass --template")
    return model


def model_config(
    llava: nn.Module, processor: Any, path: str, vision_options: dict[str, Any]
) -> dict[str, Any]:
    """Our model config for a transformers LLaVA(-NeXT) and its processor;
    ``vision_options`` adds the vision section's preprocessing (and tiling)."""
    config = llava.config
    dtype = str(llava.dtype).removeprefix("torch.")
    vision = {
        "type": "hf",
        "config": _plain(config.vision_config),
        "feature_layer": config.vision_feature_layer,
        **vision_options,
        "dtype": dtype,
    }
    tokenizer = processor.tokenizer
    llm = {
        "type": "hf",
        "config": _plain(config.text_config),
        "tokenizer": path,
        "image_token": processor.image_token,
        "pad_token": tokenizer.pad_token or tokenizer.eos_token or tokenizer.unk_token,
        "dtype": dtype,
    }
    return {"vision": vision, "connector": _connector_section(config), "llm": llm}


def _plain(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    data.pop("dtype", None)
    return data


def _connector_section(config: Any) -> dict[str, Any]:
    act = config.projector_hidden_act
    if act == "linear":
        return {"type": "linear"}
    if act not in PROJECTOR_ACTIVATIONS:
        raise ExportError(
            f"projector_hidden_act {act!r} has no vlm-adapters connector; supported: "
            f"linear, {', '.join(PROJECTOR_ACTIVATIONS)}"
        )
    return {"type": "mlp", "depth": 2, "activation": act}


def check_strategy(config: Any, vision: HFVisionBackbone) -> None:
    """LLaVA drops one token ("default") or none ("full"); ours drops the tower's prefix."""
    dropped = 1 if config.vision_feature_select_strategy == "default" else 0
    if dropped != vision.num_prefix:
        raise ExportError(
            f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} drops "
            f"{dropped} token(s) but the {config.vision_config.model_type!r} tower has "
            f"{vision.num_prefix} prefix token(s); vlm-adapters always drops exactly the prefix"
        )


def copy_weights(llava: nn.Module, model: VisionLanguageModel, tower: nn.Module) -> None:
    """The tower, LLM and projector weights of a transformers LLaVA(-NeXT) into ``model``."""
    llm = model.llm.transformers_model
    tower.load_state_dict(llava.model.vision_tower.state_dict())
    llm.get_decoder().load_state_dict(llava.model.language_model.state_dict())
    llm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict())
    projector = llava.model.multi_modal_projector
    layers = [m for m in model.connector.proj if isinstance(m, nn.Linear)]
    with torch.no_grad():
        if len(layers) == 1:  # "linear" activation: the two layers fold into one
            first, second = projector.linear_1, projector.linear_2
            layers[0].weight.copy_(second.weight @ first.weight)
            layers[0].bias.copy_(second.weight @ _bias(first) + _bias(second))
            return
        for ours, theirs in zip(layers, (projector.linear_1, projector.linear_2)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(_bias(theirs))


def _bias(linear: nn.Linear) -> torch.Tensor:
    """The layer's bias, or zeros when ``multimodal_projector_bias`` is off."""
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _local_model_type(directory: Path) -> str | None:
    """``model_type`` of a local checkpoint's ``config.json`` (read as plain JSON)."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{directory}: no config.json; is it a checkpoint directory?") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a checkpoint config")
    if data.get("format") == "vlm-adapters":
        raise ExportError(
            f"{directory}: not a transformers LLaVA checkpoint but a vlm-adapters one already; "
            "use it directly"
        )
    return data.get("model_type")


def ignored_code_request(source: str) -> str | None:
    """The key (``trust_remote_code`` at any depth) by which a local checkpoint's config.json
    asks to run code shipped with it: import never does, whatever the checkpoint says."""
    path = Path(source) / "config.json"
    return asks_for_remote_code(json.loads(path.read_text())) if path.is_file() else None


def _recorded_template(path: Path) -> str | None:
    meta = path / META_NAME
    try:
        data = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError):
        raise ExportError(f"{meta}: not valid JSON; remove it or fix it") from None
    return data.get("template") if isinstance(data, dict) else None
