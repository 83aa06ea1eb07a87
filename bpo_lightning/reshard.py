"""Checkpoints that move between world sizes and strategies, optimizer state included.

A run saved by N processes resumes on M (DDP or DeepSpeed ZeRO-2/3, any N and M, one process included):

- a checkpoint *file* (one process, DDP) holds whole tensors: DDP loads it as it is; under DeepSpeed each process
  cuts its own partitions of the weights, of AdamW's moments and of the float32 master weights from it;
- a DeepSpeed *folder* written by as many processes with the same ZeRO stage is read by DeepSpeed itself, as
  before; one written by another number of processes or another stage is first converted by DeepSpeed's own
  converter (``ds_to_universal``, by process 0, into a hidden folder beside it that is removed once every process
  has read it) into whole tensors per parameter, then loaded as a file is. Without DeepSpeed (one process, DDP) a
  folder loads the same way.

Every read goes through ``checkpoints.weights_only_loads``: nothing in a checkpoint runs code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bpo_lightning.errors import InputError

# the moments of torch's AdamW (and of DeepSpeed's CPU Adam), stored per parameter
MOMENTS = ("exp_avg", "exp_avg_sq")
# what a parameter group may take from a saved one (the rest, e.g. ``fused``, is the running optimizer's own)
GROUP_KEYS = ("lr", "initial_lr", "betas", "eps", "weight_decay", "amsgrad")


def _tag_folder(folder: Path) -> Path:
    latest = folder / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "checkpoint"
    return folder / tag


def saved_layout(folder: str | Path) -> tuple[int, int]:
    """``(processes, ZeRO stage)`` of a DeepSpeed checkpoint folder (read from its first model-states file)."""
    from bpo_lightning.checkpoints import weights_only_loads

    tag = _tag_folder(Path(folder))
    states = sorted(tag.glob("*model_states.pt"))
    if not states:
        raise InputError(f"ckpt_path: {folder} is a folder but not a DeepSpeed checkpoint (no model states in {tag})")
    with weights_only_loads():
        saved = torch.load(states[0], map_location="cpu")
    stage = int(saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return int(saved.get("dp_world_size", len(states))), stage


def universal(folder: str | Path, target: str | Path) -> Path:
    """The folder converted by DeepSpeed's ``ds_to_universal`` into ``target`` (whole float32 weights and AdamW
    moments per parameter; complete or absent)."""
    from deepspeed.checkpoint import ds_to_universal

    from bpo_lightning.checkpoints import weights_only_loads

    folder, target = Path(folder), Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    args = argparse.Namespace(
        input_folder=str(_tag_folder(folder)),
        output_folder=str(tmp / "checkpoint"),
        num_extract_workers=1,  # in this process: its torch.load calls stay inside weights_only_loads
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # ZeRO-1/2 folders lack the (Megatron) layout info it asks for; none is needed
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():
            ds_to_universal.main(args)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "checkpoint", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _converted_name(folder: str | Path) -> Path:
    folder = Path(folder).resolve()  # beside phase-N.ckpt, not beside the last.ckpt link
    return folder.with_name(f".{folder.name}.universal")


def whole_weights(folder: str | Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint folder as one Lightning checkpoint with whole float32 weights (its ZeRO partitions
    consolidated by Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``; the Lightning and bpo state of
    process 0 come along), read as weights only."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from bpo_lightning.checkpoints import weights_only_loads

    folder = Path(folder)
    # beside the folder, not in $TMPDIR (a killed export leaves no checkpoint-sized file there); it prints a line
    with (
        tempfile.TemporaryDirectory(dir=folder.parent) as tmp,
        contextlib.redirect_stdout(io.StringIO()),
        weights_only_loads(),  # DeepSpeed's readers unpickle with weights_only=False
    ):
        return convert_zero_checkpoint_to_fp32_state_dict(folder, Path(tmp) / "checkpoint.pt")


def folder_state(folder: str | Path, optimizer: bool = True, converted: str | Path | None = None) -> dict[str, Any]:
    """A DeepSpeed folder as one Lightning checkpoint: whole float32 weights (DeepSpeed's ``zero_to_fp32``), the
    Lightning and bpo state of process 0, and with ``optimizer`` the AdamW state by parameter name under
    ``"bpo_optimizer"`` (``{"step", "groups", "state": {name: {"exp_avg", "exp_avg_sq"}}}``), read from
    ``converted`` (the folder made by :func:`universal`; made and removed here when not given)."""
    from bpo_lightning.checkpoints import weights_only_loads

    checkpoint = whole_weights(folder)
    if not optimizer:
        return checkpoint
    if converted is None:
        target = universal(folder, _converted_name(folder))
        try:
            return folder_state(folder, optimizer, target)
        finally:
            shutil.rmtree(target, ignore_errors=True)
    zero = Path(converted) / "zero"
    with weights_only_loads():
        saved = torch.load(zero / "optimizer_state.pt", map_location="cpu")
        # ZeRO-3 keeps AdamW's step in the common state, ZeRO-1/2 one per parameter (all equal)
        inner = saved.get("optimizer_state_dict", {})
        step = next(iter(inner.get("state", {}).values()), {}).get("step")
        state = {}
        for param in sorted(p for p in zero.iterdir() if (p / "exp_avg.pt").is_file()):  # not frozen ones
            state[param.name] = {key: _tensor(torch.load(param / f"{key}.pt", map_location="cpu")) for key in MOMENTS}
            if step is None and (param / "step.pt").is_file():
                step = _tensor(torch.load(param / "step.pt", map_location="cpu"))
    groups = [{k: v for k, v in g.items() if k in GROUP_KEYS} for g in saved.get("param_groups", [])]
    step = torch.tensor(0.0) if step is None else step
    checkpoint["bpo_optimizer"] = {"step": step, "groups": groups, "state": state}
    return checkpoint


def _tensor(value):
    return value["param"] if isinstance(value, dict) else value


def optimizer_order(module) -> list[list[str]]:
    """The names of the trainable parameters in the order the optimizer holds them, one list per group (what
    ``configure_optimizers`` builds: ``module.weights.param_groups()``)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in module.weights.param_groups()]


