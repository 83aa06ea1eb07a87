"""The samplers draw from the distribution transformers' warpers define: ``TokenDraw`` over the top-k candidates
samples it (frequencies), ``draw: vocabulary`` gives ``generate``'s own samples for a seed, and the static-cache
sampler draws what ``GenerateSampler`` draws: same tokens for the same seed, run eagerly on CPU."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bpo_lightning.batches import left_pad
from bpo_lightning.prompts import ReviewPrompts, model_input
from bpo_lightning.sampling import GenerateSampler, PromptSeededDraw, StaticCacheSampler, TokenDraw, encode_prompt


@pytest.fixture(scope="module")
def policy(sft_dir):
    return AutoModelForCausalLM.from_pretrained(sft_dir), AutoTokenizer.from_pretrained(sft_dir)


@pytest.fixture(scope="module")
def prompts():
    return [model_input(row) for row in ReviewPrompts("prompts").load("data.prompts")][:40]


CASES = {
    "paper defaults": dict(max_new_tokens=24),
    "temperature, top-p": dict(temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=24),
    "greedy": dict(temperature=0, num_samples=1, max_new_tokens=24),
    "three samples, short last block": dict(num_samples=3, max_new_tokens=12, batch_size=16),
    "long responses (most end with EOS)": dict(max_new_tokens=96, batch_size=32),
    "whole-vocabulary draw": dict(max_new_tokens=24, draw="vocabulary"),
}


@pytest.mark.parametrize("case", CASES)
def test_static_cache_sampler_draws_the_generate_samplers_tokens(policy, prompts, case):
    model, tokenizer = policy
    settings = {"batch_size": 64, "progress": False, **CASES[case]}
    expected = GenerateSampler(**settings).sample(model, tokenizer, prompts, seed=11)
    sampler = StaticCacheSampler(**settings, prompt_bucket=16)
    got = sampler.sample(model, tokenizer, prompts, seed=11)
    assert got.response_ids == expected.response_ids
    assert got.finished == expected.finished
    assert got.responses == expected.responses
    assert got.prompt_ids == expected.prompt_ids
    if case == "long responses (most end with EOS)":  # the EOS path, and the loop stopping before 96 steps
        assert sum(map(sum, got.finished)) > len(prompts)
    # a second pass reuses the cache and draws the same again
    assert sampler.sample(model, tokenizer, prompts, seed=11).response_ids == expected.response_ids


DRAWS = {"paper defaults": (1.0, 50, 1.0), "temperature, top-k, top-p": (0.7, 12, 0.8),
         "top-p only": (1.3, 0, 0.9), "top-k only": (1.0, 5, 1.0)}  # fmt: skip


@pytest.mark.parametrize("case", DRAWS)
@pytest.mark.parametrize("draw", ["candidates", "vocabulary", "seeded"])
def test_token_draw_samples_the_warped_distribution(case, draw):
    """40,000 draws from one row of logits: every token outside the support of transformers' warped distribution
    is never drawn, and each token's frequency is within 5 standard errors of its probability."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    temperature, top_k, top_p = DRAWS[case]
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 2
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = scores.softmax(-1)[0]
    n = 40_000
    torch.manual_seed(0)
    if draw == "seeded":  # a stream per row, as PromptSeededDraw gives every response
        tokens = PromptSeededDraw(TokenDraw(temperature, top_k, top_p), 5, n, 1, 1, "cpu")(logits.expand(n, -1))
    else:
        tokens = TokenDraw(temperature, top_k, top_p, draw)(logits.expand(n, -1))
    freq = torch.bincount(tokens, minlength=64).double() / n
    assert freq[want == 0].sum() == 0
    assert 1 < int((want > 0).sum()) < 64  # the warpers cut something, and leave a choice
    stderr = (want.double() * (1 - want.double()) / n).sqrt()
    assert ((freq - want.double()).abs() <= 5 * stderr + 1e-12).all()


