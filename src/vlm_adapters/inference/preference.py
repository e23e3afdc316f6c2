"""Score preference pairs with a model: each answer's summed log-probability (`pair_forward`,
the sample's images computed once for both answers) and the reward accuracy of a file of pairs
(`evaluate_preferences`) against a reference model, or without one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm_adapters.data.pairs import PairCollator, PreferenceDataset
from vlm_adapters.data.records import Skipped
from vlm_adapters.errors import DataError
from vlm_adapters.model.core import evaluating
from vlm_adapters.model.generation import resolve_template
from vlm_adapters.model.lora import adapters_disabled, has_lora

if TYPE_CHECKING:
    from vlm_adapters.model import VisionLanguageModel
    from vlm_adapters.model.core import VLMOutput

Batch = dict[str, Any]


def pair_forward(model: nn.Module, batch: Batch, **extra: Any) -> VLMOutput:
    """A pair batch (`PairCollator`) through ``model``: ``sequence_logps`` ``[2P]`` (each
    row's summed answer log-probability: the chosen rows, then the rejected rows) and
    ``sequence_tokens`` ``[2P]``; the images (or the batch's cached features, or ``extra``'s
    ``image_features``) are encoded once for both rows."""
    features = extra.pop("image_features", batch.get("image_features"))
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=None if features is not None else batch["pixel_values"],
        labels=batch["labels"],
        image_features=features,
        shared_images=2,
        per_sequence=True,
        **extra,
    )


def evaluate_preferences(
    model: VisionLanguageModel,
    records: Sequence[Mapping[str, Any]],
    image_root: str | Path,
    template: str | None = None,
    batch_size: int = 16,
    reference: VisionLanguageModel | None = None,
    *,
    source: str | Path = "",
) -> dict[str, Any]:
    """Reward accuracy of ``model`` on pair ``records``: the share of pairs whose chosen
    answer gains more log-probability over the reference than the rejected one (DPO's
    implicit reward, whatever beta). The reference is ``reference`` when given, else the
    model with its LoRA adapters off when it has some (``reference``: "adapters"), else none:
    the share of pairs whose chosen answer is the more likely (``reference``: "none").
    Returns ``reward_accuracy``, ``reward_margin`` (mean log-ratio margin, beta 1),
    ``logps_chosen``, ``logps_rejected`` (means), ``n``, ``skipped``, ``reference`` and
    ``template``. Bad pairs are skipped and counted."""
    template = resolve_template(model, template)
    dataset = PreferenceDataset.for_model(
        model, records, image_root=image_root, template=template, source=str(source)
    )
    kept, skipped = dataset.precheck()
    kind = "model" if reference is not None else "adapters" if has_lora(model) else "none"
    rows = _scored(model, reference, kind, kept, batch_size, skipped)
    if not rows:
        raise DataError(f"{source or 'the pairs'}: no usable pair ({len(skipped)} skipped)")
    table = torch.tensor(rows, dtype=torch.float64)  # [n, 4]: chosen, rejected, refs
    margins = (table[:, 0] - table[:, 2]) - (table[:, 1] - table[:, 3])
    return {
        "reward_accuracy": float((margins > 0).double().mean()),
        "reward_margin": float(margins.mean()),
        "logps_chosen": float(table[:, 0].mean()),
        "logps_rejected": float(table[:, 1].mean()),
        "n": len(rows),
        "skipped": len(skipped),
        "reference": kind,
        "template": template,
    }


@torch.no_grad()
def _scored(
    model: VisionLanguageModel,
    reference: VisionLanguageModel | None,
    kind: str,
    dataset: PreferenceDataset,
    batch_size: int,
    skipped: list[Skipped],
) -> list[tuple[float, float, float, float]]:
    """Per pair: the model's and the reference's (0 without one) summed log-probabilities."""
    collate = PairCollator(model.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    rows = []
    with evaluating(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate(
                [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            )
            skipped += batch["skipped"]
            if not batch["pairs"]:
                continue
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            policy = pair_forward(model, batch).sequence_logps.double().cpu()
            ref = torch.zeros_like(policy)
            if kind == "adapters":
                with adapters_disabled(model):
                    ref = pair_forward(model, batch).sequence_logps.double().cpu()
            elif reference is not None:
                with evaluating(reference):
                    ref = pair_forward(reference, batch).sequence_logps.double().cpu()
            pairs = batch["pairs"]
            rows += zip(policy[:pairs].tolist(), policy[pairs:].tolist(),
                        ref[:pairs].tolist(), ref[pairs:].tolist())  # fmt: skip
    return rows
