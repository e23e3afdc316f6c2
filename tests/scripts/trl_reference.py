"""TRL's ``DPOTrainer`` as a reference for one batch of preference pairs (a test helper).

:func:`trl_dpo_step` builds the trainer on a transformers LLaVA checkpoint (an export of a
vlm-adapters model), collates the pairs with TRL's own collator, and runs TRL's loss once,
forward and backward, without a training run: it returns the collated batch, the loss, each
pair's log-probabilities and implicit rewards, and the gradient of every trainable parameter.
Our names for the parameters are mapped to the checkpoint's by :func:`llava_name`.

TRL 1.16's conventions, which the comparison relies on:

- a pair is ``prompt`` / ``chosen`` / ``rejected`` conversations plus ``images``; the prompt is
  rendered with the chat template's generation prompt and the answers as the rest of the
  rendered conversation, each tokenized on its own without special tokens, the prompt through
  the processor (which expands ``<image>`` to the visual tokens);
- the batch is every chosen sequence, then every rejected one, right-padded, the images given
  twice (the tower runs once per answer); the completion mask marks the answer tokens;
- ``max_length`` (default 1024) cuts the end of each sequence (``keep_start``); the pairs used
  here are far shorter, so nothing is cut;
- log-probabilities are summed over the answer tokens; ``rewards`` are always
  ``beta * (logp - ref_logp)`` of the summed log-probabilities, also for IPO, whose loss uses
  the per-token averages (its ``(h - 1/(2 beta))**2`` on ``h`` = the difference of the average
  log-ratios); the ``sigmoid`` loss ignores ``label_smoothing`` (TRL's ``robust`` loss uses it);
- the loss is the mean over pairs; with LoRA (peft) the reference is the model with its
  adapters disabled, otherwise the ``ref_model`` given.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_PREFIXES = (
    ("vision.tower.", "model.vision_tower."),
    ("connector.proj.0.", "model.multi_modal_projector.linear_1."),
    ("connector.proj.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.model.", "model.language_model."),
    ("llm.model.lm_head.", "lm_head."),
)


def llava_name(name: str) -> str:
    """The transformers LLaVA name of one of our parameters (a CLIP-style tower, a depth-2
    ``mlp`` connector and an ``hf`` LLM), with peft's wrapper prefixes dropped on both sides."""
    name = name.replace("base_model.model.", "")
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(f"no LLaVA name for parameter {name!r}")


def plain_name(name: str) -> str:
    """A parameter name of the TRL side with peft's wrapper prefix dropped."""
    return re.sub(r"^base_model\.model\.", "", name)


@dataclass
class TrlStep:
    """What TRL computed for one batch."""

    batch: dict[str, torch.Tensor]
    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    grads: dict[str, torch.Tensor]


def trl_dpo_step(
    checkpoint: str | Path,
    pairs: list[dict[str, Any]],
    *,
    loss_type: str,
    beta: float,
    trainable: set[str] | None = None,
    lora: Any = None,
    lora_weights: dict[str, torch.Tensor] | None = None,
    reference: str | Path | None = None,
    out_dir: str | Path,
) -> TrlStep:
    """One TRL DPO forward and backward on ``pairs`` (TRL's conversational format).

    Full training: ``trainable`` names the LLaVA parameters that train (the rest are frozen),
    and the reference is ``reference`` (a checkpoint; default: a second copy of ``checkpoint``).
    LoRA: ``lora`` is a peft config, ``lora_weights`` the value of every adapter parameter to
    start from (by plain LLaVA name), and ``trainable`` any base parameters that train beside
    the adapters; the reference is the model with its adapters off.
    """
    from datasets import Dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    reference = reference or checkpoint
    ref_model = None if lora else LlavaForConditionalGeneration.from_pretrained(reference)
    if lora is None:
        for name, param in model.named_parameters():
            param.requires_grad_(name in (trainable or set()))
    args = DPOConfig(
        output_dir=str(out_dir),
        loss_type=[loss_type],
        beta=beta,
        per_device_train_batch_size=len(pairs),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=AutoProcessor.from_pretrained(checkpoint),
        peft_config=lora,
    )
    if lora is not None:
        _set_lora(trainer.model, lora_weights or {}, trainable or set())
    batch = _collate(trainer, pairs)
    return _forward_backward(trainer, batch)


def _collate(trainer: Any, pairs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """TRL's vision preference collator on copies of ``pairs`` (it edits its examples)."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    collator = DataCollatorForVisionPreference(
        processor=trainer.processing_class, max_length=trainer.args.max_length
    )
    return dict(collator([copy.copy(pair) for pair in pairs]))


def _set_lora(model: Any, weights: dict[str, torch.Tensor], trainable: set[str]) -> None:
    """Start the adapters from ``weights`` and let the ``trainable`` base parameters train."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            plain = plain_name(name)
            if "lora_" in name:
                param.copy_(weights[plain])
            elif plain in trainable:
                param.requires_grad_(True)


def _forward_backward(trainer: Any, batch: dict[str, torch.Tensor]) -> TrlStep:
    """``trainer.compute_loss`` once, its per-pair rewards and log-probs (read from the
    tensors it gathers for its metrics), and the gradient of every trainable parameter the
    loss reaches."""
    gathered: list[torch.Tensor] = []
    gather = trainer.accelerator.gather

    def recording(tensor: torch.Tensor) -> torch.Tensor:
        gathered.append(tensor.detach().clone())
        return gather(tensor)

    trainer.accelerator.gather = recording
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    # the last six tensors TRL gathers, in order: chosen and rejected rewards, accuracy,
    # margin, chosen and rejected log-probabilities (the earlier ones are token counts)
    chosen, rejected, _, margin, chosen_logps, rejected_logps = gathered[-6:]
    assert torch.equal(margin, chosen - rejected), "TRL's metric gathering order has changed"
    # the trainable parameters the loss reaches (not a tower's layers past its feature layer)
    grads = {
        plain_name(name): param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
    return TrlStep(batch, loss.detach(), chosen_logps, rejected_logps, chosen, rejected, grads)
