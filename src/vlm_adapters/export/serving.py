"""Whether vLLM's native LLaVA / LLaVA-NeXT classes load a model's transformers LLaVA export.

vLLM does not run transformers' LLaVA classes: it has its own
(``vllm/model_executor/models/llava.py``, ``llava_next.py``), which build the vision tower only
from a ``CLIPVisionConfig``, ``SiglipVisionConfig`` or ``PixtralVisionConfig`` (anything else
fails with "Unsupported vision config"), a projector that is always
``linear_1 (vision width -> LLM width)``, an activation from vLLM's ``get_act_fn`` and
``linear_2 (LLM width -> LLM width)``, and the LLM from vLLM's own registry of text
architectures. A model that transformers loads can still fail there; :func:`vllm_report` says
so before anyone tries, with every reason that applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlm_adapters.connectors.simple import LinearConnector, MLPConnector
from vlm_adapters.export.support import check_exportable
from vlm_adapters.llm.hf import HFLLM
from vlm_adapters.vision.hf import HFVisionBackbone

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

VLLM_VISION_CONFIGS = ("CLIPVisionConfig", "SiglipVisionConfig", "PixtralVisionConfig")
"""The vision config classes vLLM's ``init_vision_tower_for_llava`` builds a tower from."""

VLLM_ACTIVATIONS = frozenset(
    {
        "gelu",
        "gelu_fast",
        "gelu_new",
        "gelu_pytorch_tanh",
        "relu",
        "relu2",
        "silu",
        "quick_gelu",
        "tanh",
        "sigmoid",
    }
)
"""``projector_hidden_act`` values vLLM's ``get_act_fn`` knows (its ``_ACTIVATION_REGISTRY`` in
``vllm/model_executor/layers/activation.py``); it has no ``linear``."""

VLLM_TEXT_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
        "PhiForCausalLM",
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "OPTForCausalLM",
        "StableLmForCausalLM",
        "Starcoder2ForCausalLM",
        "OlmoForCausalLM",
        "Olmo2ForCausalLM",
        "GraniteForCausalLM",
        "InternLM2ForCausalLM",
    }
)
"""Causal-LM classes vLLM serves natively, a deliberately small subset of
``_TEXT_GENERATION_MODELS`` in ``vllm/model_executor/models/registry.py`` (vLLM main, 2025):
the families people put under LLaVA. An architecture missing here may still be served by vLLM;
the report then says it is not known to be."""


@dataclass(frozen=True)
class ServingReport:
    """Whether vLLM's native LLaVA classes load the export, and every reason they would not."""

    reasons: tuple[str, ...] = ()

    @property
    def native(self) -> bool:
        return not self.reasons

    def line(self) -> str:
        """``vLLM: native`` or ``vLLM: not native, because <reason>; <reason>``."""
        if self.native:
            return "vLLM: native"
        return "vLLM: not native, because " + "; ".join(self.reasons)


def vllm_report(model: VisionLanguageModel) -> ServingReport:
    """Judge whether ``model``, exported as transformers LLaVA (LLaVA-NeXT when tiled), loads in
    vLLM's native ``LlavaForConditionalGeneration`` (``LlavaNextForConditionalGeneration``): the
    tower's config class, the projector's shape and activation, and the LLM's architecture.
    Works on any model, also one the export refuses (which is then a reason too)."""
    reasons = [*_vision_reasons(model), *_connector_reasons(model), *_llm_reasons(model)]
    if check_exportable(model):  # its reasons: `check_exportable`, the export's refusal
        reasons.append("vlm-adapters does not export it to the transformers LLaVA format at all")
    return ServingReport(tuple(reasons))


def _vision_reasons(model: VisionLanguageModel) -> list[str]:
    vision = model.vision.untiled()
    kind = model.component_types.get("vision", type(vision).__name__)
    if not isinstance(vision, HFVisionBackbone):
        return [
            f"its vision tower (type {kind!r}: {type(vision).__name__}) is not a transformers "
            f"CLIP, SigLIP or Pixtral vision model, the only towers vLLM's LLaVA builds "
            f"({', '.join(VLLM_VISION_CONFIGS)})"
        ]
    config = vision.tower.config
    reasons = []
    if not any(cls.__name__ in VLLM_VISION_CONFIGS for cls in type(config).__mro__):
        reasons.append(
            f"its vision tower's config is a {type(config).__name__} ({config.model_type!r}); "
            f"vLLM's LLaVA builds only {', '.join(VLLM_VISION_CONFIGS)} towers "
            '("Unsupported vision config")'
        )
    layers = vision.cfg.feature_layer
    if isinstance(layers, list) and len(layers) > 1:
        reasons.append(
            f"it concatenates {len(layers)} vision layers ({layers}), but vLLM's LLaVA projector "
            "reads one layer (its linear_1 takes the tower's hidden size)"
        )
    return reasons


def _connector_reasons(model: VisionLanguageModel) -> list[str]:
    connector = model.connector
    kind = model.component_types.get("connector", type(connector).__name__)
    if isinstance(connector, LinearConnector) or (
        isinstance(connector, MLPConnector) and connector.cfg.depth == 1
    ):
        return [
            f"its {kind!r} connector is one linear layer, written as projector_hidden_act "
            "'linear', which vLLM's get_act_fn does not know (vLLM's projector is "
            "Linear-activation-Linear: use an `mlp` connector of depth 2)"
        ]
    if not isinstance(connector, MLPConnector):
        return [
            f"its connector {kind!r} is not Linear-activation-Linear, the only projector "
            "vLLM's LLaVA has"
        ]
    cfg, reasons = connector.cfg, []
    if cfg.depth > 2:
        reasons.append(f"its mlp connector has {cfg.depth} layers; vLLM's LLaVA projector has two")
    if cfg.hidden_dim not in (None, connector.out_dim):
        reasons.append(
            f"its mlp connector's inner width is {cfg.hidden_dim}; vLLM's projector uses the "
            f"LLM width ({connector.out_dim})"
        )
    if cfg.activation not in VLLM_ACTIVATIONS:
        reasons.append(f"vLLM's get_act_fn does not know the activation {cfg.activation!r}")
    return reasons


def _llm_reasons(model: VisionLanguageModel) -> list[str]:
    llm = model.llm
    if not isinstance(llm, HFLLM):
        kind = model.component_types.get("llm", type(llm).__name__)
        return [f"its LLM ({kind!r}) is not a transformers causal LM that vLLM could rebuild"]
    architecture = type(llm.transformers_model).__name__
    if architecture not in VLLM_TEXT_ARCHITECTURES:
        return [
            f"its LLM architecture {architecture} is not among the text architectures "
            "vLLM is known to serve natively"
        ]
    return []


def text_architecture(model: VisionLanguageModel) -> str | None:
    """The LLM's transformers class name (what ``text_config.architectures`` names), if any."""
    llm = model.llm
    return type(llm.transformers_model).__name__ if isinstance(llm, HFLLM) else None
