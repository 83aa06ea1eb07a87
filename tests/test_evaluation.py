"""Evaluation as a tool: answers scored against references, KL to the initial and behavior models, `bpo validate`
and `bpo test`, evaluations every N steps."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_run
from torch.utils.data import DistributedSampler

from bpo_lightning import GenerateSampler, RuleAnnotator
from bpo_lightning.annotation import Annotator
from bpo_lightning.batches import response_batch
from bpo_lightning.cli import main
from bpo_lightning.data import OnlineDataModule
from bpo_lightning.evaluation import Evaluation, EvaluationMetrics, evaluation_step
from bpo_lightning.module import BPOModule
from bpo_lightning.policy import Pretrained
from bpo_lightning.prompts import ReviewPrompts
from bpo_lightning.reporting import PhaseReport
from bpo_lightning.sampling import Samples, encode_prompt

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def test_evaluation_settings_name_their_config_keys():
    with pytest.raises(ValueError, match=r"model.evaluation.samples_per_prompt must be 1 with greedy"):
        Evaluation(temperature=0.0, samples_per_prompt=2)
    with pytest.raises(ValueError, match=r"model.evaluation.kl_samples must be >= 0, got -1"):
        Evaluation(kl_samples=-1)
    with pytest.raises(ValueError, match=r"model.evaluation.temperature must be >= 0"):
        Evaluation(temperature=-1.0)


def test_response_batch_scores_eos_only_where_the_model_emitted_it():
    samples = Samples(
        prompt_ids=[[1, 2]], response_ids=[[[5, 6], [7]]], responses=[["a", "b"]], finished=[[True, False]]
    )
    batch = response_batch(samples, pad_id=0, eos_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 5, 6, 9], [1, 2, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]


class Length(Annotator):
    """Score = number of characters; NaN for answers containing 'zzz' (an evaluator failure)."""

    identity = "Length"

    def score(self, prompts, responses):
        return [math.nan if "zzz" in r else float(len(r)) for r in responses]


def _module(sft_dir, **evaluation):
    module = BPOModule(policy=Pretrained(str(sft_dir)), evaluation=Evaluation(**evaluation))
    module.configure_model()
    return module


def _data(annotator, evaluator=None, limit=8):
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"),
        annotator=annotator,
        evaluator=evaluator,
        eval_prompts=ReviewPrompts("eval", limit=limit),
        annotation_cache=None,
        sampler=GenerateSampler(max_new_tokens=12, progress=False),
        eval_batch_size=4,
    )
    data.setup("validate")
    return data


def test_win_rate_and_rewards_follow_the_saved_scores(sft_dir):
    module = _module(sft_dir, temperature=1.0, samples_per_prompt=2, kl_samples=0)
    gold = RuleAnnotator("bpo_lightning.tasks.reviews:gold_reward")
    data = _data(annotator=Length(), evaluator=gold)  # the annotator (proxy) is not the evaluator
    metrics = EvaluationMetrics()
    inputs = data.evaluation_inputs()
    records = [r for batch in data.eval_batches() for r in evaluation_step(module, inputs, batch, metrics)]
    result = metrics.compute()
    assert len(records) == 16 and [r["index"] for r in records] == [i for i in range(8) for _ in range(2)]
    wins = sum(r["score"] > r["reference_score"] for r in records)
    ties = sum(r["score"] == r["reference_score"] for r in records)
    assert result["win_rate"] == pytest.approx(wins / 16) and result["tie_rate"] == pytest.approx(ties / 16)
    assert result["reward"] == pytest.approx(sum(r["score"] for r in records) / 16)
    assert result["proxy_reward"] == pytest.approx(sum(len(r["response"]) for r in records) / 16)
    assert result["length"] == pytest.approx(sum(len(r["response"].split()) for r in records) / 16)
    assert "kl_initial" not in result and module.initial is None  # kl_samples: 0 keeps no initial weights
    # the same batches give the same sampled answers: each batch's seed follows its first prompt's index
    inputs = data.evaluation_inputs()
    again = [r for batch in data.eval_batches() for r in evaluation_step(module, inputs, batch, EvaluationMetrics())]
    assert [r["response"] for r in again] == [r["response"] for r in records]


def test_an_evaluator_failure_is_counted_invalid_not_as_a_loss(sft_dir):
    module = _module(sft_dir, kl_samples=0)
    data = _data(annotator=Length(), limit=4)
    data.eval_rows[1] = {**data.eval_rows[1], "reference": "zzz"}  # the evaluator fails on this reference
    metrics = EvaluationMetrics()
    inputs = data.evaluation_inputs()
    records = [r for batch in data.eval_batches() for r in evaluation_step(module, inputs, batch, metrics)]
    result = metrics.compute()
    assert records[1]["reference_score"] is None
    assert result["invalid"] == 1 and result["count"] == 3
    valid = [r for r in records if r["reference_score"] is not None]
    assert result["win_rate"] == pytest.approx(sum(r["score"] > r["reference_score"] for r in valid) / 3)


def _exact_next_token_kl(module, prompt_ids, weights_p, weights_q):
    """KL(p‖q) of the next-token distributions after ``prompt_ids``, from the two weight contexts."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        with weights_p():
            logp = module.policy(input_ids=ids).logits[0, -1].double().log_softmax(-1)
        with weights_q():
            logq = module.policy(input_ids=ids).logits[0, -1].double().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum().item()


def test_kl_estimates_match_exact_kl_of_one_token_answers_and_follow_the_behavior(sft_dir):
    """With one-token answers the sequence KL is the next-token KL, computable exactly from the logits; the
    Monte-Carlo estimates must agree within their standard errors. π_β follows hard sync phase by phase."""
    module = _module(sft_dir, max_new_tokens=1, kl_samples=4000)
    data = _data(annotator=Length(), limit=1)
    batch = data.eval_batches()[0]
    prompt_ids = encode_prompt(module.tokenizer, batch[0][1]["prompt"], 64)

    def evaluate():
        metrics = EvaluationMetrics()
        evaluation_step(module, data.evaluation_inputs(), batch, metrics)
        return metrics.compute()

    def perturb(seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.policy.transformer.h[-1].parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=generator))

    before = evaluate()  # no phase has started: the policy is the initial and the behavior model
    assert before["kl_initial"] == 0.0 and before["kl_behavior"] == 0.0
    perturb(0)
    module.start_phase(0)  # phase 1: π_β is the initial model
    result = evaluate()
    exact = _exact_next_token_kl(module, prompt_ids, module.policy_weights, module.initial_weights)
    assert exact > 0.05
    assert abs(result["kl_initial"] - exact) < 4 * result["kl_initial_stderr"] + 1e-3
    assert result["kl_behavior"] == result["kl_initial"]
    module.start_phase(1)  # hard sync: π_β is now the current policy
    assert evaluate()["kl_behavior"] == 0.0
    synced = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    perturb(1)
    result = evaluate()
    exact = _exact_next_token_kl(module, prompt_ids, module.policy_weights, lambda: module._computing_as(synced))
    assert exact > 0.05
    assert abs(result["kl_behavior"] - exact) < 4 * result["kl_behavior_stderr"] + 1e-3
    assert result["kl_initial"] > result["kl_behavior"]  # two perturbations away from the start, one from π_β


def test_held_out_prompts_split_into_batches_and_across_processes():
    data = OnlineDataModule(
        prompts=ReviewPrompts("prompts"),
        annotator=Length(),
        eval_prompts=ReviewPrompts("eval"),
        test_prompts=ReviewPrompts("eval", limit=5),
        max_eval_prompts=10,
        eval_batch_size=3,
    )
    data.setup("test")
    assert len(data.eval_rows) == 10 and len(data.test_rows) == 5 and data.pool is None  # no training pool read
    assert [len(b) for b in data.eval_batches()] == [3, 3, 3, 1]
    shards = [[i for batch in data.eval_batches(rank, 3) for i, _ in batch] for rank in range(3)]
    # whole batches of 3 per process, round robin, so a batch (and its seeded samples) is the same on any number
    # of processes; every prompt once; a process one batch short ends with a stand-in, -1
    assert shards == [[0, 1, 2, 9], [3, 4, 5, -1], [6, 7, 8, -1]]
    assert [[len(b) for b in data.eval_batches(rank, 3)] for rank in range(3)] == [[3, 1], [3, 1], [3, 1]]
    loader = data._eval_loader(data.eval_rows)
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it instead of a padding sampler
    assert [i for i, _ in next(iter(data.test_dataloader()))] == [0, 1, 2]
    with pytest.raises(ValueError, match="data.eval_batch_size must be >= 1, got 0"):
        OnlineDataModule(prompts=ReviewPrompts("prompts"), annotator=Length(), eval_batch_size=0)


def test_validate_needs_held_out_prompts(tmp_path, sft_dir):
    module, data, trainer = make_run(tmp_path, sft_dir)
    with pytest.raises(ValueError, match="bpo validate: data.eval_prompts is not set"):
        trainer.validate(module, datamodule=data)


@pytest.mark.slow
def test_evaluation_every_n_steps_records_mid_phase_points(tmp_path, sft_dir, capsys):
    report = PhaseReport(plots=False)
    trainer_args = {"val_check_interval": 2, "check_val_every_n_epoch": None}
    module, data, trainer = make_run(tmp_path, sft_dir, budget=48, num_phases=2, callbacks=[report], eval_prompts=4,
                                     evaluation=Evaluation(kl_samples=0), trainer_args=trainer_args)  # fmt: skip
    trainer.fit(module, datamodule=data)
    # 24 prompts per phase, 8 pairs per step: 3 steps per phase, an evaluation every 2 steps
    points = [(h["phase"], h["step"], "win_rate" in h) for h in report.history]
    assert points == [(0, 0, True), (round(2 / 3, 4), 2, True), (1, 3, False), (round(4 / 3, 4), 4, True), (2, 6, True)]
    assert "step 2    | phase 1/2 at 67% | eval win rate" in capsys.readouterr().out
    saved = sorted(p.name for p in (tmp_path / "evaluations").iterdir())
    assert saved == [
        "fit_step0000002.jsonl",
        "fit_step0000004.jsonl",
        "fit_step0000006.jsonl",
        "start_step0000000.jsonl",
    ]


