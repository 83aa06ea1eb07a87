"""The worked examples of docs/plugins.md run as written: each code block is executed as a module of its own,
registered as an in-process plugin and used — the sampler with a tiny trained policy, the annotator and the judge on
its samples, the loss through the conformance checks and the command line."""

import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from bpo_lightning.collection import annotate
from bpo_lightning.errors import InputError
from bpo_lightning.judge import LLMJudge
from bpo_lightning.losses import DPOLoss
from bpo_lightning.plugins import format_plugins
from bpo_lightning.policy import Pretrained
from bpo_lightning.sampling import Samples
from bpo_lightning.tasks import reviews
from bpo_lightning.testing import check_loss, check_sampler

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r"^```python\n(# example: (\w+)\n.*?)^```$", re.M | re.S)
NAMES = {
    "sampler": "TemperatureLadderSampler",
    "annotator": "KeywordAnnotator",
    "judge": "LongerIsBetterJudge",
    "loss": "OffsetDPOLoss",
}


def blocks() -> dict[str, str]:
    return {name: code for code, name in BLOCK.findall(DOC.read_text())}


def run_example(name: str) -> types.ModuleType:
    """The example's code block executed in a fresh module named ``plugin_example_<name>``."""
    module = types.ModuleType(f"plugin_example_{name}")
    exec(compile(blocks()[name], f"{DOC}:example {name}", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def examples() -> dict[str, types.ModuleType]:
    return {name: run_example(name) for name in NAMES}


@pytest.fixture
def plugins(examples, use_plugins, monkeypatch):
    """The four examples as process-wide plugins, importable by their module names (as from a file)."""
    for module in examples.values():
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return use_plugins(*examples.values())


@pytest.fixture(scope="module")
def policy(sft_dir):
    source = Pretrained(str(sft_dir))
    return source.model(), source.tokenizer()


PROMPTS = [row["prompt"] for row in reviews.load_split("prompts")[:3]]


def test_plugins_md_has_the_four_examples():
    assert set(blocks()) == set(NAMES)


def test_the_examples_register_as_plugins(plugins, examples):
    for name, kind in (
        ("sampler", "samplers"),
        ("annotator", "annotators"),
        ("judge", "annotators"),
        ("loss", "losses"),
    ):
        assert plugins.get(kind, NAMES[name]) is getattr(examples[name], NAMES[name])
    listing = format_plugins(plugins)
    assert all(name in listing for name in NAMES.values())


def test_the_sampler_samples_with_the_tiny_policy(examples, policy):
    model, tokenizer = policy
    sampler = examples["sampler"].TemperatureLadderSampler(
        temperatures=(0.7, 1.3), max_new_tokens=16, batch_size=2, max_prompt_tokens=64
    )
    assert sampler.num_samples == 2
    model.train()
    samples = sampler.sample(model, tokenizer, PROMPTS, seed=0)  # two blocks: prompts 0-1 and prompt 2
    assert model.training  # the sampler restores the mode it found
    assert isinstance(samples, Samples) and len(samples.prompt_ids) == len(PROMPTS)
    eos = tokenizer.eos_token_id
    for prompt, prompt_ids, ids, texts, finished in zip(
        PROMPTS, samples.prompt_ids, samples.response_ids, samples.responses, samples.finished, strict=True
    ):
        assert prompt_ids[0] == tokenizer.bos_token_id and tokenizer.decode(prompt_ids[1:]).strip() == prompt.strip()
        assert len(ids) == len(texts) == len(finished) == 2
        for response_ids, text, done in zip(ids, texts, finished, strict=True):
            assert eos not in response_ids and isinstance(done, bool)
            assert done or len(response_ids) == 16  # not finished: cut at max_new_tokens
            assert text == tokenizer.decode(response_ids, skip_special_tokens=True)
    assert any(text for texts in samples.responses for text in texts)
    again = sampler.sample(model, tokenizer, PROMPTS, seed=0)
    assert again.response_ids == samples.response_ids  # seeded
    alone = sampler.sample(model, tokenizer, PROMPTS[2:], seed=2)  # the second block started at position 2
    assert alone.response_ids == samples.response_ids[2:]
    assert sampler.settings() == {
        "class": "plugin_example_sampler.TemperatureLadderSampler",
        "temperatures": [0.7, 1.3],
        "max_new_tokens": 16,
        "batch_size": 2,
        "max_prompt_tokens": 64,
    }
    with pytest.raises(InputError, match=r"data\.sampler\.init_args\.temperatures"):
        examples["sampler"].TemperatureLadderSampler(temperatures=(1.0,))
    check_sampler(sampler, model, tokenizer, PROMPTS)  # the conformance kit agrees


def test_the_annotator_scores(examples):
    annotator = examples["annotator"].KeywordAnnotator(words=("good",))
    scores = annotator.score(["p"] * 3, ["the food was good .", "the food was bad .", ""])
    assert scores[:2] == pytest.approx([1 - 0.05, -0.05]) and math.isnan(scores[2])
    assert annotator.identity == (
        'plugin_example_annotator.KeywordAnnotator(length_penalty=0.01, weight=1.0, words=["good"])'
    )
    assert examples["annotator"].KeywordAnnotator(words=("bad",)).identity != annotator.identity


def test_the_judge_compares_and_counts(examples):
    judge = examples["judge"].LongerIsBetterJudge()
    assert isinstance(judge, LLMJudge)
    verdicts = judge.compare(["p"] * 3, ["one two three", "one", "one two"], ["one", "one two", "three four"])
    assert verdicts[:2] == [1.0, -1.0] and math.isnan(verdicts[2])  # equally long: no verdict
    assert judge.counts["requests"] == 6  # both orders of every pair
    assert judge.counts["unparseable"] == 2 and judge.counts["disagreements"] == 0
    assert judge.take_counts()["requests"] == 6 and judge.take_counts()["requests"] == 0
    once = examples["judge"].LongerIsBetterJudge(both_orders=False)
    assert once.compare(["p"], ["a b"], ["a"]) == [1.0] and once.counts["requests"] == 1
    blind = examples["judge"].LongerIsBetterJudge(template="{prompt} | {response_a} | {response_b}")
    assert math.isnan(blind.compare(["p"], ["a b"], ["a"])[0]) and blind.counts["failures"] == 2
    assert blind.identity != judge.identity  # the template is part of the identity


def test_the_annotator_and_the_judge_label_the_samplers_pairs(examples, policy):
    model, tokenizer = policy
    sampler = examples["sampler"].TemperatureLadderSampler(max_new_tokens=16, max_prompt_tokens=64)
    samples = sampler.sample(model, tokenizer, PROMPTS, seed=1)
    pool = [{"prompt": prompt} for prompt in PROMPTS]
    judge = examples["judge"].LongerIsBetterJudge()
    for annotator in (examples["annotator"].KeywordAnnotator(), judge):
        rows = annotate(annotator, list(range(len(PROMPTS))), pool, samples)
        assert len(rows) == len(PROMPTS)
        for row in rows:
            assert row.status in {"kept", "identical", "tie", "annotator_nan"}
            if row.status == "kept":
                assert row.scores[row.chosen] > row.scores[row.rejected]
    distinct = sum(len(set(texts)) == 2 for texts in samples.responses)
    assert judge.counts["requests"] == 2 * distinct  # one request per order of every pair of distinct responses


def test_the_loss_conforms_and_validates_gamma(examples):
    loss_cls = examples["loss"].OffsetDPOLoss
    check_loss(loss_cls)
    check_loss(loss_cls(beta=0.5, gamma=4.0))
    h = torch.tensor([-3.0, 0.0, 2.0, 10.0])
    assert torch.allclose(loss_cls(beta=0.1, gamma=0.0).pair_losses(h), DPOLoss(beta=0.1).pair_losses(h))
    assert loss_cls(beta=0.1, gamma=2.0).pair_losses(torch.tensor([2.0])).item() == pytest.approx(math.log(2))
    for bad in (-1.0, math.nan, math.inf, "2"):
        with pytest.raises(InputError, match=r"^model\.loss\.init_args\.gamma must be"):
            loss_cls(gamma=bad)
    with pytest.raises(InputError, match=r"model\.loss\.init_args\.beta"):
        loss_cls(beta=0.0)


def test_the_loss_is_a_config_shorthand(plugins, monkeypatch, capsys):
    from bpo_lightning.cli import main

    monkeypatch.setattr("sys.argv", ["bpo"])
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", quickstart, "--model.loss=OffsetDPOLoss", "--model.loss.gamma=2.5", "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: plugin_example_loss.OffsetDPOLoss" in out and "gamma: 2.5" in out
