"""Direct-alignment-from-preference (DAP) losses with the behavior LLM as reference.

Every loss sees the same four tensors of shape (B,): the policy's and the behavior's log-probabilities of the
chosen and rejected responses, and the implicit log-ratio margin

    h = [log π(y_w) − log π(y_l)] − [log π_β(y_w) − log π_β(y_l)]

(docs/algorithm.md §2.1). In BPO, π_β is the model that sampled the pair; in offline or on-policy DPO it is the initial
model. Each loss returns per-pair losses plus detached implicit rewards for logging; the module averages them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bpo_lightning.errors import InputError
from bpo_lightning.hookspecs import hookimpl


@dataclass
class LossOutput:
    """Per-pair loss terms and detached rewards, each of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # β·(log π(y_w) − log π_β(y_w)), detached
    rejected_rewards: torch.Tensor  # β·(log π(y_l) − log π_β(y_l)), detached


class PreferenceLoss(nn.Module):
    """Base class of preference losses.

    Subclasses implement ``pair_losses(h)`` on the log-ratio margin h (B,). Set ``average_log_prob = True`` when
    the loss is defined on per-token mean log-probabilities instead of sums (IPO).

    Args:
        beta: strength of the pull towards the reference (the behavior LLM in BPO). 0.1 in the paper.
    """

    average_log_prob: bool = False

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise InputError(f"model.loss.init_args.beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,  # (B,)
        policy_rejected_logps: torch.Tensor,  # (B,)
        behavior_chosen_logps: torch.Tensor,  # (B,), no grad
        behavior_rejected_logps: torch.Tensor,  # (B,), no grad
    ) -> LossOutput:
        behavior_chosen_logps = behavior_chosen_logps.detach()
        behavior_rejected_logps = behavior_rejected_logps.detach()
        chosen_ratio = policy_chosen_logps - behavior_chosen_logps
        rejected_ratio = policy_rejected_logps - behavior_rejected_logps
        losses = self.pair_losses(chosen_ratio - rejected_ratio)
        return LossOutput(losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DPOLoss(PreferenceLoss):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), with optional label
    smoothing (conservative DPO, Mitchell 2023):

        ℓ(h) = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    At h = 0 the loss is log 2 ≈ 0.693; it falls towards 0 as the chosen response gains on the rejected one
    relative to the reference. With ε > 0 the optimum is a finite margin, which tolerates label noise.

    Args:
        beta: inverse temperature β (0.1 in the BPO paper; typical 0.01–0.5).
        label_smoothing: ε in [0, 0.5), the assumed probability that a label is flipped.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__(beta)
        if not 0.0 <= label_smoothing < 0.5:
            raise InputError(f"model.loss.init_args.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)


class IPOLoss(PreferenceLoss):
    """Identity Preference Optimization (Azar et al. 2023, arXiv 2310.12036, Eq. 17):

        ℓ(h̄) = (h̄ − 1/(2τ))²,   τ = β

    where h̄ is the margin of per-token *mean* log-probabilities (the official BPO code's convention,
    docs/algorithm.md §2.2). A squared loss regresses the margin onto 1/(2τ) = 5 for β = 0.1 instead of pushing it to
    infinity, so it does not overfit deterministic preferences.

    Args:
        beta: τ; the target margin is 1/(2τ).
    """

    average_log_prob = True

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        return (h - 1 / (2 * self.beta)) ** 2


class SLiCLoss(PreferenceLoss):
    """Sequence Likelihood Calibration, hinge form with reference normalisation (Zhao et al. 2023, arXiv
    2305.10425, Eq. 2; the ``hinge`` loss of the official BPO code):

        ℓ(h) = max(0, 1 − β·h)

    i.e. β·max(0, δ − h) with margin δ = 1/β = 10 nats: pairs already separated by δ give no gradient.

    Args:
        beta: scale of the margin; the hinge is flat once h ≥ 1/β.
    """

    def pair_losses(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(1 - self.beta * h)


@hookimpl
def register_losses(register):
    register(DPOLoss)
    register(IPOLoss)
    register(SLiCLoss)