def _last_row(path: Path, key: str) -> dict:
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r.get(key)][-1]


@pytest.mark.slow
@pytest.mark.parametrize("members", [0, 3], ids=["full", "lora-ensemble"])
def test_bpo_validate_and_test_reproduce_the_fits_final_evaluation(tmp_path, monkeypatch, members, capsys):
    monkeypatch.setattr("sys.argv", ["bpo"])  # arguments come from the list below
    run = tmp_path / "run"
    lora = [
        "--model.lora=bpo_lightning.lora.LoRA",
        "--model.lora.r=4",
        f"--model.lora.members={members}",
        "--model.lr=5e-3",
    ]
    main(
        [
            "fit",
            "--config",
            QUICKSTART,
            f"--trainer.default_root_dir={run}",
            f"--model.policy.init_args.cache_dir={tmp_path / 'cache'}",
            "--model.policy.init_args.steps=40",
            "--data.budget=32",
            "--data.num_phases=2",
            "--data.batch_size=8",
            "--data.sampler.init_args.max_new_tokens=16",
            "--data.sampler.init_args.progress=false",
            "--data.max_eval_prompts=8",
            *(lora if members else []),
        ]
    )
    fit_metrics = (run / "metrics.csv").read_bytes()
    final = json.loads((run / "report.json").read_text())[-1]
    noise = 3 * (final["kl_behavior_stderr"] + final["kl_initial_stderr"])  # 8 prompts, one Monte-Carlo draw each
    assert final["phase"] == 2 and final["kl_behavior"] < final["kl_initial"] + noise
    args = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    main(["validate", *args])
    validated = _last_row(run / "validate" / "metrics.csv", "eval/win_rate")
    for name in ("win_rate", "reward", "length", "kl_initial", "kl_behavior"):  # metrics.csv holds float32
        assert float(validated[f"eval/{name}"]) == pytest.approx(final[name], rel=1e-6, abs=1e-7), name
    saved = run / "evaluations"  # the same answers and scores, byte for byte
    assert (saved / "validate_step0000004.jsonl").read_bytes() == (saved / "fit_step0000004.jsonl").read_bytes()
    main(["test", *args])
    tested = _last_row(run / "test" / "metrics.csv", "test/win_rate")
    assert float(tested["test/win_rate"]) == pytest.approx(final["win_rate"])  # test prompts default to eval's
    assert (run / "metrics.csv").read_bytes() == fit_metrics  # the fit's own log is untouched
    saved = {p.name for p in (run / "evaluations").iterdir()}
    assert {"validate_step0000004.jsonl", "test_step0000004.jsonl", "fit_step0000004.jsonl"} <= saved
    capsys.readouterr()
    main(["validate", "--config", str(run / "config.yaml")])  # no checkpoint: the starting policy, and it says so
    assert "no --ckpt_path, so this evaluates the starting policy" in capsys.readouterr().err


def test_a_reward_model_evaluates_and_references_are_scored_once(tmp_path, sft_dir):
    """A locally built sequence-classification reward model as evaluator, through the annotation cache."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from bpo_lightning import RewardModelAnnotator

    tok = AutoTokenizer.from_pretrained(sft_dir)
    config = GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, num_labels=1, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")

    class CountingRM(RewardModelAnnotator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scored = []

        def score(self, prompts, responses):
            self.scored.extend(responses)
            return super().score(prompts, responses)

    rm = CountingRM(str(tmp_path / "rm"), batch_size=4, max_length=64, device="cpu")
    module = _module(sft_dir, kl_samples=0)  # greedy: the same answers every time
    data = _data(annotator=Length(), evaluator=rm, limit=6)
    data.annotation_cache = str(tmp_path / "cache.sqlite")
    metrics = EvaluationMetrics()
    inputs = data.evaluation_inputs()
    records = [r for batch in data.eval_batches() for r in evaluation_step(module, inputs, batch, metrics)]
    prompts = [r["prompt"] for r in records]
    direct = RewardModelAnnotator(str(tmp_path / "rm"), batch_size=1, max_length=64, device="cpu")
    expected = direct.score(prompts, [r["response"] for r in records])
    assert [r["score"] for r in records] == pytest.approx(expected, abs=1e-5)
    assert [r["reference_score"] for r in records] == pytest.approx(
        direct.score(prompts, [r["reference"] for r in records]), abs=1e-5
    )
    wins = sum(r["score"] > r["reference_score"] for r in records)
    assert metrics.compute()["win_rate"] == pytest.approx(wins / 6)
    calls = len(rm.scored)
    for batch in data.eval_batches():  # a second evaluation of the same policy: everything comes from the cache
        evaluation_step(module, data.evaluation_inputs(), batch, EvaluationMetrics())
    assert len(rm.scored) == calls
