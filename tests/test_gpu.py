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


def test_compiled_static_cache_sampler_on_gpu(sft_dir):
    """On CUDA the decode step is compiled once (CUDA graphs) and reused by every block; a bfloat16 policy samples
    valid responses, and the eager loop on the same GPU draws responses of the same form."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bpo_lightning.prompts import ReviewPrompts, model_input
    from bpo_lightning.sampling import StaticCacheSampler

    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.bfloat16).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    prompts = [model_input(row) for row in ReviewPrompts("prompts").load("data.prompts")][:40]
    sampler = StaticCacheSampler(batch_size=16, max_new_tokens=24, progress=False)  # compile: null = on CUDA
    first = sampler.sample(model, tokenizer, prompts, seed=0)  # 3 blocks, the last one padded to 16 prompts
    again = sampler.sample(model, tokenizer, prompts, seed=0)
    from bpo_lightning.sampling import encode_prompt
    from bpo_lightning.testing import sampler_problems

    # computed apart from the sampler: every prompt's ids (the padded last block's rows dropped) as the tokenizer
    # encodes it, and num_samples responses for each
    assert first.prompt_ids == [
        encode_prompt(tokenizer, p, sampler.max_prompt_tokens or 1 << 30, sampler.add_bos) for p in prompts
    ]
    assert [len(rs) for rs in first.response_ids] == [sampler.num_samples] * len(prompts)
    # the sampler contract on the GPU, all 3 blocks: shapes, no EOS kept, finished flags, texts decoded, recorded
    # bf16 log-probs near one uncompiled forward pass of the model (a sum over up to 24 tokens, each bf16-rounded)
    assert sampler_problems(sampler, model, tokenizer, prompts, atol=0.5) == []
    assert len(sampler._steps) == 1  # one compiled step for the whole run, the checks' samplings included
    assert again.response_ids == first.response_ids  # the same seed draws the same tokens
    assert all(
        0 < len(r) <= 24 or done
        for rs, ds in zip(first.response_ids, first.finished, strict=True)
        for r, done in zip(rs, ds, strict=True)
    )


def test_kl_snapshots_stay_in_cpu_memory_on_gpu(tmp_path, sft_dir):
    """With KL evaluation on (held-out prompts, ``kl_samples``) the initial and behavior weights it compares with are
    kept, in CPU memory by default (``model.offload_snapshots``): the GPU holds the policy alone; the KL numbers are
    those computed by swapping each snapshot in."""
    import lightning as L
    from conftest import make_run

    from bpo_lightning.evaluation import Evaluation

    module, data, _ = make_run(tmp_path, sft_dir, budget=16, num_phases=1, eval_prompts=4,
                               evaluation=Evaluation(kl_samples=2))  # fmt: skip
    trainer = L.Trainer(accelerator="cuda", devices=1, max_epochs=1, reload_dataloaders_every_n_epochs=1,
                        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert module.policy.device.type == "cuda"
    snapshots = [module.initial, module.behavior_copy, module.behavior_snapshot]
    kept = [s for s in snapshots if s]
    assert kept and all(t.device.type == "cpu" for s in kept for t in s.values())
    assert module.last_evaluation["kl_initial"] >= 0  # measured against the CPU copies
