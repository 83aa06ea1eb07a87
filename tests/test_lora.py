"""LoRA and the LoRA ensemble in the loop: what trains, what samples, what is kept in memory."""

import itertools

import lightning as L
import pytest
import torch
from conftest import make_run
from test_loop import fresh_logps
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from bpo_lightning import EMA, Frozen, HardSync
from bpo_lightning.lora import MERGED, LoRA
from bpo_lightning.merge import merge_adapter_states
from bpo_lightning.store import PhaseStore


class EndWeights(L.Callback):
    def __init__(self):
        self.states = {}

    def on_train_epoch_end(self, trainer, module):
        self.states[trainer.current_epoch] = {k: v.detach().clone() for k, v in module.policy.named_parameters()}


def test_lora_arguments_are_validated():
    with pytest.raises(ValueError, match=r"model.lora.members must be >= 1.*model.lora.merge must be"):
        LoRA(members=0, merge="soup")
    with pytest.raises(ValueError, match="model.lora.init_from lists 1 adapters for 2 members"):
        LoRA(members=2, init_from=["a"])


@pytest.mark.slow
def test_single_lora_keeps_adapter_only_snapshots(tmp_path, sft_dir):
    module, data, trainer = make_run(
        tmp_path, sft_dir, budget=32, num_phases=2, behavior=Frozen(), lora=LoRA(r=4, alpha=8)
    )
    trainer.fit(module, datamodule=data)
    assert module.initial and all("lora_" in name for name in module.initial)  # never the base weights
    base = sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" not in n)
    assert sum(v.numel() for v in module.initial.values()) < 0.05 * base
    trained = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trained and all(".member_0." in n for n in trained)
    # the frozen behavior is the initial model: base weights plus the initial adapter (B = 0, so the base model)
    records = PhaseStore(tmp_path / "data", 1).load_pairs()[0]
    chosen, _ = fresh_logps(sft_dir, records, module.tokenizer)
    assert_close(torch.tensor([r.behavior_chosen_logps for r in records]), chosen, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_ema_with_lora_averages_the_factors_not_the_updates(tmp_path, sft_dir):
    """EMA with one LoRA adapter: A and B are each averaged, as documented; so π_β's update B̄Ā differs from the
    EMA of the updates BA (here B starts at 0: the EMA of BA is (1 − d)·B₁A₁, while B̄Ā = (1 − d)·B₁·Ā)."""
    decay, ends = 0.75, EndWeights()
    module, data, trainer = make_run(tmp_path, sft_dir, budget=32, num_phases=2, behavior=EMA(decay=decay),
                                     lora=LoRA(r=4, alpha=8), callbacks=[ends], lr=5e-3)  # fmt: skip
    trainer.fit(module, datamodule=data)
    after_phase_0 = ends.states[0]
    assert module.behavior_snapshot.keys() == module.initial.keys() and all("lora_" in k for k in module.initial)
    for name, value in module.behavior_snapshot.items():  # factor by factor
        assert_close(value, decay * module.initial[name] + (1 - decay) * after_phase_0[name], atol=1e-7, rtol=0)
    a = next(k for k in module.initial if "lora_A" in k)
    b = a.replace("lora_A", "lora_B")
    behavior_update = module.behavior_snapshot[b] @ module.behavior_snapshot[a]
    ema_of_updates = (1 - decay) * after_phase_0[b] @ after_phase_0[a]  # + decay · B₀A₀ = 0
    assert ema_of_updates.abs().max() > 1e-6
    assert not torch.allclose(behavior_update, ema_of_updates, rtol=1e-2, atol=0)


def _ensemble_run(tmp_path, sft_dir, **kwargs):
    ends = EndWeights()
    lora = LoRA(r=4, alpha=8, members=3, merge=kwargs.pop("merge", "peft_linear"), seed=0)
    module, data, trainer = make_run(
        tmp_path, sft_dir, budget=32, num_phases=2, lora=lora, callbacks=[ends], lr=5e-3, **kwargs
    )
    trainer.fit(module, datamodule=data)
    return module, data, ends


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["peft_linear", "mean"])
def test_ensemble_trains_every_member_and_samples_with_the_merge(tmp_path, sft_dir, merge):
    module, data, ends = _ensemble_run(tmp_path, sft_dir, behavior=HardSync(), merge=merge)
    lora = module.lora
    members = [lora.member_state(module.policy, name) for name in lora.names]
    for state in members:  # every member moved away from B = 0
        assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    assert not torch.equal(*(next(v for k, v in s.items() if "lora_B" in k) for s in members[:2]))
    # phase 1 was sampled and scored by the merge of the members as they were at the end of phase 0
    end0 = ends.states[0]
    states0 = [{k.replace(f".{n}.", "."): v for k, v in end0.items() if f".{n}." in k} for n in lora.names]
    merged0 = merge_adapter_states(states0, lora.scaling, merge)
    lora.load_merged(module.policy, merged0)
    records = PhaseStore(tmp_path / "data", 1).load_pairs()[0]
    from bpo_lightning.lora import active_adapter

    with active_adapter(module.policy, MERGED):
        chosen, _ = fresh_logps(module.policy, records, module.tokenizer)
    assert_close(torch.tensor([r.behavior_chosen_logps for r in records]), chosen, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_ensemble_keeps_one_base_model_and_no_gradient_through_the_merge(tmp_path, sft_dir):
    module, data, ends = _ensemble_run(tmp_path, sft_dir, behavior=HardSync())
    params = dict(module.policy.named_parameters())
    base = sum(p.numel() for n, p in params.items() if "lora_" not in n)
    adapters = sum(p.numel() for n, p in params.items() if "lora_" in n)
    single = AutoModelForCausalLM.from_pretrained(data.trainer.lightning_module.source.name_or_path)
    assert base == sum(p.numel() for p in single.parameters())  # exactly one copy of the base weights
    assert adapters < 0.2 * base  # K members + the merged adapter are small next to it (here r = 4)
    assert all(p.grad is None for n, p in params.items() if f".{MERGED}." in n)  # no gradient flows into the merge
    assert not any(p.requires_grad for n, p in params.items() if "lora_" not in n or f".{MERGED}." in n)


def test_members_are_clipped_one_by_one():
    from bpo_lightning.module import BPOModule
    from bpo_lightning.weights import EnsembleWeights

    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((4,), 3.0), torch.full((4,), 0.1)  # norms 6.0 and 0.2
    optimizer = torch.optim.AdamW([{"params": [a]}, {"params": [b]}])
    module = BPOModule.__new__(BPOModule)
    module.weights = EnsembleWeights(torch.nn.Linear(1, 1), LoRA(members=2))
    BPOModule.configure_gradient_clipping(module, optimizer, gradient_clip_val=1.0)
    assert_close(a.grad.norm(), torch.tensor(1.0))  # clipped to 1 on its own
    assert_close(b.grad, torch.full((4,), 0.1))  # untouched: its norm is below 1 (a global clip would shrink it)


def test_members_can_start_from_adapter_directories(tmp_path, sft_dir):
    """K separately saved adapters (as from K SFT runs) become the K members, factor for factor."""
    from peft import LoraConfig, get_peft_model

    saved = []
    for k in range(2):
        torch.manual_seed(10 + k)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(sft_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
        )
        model.save_pretrained(tmp_path / f"sft_{k}")
        saved.append(
            {n.replace(".default.", "."): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        )
    lora = LoRA(
        r=4, alpha=8, members=2, target_modules=["c_attn"], init_from=[str(tmp_path / f"sft_{k}") for k in range(2)]
    )
    policy = lora.wrap(AutoModelForCausalLM.from_pretrained(sft_dir))
    for k, name in enumerate(lora.names):
        state = lora.member_state(policy, name)
        assert state.keys() == saved[k].keys()
        for key, value in saved[k].items():
            assert torch.equal(state[key], value), key
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".member_" in n)


@pytest.mark.slow
@pytest.mark.parametrize("members", [0, 3])
def test_lora_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path, sft_dir, members):
    """A LoRA run's checkpoints used to store the frozen base model beside the adapters (1.1 GB for 7.6 MB of
    adapters on a 268M model): now adapters only, and a resume from them ends with the uninterrupted weights."""
    from bpo_lightning.checkpoints import PhaseCheckpoint

    def run(root, max_epochs, ckpt_path=None):
        checkpoint = PhaseCheckpoint(
            dirpath=root / "ckpt",
            filename="phase-{phase}",
            save_top_k=-1,
            save_last="link",
            auto_insert_metric_name=False,
        )
        lora = LoRA(r=4, alpha=8, members=members, seed=0) if members else LoRA(r=4, alpha=8)
        module, data, trainer = make_run(
            root, sft_dir, budget=32, num_phases=2, max_epochs=max_epochs, lora=lora, callbacks=[checkpoint]
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "full", 2)
    saved = torch.load(tmp_path / "full" / "ckpt" / "phase-2.ckpt", weights_only=True)
    assert saved["state_dict"] and all("lora_" in key for key in saved["state_dict"])  # no frozen base tensor
    assert saved["bpo"]["base"] == "model.policy"
    base = sum(p.numel() for p in full.policy.parameters() if not p.requires_grad)
    kept = sum(v.numel() for v in saved["state_dict"].values())
    assert kept < base / 4
    run(tmp_path / "split", 1)
    resumed = run(tmp_path / "split", 2, ckpt_path=str(tmp_path / "split" / "ckpt" / "last.ckpt"))
    for (name, a), (_, b) in zip(full.trainable_state().items(), resumed.trainable_state().items(), strict=True):
        assert torch.equal(a, b), name


