"""A plugin's settings reach the provenance without the plugin doing anything: a sampler or annotator that defines
no ``settings()`` / ``identity`` is described by the arguments it was built with."""

import json

import pytest

from bpo_lightning.annotation import Annotator
from bpo_lightning.errors import RunError
from bpo_lightning.sampling import GenerateSampler, Sampler, Samples
from bpo_lightning.store import PhaseStore


class Truncating(Sampler):
    """A third-party sampler that defines only what it must."""

    def __init__(self, max_new_tokens: int = 32, progress: bool = True) -> None:
        self.max_new_tokens = max_new_tokens

    def sample_batches(self, model, tokenizer, prompts, *, seed):
        yield (
            0,
            Samples(
                [[1]] * len(prompts),
                [[[2], [3]]] * len(prompts),
                [["a", "b"]] * len(prompts),
                [[True, True]] * len(prompts),
            ),
        )


class Keywords(Annotator):
    def __init__(self, words: tuple[str, ...] = ("good",), weight: float = 1.0) -> None:
        self.words, self.weight = words, weight

    def score(self, prompts, responses):
        return [self.weight * sum(w in r for w in self.words) for r in responses]


def test_a_plugin_sampler_is_described_by_its_arguments():
    assert Truncating(4).settings() == {"class": "test_provenance.Truncating", "max_new_tokens": 4}
    assert Truncating().settings()["max_new_tokens"] == 32  # defaults count
    assert "progress" not in Truncating(progress=False).settings()  # how it reports is not what it produces


def test_a_resume_with_other_plugin_sampler_arguments_is_refused(tmp_path):
    """The reproduction: killed after 16 of 32 prompts, rerun with max_new_tokens 32 → 4, the run used to go on and
    train on a phase mixing 32- and 4-token responses."""

    def provenance(sampler):
        return {"phase": 0, "behavior_version": 0, "sampler": sampler.settings(), "annotator": "a", "seed": 0}

    store = PhaseStore(tmp_path, 0)
    store.check(provenance(Truncating(32)))
    with pytest.raises(RunError, match=r"sampler: saved .*'max_new_tokens': 32.*now .*'max_new_tokens': 4"):
        store.check(provenance(Truncating(4)))


def test_a_plugin_annotator_identity_names_its_arguments():
    assert Keywords().identity == 'test_provenance.Keywords(weight=1.0, words=["good"])'
    assert Keywords(weight=2.0).identity != Keywords().identity  # another setting never shares cached scores


def test_a_subclass_of_the_built_in_sampler_keeps_its_own_arguments():
    class Longer(GenerateSampler):
        def __init__(self, penalty: float = 1.0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.penalty = penalty

    settings = Longer(penalty=1.3, max_new_tokens=8).settings()
    assert settings["penalty"] == 1.3 and settings["max_new_tokens"] == 8


def _fit_once(root, sft_dir, **changes):
    """A one-phase fit of 16 prompts into ``root`` through ``Trainer.fit``; ``changes``: ``block`` (the sampler's
    batch_size), ``reference`` or ``loss`` differing from the first run."""
    from conftest import make_run

    from bpo_lightning.losses import IPOLoss

    module_args = {"reference": changes["reference"]} if "reference" in changes else {}
    if "loss" in changes:
        module_args["loss"] = IPOLoss(beta=changes["loss"])
    module, data, trainer = make_run(root, sft_dir, budget=16, num_phases=1, **module_args)
    data.sampler = GenerateSampler(max_new_tokens=16, batch_size=changes.get("block", 16), progress=False)
    trainer.fit(module, datamodule=data)
    return data


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"block": 8}, r"sampler: saved .*'batch_size': 16.*now .*'batch_size': 8"),
        ({"reference": "initial"}, r"reference: saved 'behavior', now 'initial'"),
        ({"loss": 0.1}, r"loss: saved .*DPOLoss.*now .*IPOLoss"),
    ],
    ids=["block size", "reference", "loss"],
)
def test_the_python_api_refuses_phase_data_of_another_setup(change, key, tmp_path, sft_dir):
    """The saved phase of a run is reused only by that run's setup, through ``Trainer.fit`` as through ``bpo fit``:
    another block size draws other samples (blocks are seeded by their first position), another reference or loss
    trains on them otherwise; each is refused naming the entry, and the saved files are left as they were."""
    first = _fit_once(tmp_path, sft_dir)
    assert first.stats[0].prompts == 16
    files = {p: p.read_bytes() for p in sorted((tmp_path / "data").iterdir())}
    with pytest.raises(RunError, match=key):
        _fit_once(tmp_path, sft_dir, **change)
    assert {p: p.read_bytes() for p in sorted((tmp_path / "data").iterdir())} == files


def test_a_phase_file_written_before_the_loss_and_block_size_were_recorded_is_reused(tmp_path):
    """Phase files of earlier versions hold no ``loss`` and no sampler ``batch_size``: compared without them."""
    sampler = GenerateSampler(batch_size=16)
    old = {
        "phase": 0,
        "behavior_version": 0,
        "annotator": "a",
        "seed": 0,
        "reference": "behavior",
        "sampler": {k: v for k, v in sampler.settings().items() if k != "batch_size"},
    }
    store = PhaseStore(tmp_path, 0)
    store.check(old)
    now = {**old, "sampler": sampler.settings(), "loss": {"class": "bpo_lightning.losses.DPOLoss", "beta": 0.1}}
    store.check(now)  # accepted
    with pytest.raises(RunError, match="sampler"):  # a setting the old file does record still counts
        store.check({**now, "sampler": {**sampler.settings(), "max_new_tokens": 7}})


