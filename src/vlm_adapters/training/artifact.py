"""The stage-1 artifact: the aligned connector's weights plus the signature of what it fits.

``connector.json`` records the vision backbone (type and a hash of its architecture), the
feature layer, the patch count and width it reads, the visual-token count and LLM width it
writes, and the connector's own type and kwargs. Loading onto a model that differs in any of
these fails with an error naming each difference instead of loading weights that do not fit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_model, save_model

from vlm_adapters._io import atomic_dir, package_versions
from vlm_adapters.errors import CheckpointError

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel

WEIGHTS_NAME = "connector.safetensors"
CONFIG_NAME = "connector.json"
FORMAT = "vlm-adapters-connector"

_LABELS = {
    "vision_type": "vision backbone type",
    "vision_arch_sha256": "vision backbone architecture (sha256 of its config)",
    "feature_layer": "vision feature layer",
    "num_patches": "number of input patches",
    "vision_hidden_size": "vision hidden size",
    "num_visual_tokens": "number of visual tokens",
    "llm_hidden_size": "LLM hidden size",
    "connector_type": "connector type",
    "connector_config": "connector config",
}
# keys that do not change what a backbone computes from its weights
_RUNTIME_KEYS = frozenset(
    {
        "feature_layer",
        "pretrained",
        "revision",
        "torch_dtype",
        "dtype",
        "trust_remote_code",
        "attn_implementation",
        "_attn_implementation_autoset",
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "architectures",
        "use_cache",
        "output_hidden_states",
        "return_dict",
        "image_mean",
        "image_std",
        "image_processor",
    }
)


def connector_signature(model: VisionLanguageModel) -> dict[str, Any]:
    """What the connector of ``model`` was built to read and to produce."""
    vision = model.vision.rebuild_kwargs()
    return {
        "vision_type": model.component_types["vision"],
        "vision_arch_sha256": _digest(vision),
        "feature_layer": _feature_layers(vision),
        "num_patches": model.vision.num_patches,
        "vision_hidden_size": model.vision.hidden_size,
        "num_visual_tokens": model.num_image_tokens,
        "llm_hidden_size": model.llm.hidden_size,
        "connector_type": model.component_types["connector"],
        "connector_config": model.connector.rebuild_kwargs(),
    }


def save_connector(model: VisionLanguageModel, directory: str | Path) -> Path:
    """Write ``connector.safetensors`` and ``connector.json`` (signature) atomically."""
    meta = {
        "format": FORMAT,
        "signature": connector_signature(model),
        "vision_model": getattr(getattr(model.vision, "cfg", None), "model", None),
        "versions": package_versions("vlm-adapters", "torch", "transformers"),
    }
    with atomic_dir(directory) as tmp:
        save_model(model.connector, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return Path(directory)


def load_connector(model: VisionLanguageModel, directory: str | Path) -> None:
    """Load a saved connector onto ``model``; ValueError naming every signature mismatch."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a stage-1 connector?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a vlm-adapters connector (format={meta.get('format')!r})"
        )
    problems = signature_mismatches(meta["signature"], connector_signature(model))
    if problems:
        raise CheckpointError(
            f"connector at {directory} does not fit this model: " + "; ".join(problems)
        )
    load_model(model.connector, str(directory / WEIGHTS_NAME), strict=True)


def signature_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One readable line per field where ``saved`` and ``current`` differ."""
    problems = []
    for key, label in _LABELS.items():
        old, new = saved.get(key), current.get(key)
        if old != new:
            problems.append(f"connector was aligned for {label} {old!r} but this model has {new!r}")
    return problems


def _feature_layers(vision: dict[str, Any]) -> Any:
    """The feature layer(s) of a backbone's kwargs (a list per member for fused backbones)."""
    if "backbones" in vision:
        return [_feature_layers(member) for member in vision["backbones"]]
    return vision.get("feature_layer")


def _digest(kwargs: dict[str, Any]) -> str:
    text = json.dumps(_strip(kwargs), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _RUNTIME_KEYS}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return value
