"""Preference losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_adapters.training.preference import (
    PairLogps,
    PreferenceSettings,
    metric_sums,
    preference_terms,
)

POLICY = PairLogps(
    chosen=torch.tensor([-4.0, -10.0]),
    rejected=torch.tensor([-6.0, -8.0]),
    chosen_tokens=torch.tensor([2.0, 5.0]),
    rejected_tokens=torch.tensor([3.0, 4.0]),
)
REFERENCE = (torch.tensor([-5.0, -9.0]), torch.tensor([-5.0, -9.0]))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_sigmoid_with_label_smoothing_by_hand():
    terms = preference_terms(
        PreferenceSettings("dpo", beta=0.5, label_smoothing=0.1), POLICY, REFERENCE
    )
    # pair 0: chosen ratio -4+5 = 1, rejected ratio -6+5 = -1: h = 0.5 * 2 = 1
    # pair 1: chosen ratio -10+9 = -1, rejected -8+9 = 1: h = -1
    expected = [-0.9 * _log_sigmoid(h) - 0.1 * _log_sigmoid(-h) for h in (1.0, -1.0)]
    assert terms.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert terms.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert terms.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])


def test_dpo_without_smoothing_is_minus_log_sigmoid():
    terms = preference_terms(PreferenceSettings("dpo", beta=0.1), POLICY, REFERENCE)
    assert terms.losses[0].item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)


def test_ipo_on_average_log_probs_per_token_by_hand():
    terms = preference_terms(PreferenceSettings("ipo", beta=0.25), POLICY, REFERENCE)
    # pair 0: chosen 1/2 = 0.5, rejected -1/3: h = 5/6; target 1/(2*0.25) = 2
    # pair 1: chosen -1/5, rejected 1/4: h = -0.45
    expected = [(5 / 6 - 2) ** 2, (-0.45 - 2) ** 2]
    assert terms.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert terms.chosen_rewards.tolist() == pytest.approx([0.125, -0.05])
    assert terms.rejected_rewards.tolist() == pytest.approx([-1 / 12, 0.0625])


def test_simpo_is_reference_free_and_length_normalised_by_hand():
    settings = PreferenceSettings("simpo", beta=2.0, simpo_gamma=0.5)
    terms = preference_terms(settings, POLICY, None)
    # pair 0: 2 * -4/2 = -4, 2 * -6/3 = -4: x = -0.5; pair 1: -4 vs -4: x = -0.5
    assert terms.losses.tolist() == pytest.approx([-_log_sigmoid(-0.5)] * 2, abs=1e-6)
    assert terms.chosen_rewards.tolist() == pytest.approx([-4.0, -4.0])
    assert not settings.needs_reference


def test_losses_that_need_a_reference_refuse_none():
    with pytest.raises(ValueError, match="reference"):
        preference_terms(PreferenceSettings("dpo"), POLICY, None)


def test_gradient_flows_to_the_policy_only():
    chosen = POLICY.chosen.clone().requires_grad_(True)
    policy = PairLogps(chosen, POLICY.rejected, POLICY.chosen_tokens, POLICY.rejected_tokens)
    terms = preference_terms(PreferenceSettings("dpo", beta=1.0), policy, REFERENCE)
    terms.losses.sum().backward()
    # d/dx -log sigmoid(x - c) = -(1 - sigmoid(h)): h = 2 and -2
    expected = [-(1 - 1 / (1 + math.exp(-2))), -(1 - 1 / (1 + math.exp(2)))]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert not terms.chosen_rewards.requires_grad


def test_metric_sums():
    terms = preference_terms(PreferenceSettings("dpo", beta=0.5), POLICY, REFERENCE)
    sums = metric_sums(terms, POLICY).tolist()
    # rewards chosen 0.5 + -0.5, rejected -0.5 + 0.5, 1 pair right, margins 1 + -1, logps
    assert sums == pytest.approx([0.0, 0.0, 1.0, 0.0, -14.0, -14.0])
