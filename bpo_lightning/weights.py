"""Which weights the policy computes with: the current policy, or a snapshot (π_β, the initial model).

One object per run answers that question, so the module never branches on the kind of model:

- ``TrainableWeights`` (full fine-tuning, a single LoRA adapter): the policy *is* its trainable tensors; a snapshot
  holds copies of them and is swapped in for as long as it is needed.
- ``EnsembleWeights`` (the paper's K LoRA members): the policy is the weight-space merge of the members, held by a
  frozen ``merged`` adapter that samples, scores, is evaluated and exported; a snapshot is a merged adapter.

Snapshots are dicts of tensors. Under ZeRO-3 each process keeps only its own part of every tensor (its shard,
``distributed.local_tensor``): copies, swaps and EMA averages are element-wise, so they run locally, at 1/N of
the memory, without communication. A whole tensor taken before ZeRO-3 partitioned its parameter is cut to this
process's shard the first time it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from bpo_lightning.behavior import Snapshot
from bpo_lightning.distributed import gathered, is_partitioned, local_tensor, release_whole
from bpo_lightning.lora import MERGED, LoRA, active_adapter


def as_local(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the layout of ``local_tensor(param)``: unchanged, or the shard of a whole tensor."""
    local = local_tensor(param)
    if value.shape == local.shape:
        return value
    if not is_partitioned(param) or value.numel() != param.ds_numel:
        raise ValueError(f"a snapshot tensor of shape {tuple(value.shape)} does not fit parameter {tuple(local.shape)}")
    size, rank = local.numel(), dist.get_rank(group=param.ds_process_group)
    flat = value.reshape(-1)[rank * size : (rank + 1) * size]  # ZeRO-3's layout: consecutive, zero-padded shards
    return torch.cat([flat, flat.new_zeros(size - flat.numel())]) if flat.numel() < size else flat.clone()


def localize(model: nn.Module, snapshot: Snapshot) -> Snapshot:
    """Cut whole tensors of ``snapshot`` to this process's shards, in place (a no-op without ZeRO-3)."""
    params = dict(model.named_parameters())
    for name, value in snapshot.items():
        if name in params:
            snapshot[name] = as_local(params[name], value)
    return snapshot


def whole(model: nn.Module, snapshot: Snapshot) -> Snapshot:
    """CPU copies of ``snapshot`` with every ZeRO-3 shard gathered back into its whole tensor (every process must
    call this under ZeRO-3); other tensors are copied as they are."""
    params = dict(model.named_parameters())
    out = {}
    for name, value in snapshot.items():
        param = params.get(name)
        if param is None or not is_partitioned(param) or value.shape == param.ds_shape:
            out[name] = value.cpu()
            continue
        group, local = param.ds_process_group, value.to(param.ds_tensor.device)  # NCCL gathers device tensors
        shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(shards, local.contiguous(), group=group)
        out[name] = torch.cat(shards)[: param.ds_numel].reshape(param.ds_shape).cpu()
    return out


@contextmanager
def swapped_weights(model: nn.Module, snapshot: Snapshot | None) -> Iterator[None]:
    """Temporarily load ``snapshot`` into ``model``'s parameters (their local parts under ZeRO-3); restore the
    originals on exit. ``None`` means "the model as it is" (nothing is copied)."""
    if snapshot is None:
        yield
        return
    params = dict(model.named_parameters())
    missing = sorted(set(snapshot) - set(params))
    if missing:
        raise KeyError(f"snapshot has parameters the model lacks: {missing[:5]}")
    localize(model, snapshot)
    targets = {name: local_tensor(params[name]) for name in snapshot}
    backup = {name: target.to("cpu", copy=True) for name, target in targets.items()}
    swapped = [params[name] for name in snapshot]
    with torch.no_grad():
        for name, value in snapshot.items():
            targets[name].copy_(value)
    release_whole(swapped)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in backup.items():
                targets[name].copy_(value)
        release_whole(swapped)


class TrainableWeights:
    """Full fine-tuning or one LoRA adapter: the policy is its trainable tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state(self) -> Snapshot:
        """The current policy's weights (views, not copies: copy what must outlive the next optimizer step)."""
        return {n: local_tensor(p).detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def computing_as(self, snapshot: Snapshot | None):
        """Context in which the model computes as ``snapshot`` describes (``None``: the current policy)."""
        return swapped_weights(self.model, snapshot)

    def members(self) -> list[Callable[[], AbstractContextManager]]:
        """One factory per independently trained member (here: the policy itself) of the context to train it in; a
        factory, so that a member's forward can be run again in the backward pass (``LoRA.recompute_members``)."""
        return [nullcontext]

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def clip_separately(self) -> bool:
        """Whether each parameter group's gradient is clipped on its own (as with one optimizer per member)."""
        return False


class EnsembleWeights(TrainableWeights):
    """K LoRA members merged in weight space (``lora.merge``); the merge is what computes as "the policy"."""

    def __init__(self, model: nn.Module, lora: LoRA) -> None:
        super().__init__(model)
        self.lora = lora

    def state(self) -> Snapshot:
        """The merge of the members' current factors (whole tensors: the members are gathered under ZeRO-3)."""
        members = [p for n, p in self.model.named_parameters() if p.requires_grad]
        with gathered(members):
            return {k: v.clone() for k, v in self.lora.merged_state(self.model).items()}

    @contextmanager
    def computing_as(self, snapshot: Snapshot | None) -> Iterator[None]:
        state = snapshot if snapshot is not None else self.state()
        merged = [p for n, p in self.model.named_parameters() if f".{MERGED}." in n]
        with gathered(merged, modify=True):
            self.lora.load_merged(self.model, state)
        with active_adapter(self.model, MERGED):
            yield

    def members(self) -> list[Callable[[], AbstractContextManager]]:
        return [partial(active_adapter, self.model, name) for name in self.lora.names]

    def param_groups(self) -> list[dict]:
        """One group per member (a single optimizer, as DeepSpeed requires; AdamW treats groups independently)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if f".{m}." in n], "name": m} for m in self.lora.names]

    def clip_separately(self) -> bool:
        return True


def policy_weights(model: nn.Module, lora: LoRA | None) -> TrainableWeights:
    """The weights object of a policy: an ensemble for K > 1 LoRA members, else its trainable tensors."""
    if lora is not None and lora.members > 1:
        return EnsembleWeights(model, lora)
    return TrainableWeights(model)
