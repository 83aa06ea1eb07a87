"""What training on several processes needs beyond Lightning: the collectives of collection, and ZeRO-3 gathers.

``Ranks`` is this process's place among the training processes (a no-op for one process). ``gathered`` makes
ZeRO-3-partitioned parameters whole for the duration of a block (and, with ``modify=True``, writes changes made
on process 0 back into every partition); without ZeRO-3 it does nothing.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes, and the collectives collection needs."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, trainer) -> Ranks:
        if trainer is None or trainer.world_size == 1:
            return cls()
        return cls(trainer.global_rank, trainer.world_size)

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Process 0's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def arrive(self, tag: str, poll_s: float = 0.05) -> None:
        """Wait, without a collective, until every process has arrived at ``tag`` (a name no earlier call used): each
        sets a key in the process group's store and polls for the others' (``store.check`` returns at once). A
        process waiting here for one that is still waiting on a slow annotator or judge is not subject to the
        process group's timeout, which a collective would be (``trainer.strategy.init_args.timeout``); the
        collective that follows then finds every process ready. A process of this host that dies meanwhile stops
        the wait with a ``RunError`` naming it (one on another host is the launchers' to report: Lightning's and
        torchrun's stop the job)."""
        if self.world == 1:
            return
        store = _default_store()
        if store is None:  # not a c10d process group with a store: a collective, with its timeout
            dist.barrier()
            return
        store.set(f"bpo/{tag}/{self.rank}", "1")
        keys = [f"bpo/{tag}/{r}" for r in range(self.world)]
        checked = time.monotonic()
        while not store.check(keys):
            time.sleep(poll_s)
            if time.monotonic() - checked > 1.0:
                checked = time.monotonic()
                if gone():
                    from bpo_lightning.errors import RunError

                    raise RunError(lost_message(self.rank))

    def most(self, n: int) -> int:
        """The largest ``n`` over processes."""
        return max(self.gather(n))


SHARED_CHECK = ".bpo-shared-check"
# (host, pid) of every process of the job, by rank: learnt at start (``agree_on_run_dir``), to name one that dies
PROCESSES: list[tuple[str, int]] = []


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, dead but not yet reaped by its launcher, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def gone() -> list[int]:
    """Ranks of the job's processes on this host that no longer run."""
    here = socket.gethostname()
    return [r for r, (host, pid) in enumerate(PROCESSES) if host == here and pid != os.getpid() and not _alive(pid)]


def lost_message(rank: int, detail: str = "") -> str:
    """One line naming the processes of the job that stopped (killed or crashed), as process ``rank`` sees it."""
    dead = gone()
    deadline = time.monotonic() + 2.0
    while not dead and time.monotonic() < deadline:  # a peer's sockets close while it is still being killed
        time.sleep(0.05)
        dead = gone()
    world = len(PROCESSES)
    if dead:
        who = ", ".join(f"process {r} of {world} (pid {PROCESSES[r][1]} on {PROCESSES[r][0]})" for r in dead)
        what = f"{who} stopped (killed or crashed) while process {rank} waited for it"
    else:
        others = sorted({host for host, _ in PROCESSES} - {socket.gethostname()})
        where = f" on {', '.join(others)}" if others else ""
        what = f"another process of the job{where} stopped answering while process {rank} waited for it"
    detail = f" ({detail})" if detail else ""
    return (
        f"{what}{detail}; what the run saved (its collected rows and phases, its checkpoints) is kept: the same "
        "command with --ckpt_path last continues (the stopped process's own log says why it stopped)"
    )


# what gloo and NCCL say when the process at the other end of a collective is gone
_PEER_LOST = re.compile(
    r"Connection (?:reset|closed) by peer|Broken pipe|remote worker|NCCL communicator was aborted|"
    r"ProcessGroupNCCL.*(?:timeout|Timeout|abort)|Socket Timeout|recvBytes|sendBytes"
)


def peer_failure(err: BaseException) -> str | None:
    """The one-line message for a collective that failed because another process of the job is gone (``err`` or
    an exception it came from), ``None`` for any other error or outside a multi-process job."""
    if len(PROCESSES) < 2:
        return None
    known = getattr(err, "_bpo_lost", None)  # composed once per error (it may wait for the dead process to go)
    if known is not None:
        return known
    seen, visited = err, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        text = str(seen)
        if isinstance(seen, RuntimeError) and _PEER_LOST.search(text):
            rank = dist.get_rank() if dist.is_initialized() else 0
            reason = _PEER_LOST.search(text).group(0)
            message = lost_message(rank, f"a collective failed: {reason}")
            with suppress(AttributeError, TypeError):  # an exception type that takes no attributes: composed again
                err._bpo_lost = message
            return message
        seen = seen.__cause__ or seen.__context__
    return None


def agree_on_run_dir(folder: Path, ranks: Ranks, key: str, ckpt_path: str | None) -> None:
    """Stop the job, on every process at once, unless all its processes see one run folder and resume from one
    checkpoint. Process 0 alone writes the run folder, and every process reads from it (the checkpoint Lightning
    restores, the phase data of a resumed phase): a folder private to each node would leave the processes in
    different states, waiting in different collectives forever. Process 0 writes a token there, the others read
    it back, and every process learns what each saw: an ``InputError`` naming ``key`` (or ``ckpt_path``) where they
    differ, raised by all of them, so no process is left waiting for another."""
    if ranks.world == 1:
        return
    path = folder / SHARED_CHECK
    token = None
    if ranks.rank == 0:
        from bpo_lightning.files import atomic_write

        token = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
        atomic_write(path, token, key=key)
    token = ranks.broadcast(token)  # process 0 has written it by now
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    views = ranks.gather((seen, socket.gethostname(), str(ckpt_path) if ckpt_path else None, os.getpid()))
    PROCESSES[:] = [(host, pid) for _, host, _, pid in views]
    ranks.barrier()  # every process has read it
    if ranks.rank == 0:
        path.unlink(missing_ok=True)
    from bpo_lightning.errors import InputError

    blind = [f"process {r} on {host}" for r, (ok, host, _, _) in enumerate(views) if not ok]
    if blind:
        raise InputError(
            f"{key}: {folder} is not one folder for every process: {', '.join(blind)} cannot see what process 0 "
            f"(on {views[0][1]}) writes there; put the run folder on a filesystem that every node mounts at the "
            "same path (docs/distributed.md, several nodes)"
        )
    resumes = {ckpt for _, _, ckpt, _ in views}
    if len(resumes) > 1:
        each = ", ".join(f"process {r}: {ckpt or 'none (a fresh fit)'}" for r, (_, _, ckpt, _) in enumerate(views))
        raise InputError(f"ckpt_path: the processes would start from different checkpoints ({each})")


def _default_store():
    """The default process group's key-value store, or ``None`` where torch does not expose it."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: each process holds a shard, and the tensor itself is empty outside a gather."""
    return hasattr(param, "ds_id")


@contextmanager
def gathered(params: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Whole ZeRO-3 parameters inside the block (every process must enter it); with ``modify``, in-place changes
    are written back to the partitions. Parameters that are not partitioned pass through untouched."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        with nullcontext():
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` this process holds: the tensor itself, or under ZeRO-3 its shard (``ds_tensor``, which
    the optimizer updates and every forward gathers from; a whole copy that ZeRO-3 keeps of a small, "persistent"
    parameter is refreshed from the shards).

    Snapshots of the behavior, initial and EMA models are made of these: 1/N of the weights per process, swapped
    and averaged locally, element by element, with no communication.
    """
    return param.ds_tensor.data if is_partitioned(param) else param.data


def release_whole(params: Iterable[torch.Tensor]) -> None:
    """Drop the whole copies ZeRO-3 holds of ``params`` (after their shards were written), so the next forward
    gathers them again from the shards instead of using stale values."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for param in params:
        if is_partitioned(param) and param.ds_status == ZeroParamStatus.AVAILABLE:
            param.partition(has_been_updated=False)


def offloads_optimizer(strategy) -> bool:
    """Whether a DeepSpeed strategy keeps the optimizer states in CPU memory (ZeRO-Offload)."""
    config = getattr(strategy, "config", None) or {}
    return bool(config.get("zero_optimization", {}).get("offload_optimizer"))


def zero3_integration(strategy):
    """When ``strategy`` runs ZeRO-3, register its DeepSpeed config with transformers and return the object that
    must stay alive while the model is used (transformers keeps a weak reference): ``from_pretrained`` and
    ``from_config`` then fill each process's partitions, and ``generate`` keeps the processes in step
    (``synced_gpus``). Otherwise ``None``."""
    if not getattr(strategy, "zero_stage_3", False):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    config = dict(strategy.config)
    config.setdefault("train_micro_batch_size_per_gpu", 1)  # set by Lightning only later; not used by loading
    return HfDeepSpeedConfig(config)


@contextmanager
def outside_zero_init() -> Iterator[None]:
    """Create modules inside the block as ordinary whole tensors even within ZeRO-3's ``zero.Init`` (e.g. LoRA
    adapters initialised by PEFT, or a small randomly initialised model, which then starts exactly as on one
    process); DeepSpeed partitions them when the engine starts. transformers' own ZeRO-3 creation path is off too."""
    from transformers.integrations import deepspeed as hf

    try:
        from deepspeed.runtime.zero import partition_parameters as zero
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        yield
        return
    active, registered = zero.top_level_context is not None, hf._hf_deepspeed_config_weak_ref
    if active:
        zero.shutdown_init_context()
    hf._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf._hf_deepspeed_config_weak_ref = registered
        if active:
            zero.restore_init_context()


@contextmanager
def gathered_for_generation(strategy) -> Iterator[None]:
    """Under ZeRO-3, the whole model on every process for the block, with DeepSpeed's per-layer hooks off
    (DeepSpeed's ``unwrap_model_for_generation``): one gather instead of one per layer and decoding step. Needs
    the whole model to fit in one device's memory. Elsewhere a no-op."""
    engine = getattr(strategy, "model", None) if getattr(strategy, "zero_stage_3", False) else None
    if engine is None or not hasattr(engine, "optimizer"):  # not ZeRO-3, or the engine is not started yet
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield
