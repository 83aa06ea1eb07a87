"""LoRA through PEFT, and the BPO paper's stabiliser: an ensemble of K LoRA adapters merged in weight space.

With ``members = 1`` the policy is one LoRA adapter; snapshots of the behavior or initial model then hold the
adapter weights only (they are the only trainable tensors), never a second base model.

With ``members = K > 1`` (docs/algorithm.md §3): adapters ``member_0 … member_{K-1}`` start from distinct seeds (or from
K given adapter directories) and all train on the same pairs, each with its own loss against the *merged*
reference; an extra frozen adapter ``merged`` holds their merge (``bpo_lightning.merge``) and is what samples,
serves as π_β, is evaluated and exported. One base model is shared by all adapters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bpo_lightning.errors import InputError
from bpo_lightning.merge import MergeRule, merge_adapter_states, merged_rank

MERGED = "merged"


class LoRA:
    """LoRA settings (PEFT ``LoraConfig``) and the ensemble size.

    Args:
        r: adapter rank (paper: 256).
        alpha: LoRA alpha; the scaling is alpha / r (paper: 512).
        dropout: LoRA dropout (the paper trains with 0).
        target_modules: ``all-linear`` or a list of module names.
        members: K, the number of ensemble members (paper: 5); 1 is a single adapter.
        merge: ``peft_linear`` (the official code's rule, cross terms included) or ``mean`` (exact mean of ΔW).
        seed: seed of member k is ``seed + k``.
        init_from: K adapter directories to start the members from (e.g. separately trained SFT adapters).
        recompute_members: K > 1: run each member's forward again in the backward pass (activation checkpointing per
            member) so that a training step holds one member's activations, not K; costs one more forward per
            member and step. The gradients are the same either way.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        members: int = 1,
        merge: MergeRule = "peft_linear",
        seed: int = 0,
        init_from: list[str] | None = None,
        recompute_members: bool = True,
    ) -> None:
        problems = []
        if r < 1:
            problems.append(f"model.lora.r must be >= 1, got {r}")
        if members < 1:
            problems.append(f"model.lora.members must be >= 1, got {members}")
        if merge not in ("peft_linear", "mean"):
            problems.append(f"model.lora.merge must be 'peft_linear' or 'mean', got {merge!r}")
        if init_from is not None and len(init_from) != members:
            problems.append(f"model.lora.init_from lists {len(init_from)} adapters for {members} members")
        if problems:
            raise InputError("; ".join(problems))
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules
        self.members, self.merge, self.seed, self.init_from = members, merge, seed, init_from
        self.recompute_members = recompute_members

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def names(self) -> list[str]:
        return [f"member_{k}" for k in range(self.members)]

    def wrap(self, model: nn.Module) -> nn.Module:
        """Add the member adapters (and, for an ensemble, the frozen ``merged`` adapter) to ``model``."""
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers.pytorch_utils import Conv1D

        transposed = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2 stores weights as (in, out)

        def config(rank: int, alpha: float, dropout: float) -> LoraConfig:
            return LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=dropout,
                target_modules=self.target_modules,
                fan_in_fan_out=transposed,
                task_type="CAUSAL_LM",
            )

        for k, name in enumerate(self.names):
            with torch.random.fork_rng():
                torch.manual_seed(self.seed + k)
                if self.init_from is not None:
                    if k == 0:
                        model = PeftModel.from_pretrained(
                            model, self.init_from[0], adapter_name=name, is_trainable=True
                        )
                    else:
                        model.load_adapter(self.init_from[k], adapter_name=name, is_trainable=True)
                elif k == 0:
                    model = get_peft_model(model, config(self.r, self.alpha, self.dropout), adapter_name=name)
                else:
                    model.add_adapter(name, config(self.r, self.alpha, self.dropout))
        if self.members > 1:
            rank = merged_rank(self.r, self.members, self.merge)
            model.add_adapter(MERGED, config(rank, rank, 0.0))  # scaling 1, as the merge rules assume
        for name, p in model.named_parameters():  # members train; the base and the merge stay frozen
            p.requires_grad_(any(f".{m}." in name for m in self.names))
        return model

    def member_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """One member's LoRA factors, keyed without the adapter name."""
        tag = f".{name}."
        return {k.replace(tag, "."): p.detach() for k, p in model.named_parameters() if tag in k}

    def merged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The merge of the members' current factors: the weights of the ``merged`` adapter."""
        states = [self.member_state(model, name) for name in self.names]
        return merge_adapter_states(states, self.scaling, self.merge)

    def load_merged(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                head, _, leaf = key.rpartition(".")
                params[f"{head}.{MERGED}.{leaf}"].copy_(value)


@contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Compute with adapter ``name`` alone, leaving every ``requires_grad`` flag as it was (PEFT's
    ``set_adapter`` would flip them, which would change what the optimizer trains)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    previous = model.active_adapter
    model.base_model.set_adapter(name)
    for p, flag in flags.items():
        p.requires_grad_(flag)
    try:
        yield
    finally:
        model.base_model.set_adapter(previous)
        for p, flag in flags.items():
            p.requires_grad_(flag)
