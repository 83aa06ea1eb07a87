"""GPU smoke tests (`nox -s gpu`); skipped where CUDA is not available."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bpo_phase_on_gpu(tmp_path, sft_dir):
    import lightning as L
    from conftest import make_run

    module, data, _ = make_run(tmp_path, sft_dir, budget=32, num_phases=2)
    trainer = L.Trainer(accelerator="cuda", devices=1, max_epochs=2, reload_dataloaders_every_n_epochs=1,
                        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert module.policy.device.type == "cuda"
    assert sorted(data.stats) == [0, 1] and all(s.kept > 0 for s in data.stats.values())