def by_name(checkpoint: dict, module) -> dict | None:
    """The checkpoint's AdamW state by parameter name (``bpo_optimizer``'s form), from either form; ``None`` when it
    holds none."""
    if "bpo_optimizer" in checkpoint:
        return checkpoint["bpo_optimizer"]
    saved = (checkpoint.get("optimizer_states") or [None])[0]
    if saved is None:
        return None
    order = [name for group in optimizer_order(module) for name in group]
    flat = [i for group in saved["param_groups"] for i in group["params"]]
    if len(flat) != len(order):
        raise InputError(
            f"ckpt_path: the checkpoint's optimizer holds {len(flat)} tensors, this model trains {len(order)}"
        )
    state = {
        order[k]: {key: saved["state"][i][key] for key in MOMENTS} for k, i in enumerate(flat) if i in saved["state"]
    }
    steps = [s["step"] for s in saved["state"].values()]
    groups = [{k: v for k, v in g.items() if k in GROUP_KEYS} for g in saved["param_groups"]]
    return {"step": steps[0] if steps else torch.tensor(0.0), "groups": groups, "state": state}


def torch_optimizer_state(saved: dict, optimizer, module) -> dict:
    """``saved`` (by name) as ``optimizer.state_dict()`` of the running optimizer: its own options, the saved
    learning rates and AdamW settings, the moments in its parameter order."""
    order = optimizer_order(module)
    live = optimizer.state_dict()
    state, k = {}, 0
    groups = []
    groups_now = zip(order, live["param_groups"], optimizer.param_groups, _groups_for(saved, len(order)), strict=True)
    for names, group, params, saved_group in groups_now:
        ids = []
        for name, param in zip(names, params["params"], strict=True):
            if name in saved["state"]:
                moments = {key: value.reshape(param.shape) for key, value in saved["state"][name].items()}
                state[k] = {"step": torch.as_tensor(saved["step"], dtype=torch.float32).clone(), **moments}
            ids.append(k)
            k += 1
        groups.append({**group, **saved_group, "params": ids})
    return {"state": state, "param_groups": groups}


def _groups_for(saved: dict, n: int) -> list[dict]:
    groups = saved["groups"]
    if len(groups) == n:
        return groups
    if len(groups) == 1:  # DeepSpeed's universal form keeps one group's settings for all
        return groups * n
    raise InputError(f"ckpt_path: the checkpoint's optimizer has {len(groups)} parameter groups, this one {n}")


def load_into_deepspeed(strategy, checkpoint: dict) -> dict:
    """Set a whole-tensor checkpoint into a running DeepSpeed engine: every process writes its partitions of the
    weights, of the float32 master weights and of AdamW's moments; returns the rest (loops, schedulers, bpo state)
    for Lightning to restore."""
    module = strategy.lightning_module
    weights = checkpoint["state_dict"]
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n, _ in trainable if n not in weights]
    if missing:
        raise InputError(
            f"ckpt_path: the checkpoint has no weights for {len(missing)} trained tensors ({missing[0]}, …)"
        )
    _write_weights(strategy, module, weights)
    saved = by_name(checkpoint, module) if _fitting(strategy) else None
    engine = strategy.deepspeed_engine
    if saved is not None:
        _make_states(engine)
    for name, param in trainable:
        _set_partition(param, weights[name])
        for key in MOMENTS if saved is not None and name in saved["state"] else ():
            _set_partition(param, saved["state"][name][key], key)
    if saved is not None:
        inner = engine.optimizer.optimizer
        for state in inner.state.values():
            state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).clone()
        for group, saved_group in zip(inner.param_groups, _groups_for(saved, len(inner.param_groups)), strict=True):
            group.update(saved_group)
    engine.global_steps = int(checkpoint.get("global_step", engine.global_steps))
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states", "bpo_optimizer")}


