"""Data pieces: log-probs, sampling, pairing, prompt sources, and how bad input is reported."""

import json
import math

import pytest
import torch
from conftest import CountingAnnotator, make_run
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from bpo_lightning import GenerateSampler, RuleAnnotator
from bpo_lightning.annotation import PairwiseAnnotator
from bpo_lightning.batches import pair_batch
from bpo_lightning.data import OnlineDataModule, annotate
from bpo_lightning.logprobs import sequence_logps, token_logps
from bpo_lightning.policy import Pretrained, prepare_tokenizer
from bpo_lightning.prompts import PromptSource, ReviewPrompts
from bpo_lightning.sampling import Samples, encode_prompt
from bpo_lightning.store import PhaseStore
from bpo_lightning.types import PreferenceRecord


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_token_logps_equal_log_softmax_for_any_chunk(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11) * 4
    targets = torch.randint(0, 11, (3, 7))
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert_close(token_logps(logits, targets, chunk), expected)


def test_token_logps_upcasts_half_precision_chunks():
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16)  # p = (1/4, 3/4)
    out = token_logps(logits, torch.tensor([[1]]), 1)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[math.log(0.75)]]), atol=1e-2, rtol=0)


class Bigram(torch.nn.Module):
    """A model whose next-token distribution depends only on the current token: log-probs checkable by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.log(torch.tensor(table))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_sequence_logps_mask_the_prompt_and_count_eos():
    """Vocab {0: pad/eos, 1, 2}; P(next | current) rows: from 0 → (.5,.25,.25), 1 → (.1,.1,.8), 2 → (.2,.6,.2).
    Sequence [1 | 2, 0]: prompt [1], response [2] + EOS 0 → log P(2|1) + log P(0|2) = log .8 + log .2."""
    model = Bigram([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    record = PreferenceRecord(0, 0, "p", "c", "r", 1.0, 0.0, [1], [2], [1, 1], 0)
    batch = pair_batch([record], pad_id=0, eos_id=0)
    out = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    # rejected: [1 | 1, 1, 0] → log .1 + log .1 + log .1
    assert_close(out.sums, torch.tensor([math.log(0.8 * 0.2), math.log(0.1**3)]))
    assert out.counts.tolist() == [2.0, 3.0]
    assert_close(out.means(), torch.tensor([math.log(0.8 * 0.2) / 2, math.log(0.1**3) / 3]))


def test_encode_prompt_keeps_the_end_and_bos(sft_dir):
    tok = AutoTokenizer.from_pretrained(sft_dir)
    full = tok("hotel review : we stayed here for a week .", add_special_tokens=False)["input_ids"]
    ids = encode_prompt(tok, "hotel review : we stayed here for a week .", max_tokens=5)
    assert ids == [tok.bos_token_id, *full[-4:]]


def test_left_padded_batches_sample_like_single_prompts(sft_dir):
    """Greedy decoding of a padded batch equals decoding each prompt alone (mask and positions are right)."""
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(sft_dir), "test")
    prompts = ["hotel review : we stayed here for a week last year .", "phone review : i love it ."]
    greedy = GenerateSampler(num_samples=1, temperature=0, max_new_tokens=12, progress=False)
    together = greedy.sample(model, tok, prompts, seed=0).response_ids
    alone = [greedy.sample(model, tok, [p], seed=0).response_ids[0] for p in prompts]
    assert together == alone


def test_sampler_draws_n_samples_reproducibly(sft_dir):
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(sft_dir), "test")
    sampler = GenerateSampler(num_samples=3, max_new_tokens=10, batch_size=2, progress=False)
    prompts = ["book review : i bought this novel last week ."] * 3
    a, b = sampler.sample(model, tok, prompts, seed=5), sampler.sample(model, tok, prompts, seed=5)
    assert [len(r) for r in a.responses] == [3, 3, 3] and a.response_ids == b.response_ids
    assert all(len(ids) <= 10 for group in a.response_ids for ids in group)
    assert all(tok.eos_token_id not in ids for group in a.response_ids for ids in group)


def _samples(groups):
    return Samples(
        [[1]] * len(groups), [[[i] for i in range(len(g))] for g in groups], groups, [[True] * len(g) for g in groups]
    )


class TableAnnotator(CountingAnnotator):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def score(self, prompts, responses):
        self.calls.extend(prompts)
        return [self.table[r] for r in responses]


def test_annotate_picks_best_vs_worst_and_counts_drops():
    pool = [{"prompt": f"p{i}"} for i in range(5)]
    annotator = TableAnnotator({"a": 1.0, "b": 3.0, "c": 2.0, "d": 2.0, "n": math.nan})
    rows = annotate(  # no warning for the unscored prompt #3: it is counted
        annotator,
        [0, 1, 2, 3, 4],
        pool,
        _samples([["a", "b", "c"], ["x", "x"], ["c", "d"], ["a", "n"], ["a", "a", "b"]]),
    )
    assert [r.status for r in rows] == ["kept", "identical", "tie", "annotator_nan", "kept"]
    assert (rows[0].chosen, rows[0].rejected) == (1, 0)  # best "b" vs worst "a" of three
    assert (rows[4].chosen, rows[4].rejected) == (2, 0)
    assert rows[3].scores == [1.0, None]
    assert annotator.calls.count("p1") == 0  # identical responses are never sent to the annotator
    assert annotator.calls.count("p4") == 2  # a duplicated response is scored once


def test_rule_annotator_imports_its_function():
    annotator = RuleAnnotator("bpo_lightning.tasks.reviews:gold_reward")
    assert annotator.score(["hotel review : we stayed here ."], [" the staff was friendly ."])[0] > 0
    with pytest.raises(ValueError, match="annotator.init_args.function: cannot import 'nope.nothing:f'"):
        RuleAnnotator("nope.nothing:f")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_prompt_field_names_the_config_key(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": "hi"}])
    with pytest.raises(ValueError, match=r"data.prompts.init_args.prompt_field: column 'prompt' not found .*question"):
        PromptSource(path).load("data.prompts")


def test_empty_prompts_are_skipped_and_counted(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "  "}, {"prompt": "b"}, {"prompt": ""}])
    with pytest.warns(UserWarning, match=r"data.prompts: skipped 2 rows .* \(first rows: \[1, 3\]\)"):
        rows = PromptSource(path).load("data.prompts")
    assert [r["prompt"] for r in rows] == ["a", "b"]


def test_eval_prompts_need_references(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="data.eval_prompts.init_args.reference_field: column 'reference'"):
        PromptSource(path).load("data.eval_prompts", require_reference=True)


def test_missing_prompt_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptSource(str(tmp_path / "nope.jsonl")).load("data.prompts")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_phases": 8, "budget": 4}, r"data.num_phases \(8\) exceeds data.budget \(4\)"),
        ({"num_phases": 0}, r"data.num_phases must be >= 1"),
        ({"batch_size": 0}, r"data.batch_size must be >= 1"),
    ],
)
def test_bad_phase_settings_name_the_keys(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OnlineDataModule(prompts=ReviewPrompts(), annotator=CountingAnnotator(), **kwargs)


def test_budget_larger_than_the_pool_is_reported():
    data = OnlineDataModule(prompts=ReviewPrompts(limit=10), annotator=CountingAnnotator(), budget=20, num_phases=2)
    with pytest.raises(ValueError, match=r"data.budget \(20\) exceeds the 10 usable prompts"):
        data.setup("fit")


def test_tokenizer_without_pad_token_falls_back_to_eos(sft_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(sft_dir)
    tok.pad_token = None
    with pytest.warns(UserWarning, match="model.policy: the tokenizer has no pad token; using its EOS"):
        prepared = prepare_tokenizer(tok, "model.policy")
    assert prepared.pad_token_id == prepared.eos_token_id and prepared.padding_side == "left"


def test_tokenizer_without_eos_is_an_error(sft_dir):
    tok = AutoTokenizer.from_pretrained(sft_dir)
    tok.eos_token = None
    with pytest.raises(ValueError, match="model.policy: the tokenizer has no EOS token"):
        prepare_tokenizer(tok, "model.policy")


def test_annotator_nan_is_a_counted_drop_in_a_run(tmp_path, sft_dir):
    class FirstIsNaN(CountingAnnotator):  # cannot score the first response it is shown in every call
        scores_per_call = None  # one call per block

        def score(self, prompts, responses):
            return [math.nan, *super().score(prompts, responses)[1:]]

    module, data, trainer = make_run(tmp_path, sft_dir, budget=16, num_phases=1, annotator=FirstIsNaN())
    trainer.fit(module, datamodule=data)  # no warning per prompt: the drop is counted
    stats = data.stats[0]
    assert stats.dropped["annotator_nan"] == 1  # one generate block of 16 prompts, one annotator call
    assert stats.kept + stats.dropped_total == 16


def test_policy_dtype_is_validated():
    with pytest.raises(ValueError, match="model.policy.init_args.dtype must be one of"):
        Pretrained("x", dtype="float8")


def test_rerun_with_another_annotator_refuses_to_mix_data(tmp_path, sft_dir):
    module, data, trainer = make_run(tmp_path, sft_dir, budget=16, num_phases=1)
    trainer.fit(module, datamodule=data)

    class Other(CountingAnnotator):
        identity = "Other"

    module, data, trainer = make_run(tmp_path, sft_dir, budget=16, num_phases=1, annotator=Other())
    with pytest.raises(RuntimeError, match="different setup .*annotator: saved 'CountingAnnotator:gold', now 'Other'"):
        trainer.fit(module, datamodule=data)


def test_reward_model_annotator_scores_in_batches(tmp_path, sft_dir):
    """A locally built sequence-classification model: batched scores equal one-at-a-time forward passes."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from bpo_lightning import RewardModelAnnotator

    tok = AutoTokenizer.from_pretrained(sft_dir)
    config = GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, num_labels=1, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    annotator = RewardModelAnnotator(str(tmp_path / "rm"), batch_size=3, max_length=64, device="cpu")
    prompts = ["hotel review : we stayed here ."] * 2 + ["phone review : i love it ."] * 3
    responses = [" the staff was friendly .", " the room was bad .", " the battery is great .", "", " ok ."]
    batched = annotator.score(prompts, responses)
    single = [annotator.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)]
    assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-5, rtol=0)
    assert len(set(batched)) == 5 and "max_length=64" in annotator.identity
    # the identity (which keys cached scores and saved provenance) changes with anything that changes a score
    config.num_labels = 2
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm2")
    tok.save_pretrained(tmp_path / "rm2")
    label0 = RewardModelAnnotator(str(tmp_path / "rm2"), max_length=64, device="cpu")
    label1 = RewardModelAnnotator(str(tmp_path / "rm2"), max_length=64, device="cpu", label_index=1)
    assert ":label=0:" in label0.identity and label0.identity.replace(":label=0:", ":label=1:") == label1.identity
    other_tokenizer = RewardModelAnnotator(str(tmp_path / "rm"), tokenizer=str(sft_dir), max_length=64, device="cpu")
    assert other_tokenizer.identity != annotator.identity
    torch.manual_seed(1)  # the same folder, retrained weights
    GPT2ForSequenceClassification(GPT2Config(**{**config.to_dict(), "num_labels": 1})).save_pretrained(tmp_path / "rm")
    assert RewardModelAnnotator(str(tmp_path / "rm"), batch_size=3, max_length=64, device="cpu").identity != (
        annotator.identity
    )