def _ensemble_step(sft_dir, recompute: bool):
    """One training step's loss and gradients of a 3-member ensemble, and the bytes its forward keeps for the
    backward pass (autograd's saved tensors, counted as they are packed)."""
    from bpo_lightning.batches import pair_batch
    from bpo_lightning.module import BPOModule
    from bpo_lightning.policy import Pretrained
    from bpo_lightning.types import PreferenceRecord

    torch.manual_seed(0)
    module = BPOModule(policy=Pretrained(str(sft_dir)), lora=LoRA(r=4, alpha=8, members=3, recompute_members=recompute))
    module.configure_model()
    for name, p in module.policy.named_parameters():  # members that differ (B starts at 0)
        if "lora_B" in name and p.requires_grad:
            p.data.normal_(0, 0.05)
    tok = module.tokenizer
    records = []
    for i, (prompt, chosen, rejected) in enumerate(
        [
            ("hotel review : the room was", " clean and quiet .", " dirty ."),
            ("book review : this novel", " is great .", " was dull and long ."),
        ]
    ):
        ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        records.append(PreferenceRecord(1, i, prompt, chosen, rejected, 1.0, 0.0, [tok.bos_token_id, *ids(prompt)],
                                        ids(chosen), ids(rejected), 1, -9.0, -11.0, -9.0, -11.0))  # fmt: skip
    batch = pair_batch(records, tok.pad_token_id, tok.eos_token_id)
    saved, forwards = [], []
    first = next(m for m in module.policy.modules() if hasattr(m, "lora_A"))  # the first adapted layer
    first.register_forward_hook(lambda *args: forwards.append(tuple(first.active_adapters)))

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.training_step(batch, 0)
    kept = sum(saved)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    return loss.detach(), grads, kept, forwards


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step outside a Trainer
def test_ensemble_members_recomputed_in_the_backward_give_the_same_gradients_and_keep_one_members_activations(sft_dir):
    """``recompute_members``: the loss and every member's gradient are those of the plain step, and what the
    forward keeps for the backward pass is a small part of it (the plain step keeps K members' activations; the
    recomputed one keeps only the members' outputs until each member's forward runs again)."""
    loss, grads, kept, forwards = _ensemble_step(sft_dir, recompute=False)
    loss_r, grads_r, kept_r, forwards_r = _ensemble_step(sft_dir, recompute=True)
    members = [("member_0",), ("member_1",), ("member_2",)]
    # the forward is the plain step's; then the backward runs each member's forward again, last member first
    again = forwards_r[len(forwards) :]
    assert forwards_r[: len(forwards)] == forwards and [name for name, _ in itertools.groupby(forwards)] == members
    assert [name for name, _ in itertools.groupby(again)] == members[::-1]
    assert_close(loss_r, loss, atol=0, rtol=0)
    assert grads_r.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads_r[name], grads[name], atol=1e-7, rtol=1e-6, msg=name)
    assert all(any(g.abs().sum() > 0 for n, g in grads.items() if f".member_{k}." in n) for k in range(3))
    assert kept > 0 and kept_r < 0.1 * kept, (kept_r, kept)