@pytest.mark.parametrize("cls", ["GenerateSampler", "StaticCacheSampler"])
def test_run_identity_and_phase_files_read_one_declaration_of_the_sampler(cls):
    """run.json's sampler keys are exactly what the phase files record (``settings()``): both leave out the
    arguments the class declares ``not_provenance`` (how it computes) and keep the block size (it seeds blocks)."""
    import inspect

    import bpo_lightning
    from bpo_lightning.identity import fingerprint

    sampler_cls = getattr(bpo_lightning, cls)
    args = {name: p.default for name, p in inspect.signature(sampler_cls.__init__).parameters.items() if name != "self"}
    config = {"model": {}, "data": {"sampler": {"class_path": f"bpo_lightning.{cls}", "init_args": args}}}
    recorded = {k.removeprefix("data.sampler.init_args.") for k in fingerprint(config) if ".init_args." in k}
    settings = set(sampler_cls().settings()) - {"class"}
    assert recorded == settings
    assert "batch_size" in recorded and "share_prompts" not in recorded and "progress" not in recorded


def test_a_judge_run_continues_against_another_endpoint_or_with_a_longer_timeout(tmp_path, monkeypatch):
    """Where and how patiently a judge is asked does not change its verdicts: a run folder whose run.json was
    written with one endpoint, timeout and concurrency (or, by an earlier version, with them recorded) accepts
    another; another judge model is refused, naming the key."""
    from bpo_lightning.identity import RunMismatch, check_run_dir, fingerprint

    monkeypatch.setenv("OPENAI_API_KEY", "k")

    def judge(**changes):
        args = {"base_url": "http://127.0.0.1:8000/v1", "model": "m", "timeout": 30.0, "concurrency": 8, **changes}
        return fingerprint(
            {"model": {}, "data": {"annotator": {"class_path": "bpo_lightning.judge.HTTPJudge", "init_args": args}}}
        )

    first = judge()
    assert "data.annotator.init_args.model" in first and "data.annotator.init_args.base_url" not in first
    check_run_dir(tmp_path, first)
    check_run_dir(tmp_path, judge(base_url="http://10.0.0.2:9000/v1", timeout=300.0, concurrency=2))
    older = tmp_path / "older"
    older.mkdir()
    (older / "run.json").write_text(json.dumps({"fingerprint": {**first, "data.annotator.init_args.base_url": "x",
                                                                "data.annotator.init_args.timeout": 5.0}}))  # fmt: skip
    check_run_dir(older, judge(timeout=60.0))
    with pytest.raises(RunMismatch, match="data.annotator.init_args.model: saved 'm', now 'other'"):
        check_run_dir(tmp_path, judge(model="other"))


def test_an_edited_rule_function_is_another_annotator(tmp_path, monkeypatch):
    """The reproduction: a rule function edited between two runs sharing an annotation cache used to get its old
    scores back through the cache (``direct call [-5.0], through the cache [1.0]``). Its identity now digests its
    code and module, so the edited function is asked again; a phase file written before the digest was recorded is
    still reused by the same import path."""
    import importlib

    from bpo_lightning.annotation import RuleAnnotator
    from bpo_lightning.cache import AnnotationCache, cached_score

    monkeypatch.syspath_prepend(str(tmp_path))
    rule = tmp_path / "my_rule.py"
    rule.write_text("def score(prompt, response):\n    return 1.0\n")
    import my_rule

    cache = AnnotationCache(tmp_path / "cache.sqlite")
    first = RuleAnnotator("my_rule:score")
    assert cached_score(first, cache, ["p"], ["r"])[0] == [1.0]
    rule.write_text("def score(prompt, response):\n    return -5.0\n")
    importlib.reload(my_rule)
    edited = RuleAnnotator("my_rule:score")
    assert edited.identity != first.identity and edited.identity.startswith("RuleAnnotator:my_rule:score@")
    assert cached_score(edited, cache, ["p"], ["r"])[0] == [-5.0]  # asked, not the old cached 1.0
    assert RuleAnnotator("my_rule:score").identity == edited.identity  # stable while the code is

    store = PhaseStore(tmp_path / "data", 0)
    legacy = {
        "phase": 0,
        "behavior_version": 0,
        "sampler": {},
        "annotator": "RuleAnnotator:my_rule:score",
        "seed": 0,
        "reference": "behavior",
    }
    store.check(legacy)
    store.check({**legacy, "annotator": edited.identity})  # written before digests: the same import path passes
    with pytest.raises(RunError, match="annotator"):
        store.check({**legacy, "annotator": RuleAnnotator("test_provenance:_other_rule").identity})


def _other_rule(prompt, response):
    return 0.0


def test_a_loss_is_recorded_by_its_arguments_not_by_what_a_strategy_adds():
    """DeepSpeed tags every module with bookkeeping attributes (``ds_id``, ``ds_grads_remaining``, the latter only
    once it has run): a resumed ZeRO-3 run was refused for them. The loss's provenance is its constructor arguments."""
    from bpo_lightning.losses import DPOLoss
    from bpo_lightning.module import loss_settings

    loss = DPOLoss(beta=0.2)
    before = loss_settings(loss)
    loss.ds_id, loss.ds_grads_remaining = 1, 0
    assert (
        loss_settings(loss) == before == {"class": "bpo_lightning.losses.DPOLoss", "beta": 0.2, "label_smoothing": 0.0}
    )
