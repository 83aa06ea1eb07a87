"""What ``bpo`` prints: its own lines and progress bars, without the routine logs and bars of the libraries under it.

A default ``bpo`` command keeps the libraries' errors and silences their announcements (Lightning's "GPU available",
its tips and model summary, DeepSpeed's accelerator choice, transformers' and datasets' progress bars and notices)
and a few warnings that are about the libraries' own code, not about the run. ``--verbose`` (anywhere on the
command line) or ``BPO_VERBOSE=1`` shows all of them. Warnings and progress of bpo-lightning itself are never
silenced.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

VERBOSE_ENV = "BPO_VERBOSE"

# loggers whose records below ERROR are dropped
LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
    "datasets",
    "DeepSpeed",
    "deepspeed",
    "torch.distributed",
    "vllm",
)
# set for libraries not imported yet, which read them at import (children of a multi-process run inherit them)
ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_CONFIGURE_LOGGING": "1",
}
# (message regex, warning category) of warnings about the libraries' own code
WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)", Warning),  # Lightning's use of torch's _pytree
    (r"The number of training batches .* is smaller than the logging interval", Warning),
    (r".*`loss_type=None` was set in the config", Warning),
    (r".*gradient.checkpointing", FutureWarning),
    (r".*use_reentrant", Warning),
    (r".*does not have many workers which may be a bottleneck", Warning),
    (r".*litlogger", Warning),
    (r".*torch.distributed.reduce_op. is deprecated", FutureWarning),  # vLLM's import
)


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block, the libraries' logs below ERROR, their progress bars and their :data:`WARNINGS` are
    silenced, unless ``--verbose`` / ``BPO_VERBOSE=1``; everything is as before after it."""
    if verbose_requested():
        yield
        return
    saved_env = {name: os.environ.get(name) for name in ENVIRONMENT}
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    # a level covers the child loggers ("lightning.pytorch.utilities.rank_zero"); a filter stays when a library
    # imported inside the block resets its logger's level (DeepSpeed announces its accelerator at import)
    drop = _BelowError()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
        logger.addFilter(drop)
    restore_bars = _quiet_progress_bars()
    try:
        with warnings.catch_warnings():
            for message, category in WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        restore_bars()
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeFilter(drop)
            logger.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _quiet_progress_bars():
    """Turn off the progress bars and notices of transformers and datasets where they are imported (where not, the
    environment does it when they are); returns the function that turns them back on."""
    undo = []
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        undo.append(lambda: hf_logging.set_verbosity(level))
    if "datasets" in sys.modules:
        ds_tqdm = importlib.import_module("datasets.utils.tqdm")  # the module (``datasets.utils.tqdm`` is the class)
        if not ds_tqdm.are_progress_bars_disabled():
            ds_tqdm.disable_progress_bars()
            undo.append(ds_tqdm.enable_progress_bars)

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore
