"""The online loop end to end on a tiny model: phases, behavior handling, stored log-probs, resume."""

import json
import math

import lightning as L
import pytest
import torch
from conftest import CountingAnnotator, make_run
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from bpo_lightning import EMA, DPOLoss, Frozen, HardSync
from bpo_lightning.batches import pair_batch
from bpo_lightning.evaluation import Evaluation
from bpo_lightning.logprobs import sequence_logps
from bpo_lightning.store import PhaseStore


class RecordingDPOLoss(DPOLoss):
    """DPO that remembers the margins h of every call, with the epoch it was called in."""

    def __init__(self):
        super().__init__(beta=0.1)
        self.margins = []

    def pair_losses(self, h):
        self.margins.append(h.detach().clone())
        return super().pair_losses(h)


class FirstBatchOfPhase(L.Callback):
    """Records how many loss calls happened before each phase's first step, and the policy at each phase end."""

    def __init__(self):
        self.first_call = {}
        self.end_weights = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.first_call[trainer.current_epoch] = len(module.loss.margins)

    def on_train_epoch_end(self, trainer, module):
        state = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
        self.end_weights[trainer.current_epoch] = state


def load_pairs(root, phase):
    return PhaseStore(root / "data", phase).load_pairs()[0]


def fresh_logps(model_dir_or_model, records, tokenizer, state=None, share_prompts=False):
    """Log-probs of the records' chosen and rejected responses from a freshly loaded model (each pair's prompt run
    once with ``share_prompts``, as the module's default does)."""
    if isinstance(model_dir_or_model, torch.nn.Module):
        model = model_dir_or_model
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir_or_model)
    if state is not None:
        model.load_state_dict(state, strict=False)
    model.eval()
    batch = pair_batch(records, tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.no_grad():
        sums = sequence_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], share_prompts=share_prompts
        ).sums
    return sums[: len(records)], sums[len(records) :]


def annotations_on_disk(root, phases):
    """How many scores the annotator gave for the saved phases: distinct responses of non-identical prompts, less
    those the annotation cache already knew (each row records both counts)."""
    total = 0
    for phase in phases:
        for row in PhaseStore(root / "data", phase).load_samples().values():
            distinct = len(set(row.responses)) if row.status != "identical" else 0
            assert row.annotated + row.cached == distinct
            total += row.annotated
    return total


def run(tmp_path, sft_dir, **kwargs):
    recorder = FirstBatchOfPhase()
    module, data, trainer = make_run(tmp_path, sft_dir, callbacks=[recorder], loss=RecordingDPOLoss(), **kwargs)
    trainer.fit(module, datamodule=data)
    return module, data, recorder


@pytest.mark.slow
def test_bpo_regenerates_once_per_phase_and_behavior_follows_policy(tmp_path, sft_dir):
    no_kl = Evaluation(kl_samples=0)  # evaluation KL off: nothing needs a weight copy
    module, data, recorder = run(tmp_path, sft_dir, budget=48, num_phases=3, behavior=HardSync(), evaluation=no_kl)
    annotator = data.annotator
    # each phase sampled and annotated its own 16 prompts, and each prompt in one annotator call only
    assert sorted(data.stats) == [0, 1, 2] and all(s.prompts == 16 for s in data.stats.values())
    assert len(annotator.calls) == annotations_on_disk(tmp_path, range(3))
    for phase in range(3):
        records = load_pairs(tmp_path, phase)
        assert {r.behavior_version for r in records} == {phase}
        # h = 0 on the first step of every phase: the behavior *is* the policy at the phase start
        first = module.loss.margins[recorder.first_call[phase]]
        assert_close(first, torch.zeros_like(first), atol=2e-4, rtol=0)
        # the stored behavior log-probs equal a fresh forward of the policy as it was when the phase began
        state = recorder.end_weights.get(phase - 1)
        chosen, rejected = fresh_logps(sft_dir, records, module.tokenizer, state)
        assert_close(torch.tensor([r.behavior_chosen_logps for r in records]), chosen, atol=1e-4, rtol=0)
        assert_close(torch.tensor([r.behavior_rejected_logps for r in records]), rejected, atol=1e-4, rtol=0)
        assert all(r.reference_chosen_logps == r.behavior_chosen_logps for r in records)
    # the behavior changed between phases because the policy trained: phase 1's behavior is not the initial model
    records = load_pairs(tmp_path, 1)
    initial_chosen, _ = fresh_logps(sft_dir, records, module.tokenizer)
    assert not torch.allclose(torch.tensor([r.behavior_chosen_logps for r in records]), initial_chosen, atol=1e-3)
    # hard sync keeps no weight copy at all
    assert module.initial is None and module.behavior_snapshot is None and module.behavior_copy is None


@pytest.mark.slow
def test_offline_behavior_never_changes(tmp_path, sft_dir):
    module, data, recorder = run(tmp_path, sft_dir, budget=32, num_phases=2, behavior=Frozen())
    for phase in range(2):
        records = load_pairs(tmp_path, phase)
        assert {r.behavior_version for r in records} == {0}
        chosen, rejected = fresh_logps(sft_dir, records, module.tokenizer)  # the initial model
        assert_close(torch.tensor([r.behavior_chosen_logps for r in records]), chosen, atol=1e-4, rtol=0)
        assert_close(torch.tensor([r.behavior_rejected_logps for r in records]), rejected, atol=1e-4, rtol=0)
    # phase 2's first step is not at h = 0: the policy moved away from the frozen behavior
    first = module.loss.margins[recorder.first_call[1]]
    assert first.abs().max() > 1e-2


@pytest.mark.slow
def test_on_policy_dpo_samples_from_snapshot_but_regularises_to_initial(tmp_path, sft_dir):
    module, data, recorder = run(tmp_path, sft_dir, budget=32, num_phases=2, behavior=HardSync(), reference="initial")
    records = load_pairs(tmp_path, 1)
    chosen, _ = fresh_logps(sft_dir, records, module.tokenizer)  # initial model
    assert_close(torch.tensor([r.reference_chosen_logps for r in records]), chosen, atol=1e-4, rtol=0)
    behavior, _ = fresh_logps(sft_dir, records, module.tokenizer, recorder.end_weights[0])
    assert_close(torch.tensor([r.behavior_chosen_logps for r in records]), behavior, atol=1e-4, rtol=0)
    assert not torch.allclose(behavior, chosen, atol=1e-3)


@pytest.mark.slow
def test_ema_behavior_moves_by_the_decay(tmp_path, sft_dir):
    decay = 0.75
    module, data, recorder = run(tmp_path, sft_dir, budget=32, num_phases=2, behavior=EMA(decay=decay))
    initial = AutoModelForCausalLM.from_pretrained(sft_dir).state_dict()
    policy_after_phase_0 = recorder.end_weights[0]
    for name, value in module.behavior_snapshot.items():
        assert_close(value, decay * initial[name] + (1 - decay) * policy_after_phase_0[name], atol=1e-6, rtol=0)
    # and the phase-1 pairs were sampled and scored by exactly that model
    records = load_pairs(tmp_path, 1)
    chosen, _ = fresh_logps(sft_dir, records, module.tokenizer, module.behavior_snapshot)
    assert_close(torch.tensor([r.behavior_chosen_logps for r in records]), chosen, atol=1e-4, rtol=0)


class StopAfterFirstPhase(L.Callback):
    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