def _write_weights(strategy, module, weights: dict) -> None:
    """The model's own weights (ZeRO-3: gathered, written by process 0, partitioned again)."""
    from bpo_lightning.distributed import gathered

    params = dict(module.named_parameters())
    with torch.no_grad(), gathered(params.values(), modify=True):
        if strategy.global_rank == 0 or not strategy.zero_stage_3:
            for name, value in weights.items():
                if name in params:
                    params[name].data.copy_(value.view_as(params[name]).to(params[name].dtype))


def _make_states(engine) -> None:
    """AdamW's state of DeepSpeed's float32 partitions, made now (it is made at the first step) to be written into.
    ZeRO-3 keeps the partitions in AdamW's groups only while it steps; ZeRO-1/2 keep them there."""
    inner = engine.optimizer.optimizer
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in inner.param_groups for flat in group["params"]
    ]
    for flat in flats:
        if not inner.state.get(flat):
            zeros = {key: torch.zeros_like(flat, memory_format=torch.preserve_format) for key in MOMENTS}
            inner.state[flat] = {"step": torch.tensor(0.0), **zeros}


def _set_partition(param, whole: torch.Tensor, key: str | None = None) -> None:
    """Write this process's part of ``whole`` into the optimizer's float32 copy of ``param`` (``key``: into that
    AdamW moment instead). A ZeRO-3 shard is cut here, zero-padded at the end: DeepSpeed's whole-tensor setter cuts
    past the end when the size does not divide by the number of processes."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    from bpo_lightning.distributed import is_partitioned

    flat = whole.reshape(-1).float()
    if not is_partitioned(param):
        safe_set_full_fp32_param(param, flat) if key is None else safe_set_full_optimizer_state(param, flat, key)
        return
    size = param.ds_tensor.numel()
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    piece = torch.zeros(size, dtype=torch.float32)
    part = flat[rank * size : (rank + 1) * size]
    piece[: part.numel()] = part
    safe_set_local_fp32_param(param, piece) if key is None else safe_set_local_optimizer_state(param, piece, key)


def _fitting(strategy) -> bool:
    trainer = strategy.lightning_module.trainer
    return trainer.state.fn == "fit"


def _read_folder(strategy, folder: Path) -> dict:
    """``folder_state`` on every process: process 0 converts the folder once (beside it), every process reads it,
    then process 0 removes the conversion."""
    if not _fitting(strategy):
        return folder_state(folder, optimizer=False)
    target = _converted_name(folder)
    try:
        if strategy.global_rank == 0:
            universal(folder, target)
    finally:
        strategy.barrier("bpo-reshard-converted")
    try:
        return folder_state(folder, converted=target)
    finally:
        strategy.barrier("bpo-reshard-read")
        if strategy.global_rank == 0:
            shutil.rmtree(target, ignore_errors=True)


def load_moved(strategy, path) -> dict | None:
    """The checkpoint at ``path`` when the running strategy cannot read it as it is (see the module docstring),
    loaded (into the DeepSpeed engine, where there is one); ``None`` when the strategy's own reader is right."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from bpo_lightning.checkpoints import checked_load

    path = Path(path)
    if not isinstance(strategy, DeepSpeedStrategy):
        if not path.is_dir():
            return None
        return _read_folder(strategy, path)
    if path.is_dir():
        processes, stage = saved_layout(path)
        if processes == strategy.world_size and stage == strategy.config.get("zero_optimization", {}).get("stage"):
            return None  # DeepSpeed's own reader
        checkpoint = _read_folder(strategy, path)
    elif strategy.load_full_weights and strategy.zero_stage_3 and not _fitting(strategy):
        return None  # Lightning's reader of a single file for evaluation
    else:
        checkpoint = checked_load(path, weights_only=True)
    return load_into_deepspeed(strategy, checkpoint)


def restore_optimizer(strategy, load):
    """``strategy.load_optimizer_state_dict`` that also takes AdamW state by parameter name (a moved checkpoint)."""

    def restore(checkpoint):
        saved = checkpoint.get("bpo_optimizer")
        if saved is not None:
            module = strategy.lightning_module
            states = [torch_optimizer_state(saved, strategy.optimizers[0], module)]
            checkpoint = {**checkpoint, "optimizer_states": states}
        return load(checkpoint)

    return restore
