"""Loss maths with hand-checkable numbers, and invariants every registered loss must satisfy."""

import math

import pytest
import torch
from torch.testing import assert_close

from bpo_lightning import DPOLoss, IPOLoss, PreferenceLoss, SLiCLoss
from bpo_lightning.plugins import load_plugins

REGISTERED = sorted(load_plugins().registries["losses"].items())


def _call(loss, pc, pr, bc, br):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return loss(t(pc), t(pr), t(bc), t(br))


def test_dpo_hand_computed():
    """β = 0.1. Pair 1: policy (−10, −14), behavior (−11, −12) → h = (−10+14) − (−11+12) = 4 − 1 = 3,
    ℓ = −log σ(0.3) = log(1 + e^−0.3) = 0.554355. Pair 2: h = 0 → log 2 = 0.693147.
    Rewards pair 1: chosen 0.1·(−10+11) = 0.1, rejected 0.1·(−14+12) = −0.2."""
    out = _call(DPOLoss(beta=0.1), [-10, -5], [-14, -5], [-11, -5], [-12, -5])
    assert_close(out.losses, torch.tensor([0.554355, 0.693147], dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, torch.tensor([0.1, 0.0], dtype=torch.float64))
    assert_close(out.rejected_rewards, torch.tensor([-0.2, 0.0], dtype=torch.float64))


def test_dpo_label_smoothing_hand_computed():
    """β = 1, ε = 0.2, h = 1: 0.8·(−log σ(1)) + 0.2·(−log σ(−1)) = 0.8·0.313262 + 0.2·1.313262 = 0.513262."""
    out = _call(DPOLoss(beta=1.0, label_smoothing=0.2), [1], [0], [0], [0])
    assert_close(out.losses, torch.tensor([0.513262], dtype=torch.float64), atol=1e-6, rtol=0)


def test_ipo_hand_computed():
    """β = τ = 0.1, target 1/(2τ) = 5. h = (−1 − (−2)) − (−1.5 − (−1.5)) = 1 → (1 − 5)² = 16.
    h = 5 → 0. IPO asks for per-token mean log-probs (``average_log_prob``)."""
    out = _call(IPOLoss(beta=0.1), [-1, 0], [-2, -5], [-1.5, 0], [-1.5, 0])
    assert_close(out.losses, torch.tensor([16.0, 0.0], dtype=torch.float64))
    assert IPOLoss.average_log_prob and not DPOLoss.average_log_prob


def test_slic_hand_computed():
    """β = 0.1: ℓ = max(0, 1 − 0.1·h). h = 3 → 0.7; h = 10 → 0; h = −5 → 1.5."""
    out = _call(SLiCLoss(beta=0.1), [3, 10, -5], [0, 0, 0], [0, 0, 0], [0, 0, 0])
    assert_close(out.losses, torch.tensor([0.7, 0.0, 1.5], dtype=torch.float64))


def test_dpo_is_log2_at_zero_margin():
    out = _call(DPOLoss(), [-3.0, -7.0], [-3.0, -9.0], [-1.0, -2.0], [-1.0, -4.0])
    assert_close(out.losses, torch.full((2,), math.log(2), dtype=torch.float64))


@pytest.mark.parametrize("bad", [{"beta": 0.0}, {"beta": -1.0}, {"label_smoothing": 0.5}])
def test_dpo_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="model.loss.init_args"):
        DPOLoss(**bad)


def test_every_builtin_is_registered():
    assert {"DPOLoss", "IPOLoss", "SLiCLoss"} <= {name for name, _ in REGISTERED}


@pytest.mark.parametrize(("name", "cls"), REGISTERED)
def test_invariant_finite_on_extreme_inputs(name, cls):
    loss = cls()
    values = [-500.0, -1e-3, 0.0, 1e-3, 500.0]
    out = _call(loss, values, values[::-1], [0.0] * 5, [0.0] * 5)
    assert torch.isfinite(out.losses).all(), name
    assert out.losses.shape == (5,)


@pytest.mark.parametrize(("name", "cls"), REGISTERED)
def test_invariant_no_gradient_reaches_behavior(name, cls):
    policy_c = torch.tensor([-3.0, -4.0], requires_grad=True)
    policy_r = torch.tensor([-5.0, -2.0], requires_grad=True)
    behavior_c = torch.tensor([-3.5, -4.5], requires_grad=True)
    behavior_r = torch.tensor([-4.0, -2.5], requires_grad=True)
    out = cls()(policy_c, policy_r, behavior_c, behavior_r)
    out.losses.sum().backward()
    assert behavior_c.grad is None and behavior_r.grad is None
    assert policy_c.grad is not None and policy_c.grad.abs().sum() > 0
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize(("name", "cls"), REGISTERED)
def test_invariant_loss_falls_as_margin_grows(name, cls):
    margins = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    zeros = torch.zeros_like(margins)
    losses = cls()(margins, zeros, zeros, zeros).losses
    assert (losses[1:] < losses[:-1]).all(), f"{name}: {losses.tolist()}"


@pytest.mark.parametrize(("name", "cls"), REGISTERED)
def test_invariant_is_a_preference_loss(name, cls):
    assert issubclass(cls, PreferenceLoss)
    assert cls.__doc__ and "arXiv" in cls.__doc__, f"{name} must cite its paper"