def test_whole_vocabulary_draw_gives_generates_own_samples(policy, prompts):
    """``draw: vocabulary`` reproduces transformers' ``generate(do_sample=True, num_return_sequences=2)`` token for
    token for the same seed: the sampling that runs made before candidate draws keep their samples."""
    model, tokenizer = policy
    sampler = GenerateSampler(max_new_tokens=16, batch_size=64, progress=False, draw="vocabulary",
                              share_prompts=False)  # fmt: skip
    got = sampler.sample(model, tokenizer, prompts, seed=5)
    ids, mask = left_pad([encode_prompt(tokenizer, p, 512) for p in prompts], tokenizer.pad_token_id, model.device)
    torch.manual_seed(5)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=50, top_p=1.0,
                         num_return_sequences=2, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)[:, ids.shape[1] :].tolist()  # fmt: skip
    eos = tokenizer.eos_token_id
    want = [seq[: seq.index(eos)] if eos in seq else seq for seq in out]
    assert [ids for pair in got.response_ids for ids in pair] == want


@pytest.mark.parametrize("case", ["paper defaults", "three samples, short last block", "whole-vocabulary draw"])
def test_a_prompt_shared_by_its_samples_runs_once_and_draws_the_same(policy, prompts, case):
    """With ``share_prompts`` each block's prompts but their last token run once through the backbone and
    ``generate`` starts from that cache, expanded to the samples' rows (its first forward takes one token per row);
    the tokens drawn are those of every row running its own prompt, and the recorded log-probs equal to rounding."""
    model, tokenizer = policy
    settings = {"batch_size": 16, "progress": False, **CASES[case]}
    shapes = []  # (rows, tokens) of the full model's forwards with more than one row (a one-row check is not one)
    record = lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)) if len(k["input_ids"]) > 1 else None  # noqa: E731
    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        shared = GenerateSampler(**settings).sample(model, tokenizer, prompts, seed=7)
        shared_shapes = list(shapes)
        shapes.clear()
        whole = GenerateSampler(**settings, share_prompts=False).sample(model, tokenizer, prompts, seed=7)
    finally:
        handle.remove()
    n, blocks = settings.get("num_samples", 2), -(-len(prompts) // settings["batch_size"])
    prompts_run = [s for s in shapes if s[1] > 1]
    assert len(prompts_run) == blocks and all(s[0] % n == 0 for s in prompts_run)  # every row ran its prompt
    assert {s[1] for s in shared_shapes} == {1} and len(shared_shapes) == len(shapes)  # the backbone ran them
    assert shared.response_ids == whole.response_ids and shared.finished == whole.finished
    for mine, theirs in ((shared.logps, whole.logps), (shared.eos_logps, whole.eos_logps)):
        flat_mine, flat_theirs = [x for g in mine for x in g], [x for g in theirs for x in g]
        assert flat_mine == pytest.approx(flat_theirs, abs=1e-4)


def test_a_prompt_cache_is_only_built_where_it_is_the_same_computation(policy):
    model, _ = policy
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    model.eval()
    cache = GenerateSampler(num_samples=3).prompt_cache(model, ids, mask)
    ((name, value),) = cache.items()
    assert value.get_seq_length() == 3  # all but the last token, expanded to 2 prompts × 3 samples:
    rows, row_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    with torch.no_grad():  # the last token continues from it as from the whole prompt
        want = model(input_ids=rows, attention_mask=row_mask, position_ids=(row_mask.cumsum(-1) - 1).clamp(min=0))
        got = model(input_ids=rows[:, -1:], attention_mask=row_mask, position_ids=row_mask.sum(-1, keepdim=True) - 1,
                    **{name: value})  # fmt: skip
    torch.testing.assert_close(got.logits[:, -1], want.logits[:, -1], atol=1e-4, rtol=1e-4)
    assert GenerateSampler(num_samples=1).prompt_cache(model, ids, mask) == {}  # nothing shared
    one_token = torch.tensor([[0, 0, 0, 11], [5, 6, 7, 8]]), torch.tensor([[0, 0, 0, 1], [1, 1, 1, 1]])
    assert GenerateSampler().prompt_cache(model, *one_token) == {}  # a prompt with nothing before its last token
    assert GenerateSampler().prompt_cache(model, ids[:, -1:], mask[:, -1:]) == {}
    assert StaticCacheSampler().prompt_cache(model, ids, mask) == {}  # its decode loop fills its own cache
    model.generation_config.cache_implementation = "static"  # generate refuses a given cache beside its own
    try:
        assert GenerateSampler().prompt_cache(model, ids, mask) == {}
    finally:
        model.generation_config.cache_implementation = None
    assert "share_prompts" not in GenerateSampler(share_prompts=False).settings()  # how, not what, is sampled


def test_running_out_of_accelerator_memory_names_the_block_size(policy, prompts, monkeypatch):
    """An out-of-memory error while sampling a block is a one-line error naming the setting to lower; the blocks
    yielded before it are the caller's (collection saves each as it arrives)."""
    from bpo_lightning.errors import RunError

    model, tokenizer = policy
    sampler = GenerateSampler(max_new_tokens=4, batch_size=16, progress=False)
    generate, calls = GenerateSampler.generate, []

    def second_runs_out(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerateSampler, "generate", second_runs_out)
    blocks = sampler.sample_batches(model, tokenizer, prompts, seed=0)
    start, first = next(blocks)
    assert start == 0 and len(first.response_ids) == 16
    with pytest.raises(RunError, match=r"data.sampler.init_args.batch_size: a block of 16 prompts × 2 samples ran out "
                                       r"of accelerator memory.*Tried to allocate 20.00 GiB"):  # fmt: skip
        next(blocks)


def test_a_bad_draw_is_refused():
    with pytest.raises(Exception, match="draw must be 'candidates' or 'vocabulary', got 'gumbel'"):
        GenerateSampler(draw="gumbel")


def test_static_cache_sampler_records_the_distribution_not_the_mechanics():
    sampler = StaticCacheSampler(max_new_tokens=8, compile=False, prompt_bucket=8)
    settings = sampler.settings()
    assert settings["class"] == "StaticCacheSampler" and settings["max_new_tokens"] == 8
    assert not {"compile", "compile_mode", "prompt_bucket"} & set(settings)
    assert settings["batch_size"] == 128  # recorded: with draw: vocabulary it seeds the blocks
    assert sampler.seeds_per_prompt and not StaticCacheSampler(draw="vocabulary").seeds_per_prompt


@pytest.mark.parametrize("cls", [GenerateSampler, StaticCacheSampler])
def test_a_prompts_samples_depend_on_its_seed_and_position_only(policy, prompts, cls):
    """The candidates draw seeds every response's stream from the call's seed and the prompt's position: another
    block size gives the same samples, and so does sampling a later slice of the prompts with the seed moved by its
    offset (what a process handed that slice in collection does)."""
    model, tokenizer = policy
    settings = {"max_new_tokens": 12, "progress": False, **({"compile": False} if cls is StaticCacheSampler else {})}
    whole = cls(batch_size=16, **settings).sample(model, tokenizer, prompts[:20], seed=11)
    small = cls(batch_size=3, **settings).sample(model, tokenizer, prompts[:20], seed=11)
    tail = cls(batch_size=16, **settings).sample(model, tokenizer, prompts[7:20], seed=11 + 7)
    assert small.response_ids == whole.response_ids and tail.response_ids == whole.response_ids[7:]
    # each response has its own stream: a prompt's two samples are not copies of each other
    assert sum(a != b for a, b in whole.response_ids) >= 15
    assert (
        cls(batch_size=16, **settings).sample(model, tokenizer, prompts[:20], seed=12).response_ids
        != whole.response_ids
    )


def test_static_cache_sampler_rejects_a_bad_bucket():
    with pytest.raises(Exception, match="prompt_bucket must be >= 1"):
        StaticCacheSampler(prompt_bucket=0)


@pytest.mark.slow
def test_compiled_decode_step_draws_the_eager_tokens(policy, prompts):
    """``compile: true`` on CPU (inductor): one full block, compiled once, equal to the eager loop; a short block
    is padded to the compiled batch (its draws then differ from the unpadded eager ones, by design)."""
    model, tokenizer = policy
    settings = {"batch_size": 32, "max_new_tokens": 12, "progress": False, "prompt_bucket": 64}
    eager = StaticCacheSampler(**settings).sample(model, tokenizer, prompts[:32], seed=5)
    compiled = StaticCacheSampler(**settings, compile=True, compile_mode="default")
    torch._dynamo.reset()
    assert compiled.sample(model, tokenizer, prompts[:32], seed=5).response_ids == eager.response_ids
    short = compiled.sample(model, tokenizer, prompts[:5], seed=5)  # padded to 32 prompts, same compiled graph
    assert len(short.response_ids) == 5 and all(len(r) == 2 for r in short.response_ids)


def _forward_logps(model, tokenizer, samples, with_eos: bool) -> list[list[float]]:
    """log π(y|x) of every sampled response by a forward pass over prompt + response (+ EOS), as training does."""
    from bpo_lightning.batches import right_padded
    from bpo_lightning.logprobs import sequence_logps

    seqs, starts = [], []
    for prompt_ids, group in zip(samples.prompt_ids, samples.response_ids, strict=True):
        for ids in group:
            seqs.append(prompt_ids + ids + [tokenizer.eos_token_id] * with_eos)
            starts.append(len(prompt_ids))
    batch = right_padded(seqs, starts, tokenizer.pad_token_id)
    with torch.no_grad():
        sums = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).sums.tolist()
    n = len(samples.response_ids[0])
    return [sums[i : i + n] for i in range(0, len(sums), n)]