def test_inline_config_policy(sft_dir):
    from bpo_lightning.policy import FromConfig

    source = FromConfig(
        {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 768,
        },
        tokenizer=str(sft_dir),
    )
    model, tok = source.model(), source.tokenizer()
    assert type(model).__name__ == "LlamaForCausalLM" and tok.padding_side == "left"
    a, b = source.model(), FromConfig(source.config, str(sft_dir), seed=1).model()
    assert torch.equal(a.lm_head.weight, model.lm_head.weight)  # same seed, same weights
    assert not torch.equal(b.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="model_type"):
        FromConfig({"hidden_size": 8}, tokenizer=str(sft_dir))


def test_prompts_from_parquet_and_a_datasets_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["a", "b", "c"], "ref": ["x", "y", "z"]}).to_parquet(tmp_path / "p.parquet")
    rows = PromptSource(str(tmp_path / "p.parquet"), prompt_field="text", reference_field="ref").load("data.prompts")
    assert rows == [
        {"prompt": "a", "reference": "x"},
        {"prompt": "b", "reference": "y"},
        {"prompt": "c", "reference": "z"},
    ]
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    _write_jsonl(folder / "test.jsonl", [{"prompt": "t1"}])
    assert [r["prompt"] for r in PromptSource(str(folder), split="test").load("data.prompts")] == ["t1"]
    assert [r["prompt"] for r in PromptSource(str(folder), limit=1).load("data.prompts")] == ["p1"]


