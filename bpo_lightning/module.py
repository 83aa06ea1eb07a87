"""The LightningModule: a policy trained with a DAP loss whose reference is the behavior LLM.

Regimes by configuration alone (docs/algorithm.md §1.2):

| regime            | ``behavior``  | ``reference`` |
|-------------------|---------------|---------------|
| BPO               | ``HardSync``  | ``behavior``  |
| offline DPO       | ``Frozen``    | ``behavior``  |  (≡ BPO with one phase)
| on-policy DPO     | ``HardSync``  | ``initial``   |
| BPO, EMA behavior | ``EMA``       | ``behavior``  |

A phase's collection asks the module for π_β (``behavior_llm``) at the top of the datamodule's ``train_dataloader``
— Lightning calls that *before* ``on_train_epoch_start`` — so the behavior is updated right before it samples.
Behavior and reference log-probabilities are computed once, when a phase's pairs are built (``score_records``), and
arrive with each batch. When the phase's training starts, the module reads the phase's ``PhaseResult`` from its
training loader (``PhaseSteps``): the counts it logs, the steps of the learning-rate schedule, ``on_pairs_ready``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric

from bpo_lightning.behavior import BehaviorUpdate, Frozen, HardSync, Snapshot
from bpo_lightning.distributed import (
    Ranks,
    gathered,
    gathered_for_generation,
    offloads_optimizer,
    outside_zero_init,
    zero3_integration,
)
from bpo_lightning.errors import InputError
from bpo_lightning.evaluation import (
    Evaluation,
    EvaluationInputs,
    EvaluationMetrics,
    HeldOut,
    answer_batch,
    judge_batch,
    save_records,
)
from bpo_lightning.logprobs import SequenceLogps
from bpo_lightning.lora import LoRA
from bpo_lightning.losses import DPOLoss, LossOutput, PreferenceLoss
from bpo_lightning.metrics import importance_kl_terms
from bpo_lightning.plugins import get_plugins
from bpo_lightning.policy import PolicySource
from bpo_lightning.scoring import Scorer
from bpo_lightning.types import PhaseStats, PhaseSteps, PreferenceRecord
from bpo_lightning.weights import TrainableWeights, localize, policy_weights, whole

STEP_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "behavior/kl",
    "loss",
)


def loss_settings(loss: nn.Module) -> dict:
    """A loss's class and the constructor arguments it keeps as attributes (its provenance): what the object holds
    besides them (a strategy's bookkeeping, e.g. DeepSpeed's ``ds_id``) does not count."""
    import inspect

    cls = type(loss)
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    values = {n: getattr(loss, n) for n in names if isinstance(getattr(loss, n, None), int | float | str | bool)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **values}


class BPOModule(L.LightningModule):
    """Policy + behavior handling + a pluggable preference loss.

    Args:
        policy: where the initial policy and its tokenizer come from.
        loss: the DAP loss (default ``DPOLoss``); any registered ``PreferenceLoss``.
        behavior: how π_β follows the policy between phases (default ``HardSync``, i.e. BPO).
        reference: the loss's reference: ``behavior`` (BPO) or ``initial`` (the starting model).
        lora: train LoRA adapters (optionally the paper's K-member ensemble) instead of all weights.
        evaluation: how held-out prompts are answered and scored (``bpo validate``/``bpo test``, and during fit).
        lr: AdamW learning rate (paper: 5e-5).
        betas: AdamW betas.
        eps: AdamW epsilon (paper: 1e-6).
        weight_decay: AdamW weight decay (paper: 0).
        warmup_steps: linear warm-up steps before the schedule.
        lr_schedule: ``linear`` decay to 0 over the whole run (paper), or ``constant``.
        disable_dropout: set every dropout probability to 0 (paper), so π_θ and π_β agree at a phase start.
        logprob_chunk_size: response positions whose logits exist at once when log-probs are computed (memory vs
            speed; ``benchmarks/logprob_memory.py``), at vocabularies of 131,072 tokens or more; a smaller vocabulary
            takes proportionally more positions per chunk (the same memory).
        logprob_keep_mib: a batch whose response positions' float32 logits take at most this many MiB computes
            them in one output-head call and keeps them for the backward pass (which needs about twice that);
            larger ones are chunked and recomputed (``logprob_chunk_size``), which costs a second head forward.
            0 always recomputes.
        share_prompts: a pair's chosen and rejected responses share their prompt: run it through the model once
            and let both responses attend to its cached keys and values (gradients flow through them), instead of
            once per response. With 200-token prompts and 64-token responses a SmolLM2-135M step took 6.7 s instead
            of 9.9 s on CPU; with 15-token prompts 5 % less; a model whose KV cache cannot be expanded per response
            (checked once, with a warning) runs every sequence whole. Equal to the unshared values to float
            rounding (tested).
        scoring_batch_size: pairs per forward pass when behavior/reference log-probs are computed.
        offload_snapshots: keep behavior/initial weight snapshots in CPU memory.
        gather_for_sampling: under ZeRO-3, gather the whole policy on every process while it samples (once per
            phase, and per evaluation batch) instead of layer by layer at every decoding step: much faster, but the
            whole model must fit in one GPU's memory.
        truncated_eos: score a response cut at ``max_new_tokens`` with an EOS term, as if it ended there (the
            paper's convention), or leave the EOS term out for such responses (``false``); the phase line shows
            the truncated share and warns when it is above half.
        behavior_logps: where π_β's log-probabilities of a phase's pairs come from. ``sampler``: the sampler
            records them while it draws the responses (no extra forward pass; equal to a forward pass's up to
            float rounding, so h is 0 at a phase start only to that precision); a sampler that does not record them
            gets a forward pass. ``forward``: a forward pass over the phase's pairs after annotation, the same
            computation as training's (h at a phase start is exactly 0 in float32 on CPU with ``share_prompts: false``,
            to about 1e-5 with it; tested).
    """

    def __init__(
        self,
        policy: PolicySource,
        loss: PreferenceLoss | None = None,
        behavior: BehaviorUpdate | None = None,
        reference: Literal["behavior", "initial"] = "behavior",
        lora: LoRA | None = None,
        evaluation: Evaluation | None = None,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["linear", "constant"] = "linear",
        disable_dropout: bool = True,
        logprob_chunk_size: int = 32,
        logprob_keep_mib: int = 128,
        share_prompts: bool = True,
        scoring_batch_size: int = 32,
        offload_snapshots: bool = True,
        gather_for_sampling: bool = False,
        truncated_eos: bool = True,
        behavior_logps: Literal["sampler", "forward"] = "sampler",
    ) -> None:
        super().__init__()
        if reference not in ("behavior", "initial"):
            raise InputError(f"model.reference must be 'behavior' or 'initial', got {reference!r}")
        if logprob_keep_mib < 0:
            raise InputError(f"model.logprob_keep_mib must be >= 0, got {logprob_keep_mib}")
        if behavior_logps not in ("sampler", "forward"):
            raise InputError(f"model.behavior_logps must be 'sampler' or 'forward', got {behavior_logps!r}")
        if lr <= 0:
            raise InputError(f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters(ignore=["policy", "loss", "behavior", "lora", "evaluation"])
        self.source = policy
        self.tokenizer = policy.tokenizer()
        self.loss = loss if loss is not None else DPOLoss()
        self.behavior = behavior if behavior is not None else HardSync()
        self.reference = reference
        self.lora = lora
        self.evaluation = evaluation if evaluation is not None else Evaluation()
        self.policy: nn.Module | None = None
        self.weights: TrainableWeights | None = None  # which weights compute as "the policy" (weights.py)
        self._zero3 = None  # transformers' view of a ZeRO-3 config, kept alive while the model is used
        self.initial: Snapshot | None = None  # only kept when something needs the initial weights
        self.behavior_snapshot: Snapshot | None = None  # None = the live policy (hard sync)
        self.behavior_copy: Snapshot | None = None  # hard sync: π_β kept for evaluation KL only
        self.behavior_version = 0
        self.phases_started = 0
        self.phase_stats: PhaseStats | None = None
        self.step_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in STEP_METRICS})
        self.eval_metrics = EvaluationMetrics()
        self.last_evaluation: dict[str, float] | None = None
        self.checkpoint_step = 0  # training steps behind the weights (from a loaded checkpoint)
        self.horizon: int | None = None  # optimizer steps of the whole run, for the linear decay
        self._eval_records: list[dict] = []
        self._eval_inputs: EvaluationInputs | None = None

    # --- model and behavior -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from bpo_lightning.checkpoints import guard_loads

        guard_loads(self.trainer.strategy)  # no checkpoint (a DeepSpeed folder included) runs code when it is read
        # a phase's data/* counts and behavior/version are already the same total on every process (collection
        # gathers them): Lightning's advice to reduce them across processes (one warning per value) does not apply
        warnings.filterwarnings(
            "ignore", message=r"It is recommended to use `self\.log\('(data|behavior)/", category=UserWarning
        )

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self._zero3 = zero3_integration(self._trainer.strategy if self._trainer is not None else None)
        policy = self.source.model()
        if self.lora is not None:
            with outside_zero_init():  # PEFT initialises whole tensors; DeepSpeed partitions them at start-up
                policy = self.lora.wrap(policy)
        self.policy = policy.train()
        self.weights = policy_weights(self.policy, self.lora)
        if self.hparams.disable_dropout:
            for module in self.policy.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        if self.reference == "initial" or self.behavior.keeps_snapshot or self._measures_kl():
            self.initial = self._copy(self.weights.state())
        if self.behavior.keeps_snapshot:
            self.behavior_snapshot = self.behavior.initial_snapshot(self.initial)

    def _measures_kl(self) -> bool:
        """Whether evaluations will estimate KL to the initial and behavior models, so that their weights must be
        kept: ``model.evaluation.kl_samples`` > 0 and held-out prompts configured (no copy that nothing uses)."""
        if not self.evaluation.kl_samples:
            return False
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if data is None:  # outside a trainer: keep them for whoever evaluates
            return True
        return getattr(data, "eval_prompts", None) is not None or getattr(data, "test_prompts", None) is not None

    def _copy(self, state: Snapshot) -> Snapshot:
        device = "cpu" if self.hparams.offload_snapshots else None
        return {name: value.to(device, copy=True) for name, value in state.items()}

    def start_phase(self, phase: int) -> int:
        """Update π_β for ``phase`` (once per phase, also across a resume) and return its version."""
        while self.phases_started <= phase:
            if self.phases_started > 0:  # at phase 0 every rule gives the initial model
                if self.behavior_snapshot is not None:
                    localize(self.policy, self.behavior_snapshot)  # EMA averages this process's shards
                self.behavior_snapshot = self.behavior.update(self.weights.state, self.behavior_snapshot)
                self.behavior_version += not isinstance(self.behavior, Frozen)
                if self.behavior_snapshot is None and self._measures_kl():
                    self.behavior_copy = self._copy(self.weights.state())
            self.phases_started += 1
        return self.behavior_version

    def behavior_llm(self, phase: int):
        """π_β of ``phase`` as collection uses it (``collection.BehaviorLLM``), its update done (``start_phase``)."""
        from bpo_lightning.collection import BehaviorLLM

        version = self.start_phase(phase)
        hp = self.hparams

        @contextmanager
        def computing():
            with self.behavior_weights(), self.precision_context(), self.sampling_context():
                yield

        loss = loss_settings(self.loss)
        provenance = {
            "reference": self.reference,
            "behavior_logps": hp.get("behavior_logps", "forward"),
            "loss": loss,
        }
        return BehaviorLLM(
            model=self.policy,
            tokenizer=self.tokenizer,
            version=version,
            computing=computing,
            score=self.score_records,
            provenance=provenance,
            lockstep=self.lockstep,
            sampler_logps=hp.get("behavior_logps") == "sampler",
            truncated_eos=hp.get("truncated_eos", True),
        )

    def weights_name(self) -> str:
        """A name of the weights the policy computes with now (``Sampler.prepare``): it changes when they do."""
        step = max(self.global_step if self._trainer is not None else 0, self.checkpoint_step)
        return f"policy-{step}-{self.phases_started}"

    def trainable_state(self) -> Snapshot:
        """CPU copies of the trainable tensors, whole (under ZeRO-3 every process must call this: it gathers)."""
        named = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        with gathered([p for _, p in named]):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}

    def _computing_as(self, snapshot: Snapshot | None):
        """Context in which ``self.policy`` computes as the model ``snapshot`` describes (``None``: the policy)."""
        return self.weights.computing_as(snapshot)

    def behavior_weights(self):
        """Context in which ``self.policy`` computes as π_β."""
        return self._computing_as(self.behavior_snapshot)

    def reference_weights(self):
        """Context in which ``self.policy`` computes as the loss's reference."""
        return self.behavior_weights() if self.reference == "behavior" else self._computing_as(self.initial)

    def policy_weights(self):
        """Context in which ``self.policy`` computes as the current policy (the members' merge for an ensemble)."""
        return self._computing_as(None)

    def initial_weights(self):
        """Context in which ``self.policy`` computes as the initial model (needs ``self.initial``)."""
        if self.initial is None:
            raise RuntimeError("the initial weights were not kept (model.evaluation.kl_samples is 0)")
        return self._computing_as(self.initial)

    def behavior_weights_for_evaluation(self):
        """Context computing as the current π_β for evaluation KL, or ``None`` when π_β's weights are not kept
        (hard sync restored from a checkpoint written with ``kl_samples: 0``)."""
        if self.phases_started == 0:
            return self._computing_as(None)  # before the first phase π_β is the policy itself
        if self.behavior_snapshot is not None:
            return self._computing_as(self.behavior_snapshot)
        if self.phases_started == 1:  # hard sync, first phase: π_β is the initial model
            return self._computing_as(self.initial) if self.initial is not None else None
        if self.behavior_copy is not None:
            return self._computing_as(self.behavior_copy)
        return None

    def precision_context(self):
        """The numeric precision training forwards run in (e.g. bf16 autocast), for forwards outside Lightning's
        loops: sampling and scoring a phase, so that h = 0 at a phase start also under mixed precision."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()

    def sampling_context(self):
        """Context for ``generate`` calls: the whole model gathered under ZeRO-3 with ``gather_for_sampling``."""
        if not self.hparams.gather_for_sampling or self._trainer is None:
            return nullcontext()
        return gathered_for_generation(self._trainer.strategy)

    @torch.no_grad()
    def score_records(self, records: list[PreferenceRecord]) -> None:
        """Fill in the behavior and reference log-probabilities of a phase's pairs (π_β is frozen in a phase); the
        behavior log-probs a record already has (the sampler's) are kept."""
        missing = [r for r in records if math.isnan(r.behavior_chosen_logps) or math.isnan(r.behavior_rejected_logps)]
        if missing or self.lockstep:  # ZeRO-3: every process takes part in every forward
            with self.behavior_weights(), self.precision_context():
                for r, (bc, br) in zip(missing, self.scorer.pairs(missing), strict=True):
                    r.behavior_chosen_logps, r.behavior_rejected_logps = bc, br
        if self.reference == "behavior":
            reference = [(r.behavior_chosen_logps, r.behavior_rejected_logps) for r in records]
        else:
            with self.reference_weights(), self.precision_context():
                reference = self.scorer.pairs(records)
        for r, (rc, rr) in zip(records, reference, strict=True):
            r.reference_chosen_logps, r.reference_rejected_logps = rc, rr

    @property
    def scorer(self) -> Scorer:
        """Sequence log-probs under the weights in effect, with this module's settings (``scoring``)."""
        hp = self.hparams
        ranks = Ranks.of(self._trainer) if self._trainer is not None else Ranks()
        return Scorer(self.policy, self.tokenizer, ranks, self.lockstep, hp.logprob_chunk_size, hp.logprob_keep_mib,
                      hp.share_prompts, hp.scoring_batch_size, hp.get("truncated_eos", True))  # fmt: skip

    @property
    def lockstep(self) -> bool:
        """Whether every forward pass is collective (ZeRO-3 over several processes): each process must then make
        the same number of ``generate`` and forward calls."""
        trainer = self._trainer
        return trainer is not None and trainer.world_size > 1 and bool(getattr(trainer.strategy, "zero_stage_3", 0))

    @torch.no_grad()
    def response_logps(self, samples) -> torch.Tensor:
        """log π(y|x) of sampled answers under the weights in effect, (N,) float64 (an EOS is scored where the
        model emitted it)."""
        return self.scorer.answers(samples)

    # --- training ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # an ensemble's members train on the same pairs, each with its own loss against the merged reference; their
        # parameters are disjoint, so the sum's gradient for member k is the gradient of its own loss. With
        # ``lora.recompute_members`` a member's forward keeps no activations: the backward pass runs it again, one
        # member at a time, so the step holds one member's activations instead of K.
        members = self.weights.members()
        recompute = len(members) > 1 and self.lora.recompute_members and torch.is_grad_enabled()
        losses = []
        for k, member in enumerate(members):
            step = partial(self._member_loss, batch, member)
            loss, out, logps = checkpoint(step, use_reentrant=False) if recompute else step()
            if k == 0:
                self._log_member(batch, out, logps)
            losses.append(loss)
        return torch.stack(losses).sum()

    def _member_loss(self, batch: dict[str, torch.Tensor], member) -> tuple[torch.Tensor, LossOutput, SequenceLogps]:
        with member():
            logps = self.scorer.logps(batch)  # sums and counts, (2B,)
        n = logps.sums.shape[0] // 2  # rows [:n] are chosen, [n:] rejected
        policy, reference = logps.sums, batch["reference_logps"]
        if self.loss.average_log_prob:  # IPO: per-token means
            policy, reference = logps.means(), reference / logps.counts.clamp(min=1)
        out = self.loss(policy[:n], policy[n:], reference[:n], reference[n:])
        if "pair_weight" in batch:  # a share of a global step over several processes (batches.weighted_pair_batch)
            loss = (out.losses * batch["pair_weight"]).sum() * batch["loss_scale"]
        else:
            loss = out.losses.mean()
        return loss, out, logps

    def _log_member(self, batch: dict[str, torch.Tensor], out: LossOutput, logps: SequenceLogps) -> None:
        real = batch["pair_weight"] > 0 if "pair_weight" in batch else slice(None)
        if isinstance(real, torch.Tensor) and not real.any():  # a stand-in pair only: nothing to log
            return
        n = logps.sums.shape[0] // 2
        sums = logps.sums.detach()
        chosen, rejected = out.chosen_rewards[real], out.rejected_rewards[real]
        kl = importance_kl_terms(sums, batch["behavior_logps"]).float()  # (2B,)
        self._log_step(
            {
                "loss": out.losses[real].detach().mean(),
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margin": chosen - rejected,
                "rewards/accuracy": (chosen > rejected).float(),
                "logps/chosen": sums[:n][real],
                "logps/rejected": sums[n:][real],
                # KL(π‖π_β) from π_β's samples: E_β[r·log r − r + 1], r = π/π_β; each term ≥ 0, exactly 0 when π = π_β
                "behavior/kl": torch.cat([kl[:n][real], kl[n:][real]]),
            }
        )

    def _log_step(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.step_metrics[name.replace("/", "_")].update(value)
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and not (connector.should_update_logs or trainer.fast_dev_run):
            return  # Lightning writes step values every log_every_n_steps steps only: the others are not logged
        self.log_dict({name: value.float().mean() for name, value in values.items()}, on_step=True, on_epoch=False)

    def phase_summary(self) -> dict[str, float]:
        """Means over the current phase's steps (torchmetrics, reduced across processes)."""
        return {name: self.step_metrics[name.replace("/", "_")].compute().item() for name in STEP_METRICS}

    def on_train_epoch_start(self) -> None:
        for metric in self.step_metrics.values():
            metric.reset()
        steps = self._phase_steps()
        if steps is None:  # a loader that is not a phase's (a datamodule of the user's own)
            return
        result = steps.result
        self.phase_stats = result.stats
        # the linear decay ends at 0 after the last step the run will take: this phase's pairs known, every prompt of
        # the later phases counted as a pair (after the last phase, exactly)
        accumulate = self.trainer.accumulate_grad_batches
        self.horizon = self.trainer.global_step + sum(math.ceil(n / accumulate) for n in (len(steps), *steps.later))
        if self.trainer.global_rank == 0:  # on_pairs_ready: the phase's pairs, right before the policy trains on them
            get_plugins().hook.on_pairs_ready(
                phase=result.phase, pairs=result.records, stats=result.stats, run_dir=result.run_dir
            )

    def _phase_steps(self) -> PhaseSteps | None:
        """The batches and ``PhaseResult`` of the phase about to train, from the training loader Lightning holds."""
        steps = getattr(self.trainer.train_dataloader, "dataset", None)
        if isinstance(steps, PhaseSteps) and steps.result.phase == self.trainer.current_epoch:
            return steps
        return None

    def on_train_epoch_end(self) -> None:
        if self.phase_stats is not None:
            self.log("data/pairs", float(self.phase_stats.kept))
            self.log("data/dropped", float(self.phase_stats.dropped_total))
            self.log("data/annotations", float(self.phase_stats.annotated))  # budget spent in this phase
            self.log("data/cache_hits", float(self.phase_stats.cached))
            self.log("data/truncated", self.phase_stats.truncated / max(self.phase_stats.responses, 1))
            for name, n in self.phase_stats.annotator.items():  # e.g. a judge's data/annotator_timeouts
                self.log(f"data/annotator_{name}", float(n))
            for name, n in self.phase_stats.sampler.items():  # e.g. an engine's data/sampler_sync_s
                self.log(f"data/sampler_{name}", float(n))
        self.log("behavior/version", float(self.behavior_version))

    # --- evaluation -------------------------------------------------------------------------------------------------
    def validation_step(self, batch: list[tuple[int, dict]], batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def test_step(self, batch: list[tuple[int, dict]], batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("fit" if self.trainer.state.fn == "fit" else "validate", "eval")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test", "test")

    def evaluate(self, batches, inputs: EvaluationInputs, stage: str = "evaluate") -> dict[str, float]:
        """Evaluate on ``batches`` of ``(index, row)`` held-out prompts outside Lightning's loops (e.g. before
        training) with ``inputs`` (``OnlineDataModule.evaluation_inputs``); the same steps as ``validation_step``.
        Returns the metrics (also in ``last_evaluation``)."""
        self._start_evaluation(inputs)
        for batch in batches:
            self._evaluate_batch(batch)
        return self._end_evaluation(stage, None)

    def _evaluate_batch(self, batch: list[tuple[int, dict]]) -> None:
        """A batch's answers now; their judging once every batch is answered (``_end_evaluation``): under ZeRO-3 the
        answers' forwards are collective, and a process waiting on a slow judge between two of them would hold the
        others inside one, subject to the process group's timeout."""
        self._eval_answered.append(answer_batch(self, self._eval_inputs, batch, self.eval_metrics))

    def _start_evaluation(self, inputs: EvaluationInputs | None = None) -> None:
        """Reset the metrics; the inputs come from the held-out loader Lightning holds (``HeldOut``)."""
        if inputs is None:
            trainer = self.trainer
            loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
            inputs = getattr(loaders, "dataset", None)
            inputs = inputs.inputs if isinstance(inputs, HeldOut) else None
        if inputs is None:
            raise RuntimeError(
                "BPOModule evaluates held-out loaders of OnlineDataModule (items with their "
                "EvaluationInputs); pass inputs to evaluate() outside Lightning's loops"
            )
        self._eval_inputs = inputs
        self.eval_metrics.reset()
        self._eval_records = []
        self._eval_answered = []

    def _end_evaluation(self, stage: str, prefix: str | None) -> dict[str, float]:
        """Reduce the metrics (across processes), log them under ``prefix/`` and save the answers."""
        self._evaluations = getattr(self, "_evaluations", 0) + 1  # every process ends the same evaluations in order
        answered, self._eval_answered = self._eval_answered, []
        for batch in answered:  # no collective here: a slow judge delays this process only
            self._eval_records += judge_batch(batch, self._eval_inputs, self.eval_metrics)
        if self._trainer is not None:  # a process still waiting on a slow judge: the others wait without a timeout
            Ranks.of(self._trainer).arrive(f"evaluate/{self._evaluations}")
        self.last_evaluation = self.eval_metrics.compute()
        if prefix is not None:
            for name, value in self.last_evaluation.items():
                self.log(f"{prefix}/{name}", value)
        trainer = self.trainer
        if self.evaluation.save_responses and self._eval_records and not trainer.sanity_checking:
            rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            step = trainer.global_step if trainer.state.fn == "fit" else self.checkpoint_step
            name = f"{stage}_step{step:07d}{rank}.jsonl"
            run_dir = self._eval_inputs.run_dir or Path(trainer.default_root_dir)
            save_records(self._eval_records, run_dir / "evaluations" / name)
        self._eval_records = []
        self._eval_inputs.sampler.release()  # an engine's memory goes back to training
        return self.last_evaluation

    def _fusable(self) -> bool:
        """Fused AdamW needs floating-point parameters on CPU or CUDA; DeepSpeed keeps its own optimizer copies, and
        Lightning's mixed precision refuses to clip the gradients of a fused optimizer."""
        from lightning.pytorch.plugins.precision import MixedPrecision
        from lightning.pytorch.strategies import DeepSpeedStrategy

        trainer = self._trainer
        if trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy):
            return False
        if trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision):
            return False
        devices = {p.device.type for p in self.policy.parameters() if p.requires_grad}
        return devices <= {"cpu", "cuda"}

    def configure_optimizers(self):
        hp = self.hparams
        # the fused kernel: one pass over all parameters instead of a Python loop (CPU and CUDA)
        adamw = partial(torch.optim.AdamW, fused=True) if self._fusable() else torch.optim.AdamW
        if offloads_optimizer(self.trainer.strategy):  # ZeRO-Offload steps on CPU: DeepSpeed's AdamW kernel
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            adamw = partial(DeepSpeedCPUAdam, adamw_mode=True)
        optimizer = adamw(
            self._param_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
        )

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.lr_schedule == "constant" or self.horizon is None:
                return 1.0
            return max(0.0, (self.horizon - step) / max(1, self.horizon - hp.warmup_steps))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self) -> list[dict]:
        """One group per ensemble member (a single optimizer, as DeepSpeed requires), else one group."""
        return self.weights.param_groups()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not self.weights.clip_separately() or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for group in optimizer.param_groups:  # each member is clipped on its own, as with one optimizer each
            torch.nn.utils.clip_grad_norm_(group["params"], gradient_clip_val)

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {"behavior_version": self.behavior_version, "phases_started": self.phases_started}
        # whole tensors (ZeRO-3 shards are gathered; every process runs this hook): a checkpoint does not depend on
        # the number of processes, and each process cuts its own shard again when it resumes
        if self.behavior_snapshot is not None and self.behavior_snapshot is not self.initial:
            state["behavior_snapshot"] = whole(self.policy, self.behavior_snapshot)  # e.g. EMA
        if self.behavior_copy is not None:  # lets `bpo validate` report KL(policy‖behavior) for a hard-synced run
            state["behavior_copy"] = whole(self.policy, self.behavior_copy)
        if self.lora is not None and isinstance(checkpoint.get("state_dict"), dict):
            # adapters only: the frozen base model is rebuilt from model.policy on load (a fraction of the size)
            frozen = self._frozen_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
            state["base"] = "model.policy"
        checkpoint["bpo"] = state

    def _frozen_keys(self) -> set[str]:
        """State-dict keys of the policy's frozen base weights when LoRA adapters are trained."""
        if self.lora is None or self.policy is None:
            return set()
        state = self.policy.state_dict(keep_vars=True)  # tied weights appear under each of their names
        return {f"policy.{k}" for k, v in state.items() if not (isinstance(v, nn.Parameter) and v.requires_grad)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; with LoRA, a checkpoint may leave out the frozen base weights (they
        come from ``model.policy``), and every other key must match."""
        frozen = self._frozen_keys()
        if not frozen or not strict:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"the checkpoint does not fit this model: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )
        return result

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("bpo", {})
        self.checkpoint_step = checkpoint.get("global_step", 0)
        self.behavior_version = state.get("behavior_version", 0)
        self.phases_started = state.get("phases_started", 0)
        device = "cpu" if self.hparams.offload_snapshots else self.device
        if "behavior_snapshot" in state:
            self.behavior_snapshot = {k: v.to(device) for k, v in state["behavior_snapshot"].items()}
        if "behavior_copy" in state:
            self.behavior_copy = {k: v.to(device) for k, v in state["behavior_copy"].items()}
