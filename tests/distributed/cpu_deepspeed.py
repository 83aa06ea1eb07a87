"""Lightning's DeepSpeed strategy on CPU, for tests only: the stock strategy refuses anything but CUDA.

Three CUDA assumptions are lifted: the accelerator type check, the device-index check, and the ``device_rank``
passed to ``deepspeed.initialize`` (``None`` on CPU; the local rank is passed instead). Everything else is the
stock strategy, so the code paths the project runs on GPUs (ZeRO partitioning, checkpoints) run here too.
"""

import argparse

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only guard

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        rank_zero_only.rank = self.global_rank
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