def test_prompt_template_formats_row_fields(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"instruction": "How do I boil an egg?", "demonstration": "Boil it."}])
    source = PromptSource(
        path, prompt_field="instruction", reference_field="demonstration", template="{instruction} Assistant: "
    )
    assert source.load("data.prompts") == [{"prompt": "How do I boil an egg? Assistant: ", "reference": "Boil it."}]
    with pytest.raises(ValueError, match=r"data.prompts.init_args.template: row 0 of .* has no field 'question'"):
        PromptSource(path, prompt_field="instruction", template="{question}").load("data.prompts")


class LongerIsBetter(PairwiseAnnotator):
    """Prefers the longer response; cannot judge responses that contain "?"; counts comparisons."""

    identity = "LongerIsBetter"

    def __init__(self):
        self.compared = []

    def compare(self, prompts, first, second):
        self.compared.extend(zip(first, second, strict=True))
        return [math.nan if "?" in a + b else float(len(a) - len(b)) for a, b in zip(first, second, strict=True)]


def test_pairwise_annotator_verdicts_become_pairs_and_are_cached(tmp_path):
    from bpo_lightning.cache import AnnotationCache

    pool = [{"prompt": f"p{i}"} for i in range(4)]
    samples = _samples([["ab", "abc"], ["same", "same"], ["xy", "zw"], ["a?", "bb"]])
    judge, cache = LongerIsBetter(), AnnotationCache(tmp_path / "c.sqlite")
    rows = annotate(judge, [0, 1, 2, 3], pool, samples, cache)
    assert [r.status for r in rows] == ["kept", "identical", "tie", "annotator_nan"]
    assert (rows[0].chosen, rows[0].rejected) == (1, 0) and rows[0].scores == [-1, 1]
    assert len(judge.compared) == 3  # the identical pair was not judged
    again = annotate(judge, [0, 1, 2, 3], pool, samples, cache)
    assert len(judge.compared) == 4  # only the unanswered (NaN) pair is asked again; verdicts came from the cache
    assert [r.status for r in again] == [r.status for r in rows]
    assert again[0].cached == 2 and again[0].annotated == 0


