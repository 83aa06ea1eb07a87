"""Tests of the robust DPO plugin, run in an environment where the distribution is installed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from bpo_lightning.plugins import load_plugins

HERE = Path(__file__).parent


def test_hand_computed_value():
    """β = 1, ε = 0.25, h = 1 (policy margin 1, behavior margin 0):
    clean = −log σ(1) = 0.313262, flipped = −log σ(−1) = 1.313262,
    ℓ = (0.75·0.313262 − 0.25·1.313262) / 0.5 = (0.234946 − 0.328315) / 0.5 = −0.186739."""
    from bpo_lightning_rdpo import RobustDPOLoss

    out = RobustDPOLoss(beta=1.0, flip_rate=0.25)(
        torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([0.0])
    )
    assert_close(out.losses, torch.tensor([-0.186739]), atol=1e-5, rtol=0)


def test_zero_flip_rate_is_dpo():
    from bpo_lightning_rdpo import RobustDPOLoss

    from bpo_lightning import DPOLoss

    h = torch.linspace(-20, 20, 9)
    zeros = torch.zeros_like(h)
    assert_close(RobustDPOLoss(flip_rate=0.0)(h, zeros, zeros, zeros).losses, DPOLoss()(h, zeros, zeros, zeros).losses)


def test_discovered_from_entry_point():
    plugins = load_plugins(autoload=True)
    info = next(i for i in plugins.infos if i.distribution == "bpo-lightning-rdpo")
    assert info.entry_point == "rdpo = bpo_lightning_rdpo"
    assert info.registered == {"losses": ["RobustDPOLoss"]}
    assert plugins.get("losses", "RobustDPOLoss").__module__ == "bpo_lightning_rdpo"
    assert "RobustDPOLoss" not in load_plugins(autoload=False).registries["losses"]


def _bpo(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bpo_lightning", *args], capture_output=True, text=True, env=env)


def test_listed_by_bpo_plugins():
    result = _bpo("plugins")
    assert result.returncode == 0, result.stderr
    assert "bpo-lightning-rdpo 0.1.0" in result.stdout
    assert "losses: RobustDPOLoss" in result.stdout


@pytest.mark.parametrize("loss", ["RobustDPOLoss", "bpo_lightning_rdpo.RobustDPOLoss"])
def test_accepted_as_model_loss(loss):
    config = Path(__file__).parents[3] / "configs" / "quickstart.yaml"
    result = _bpo(
        "fit", "--config", str(config), f"--model.loss={loss}", "--model.loss.flip_rate=0.2", "--print_config"
    )
    assert result.returncode == 0, result.stderr
    assert "class_path: bpo_lightning_rdpo.RobustDPOLoss" in result.stdout
    assert "flip_rate: 0.2" in result.stdout


def test_conforms_to_the_loss_contract():
    """The package's own conformance checks (float64, float32 and bfloat16; gradients; citation)."""
    from bpo_lightning_rdpo import RobustDPOLoss

    from bpo_lightning.testing import check_loss

    check_loss(RobustDPOLoss)
    check_loss(RobustDPOLoss(beta=0.5, flip_rate=0.3))
