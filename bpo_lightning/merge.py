"""Weight-space merging of an ensemble of LoRA adapters into one adapter.

BPO stabilises online training with K LoRA adapters ("members") that are merged into a single adapter; the merged
adapter samples, serves as the reference/behavior model and is what gets evaluated and exported. For one layer,
member i has factors A_i of shape (r, in_features) and B_i of shape (out_features, r) (PEFT's ``lora_A.weight``
and ``lora_B.weight``), all members share rank r and scaling s = lora_alpha / r, and its update is
ΔW_i = s·B_i·A_i. Two merge rules are offered (config key ``model.lora.merge``):

``peft_linear`` (the official BPO code's rule)
    PEFT's ``add_weighted_adapter(names, [1/K]*K, name, combination_type="linear")``: the A matrices and the B
    matrices are summed *separately*, each weighted by sqrt(w·s) with w = 1/K, and the merged adapter gets
    scaling 1::

        A = Σ_i sqrt(s/K)·A_i,   B = Σ_i sqrt(s/K)·B_i,   ΔW = B·A = (s/K)·(Σ_i B_i)·(Σ_j A_j)
          = mean_i(ΔW_i) + (s/K)·Σ_{i≠j} B_i·A_j

    The cross terms B_i·A_j make this something other than an average: K identical members give K times the single
    member's ΔW. The rule is kept because it reproduces the official code exactly.

``mean`` (a true model soup of the deltas)
    The exact mean of the members' updates, ΔW = (1/K)·Σ_i s·B_i·A_i, written as one adapter of rank K·r by
    stacking the factors, which is PEFT's ``combination_type="cat"``::

        A = concat_rows(s/K·A_1, …, s/K·A_K)   (K·r, in),   B = concat_cols(B_1, …, B_K)   (out, K·r),   scaling 1

    K identical members give exactly the single member's ΔW. The weight w·s sits wholly on A, as in PEFT, so the
    factors equal PEFT's (up to rounding) and not just their product.

Both rules return scaling 1.0, so the merged adapter must be created with ``r = merged_rank(r, K, rule)`` and
``lora_alpha = r`` (PEFT does the same in ``add_weighted_adapter``), and without rsLoRA, whose scaling alpha/sqrt(r)
would then not be 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

MergeRule = Literal["peft_linear", "mean"]

# (A suffix, B suffix) of the factor pairs in a PEFT adapter state dict without the adapter name: linear/conv
# layers keep their factors in sub-modules (``.weight``), embedding layers as bare parameters.
_FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("lora_A.weight", "lora_B.weight"),
    ("lora_embedding_A", "lora_embedding_B"),
)


def _check_rule(rule: str) -> None:
    if rule not in get_args(MergeRule):
        raise ValueError(f"model.lora.merge must be one of {list(get_args(MergeRule))}, got {rule!r}")


def merged_rank(r: int, k: int, rule: MergeRule) -> int:
    """Rank of the adapter that holds the merge of ``k`` members of rank ``r``.

    Args:
        r: the members' LoRA rank.
        k: the number of members.
        rule: the merge rule (``model.lora.merge``).

    Returns:
        ``r`` for ``peft_linear`` (factors are summed), ``k·r`` for ``mean`` (factors are stacked).
    """
    _check_rule(rule)
    if r < 1 or k < 1:
        raise ValueError(f"merging needs rank r >= 1 and K >= 1 members, got r={r}, K={k}")
    return r if rule == "peft_linear" else k * r


def merge_lora_pair(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scaling: float, rule: MergeRule
) -> tuple[Tensor, Tensor, float]:
    """Merge the LoRA factors of one layer across K members.

    Args:
        As: the members' A factors, each of shape (r, in_features) (or (r, …) for conv/embedding layers).
        Bs: the members' B factors, each of shape (out_features, r) (or (…, r, …) with rank on dim 1).
        scaling: the members' common LoRA scaling s = lora_alpha / r (> 0).
        rule: ``peft_linear`` or ``mean`` (see the module docstring).

    Returns:
        ``(A, B, merged_scaling)`` with ``merged_scaling · B @ A`` the rule's ΔW. ``merged_scaling`` is always 1.0;
        A and B have rank r for ``peft_linear`` and K·r for ``mean``, and the members' dtype.

    Raises:
        ValueError: on an unknown rule, K = 0, unequal counts of A and B, mismatched shapes, or scaling <= 0.
    """
    _check_rule(rule)
    k = len(As)
    if k == 0:
        raise ValueError("merging needs K >= 1 LoRA members, got none")
    if len(Bs) != k:
        raise ValueError(f"merging needs one B per A, got {k} A factors and {len(Bs)} B factors")
    if not scaling > 0:
        raise ValueError(f"LoRA scaling (lora_alpha / r) must be > 0 to merge, got {scaling}")
    for name, factors in (("A", As), ("B", Bs)):
        shapes = {tuple(t.shape) for t in factors}
        if len(shapes) != 1:
            raise ValueError(f"all members' LoRA {name} factors must have the same shape, got {sorted(shapes)}")
    if As[0].dim() < 2 or Bs[0].dim() < 2 or As[0].shape[0] != Bs[0].shape[1]:
        raise ValueError(
            f"LoRA factors need A of shape (r, in) and B of shape (out, r), got A {tuple(As[0].shape)} "
            f"and B {tuple(Bs[0].shape)}"
        )
    dtype = As[0].dtype
    # Accumulate in float32 at least: summing K bf16/fp16 factors directly would round after every addition.
    work = torch.promote_types(dtype, torch.float32)
    A32 = [a.to(work) for a in As]
    B32 = [b.to(work) for b in Bs]
    if rule == "peft_linear":
        # PEFT weights both factors by sqrt(w·s), so the product carries w·s = s/K exactly once.
        root = math.sqrt(scaling / k)
        A = root * torch.stack(A32).sum(0)
        B = root * torch.stack(B32).sum(0)
    else:
        # Stacking along the rank makes B·A = Σ_i B_i·(s/K·A_i): the mean of the members' ΔW, no cross terms.
        A = torch.cat([(scaling / k) * a for a in A32], dim=0)
        B = torch.cat(B32, dim=1)
    return A.to(dtype), B.to(dtype), 1.0


def merged_delta(As: Sequence[Tensor], Bs: Sequence[Tensor], scaling: float, rule: MergeRule) -> Tensor:
    """The merged layer's weight update ΔW = merged_scaling · B @ A, of shape (out_features, in_features).

    Args:
        As: the members' A factors, each of shape (r, in_features).
        Bs: the members' B factors, each of shape (out_features, r).
        scaling: the members' common LoRA scaling s = lora_alpha / r.
        rule: ``peft_linear`` or ``mean``.

    Returns:
        ΔW in the members' dtype (as PEFT would apply it to an ``nn.Linear`` weight; GPT-2's ``Conv1D`` stores the
        transpose).
    """
    if As and As[0].dim() != 2:
        raise ValueError(f"merged_delta needs 2-D LoRA factors, got A of shape {tuple(As[0].shape)}")
    A, B, merged_scaling = merge_lora_pair(As, Bs, scaling, rule)
    return merged_scaling * (B @ A)


def _factor_partner(key: str) -> tuple[str, str] | None:
    """For a factor key, ``(role, partner key)`` with role "A" or "B"; None for any other key."""
    for a_suffix, b_suffix in _FACTOR_SUFFIXES:
        if key.endswith(a_suffix):
            return "A", key[: -len(a_suffix)] + b_suffix
        if key.endswith(b_suffix):
            return "B", key[: -len(b_suffix)] + a_suffix
    return None


def merge_adapter_states(states: Sequence[dict[str, Tensor]], scaling: float, rule: MergeRule) -> dict[str, Tensor]:
    """Merge K PEFT adapter state dicts into one with the same keys.

    The states are keyed as ``peft.get_peft_model_state_dict(model, adapter_name=...)`` returns them, without the
    adapter name (``base_model.model.….q_proj.lora_A.weight``). Each lora_A/lora_B pair (and
    lora_embedding_A/lora_embedding_B pair) is merged with :func:`merge_lora_pair`. Any other key (a LoRA bias,
    a DoRA magnitude, a ``modules_to_save`` copy) has no merge under these rules, so it is passed through only if
    every member holds an identical tensor, and raises otherwise rather than silently picking one member's value.

    Load the result into an adapter with ``r = merged_rank(r, K, rule)`` and ``lora_alpha = r`` (scaling 1.0).

    Args:
        states: the K members' adapter state dicts, all with the same keys.
        scaling: the members' common LoRA scaling s = lora_alpha / r.
        rule: ``peft_linear`` or ``mean``.

    Returns:
        The merged state dict, keys in the first member's order.

    Raises:
        ValueError: on K = 0, differing key sets, a factor without its partner, mismatched shapes, a non-factor
            key whose tensors differ between members, or an unknown rule.
    """
    _check_rule(rule)
    if not states:
        raise ValueError("merging needs K >= 1 adapter states, got none")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
            raise ValueError(f"adapter state {i} has different keys from state 0: missing {missing}, extra {extra}")
    merged: dict[str, Tensor] = {}
    for key in keys:
        pair = _factor_partner(key)
        if pair is None:
            if not all(torch.equal(state[key], states[0][key]) for state in states[1:]):
                raise ValueError(f"cannot merge {key!r}: it is not a LoRA A/B factor and differs between members")
            merged[key] = states[0][key]
            continue
        role, partner = pair
        if partner not in states[0]:
            raise ValueError(f"LoRA factor {key!r} has no partner {partner!r} in the adapter state")
        if role == "A":
            a, b, _ = merge_lora_pair([s[key] for s in states], [s[partner] for s in states], scaling, rule)
            merged[key], merged[partner] = a, b
    return {key: merged[key] for key in keys}
