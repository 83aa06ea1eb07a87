"""How the behavior LLM π_β follows the policy between collection phases.

π_β samples a phase's responses and, in BPO, is the loss's reference (docs/algorithm.md §1.2). It is frozen within a
phase, so its log-probabilities are computed once, when the phase's data is built. What differs between the
regimes is only how π_β is updated at a phase start:

- ``HardSync``: π_β ← current policy (BPO; with one phase this is offline DPO). No copy is kept at all: the policy
  itself samples and scores at the phase start, before it trains on the phase.
- ``Frozen``: π_β stays the initial model (offline DPO with fresh prompts every phase).
- ``EMA``: π_β ← decay·π_β + (1 − decay)·policy, averaging the snapshot's tensors (the weights; with LoRA the
  adapter factors, see ``EMA``), at phase starts as the official code's ``ema`` option does.

Copies are *snapshots*: dicts of the trainable tensors only (the full weights in full fine-tuning, the adapter
weights with LoRA, this process's shards under ZeRO-3), swapped into the policy when needed
(``weights.TrainableWeights``), so no second model object ever exists.
"""

from __future__ import annotations

import torch

from bpo_lightning.errors import InputError

Snapshot = dict[str, torch.Tensor]


class BehaviorUpdate:
    """Base class: the rule that updates π_β at each phase start.

    ``update(policy_state, snapshot)`` receives the policy's current trainable weights (lazily, as a callable)
    and the current behavior snapshot (``None`` = the live policy) and returns the new snapshot.
    """

    keeps_snapshot: bool = True

    def initial_snapshot(self, initial: Snapshot) -> Snapshot | None:
        return initial if self.keeps_snapshot else None

    def update(self, policy_state, snapshot: Snapshot | None) -> Snapshot | None:
        raise NotImplementedError


class HardSync(BehaviorUpdate):
    """π_β ← policy at every phase start (BPO). Keeps no copy: the live policy is the behavior at that moment."""

    keeps_snapshot = False

    def update(self, policy_state, snapshot: Snapshot | None) -> Snapshot | None:
        return None


class Frozen(BehaviorUpdate):
    """π_β = the initial model for the whole run (offline DPO)."""

    def update(self, policy_state, snapshot: Snapshot | None) -> Snapshot | None:
        return snapshot


class EMA(BehaviorUpdate):
    """π_β ← decay·π_β + (1 − decay)·policy at every phase start, starting from the initial model.

    What is averaged is the snapshot's tensors, element by element: the weights in full fine-tuning (an exact EMA
    of the weights); with LoRA the adapter factors A and B separately (with the LoRA ensemble, those of the merged
    adapter). π_β's update B̄Ā is then *not* the EMA of the policy's updates BA: the product of averages is not
    the average of products (in a toy check 6–9 % off). The official code's ``ema`` option is likewise a merge of
    factors, not a true EMA of weights.

    Args:
        decay: weight of the old behavior, in [0, 1). 0 is a hard sync; 0.995 is the official code's α = 5e-3.
    """

    def __init__(self, decay: float = 0.5) -> None:
        if not 0.0 <= decay < 1.0:
            raise InputError(f"model.behavior.init_args.decay must be in [0, 1), got {decay}")
        self.decay = decay

    def initial_snapshot(self, initial: Snapshot) -> Snapshot | None:
        return {name: value.clone() for name, value in initial.items()}  # updated in place, unlike `initial`

    def update(self, policy_state, snapshot: Snapshot | None) -> Snapshot | None:
        current = policy_state()
        with torch.no_grad():
            for name, value in snapshot.items():
                value.mul_(self.decay).add_(current[name].to(value.device, value.dtype), alpha=1 - self.decay)
        return snapshot
