"""Conformance checks for preference losses, for a plugin's own tests.

    from bpo_lightning.testing import check_loss

    def test_my_loss_conforms():
        check_loss(MyLoss)                 # the class (built with its defaults) or an instance: MyLoss(beta=0.3)

Training runs in float32 or bfloat16, so every check runs in float64, float32 and bfloat16:

- the class is a ``PreferenceLoss`` and its docstring cites its paper (an arXiv id, a DOI or a URL);
- per-pair losses of shape (B,) and finite, with finite gradients, for margins h from −1000 to 1000 nats (sums of
  log-probabilities differ by that much on long responses; ``exp(−βh)`` overflows float32 there);
- no gradient reaches the behavior/reference log-probabilities, and the implicit rewards are detached;
- at h = 0 the gradient pushes the margin up (the loss falls as the chosen response gains on the rejected one).

``loss_problems`` returns what fails as a list of sentences; ``check_loss`` raises ``AssertionError`` listing them.
The built-in losses pass (``tests/test_losses.py``).
"""

from __future__ import annotations

import re

import torch

from bpo_lightning.losses import PreferenceLoss

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
EXTREME_MARGINS = (-1000.0, -100.0, -1e-3, 0.0, 1e-3, 100.0, 1000.0)
_CITATION = re.compile(r"arXiv[\s:]*\d{4}\.\d{4,5}|doi\.org/|\b10\.\d{4,9}/|https?://", re.I)


def loss_problems(loss: PreferenceLoss | type, dtypes=DTYPES) -> list[str]:
    """What ``loss`` (an instance, or a class built with its defaults) gets wrong; empty when it conforms."""
    cls = loss if isinstance(loss, type) else type(loss)
    name = cls.__name__
    if not issubclass(cls, PreferenceLoss):
        return [f"{name} is not a subclass of bpo_lightning.PreferenceLoss"]
    problems = []
    if not _CITATION.search(cls.__doc__ or ""):
        problems.append(f"{name}: the docstring must cite the loss's paper (an arXiv id, a DOI or a URL)")
    if not isinstance(cls.average_log_prob, bool):
        problems.append(f"{name}.average_log_prob must be True or False")
    instance = loss if not isinstance(loss, type) else cls()
    for dtype in dtypes:
        problems += [f"{name} in {str(dtype).removeprefix('torch.')}: {p}" for p in _problems(instance, dtype)]
    return problems


def check_loss(loss: PreferenceLoss | type, dtypes=DTYPES) -> None:
    """Raise ``AssertionError`` listing every way ``loss`` does not conform (see the module docstring)."""
    problems = loss_problems(loss, dtypes)
    if problems:
        raise AssertionError("; ".join(problems))


def _problems(loss: PreferenceLoss, dtype: torch.dtype) -> list[str]:
    problems = []
    margins = torch.tensor(EXTREME_MARGINS, dtype=torch.float64)
    # realistic magnitudes: sums of log-probs of long responses, with the margin split over chosen and rejected
    policy_c = (-1500.0 + margins / 2).to(dtype).requires_grad_()
    policy_r = (-1500.0 - margins / 2).to(dtype).requires_grad_()
    behavior_c = torch.full_like(policy_c, -1500.0, requires_grad=True)
    behavior_r = torch.full_like(policy_r, -1500.0, requires_grad=True)
    out = loss(policy_c, policy_r, behavior_c, behavior_r)
    if out.losses.shape != (len(EXTREME_MARGINS),):
        return [f"losses have shape {tuple(out.losses.shape)}, expected one per pair ({len(EXTREME_MARGINS)},)"]
    if not torch.isfinite(out.losses).all():
        finite = torch.isfinite(out.losses).tolist()
        bad = [m for m, ok in zip(EXTREME_MARGINS, finite, strict=True) if not ok]
        problems.append(f"the loss is not finite for margins h = {bad} (use log-sigmoid / softplus forms)")
    out.losses.sum().backward()
    if policy_c.grad is None or not torch.isfinite(policy_c.grad).all() or not torch.isfinite(policy_r.grad).all():
        problems.append("the gradient is not finite for margins from -1000 to 1000")
    if behavior_c.grad is not None or behavior_r.grad is not None:
        problems.append("a gradient reaches the behavior/reference log-probs (they must be constants)")
    if out.chosen_rewards.requires_grad or out.rejected_rewards.requires_grad:
        problems.append("the implicit rewards must be detached")
    h = torch.zeros(1, dtype=dtype, requires_grad=True)  # at h = 0 the margin must be pushed up
    zero = torch.zeros(1, dtype=dtype)
    loss(h, zero, zero, zero).losses.sum().backward()
    if not h.grad.item() < 0:
        problems.append(f"at margin 0 the loss's gradient with respect to h is {h.grad.item():g}, not negative: "
                        "training would not prefer the chosen response")  # fmt: skip
    return problems
