"""A plugin's settings reach the provenance without the plugin doing anything: a sampler or annotator that defines
no ``settings()`` / ``identity`` is described by the arguments it was built with."""

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
        yield 0, Samples([[1]] * len(prompts), [[[2], [3]]] * len(prompts), [["a", "b"]] * len(prompts),
                         [[True, True]] * len(prompts))  # fmt: skip


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
