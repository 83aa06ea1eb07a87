"""Loss maths with hand-checkable numbers, and invariants every registered loss must satisfy."""

import math

import pytest
import torch
from torch.testing import assert_close

from bpo_lightning import DPOLoss, IPOLoss, PreferenceLoss, SLiCLoss
from bpo_lightning.losses import LossOutput
from bpo_lightning.plugins import load_plugins
from bpo_lightning.testing import check_loss, loss_problems

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
def test_every_registered_loss_conforms(name, cls):
    """``bpo_lightning.testing.check_loss``: finite losses and gradients for margins of ±1000 nats in float64,
    float32 and bfloat16, no gradient into the behavior log-probs, the margin pushed up at 0, a cited paper."""
    check_loss(cls)


class Exponential(PreferenceLoss):
    """ℓ(h) = exp(−βh) (the exponential loss of arXiv 2402.05369, written naively)."""

    def pair_losses(self, h):
        return torch.exp(-self.beta * h)


class Backwards(PreferenceLoss):
    """A loss that prefers the rejected response (arXiv 2305.18290 with the sign flipped)."""

    def pair_losses(self, h):
        return torch.nn.functional.softplus(self.beta * h)


class Uncited(DPOLoss):
    """DPO without a citation."""


def test_the_conformance_checks_catch_what_they_are_for():
    """A naive exp(−βh) is finite in float64 but not in float32 or bfloat16 at h = −1000 (the float64-only checks
    let it pass); a loss pushing the margin down, a missing citation and gradient leaks are each reported."""
    problems = loss_problems(Exponential)
    assert not any("float64" in p for p in problems)
    assert any("float32: the loss is not finite for margins h = [-1000.0]" in p for p in problems)
    assert any("bfloat16" in p and "gradient is not finite" in p for p in problems)
    assert any("not negative" in p for p in loss_problems(Backwards))
    assert loss_problems(Uncited) == ["Uncited: the docstring must cite the loss's paper (an arXiv id, a DOI or a URL)"]

    class Leaky(DPOLoss):
        """DPO (arXiv 2305.18290) that forgets to detach the behavior log-probs."""

        def forward(self, pc, pr, bc, br):
            h = (pc - bc) - (pr - br)
            return LossOutput(self.pair_losses(h), self.beta * (pc - bc), self.beta * (pr - br))

    leaks = loss_problems(Leaky, dtypes=(torch.float64,))
    assert any("reaches the behavior" in p for p in leaks) and any("detached" in p for p in leaks)
    with pytest.raises(AssertionError, match="Exponential in float32"):
        check_loss(Exponential)
