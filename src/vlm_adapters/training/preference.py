"""Preference losses as pure functions of per-sequence log-probabilities.

Each pair has a chosen answer ``c`` and a rejected answer ``r`` to the same prompt; ``logp``
is an answer's summed log-probability under the policy being trained, ``ref`` under the
reference model, and ``n`` its number of answer tokens (see docs/preference.md):

- ``dpo`` (Rafailov et al. 2023), with conservative label smoothing ``eps``:
  ``h = beta * ((logp_c - ref_c) - (logp_r - ref_r))``,
  ``loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)``.
- ``ipo`` (Azar et al. 2023) on the average log-probability per answer token (TRL's
  convention): ``h = (logp_c / n_c - ref_c / n_c) - (logp_r / n_r - ref_r / n_r)``,
  ``loss = (h - 1 / (2 * beta)) ** 2``.
- ``simpo`` (Meng et al. 2024), reference-free and length-normalised, margin ``gamma``:
  ``loss = -log sigmoid(beta * logp_c / n_c - beta * logp_r / n_r - gamma)`` (label smoothing
  as for DPO).

Rewards are the implicit ones of each loss (detached): ``beta * (logp - ref)`` for DPO,
``beta * (logp / n - ref / n)`` for IPO and ``beta * logp / n`` for SimPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Loss = Literal["dpo", "ipo", "simpo"]
LOSSES: tuple[Loss, ...] = ("dpo", "ipo", "simpo")
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})
"""Losses that need no reference model."""


@dataclass(frozen=True)
class PreferenceSettings:
    """Which loss and its hyper-parameters."""

    loss: Loss = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


@dataclass(frozen=True)
class PairLogps:
    """Per-pair log-probabilities ``[P]``: summed over each answer's tokens, and the token
    counts ``[P]`` (used by the length-normalised losses)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class PreferenceTerms:
    """Per-pair ``losses`` ``[P]`` and implicit rewards ``[P]`` (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_terms(
    settings: PreferenceSettings,
    policy: PairLogps,
    reference: tuple[torch.Tensor, torch.Tensor] | None,
) -> PreferenceTerms:
    """The loss and rewards of each pair; ``reference``: the reference model's summed
    ``(chosen, rejected)`` log-probabilities ``[P]`` (None for a reference-free loss)."""
    if settings.loss == "simpo":
        return simpo(policy, settings.beta, settings.simpo_gamma, settings.label_smoothing)
    if reference is None:
        raise ValueError(f"the {settings.loss} loss needs reference log-probabilities")
    if settings.loss == "ipo":
        return ipo(policy, reference, settings.beta)
    if settings.loss == "dpo":
        return dpo(policy, reference, settings.beta, settings.label_smoothing)
    raise ValueError(f"unknown preference loss {settings.loss!r}; choose one of {LOSSES}")


def dpo(
    policy: PairLogps,
    reference: tuple[torch.Tensor, torch.Tensor],
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceTerms:
    """DPO's sigmoid loss on summed log-probabilities."""
    chosen = policy.chosen - reference[0].to(policy.chosen)
    rejected = policy.rejected - reference[1].to(policy.rejected)
    losses = _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing)
    return PreferenceTerms(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo(
    policy: PairLogps, reference: tuple[torch.Tensor, torch.Tensor], beta: float
) -> PreferenceTerms:
    """IPO's squared loss on average log-probabilities per answer token."""
    chosen = (policy.chosen - reference[0].to(policy.chosen)) / policy.chosen_tokens
    rejected = (policy.rejected - reference[1].to(policy.rejected)) / policy.rejected_tokens
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return PreferenceTerms(losses, beta * chosen.detach(), beta * rejected.detach())


def simpo(
    policy: PairLogps, beta: float, gamma: float, label_smoothing: float = 0.0
) -> PreferenceTerms:
    """SimPO: reference-free, on length-normalised log-probabilities, with margin ``gamma``."""
    chosen = beta * policy.chosen / policy.chosen_tokens
    rejected = beta * policy.rejected / policy.rejected_tokens
    losses = _smoothed_sigmoid(chosen - rejected - gamma, label_smoothing)
    return PreferenceTerms(losses, chosen.detach(), rejected.detach())


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)``: the preference flipped with
    probability ``eps`` (conservative DPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
)
"""What a preference step reports, each a mean over the step's pairs."""


def metric_sums(terms: PreferenceTerms, policy: PairLogps) -> torch.Tensor:
    """The sums over pairs of `METRICS`, in order ``[len(METRICS)]`` (accuracy: the pairs
    whose chosen reward is strictly higher)."""
    chosen, rejected = terms.chosen_rewards, terms.rejected_rewards
    return torch.stack(
        [
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).float().sum(),
            (chosen - rejected).sum(),
            policy.chosen.detach().sum(),
            policy.rejected.detach().sum(),
        ]
    ).float()
