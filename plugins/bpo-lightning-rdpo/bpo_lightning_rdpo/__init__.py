"""Robust DPO as a bpo-lightning plugin: ``model.loss: RobustDPOLoss`` once this distribution is installed."""

import torch.nn.functional as F

from bpo_lightning import PreferenceLoss, hookimpl


class RobustDPOLoss(PreferenceLoss):
    """Provably robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8): an unbiased DPO loss under labels
    flipped with known probability ε:

        ℓ(h) = [(1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)

    Its expectation over the label noise equals the clean DPO loss. At h = 0 it is log 2, like DPO; with ε = 0 it
    is DPO.

    Args:
        beta: inverse temperature β.
        flip_rate: ε in [0, 0.5), the annotator's label-flip probability.
    """

    def __init__(self, beta: float = 0.1, flip_rate: float = 0.1) -> None:
        super().__init__(beta)
        if not 0.0 <= flip_rate < 0.5:
            raise ValueError(f"model.loss.init_args.flip_rate must be in [0, 0.5), got {flip_rate}")
        self.flip_rate = flip_rate

    def pair_losses(self, h):
        eps = self.flip_rate
        clean, flipped = -F.logsigmoid(self.beta * h), -F.logsigmoid(-self.beta * h)
        return ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)


@hookimpl
def register_losses(register):
    register(RobustDPOLoss)
