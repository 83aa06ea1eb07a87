"""A callback for `bpo fit` in tests: process ``BPO_TEST_DIES`` (a rank) SIGKILLs itself, alone, as its
``BPO_TEST_DIES_AT``-th training step starts (``step``) or as its phase's collection starts (``collect``), while the
other processes go on into the next collective."""

import os
import signal

import lightning as L


class DieAlone(L.Callback):
    def __init__(self) -> None:
        self.rank = int(os.environ.get("BPO_TEST_DIES", "-1"))
        self.where, _, at = os.environ.get("BPO_TEST_DIES_AT", "step:1").partition(":")
        self.at = int(at)

    def _die(self, trainer) -> None:
        if trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.where == "step" and trainer.global_step + 1 == self.at:
            self._die(trainer)

    def on_train_epoch_start(self, trainer, module) -> None:
        if self.where == "phase" and trainer.current_epoch + 1 == self.at:
            self._die(trainer)