@pytest.mark.parametrize("cls", [GenerateSampler, StaticCacheSampler])
@pytest.mark.parametrize("case", ["paper defaults", "long responses (most end with EOS)"])
def test_sampler_log_probs_equal_a_forward_pass(policy, prompts, cls, case):
    """The log-probs a sampler records while drawing equal a forward pass over the drawn tokens (to float32
    rounding): each response's sum, and the EOS term after it — the EOS it drew, or for a response cut at the
    limit the EOS at the position that would have followed."""
    model, tokenizer = policy
    model.eval()
    samples = cls(**{"batch_size": 16, "progress": False, **CASES[case]}).sample(model, tokenizer, prompts, seed=5)
    finished = [f for group in samples.finished for f in group]
    assert sum(finished) > 0  # responses that drew EOS are checked in both cases
    if case == "paper defaults":  # and, at 24 new tokens, responses cut at the limit
        assert sum(finished) < len(finished)
    without_eos = _forward_logps(model, tokenizer, samples, with_eos=False)
    with_eos = _forward_logps(model, tokenizer, samples, with_eos=True)
    for k in range(len(prompts)):
        for i in range(2):
            assert samples.logps[k][i] == pytest.approx(without_eos[k][i], abs=1e-4)
            assert samples.logps[k][i] + samples.eos_logps[k][i] == pytest.approx(with_eos[k][i], abs=1e-4)
            assert samples.eos_logps[k][i] < 0


# --- the sampler contract (bpo_lightning.testing.check_sampler) -----------------------------------------------------


@pytest.mark.parametrize("cls", [GenerateSampler, StaticCacheSampler])
def test_the_built_in_samplers_conform(cls, policy, prompts):
    from bpo_lightning.testing import check_sampler

    model, tokenizer = policy
    check_sampler(cls(max_new_tokens=12, batch_size=8, progress=False), model, tokenizer, prompts[:10], seed=3)


class _Broken(GenerateSampler):
    """GenerateSampler's samples, damaged in one way (``fault``), as a plugin sampler might get them wrong."""

    def __init__(self, fault: str = "eos", **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault = fault

    def sample_batches(self, model, tokenizer, prompts, *, seed):
        for start, block in super().sample_batches(model, tokenizer, prompts, seed=seed):
            eos = tokenizer.eos_token_id
            if self.fault == "eos":  # keeps the EOS it drew
                pairs = zip(block.response_ids, block.finished, strict=True)
                block.response_ids = [[ids + [eos] * done for ids, done in zip(group, flags, strict=True)]
                                      for group, flags in pairs]  # fmt: skip
            elif self.fault == "one sample":
                block.response_ids = [group[:1] for group in block.response_ids]
            elif self.fault == "no bos":
                block.prompt_ids = [ids[1:] for ids in block.prompt_ids]
            elif self.fault == "tempered logps":  # log-probs of the warped distribution, not the model's
                block.logps = [[v / 0.5 for v in group] for group in block.logps]
            yield start, block


@pytest.mark.parametrize(
    ("fault", "message"),
    [("eos", "response_ids hold EOS"), ("one sample", "has 1 entries, num_samples is 2"),
     ("no bos", "are not encode_prompt"), ("tempered logps", "must be the raw model's")],
)  # fmt: skip
def test_the_sampler_check_names_what_a_sampler_gets_wrong(fault, message, policy, prompts):
    from bpo_lightning.testing import check_sampler, sampler_problems

    model, tokenizer = policy
    sampler = _Broken(fault, max_new_tokens=12, batch_size=8, progress=False)
    problems = sampler_problems(sampler, model, tokenizer, prompts[:10], seed=3)
    assert problems and all(message in p for p in problems), problems
    with pytest.raises(AssertionError, match=message):
        check_sampler(sampler, model, tokenizer, prompts[:10], seed=3)