def test_pairwise_annotator_needs_two_samples():
    with pytest.raises(ValueError, match="data.sampler.init_args.num_samples must be 2 with a pairwise annotator"):
        OnlineDataModule(prompts=ReviewPrompts(), annotator=LongerIsBetter(), sampler=GenerateSampler(num_samples=4))


def test_a_judge_annotates_and_evaluates_a_run(tmp_path, sft_dir):
    from bpo_lightning.reporting import PhaseReport

    judge, report = LongerIsBetter(), PhaseReport()
    module, data, trainer = make_run(
        tmp_path, sft_dir, budget=16, num_phases=1, annotator=judge, callbacks=[report], eval_prompts=16
    )
    trainer.fit(module, datamodule=data)
    assert data.stats[0].kept > 0
    # the final evaluation: 16 held-out (policy answer, reference) verdicts, saved with the answers
    saved = [
        json.loads(line)
        for line in (tmp_path / "evaluations" / f"fit_step{trainer.global_step:07d}.jsonl").read_text().splitlines()
    ]
    assert len(saved) == 16
    for r in saved:
        expected = None if "?" in r["response"] + r["reference"] else float(len(r["response"]) - len(r["reference"]))
        assert r["score"] == expected and r["reference_score"] == 0.0
    valid = [r for r in saved if r["score"] is not None]
    assert report.history[-1]["win_rate"] == pytest.approx(sum(r["score"] > 0 for r in valid) / len(valid))
    assert report.history[0]["phase"] == 0 and report.history[-1]["phase"] == 1


