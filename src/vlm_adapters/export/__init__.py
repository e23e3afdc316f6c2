"""The transformers LLaVA format: written (export, with a model card and a vLLM serving report)
and read (import).

The package is callable: ``vlm_adapters.export(model, out_dir, format="hf-llava")`` is
:func:`export`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vlm_adapters.chat.jinja import chat_template_jinja
from vlm_adapters.errors import ExportError
from vlm_adapters.export.hf_llava_read import from_hf_llava
from vlm_adapters.export.hf_llava_write import to_hf_llava
from vlm_adapters.export.serving import ServingReport, vllm_report
from vlm_adapters.export.support import check_exportable

if TYPE_CHECKING:
    from vlm_adapters.model.core import VisionLanguageModel

FORMATS = ("hf-llava",)
"""The formats :func:`export` writes."""

__all__ = [
    "FORMATS",
    "ExportError",
    "ServingReport",
    "chat_template_jinja",
    "check_exportable",
    "export",
    "from_hf_llava",
    "to_hf_llava",
    "vllm_report",
]


def export(
    model: VisionLanguageModel,
    out_dir: str | Path,
    format: str = "hf-llava",
    *,
    template: str | None = None,
    overwrite: bool = False,
    run: str | Path | None = None,
    stage: str | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` in another format; returns ``out_dir``.

    ``hf-llava``: a ``LlavaForConditionalGeneration`` checkpoint with its processor
    (``LlavaNextForConditionalGeneration`` for a tiled model) and a model card (``README.md``),
    as ``vlm-adapters export`` writes (see :func:`to_hf_llava`): LoRA adapters are merged into
    ``model`` first, and ``template`` (default: the model's, else vicuna_v1) becomes the
    processor's chat template. A model the format cannot express is refused with the reason. A
    non-empty ``out_dir`` not written by vlm-adapters is refused unless ``overwrite``. ``run``
    (and ``stage``): the training run folder the model comes from, which the card describes.
    :func:`vllm_report` says whether vLLM's native LLaVA classes serve the result.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of: {', '.join(FORMATS)}")
    return to_hf_llava(model, out_dir, template, overwrite=overwrite, run=run, stage=stage)


class _CallableModule(ModuleType):
    """This package, callable as :func:`export` (``vlm_adapters.export(model, dir)``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
