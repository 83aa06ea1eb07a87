"""Checkpoints that a kill or a full disk cannot leave half-written, and that are refused when they are not ours.

- ``AtomicCheckpointIO`` writes each checkpoint to a temporary file *in the target folder* (no checkpoint-sized file
  in ``$TMPDIR``), syncs it and renames it over the target: a checkpoint is complete or absent. Loading names the
  file when it is missing, truncated, damaged or not a bpo-lightning checkpoint.
- ``PhaseCheckpoint`` is Lightning's ``ModelCheckpoint`` with the run's conventions: a checkpoint at the very end of
  every phase (after its evaluation, so a resume neither skips nor repeats one), overwritten when a resumed run redoes
  the phase (no ``-v1`` copies), and ``last.ckpt`` a link to the newest one (no second full copy), replaced
  atomically. Its file names may use ``{phase}``, the phase counted from 1 (``phase-1.ckpt`` after the first phase;
  ``{epoch}`` is Lightning's, counted from 0). Temporary files a killed run left in the folder are removed when the
  next fit starts.

Under DeepSpeed the strategy writes its own checkpoint folders; ``PhaseCheckpoint`` leaves its I/O alone.

No checkpoint runs code when it is read. Files load with ``weights_only=True``. DeepSpeed's readers (the engine's
resume, ``zero_to_fp32``) unpickle with ``weights_only=False``: inside ``weights_only_loads()`` every ``torch.load``
is weights-only, with the few DeepSpeed classes its optimizer states hold allowed, and a file holding anything else
is refused by name. ``bpo export`` and every trainer a ``BPOModule`` runs in (``guard_loads``) read through it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from bpo_lightning.errors import InputError, disk_error
from bpo_lightning.files import atomic_file, lock_run_dir


@contextlib.contextmanager
def _without_crc32():
    """``torch.save`` without a CRC-32 per record: ``torch.load`` never checks them, and computing them was more than
    half of a checkpoint's write time (1.2 s instead of 2.8–4.1 s for 1.6 GB of weights and AdamW state). The atomic
    rename is what keeps a file whole."""
    import torch.serialization

    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


# what DeepSpeed's optimizer-state files hold besides tensors and builtins (ZeRO 1-3, fp32/bf16/fp16): an enum,
# a dataclass and the loss scalers, whose unpickling sets attributes and runs no code
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _allowed_globals() -> list:
    import importlib

    found = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):  # absent in this DeepSpeed version (or no DeepSpeed)
            found.append(getattr(importlib.import_module(module), attr))
    return found


@contextlib.contextmanager
def weights_only_loads(key: str = "ckpt_path"):
    """Every ``torch.load`` inside is ``weights_only=True`` whatever its caller asks (DeepSpeed asks for
    ``weights_only=False``); a file holding other Python objects is an ``InputError`` naming the file, ``key`` and
    the objects, and nothing of it runs."""
    import torch

    load = torch.load

    @functools.wraps(load)
    def restricted(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return load(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        except pickle.UnpicklingError as err:
            raise load_error(f, key, err) from None

    torch.load = restricted
    try:
        yield
    finally:
        torch.load = load


def load_error(f, key: str, err: Exception) -> InputError:
    """The ``InputError`` for a file ``torch.load`` refused: one holding Python objects beyond weights names them (read
    without running them); any other is truncated, damaged or not written by ``torch.save``."""
    import torch

    names: list[str] = []
    if isinstance(err, pickle.UnpicklingError) and isinstance(f, str | os.PathLike):
        with contextlib.suppress(Exception):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
            names = [name for name in unsafe if name not in DEEPSPEED_GLOBALS]
    if names:
        return InputError(
            f"{key}: {f} is refused: it holds Python objects ({', '.join(names[:4])}) that would run "
            "code when loaded, and bpo-lightning reads checkpoints as weights only; use a checkpoint "
            "written by `bpo fit`"
        )
    detail = " ".join(_ANSI.sub("", f"{type(err).__name__}: {err}").split())[:200]
    return InputError(
        f"{key}: {f} is not a complete checkpoint — truncated, damaged or not written by torch.save ({detail})"
    )


def guard_loads(strategy) -> None:
    """Make ``strategy.load_checkpoint`` (Lightning's resume and ``--ckpt_path``; for DeepSpeed the engine's folder
    reader) run inside ``weights_only_loads``, and read checkpoints another world size or strategy wrote
    (``reshard``). Idempotent."""
    from bpo_lightning import reshard

    load = strategy.load_checkpoint
    if getattr(load, "_weights_only", False):
        return

    @functools.wraps(load)
    def guarded(checkpoint_path, *args, **kwargs):
        with weights_only_loads():
            checkpoint = reshard.load_moved(strategy, checkpoint_path)
            if checkpoint is None:
                checkpoint = load(checkpoint_path, *args, **kwargs)
        if isinstance(checkpoint, dict) and "bpo_optimizer" in checkpoint:
            checkpoint.setdefault("optimizer_states", [])  # restored by name (reshard.restore_optimizer)
        return checkpoint

    guarded._weights_only = True
    strategy.load_checkpoint = guarded
    strategy.load_optimizer_state_dict = reshard.restore_optimizer(strategy, strategy.load_optimizer_state_dict)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through a temporary file beside the target and a rename; loads that name a bad file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        import torch

        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_error(err, path, "checkpoint.dirpath") from err
        with atomic_file(path, "wb", fsync=True, key="checkpoint.dirpath") as f, _without_crc32():
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return checked_load(path, map_location, weights_only, load=super().load_checkpoint)


def checked_load(path, map_location: Any = None, weights_only: bool | None = None, load=None) -> dict[str, Any]:
    """A bpo-lightning checkpoint file, or an ``InputError`` naming the file and what is wrong with it."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise InputError(
            f"ckpt_path: {path} is a folder (a DeepSpeed checkpoint), read here as a file; give it as it is to "
            "`bpo fit/validate/test --ckpt_path` (any strategy and number of processes reads it) or to "
            "`bpo export --ckpt`, which makes a single-file model"
        )
    if not path.is_file():
        raise InputError(f"ckpt_path: no checkpoint file {path}")
    try:
        if load is None:
            checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=weights_only is not False)
        else:
            checkpoint = load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # torch raises many kinds (zip errors, unpickling errors, IndexError, EOFError)
        if isinstance(err, InputError):
            raise
        raise load_error(path, "ckpt_path", err) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "bpo" not in checkpoint:
        keys = type(checkpoint).__name__
        if isinstance(checkpoint, dict):
            keys = ", ".join(sorted(map(str, checkpoint))[:6])
        raise InputError(
            f"ckpt_path: {path} is not a bpo-lightning checkpoint (it holds {keys or 'nothing'}; a "
            "bpo fit checkpoint has 'state_dict' and 'bpo')"
        )
    return checkpoint


class PhaseCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for phases: see the module docstring. Its arguments are ``ModelCheckpoint``'s; ``filename``
    may use ``{phase}`` (= ``{epoch}`` + 1)."""

    def _format_checkpoint_name(self, filename, metrics, prefix=None, auto_insert_metric_name=True) -> str:
        if "epoch" in metrics and "phase" not in metrics:
            metrics = {**metrics, "phase": metrics["epoch"] + 1}
        return super()._format_checkpoint_name(filename, metrics, prefix, auto_insert_metric_name)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            lock_run_dir(trainer.default_root_dir)  # one writer: another fit's temporary files are not ours to remove
        if stage == "fit" and trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for leftover in Path(self.dirpath).glob("*.tmp"):  # a checkpoint or link a killed run did not finish
                if leftover.is_file() or leftover.is_symlink():
                    leftover.unlink()
        strategy = trainer.strategy
        if type(getattr(strategy, "_checkpoint_io", None) or strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if self._save_on_train_epoch_end is None:
            # at the phase's very end: after its evaluation and report (Lightning runs both before the epoch-end
            # hooks), so a resume starts the next phase and never repeats or skips a phase's evaluation
            self._save_on_train_epoch_end = True

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        """``linkpath`` (``last.ckpt``) replaced in one step by a relative link to ``filepath`` (or a copy where links
        are not allowed): it never points at nothing or at a partial file."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            folder = os.path.dirname(linkpath)
            tmp = os.path.join(folder, f".{os.path.basename(linkpath)}.{os.getpid()}.tmp")
            if os.path.lexists(tmp):
                os.remove(tmp)
            try:
                os.symlink(os.path.relpath(filepath, folder), tmp)
            except OSError:
                shutil.copyfile(filepath, tmp)
            os.replace(tmp, linkpath)
        trainer.strategy.barrier()