def test_truncated_responses_get_an_eos_term_only_when_asked():
    record = PreferenceRecord(
        0, 0, "p", "c", "r", 1.0, 0.0, [5, 6], [7, 8], [9], 0, chosen_finished=True, rejected_finished=False
    )
    paper = pair_batch([record], pad_id=0, eos_id=2)  # the paper's convention: EOS after both
    assert paper["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 6, 9, 2, 0]]
    assert paper["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]]
    plain = pair_batch([record], pad_id=0, eos_id=2, truncated_eos=False)  # no EOS term for the cut response
    assert plain["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 6, 9, 0, 0]]
    assert plain["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]


@pytest.mark.slow
def test_mostly_truncated_responses_are_counted_and_warned_about(tmp_path, sft_dir):
    module, data, trainer = make_run(tmp_path, sft_dir, budget=16, num_phases=1, truncated_eos=False)
    data.sampler = GenerateSampler(max_new_tokens=2, batch_size=16, progress=False)  # far too short to finish
    with pytest.warns(
        UserWarning,
        match=r"phase 1: \d+ of 32 responses reached data.sampler.init_args.max_new_tokens "
        r"\(2\) without EOS and are scored without an EOS term",
    ):
        trainer.fit(module, datamodule=data)
    stats = data.stats[0]
    assert stats.responses == 32 and stats.truncated > 16 and "% truncated" in stats.describe()
    pairs = PhaseStore(tmp_path / "data", 0).load_pairs()[0]
    assert any(not p.chosen_finished or not p.rejected_finished for p in pairs)
    rows = PhaseStore(tmp_path / "data", 0).load_samples()
    assert all(len(row.finished) == 2 for row in rows.values())


def test_local_annotators_go_to_the_device_of_the_process_that_uses_them(tmp_path, sft_dir, monkeypatch):
    """A config builds annotators before Lightning gives each process its device: a reward model (and a local
    judge) built with ``device: auto`` stays put until it scores, and then goes to that process's CUDA device —
    here a process whose current device is cuda:1 (simulated: the move is recorded, not made)."""
    import transformers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from bpo_lightning import RewardModelAnnotator
    from bpo_lightning.judge import LocalJudge

    tok = AutoTokenizer.from_pretrained(sft_dir)
    config = GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, num_labels=1, pad_token_id=tok.pad_token_id
    )
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    for folder in ("rm", "lm"):
        tok.save_pretrained(tmp_path / folder)
    moves = []

    def record(self, *args, **kwargs):  # nn.Module.to, recorded: this machine has no GPU
        moves.append((type(self).__name__, torch.device(args[0] if args else kwargs["device"])))
        return self

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    annotator = RewardModelAnnotator(str(tmp_path / "rm"), max_length=64)
    judge = LocalJudge(str(tmp_path / "lm"), template="{prompt}|{response_a}|{response_b}|", max_new_tokens=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Lightning has set this process's device: 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.nn.Module, "to", record)
    monkeypatch.setattr(transformers.BatchEncoding, "to", lambda self, device: self)
    assert moves == []  # nothing placed while the config was read
    annotator.score(["hotel review :"], [" great ."])  # (computed on the CPU: the move was only recorded)
    judge.compare(["hotel review :"], [" a"], [" b"])
    assert moves == [
        ("GPT2ForSequenceClassification", torch.device("cuda", 1)),
        ("GPT2LMHeadModel", torch.device("cuda", 1)),
    ]