@pytest.mark.slow
def test_resume_annotates_nothing_twice_and_matches_uninterrupted_run(tmp_path, sft_dir):
    full, full_data, full_trainer = make_run(tmp_path / "full", sft_dir, budget=32, num_phases=2)
    full_trainer.fit(full, datamodule=full_data)

    annotator = CountingAnnotator()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "split" / "ckpt", save_last=True)
    first, data, trainer = make_run(
        tmp_path / "split",
        sft_dir,
        budget=32,
        num_phases=2,
        annotator=annotator,
        callbacks=[StopAfterFirstPhase(), ckpt],
    )
    trainer.fit(first, datamodule=data)
    assert trainer.current_epoch == 1 and sorted(data.stats) == [0]

    ckpt2 = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "split" / "ckpt", save_last=True)
    second, data2, trainer2 = make_run(
        tmp_path / "split", sft_dir, budget=32, num_phases=2, annotator=annotator, callbacks=[ckpt2]
    )
    trainer2.fit(second, datamodule=data2, ckpt_path=str(tmp_path / "split" / "ckpt" / "last.ckpt"))
    assert 1 in data2.stats  # (Lightning may reload phase 0's finished data from disk first; nothing is re-sampled)
    # the two runs together scored exactly what the two saved phases hold: nothing was annotated twice
    assert len(annotator.calls) == annotations_on_disk(tmp_path / "split", range(2))
    for name, value in full.policy.state_dict().items():
        assert_close(second.policy.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_partial_phase_is_continued_not_resampled(tmp_path, sft_dir):
    """A job killed while annotating leaves its annotated prompts on disk; the rerun annotates only the rest, and pays
    for no (prompt, response) twice: one already paid for by this run (the same prompt text can come back later in
    the phase with the same answer) is taken from the cache and counted as paid by the run."""

    class RecordingAnnotator(CountingAnnotator):
        scores_per_call = None  # one call per block: the second block's call fails

        def __init__(self, fail_after: int | None = None) -> None:
            super().__init__()
            self.fail_after, self.invocations, self.paid = fail_after, 0, []

        def score(self, prompts, responses):
            self.invocations += 1
            if self.fail_after is not None and self.invocations > self.fail_after:
                raise RuntimeError("annotator crashed")
            self.paid.extend(zip(prompts, responses, strict=True))
            return super().score(prompts, responses)

    first = RecordingAnnotator(fail_after=1)  # the second block's call fails
    module, data, trainer = make_run(tmp_path, sft_dir, budget=64, num_phases=1, annotator=first)
    with pytest.raises(RuntimeError, match="annotator crashed"):
        trainer.fit(module, datamodule=data)
    saved = PhaseStore(tmp_path / "data", 0).load_samples()
    assert len(saved) == 16  # one generate block of 16 prompts was annotated and saved before the crash
    annotator = RecordingAnnotator()
    module, data, trainer = make_run(tmp_path, sft_dir, budget=64, num_phases=1, annotator=annotator)
    trainer.fit(module, datamodule=data)
    assert data.stats[0].prompts == 64
    rows = PhaseStore(tmp_path / "data", 0).load_samples()
    fresh = [row for index, row in rows.items() if index not in saved]
    assert fresh and not set(annotator.paid) & set(first.paid)  # nothing paid twice
    queries = {(row.prompt, text) for row in fresh if row.annotated for text in row.responses}
    assert set(annotator.paid) | (queries & set(first.paid)) == queries  # each paid once, now or before
    assert len(annotator.paid) == len(set(annotator.paid))  # a (prompt, response) that recurs is asked once


@pytest.mark.slow
def test_phase_files_hold_provenance(tmp_path, sft_dir):
    module, data, trainer = make_run(tmp_path, sft_dir, budget=16, num_phases=1)
    trainer.fit(module, datamodule=data)
    meta = json.loads((tmp_path / "data" / "phase_0000.json").read_text())
    assert meta["complete"] is True
    prov = meta["provenance"]
    assert prov["phase"] == 0 and prov["behavior_version"] == 0 and prov["seed"] == 0
    assert prov["annotator"] == "CountingAnnotator:gold" and prov["sampler"]["top_k"] == 50
    assert meta["stats"]["prompts"] == 16
    rows = [json.loads(line) for line in (tmp_path / "data" / "phase_0000.samples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["responses"]) == 2 for r in rows)
    kept = [r for r in rows if r["status"] == "kept"]
    assert all(r["scores"][r["chosen"]] > r["scores"][r["rejected"]] for r in kept)
    assert math.isclose(meta["stats"]["kept"], len(kept))


class CoarseAnnotator(CountingAnnotator):
    """Scores 1 for a response of more than 4 words, else 0: many pairs tie and are dropped."""

    def score(self, prompts, responses):
        self.calls.extend(prompts)
        return [float(len(r.split()) > 4) for r in responses]


class LearningRates(L.Callback):
    def __init__(self):
        self.before_step = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before_step.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.slow
def test_linear_decay_reaches_zero_after_the_last_step_taken_whatever_the_drops(tmp_path, sft_dir):
    """The horizon counts the pairs kept, not the prompts: with ties dropped the run takes fewer steps, and the
    learning rate still falls to 0 right after the last one (it used to stop at a third of its peak)."""
    lrs = LearningRates()
    module, data, trainer = make_run(tmp_path, sft_dir, budget=64, num_phases=2, annotator=CoarseAnnotator(),
                                     callbacks=[lrs], lr=1e-3, evaluation=Evaluation(kl_samples=0))  # fmt: skip
    trainer.fit(module, datamodule=data)
    kept = [data.stats[p].kept for p in range(2)]
    assert sum(kept) <= 0.9 * 64  # at least 10 % of the prompts dropped
    steps = sum(math.ceil(k / 8) for k in kept)
    assert trainer.global_step == steps < 8  # fewer steps than prompts / batch
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # after the last step
    assert lrs.before_step[0] == 1e-3 and 0 < lrs.before_step[-1] < lrs.before_step[-2]
    # in the last phase (horizon exact) the decay is linear: equal decrements down to 0
    last = lrs.before_step[-math.ceil(kept[1] / 8) :] + [0.0]
    decrements = [a - b for a, b in zip(last, last[1:], strict=False)]
    assert_close(torch.tensor(decrements), torch.full((len(decrements),), decrements[0]), rtol=1e-6, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "share"), [("sampler", True), ("forward", False), ("forward", True)])
def test_behavior_log_probs_from_the_sampler_or_a_forward_pass(tmp_path, sft_dir, monkeypatch, mode, share):
    """``model.behavior_logps: sampler`` takes π_β's log-probs from sampling: no scoring forward runs (the reference
    is π_β), and h at a phase's first step is 0 to float32 rounding. ``forward`` scores the pairs with a forward
    pass in the training batch's shape: h is exactly 0 there when every sequence runs whole (each row's arithmetic
    does not depend on the others), to float rounding when pairs share their prompt's forward (a prompt's left
    padding depends on the others in its batch). All store the same values to 1e-4."""
    from bpo_lightning.scoring import Scorer

    scored = []
    original = Scorer.pairs
    monkeypatch.setattr(Scorer, "pairs", lambda self, records: scored.append(len(records)) or original(self, records))
    no_kl = Evaluation(kl_samples=0)
    module, data, recorder = run(tmp_path, sft_dir, budget=32, num_phases=2, evaluation=no_kl, behavior_logps=mode,
                                 scoring_batch_size=8, share_prompts=share)  # fmt: skip
    pairs = sum(len(load_pairs(tmp_path, phase)) for phase in range(2))
    assert pairs > 20
    assert sum(scored) == (0 if mode == "sampler" else pairs)
    for phase in range(2):
        first = module.loss.margins[recorder.first_call[phase]]
        if mode == "forward" and not share:
            assert torch.equal(first, torch.zeros_like(first))
        else:
            assert first.abs().max() < 2e-4  # float rounding (0 where it cancels), not a different model
        records = load_pairs(tmp_path, phase)
        chosen, rejected = fresh_logps(sft_dir, records, module.tokenizer, recorder.end_weights.get(phase - 1))
        assert_close(torch.tensor([r.behavior_chosen_logps for r in records]), chosen, atol=1e-4, rtol=0)
        assert_close(torch.tensor([r.behavior_rejected_logps for r in records]), rejected, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "data" / "phase_0000.json").read_text())["provenance"]["behavior_logps"] == mode


def test_a_bad_behavior_logps_mode_is_refused(sft_dir):
    from bpo_lightning.errors import InputError
    from bpo_lightning.module import BPOModule
    from bpo_lightning.policy import Pretrained

    with pytest.raises(InputError, match="model.behavior_logps must be 'sampler' or 'forward', got 'both'"):
        BPOModule(policy=Pretrained(str(sft_dir)), behavior_logps="both")
