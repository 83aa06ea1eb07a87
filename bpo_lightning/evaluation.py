"""Evaluation against reference answers, and the one-line-per-phase report.

The policy answers held-out prompts (greedily by default, the paper's protocol); the evaluator scores each answer
and the prompt's reference answer; a win is a strictly higher score (ties are counted apart), docs/algorithm.md §5.3.
Responses sampled from the policy's full distribution also give KL(policy‖initial) and KL(policy‖behavior).

The same code runs in three places: ``BPOModule.validation_step`` (``bpo validate``, and during ``bpo fit`` every
``trainer.check_val_every_n_epoch`` phases or ``trainer.val_check_interval`` steps), ``BPOModule.test_step``
(``bpo test``) and ``BPOModule.evaluate`` (the start-of-training evaluation of ``PhaseReport``, scripts).
Every quantity is a torchmetrics state summed across processes, so a distributed evaluation reduces exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics import MeanMetric
from tqdm import tqdm

from bpo_lightning.annotation import Annotator, JoinedPairs, PairwiseAnnotator
from bpo_lightning.cache import AnnotationCache, cached_score
from bpo_lightning.errors import InputError
from bpo_lightning.logprobs import right_padded
from bpo_lightning.metrics import ResponseStats, SequenceKL, WinTieLoss
from bpo_lightning.prompts import model_input
from bpo_lightning.sampling import Sampler, Samples, check_context
from bpo_lightning.store import atomic_write


class Evaluation:
    """How the policy is evaluated on held-out prompts (``model.evaluation``).

    Args:
        temperature: 0 for greedy decoding (the paper's protocol); > 0 samples at that temperature with ``top_k``,
            from a fixed seed, ``samples_per_prompt`` answers per prompt, each compared with the reference.
        samples_per_prompt: answers per prompt when sampling.
        top_k: top-k of sampled answers (0 disables).
        max_new_tokens: answer length limit; default: ``data.sampler``'s.
        max_prompt_tokens: prompts longer than this keep their last tokens; default: ``data.sampler``'s.
        seed: seed of sampled answers and KL samples (the same answers at every evaluation of the same policy).
        kl_samples: answers per prompt drawn from the policy's full distribution (temperature 1, no top-k/top-p) to
            estimate KL(policy‖initial) and KL(policy‖behavior); 0 disables both, and the module then keeps no
            weight copies for them.
        save_responses: write every evaluation's answers and scores to ``<run_dir>/evaluations/``.
    """

    def __init__(
        self,
        temperature: float = 0.0,
        samples_per_prompt: int = 1,
        top_k: int = 50,
        max_new_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        seed: int = 0,
        kl_samples: int = 1,
        save_responses: bool = True,
    ) -> None:
        problems = []
        if temperature < 0:
            problems.append(f"model.evaluation.temperature must be >= 0, got {temperature}")
        if samples_per_prompt < 1:
            problems.append(f"model.evaluation.samples_per_prompt must be >= 1, got {samples_per_prompt}")
        elif temperature == 0 and samples_per_prompt != 1:
            problems.append("model.evaluation.samples_per_prompt must be 1 with greedy decoding (temperature 0)")
        if kl_samples < 0:
            problems.append(f"model.evaluation.kl_samples must be >= 0, got {kl_samples}")
        if problems:
            raise InputError("; ".join(problems))
        self.temperature, self.samples_per_prompt, self.top_k = temperature, samples_per_prompt, top_k
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.seed, self.kl_samples, self.save_responses = seed, kl_samples, save_responses

    def samplers(self, data_sampler: Sampler, batch_size: int) -> tuple[Sampler, Sampler | None]:
        """The answer sampler and the KL sampler (full distribution), from the data sampler
        (``Sampler.evaluation_sampler``): its length limits unless set here, and its way of drawing tokens."""
        limits = {
            "max_new_tokens": self.max_new_tokens or data_sampler.max_new_tokens or 128,
            "max_prompt_tokens": self.max_prompt_tokens or data_sampler.max_prompt_tokens or 512,
            "batch_size": batch_size,
        }
        answers = data_sampler.evaluation_sampler(num_samples=self.samples_per_prompt, temperature=self.temperature,
                                                  top_k=self.top_k, **limits)  # fmt: skip
        if not self.kl_samples:
            return answers, None
        return answers, data_sampler.evaluation_sampler(num_samples=self.kl_samples, temperature=1.0, top_k=0,
                                                        **limits)  # fmt: skip


class EvaluationMetrics(nn.Module):
    """The torchmetrics of one evaluation; ``compute()`` flattens them into ``{name: float}``.

    Names: ``win_rate, tie_rate, loss_rate, invalid, count, reward_diff`` (policy vs reference, see
    :class:`~bpo_lightning.metrics.WinTieLoss`), ``reward`` (mean evaluator score of the policy's answers),
    ``proxy_reward`` (mean annotator score, when the annotator is not the evaluator), ``length`` (words),
    ``tokens``, ``eos_rate``, ``repetition`` (repeated 3-gram rate), ``kl_initial``, ``kl_behavior`` and their
    ``*_stderr`` (when KL samples were drawn).
    """

    def __init__(self) -> None:
        super().__init__()
        self.outcome = WinTieLoss()
        self.text = ResponseStats()
        self.reward = MeanMetric(nan_strategy="ignore").set_dtype(torch.float64)
        self.proxy_reward = MeanMetric(nan_strategy="ignore").set_dtype(torch.float64)
        self.kl_initial = SequenceKL()
        self.kl_behavior = SequenceKL()

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()

    def _apply(self, fn, recurse: bool = True):
        """Follow the module's device, never its dtype: a ``module.to(torch.float32)`` (what DeepSpeed's precision
        does to the whole module) must not turn float64 sums into float32 ones."""

        def device_only(t: torch.Tensor) -> torch.Tensor:
            return t.to(fn(t.detach()[:0] if t.dim() else t.detach().reshape(1)[:0]).device)

        return super()._apply(device_only, recurse)

    def compute(self) -> dict[str, float]:
        out = {k: v.item() for k, v in self.outcome.compute().items()}
        text = {k: v.item() for k, v in self.text.compute().items()}
        out.update(length=text["mean_words"], tokens=text["mean_tokens"], eos_rate=text["eos_rate"],
                   repetition=text["repeated_ngram_rate"])  # fmt: skip
        # every process decides alike: compute() reduces across processes, so none may skip it alone
        for name in ("reward", "proxy_reward"):
            metric = getattr(self, name)
            if metric.update_count:
                value = metric.compute().item()
                if not math.isnan(value):  # NaN: no answer had a valid score
                    out[name] = value
        for name in ("kl_initial", "kl_behavior"):
            metric = getattr(self, name)
            if metric.update_count:
                result = metric.compute()
                if result["count"].item() > 0:
                    out[name], out[f"{name}_stderr"] = result["kl"].item(), result["stderr"].item()
        return out


def _nan(scores: list) -> torch.Tensor:
    return torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float64)


@dataclass
class EvaluationInputs:
    """What evaluating held-out prompts takes from the data side (``OnlineDataModule.evaluation_inputs``)."""

    sampler: Sampler  # the data sampler: the answers' length limits and way of drawing (``evaluation_sampler``)
    evaluator: Annotator  # scores answers against the references
    annotator: Annotator  # the training annotator: the proxy reward, when it is not the evaluator
    cache: AnnotationCache | None  # where paid scores are kept
    run_dir: Path | None = None  # answers are saved under ``run_dir/evaluations``


class HeldOut(list):
    """A held-out loader's items (``(index, row)``) with the ``EvaluationInputs`` that evaluate them: the module
    reads them from the loader Lightning gives it (made when first read: the cache opens in the run folder)."""

    def __init__(self, items: list, inputs: Callable[[], EvaluationInputs]) -> None:
        super().__init__(items)
        self._inputs = inputs

    @property
    def inputs(self) -> EvaluationInputs:
        return self._inputs()


class EvaluatedPolicy(Protocol):
    """What ``evaluation_step`` uses of the model side (``BPOModule`` is one)."""

    evaluation: Evaluation
    policy: Any
    tokenizer: Any

    def policy_weights(self) -> AbstractContextManager: ...
    def sampling_context(self) -> AbstractContextManager: ...
    def weights_name(self) -> str: ...
    def response_logps(self, samples: Samples) -> torch.Tensor: ...
    def initial_weights(self) -> AbstractContextManager: ...
    def behavior_weights_for_evaluation(self) -> AbstractContextManager | None: ...


@torch.no_grad()
def evaluation_step(
    module: EvaluatedPolicy, inputs: EvaluationInputs, batch: list[tuple[int, dict]], metrics: EvaluationMetrics
) -> list[dict]:
    """Evaluate ``module``'s policy on one batch of ``(index, row)`` held-out prompts; update ``metrics`` and
    return one record per answer (what ``save_responses`` writes).

    ``inputs`` gives the evaluator, the training annotator (for the proxy reward), the annotation cache and the
    data sampler. A batch's seed is ``evaluation.seed`` plus its first prompt's index, so the same batches give the
    same sampled answers (another ``data.eval_batch_size`` or process count gives other draws).
    """
    data = inputs
    settings: Evaluation = module.evaluation
    indices, rows = [i for i, _ in batch], [r for _, r in batch]
    answer_sampler, kl_sampler = settings.samplers(data.sampler, batch_size=len(rows))
    inputs = [model_input(r) for r in rows]
    own = settings.max_new_tokens is not None or settings.max_prompt_tokens is not None
    check_context(answer_sampler, module.policy, module.tokenizer, inputs, key="data.eval_prompts",
                  settings="model.evaluation" if own else "data.sampler.init_args")  # fmt: skip
    with module.policy_weights(), module.sampling_context():  # an ensemble is evaluated through its merged adapter
        answer_sampler.prepare(module.policy, module.weights_name())
        answers = answer_sampler.sample(module.policy, module.tokenizer, inputs, seed=settings.seed + indices[0])
    if kl_sampler is not None:  # before anything is dropped: under ZeRO-3 every process answers as many prompts
        _update_kl(module, kl_sampler, inputs, settings.seed + 1_000_003 + indices[0], metrics, indices)
    real = [k for k, i in enumerate(indices) if i >= 0]  # index -1: a stand-in that kept the processes in step
    indices, rows = [indices[k] for k in real], [rows[k] for k in real]  # may be none: metrics get empty updates
    n = settings.samples_per_prompt
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    references = [r["reference"] for r in rows for _ in range(n)]
    responses = [answers.responses[k][j] for k in real for j in range(n)]
    finished = [answers.finished[k][j] for k in real for j in range(n)]
    tokens = [len(answers.response_ids[k][j]) for k in real for j in range(n)]
    if isinstance(data.evaluator, PairwiseAnnotator):  # a verdict > 0 means the policy's answer wins
        joined = [JoinedPairs.join(a, b) for a, b in zip(responses, references, strict=True)]
        scores = _nan(cached_score(JoinedPairs(data.evaluator), data.cache, prompts, joined)[0])
        reference_scores = torch.zeros_like(scores)
    else:
        scores = _nan(cached_score(data.evaluator, data.cache, prompts, responses)[0])
        reference_scores = _nan(cached_score(data.evaluator, data.cache, prompts, references)[0])
        metrics.reward.update(scores)
    metrics.outcome.update(scores, reference_scores)
    metrics.text.update(responses, finished, tokens)
    proxy = None
    if data.annotator is not data.evaluator and not isinstance(data.annotator, PairwiseAnnotator):
        proxy = _nan(cached_score(data.annotator, data.cache, prompts, responses)[0])  # what training optimises
        metrics.proxy_reward.update(proxy)
    return [
        {"index": indices[k // n], "prompt": prompts[k], "reference": references[k], "response": responses[k],
         "finished": finished[k], "score": _float(scores[k]), "reference_score": _float(reference_scores[k]),
         **({"proxy_score": _float(proxy[k])} if proxy is not None else {})}
        for k in range(len(responses))
    ]  # fmt: skip


def _float(x: torch.Tensor) -> float | None:
    return None if x.isnan() else x.item()


def _update_kl(
    module, sampler: Sampler, inputs: list, seed: int, metrics: EvaluationMetrics, indices: list[int]
) -> None:
    """Monte-Carlo KL(policy‖initial) and KL(policy‖behavior) on answers sampled from the policy itself (stand-in
    prompts, index -1, are sampled and scored with the others, then left out)."""
    real = torch.tensor([i >= 0 for i in indices]).repeat_interleave(sampler.num_samples)  # (N·k,)
    with module.policy_weights():
        with module.sampling_context():
            sampler.prepare(module.policy, module.weights_name())
            draws = sampler.sample(module.policy, module.tokenizer, inputs, seed=seed)
        policy = module.response_logps(draws)
    with module.initial_weights():
        initial = module.response_logps(draws)
    metrics.kl_initial.update(policy[real], initial[real])  # empty for a batch of stand-ins: still counted as updated
    behavior = module.behavior_weights_for_evaluation()
    if behavior is not None:
        with behavior:
            other = module.response_logps(draws)
        metrics.kl_behavior.update(policy[real], other[real])


def response_batch(samples: Samples, pad_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response sequences of ``samples``, EOS appended where the model emitted it.

    An answer cut at the length limit is scored as that prefix (no EOS): its probability under a model is the
    probability of the prefix, so the KL estimate is over the truncated distributions both models induce.
    """
    seqs, starts = [], []
    for prompt_ids, group, done in zip(samples.prompt_ids, samples.response_ids, samples.finished, strict=True):
        for ids, finished in zip(group, done, strict=True):
            seqs.append(prompt_ids + ids + ([eos_id] if finished else []))
            starts.append(len(prompt_ids))
    return right_padded(seqs, starts, pad_id)


def save_records(records: list[dict], path: Path) -> None:
    """Write one evaluation's answer records as JSONL (atomically: a complete file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(_strict(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records))


@rank_zero_only
def _say(line: str) -> None:
    print(line, flush=True)  # the report is the run's main output: stdout, once per job


def _describe(result: dict) -> str:
    line = f"eval win rate {result['win_rate']:.3f} (ties {result['tie_rate']:.3f})"
    if "reward" in result:
        line += f" | gold reward {result['reward']:+.3f}"
    for name, label in (("kl_initial", "KL(policy‖initial)"), ("kl_behavior", "KL(policy‖behavior)")):
        if name in result:
            line += f" | {label} {result[name]:.3f}"
            stderr = result.get(f"{name}_stderr")
            if stderr is not None and math.isfinite(stderr):
                line += f" ± {stderr:.3f}"  # standard error of the Monte-Carlo estimate
    return line


def _strict(value):
    """NaN and ±inf as ``null``: report files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


class PhaseReport(L.Callback):
    """Prints a line per phase (pairs kept/dropped, evaluation, KL, time) and keeps the run's history in
    ``report.json`` and ``plots/phases.png``.

    Evaluations themselves run in Lightning's validation loop (``BPOModule.validation_step``): every
    ``trainer.check_val_every_n_epoch`` phases, or every ``trainer.val_check_interval`` steps with
    ``trainer.check_val_every_n_epoch: null``. This callback adds the evaluation before the first training step.

    Where Lightning's progress bar is off (``trainer.enable_progress_bar: false``, the recipes' setting), it shows
    its own bars on stderr while a phase trains and while the policy is evaluated, when ``data.sampler``'s
    ``progress`` is on (the setting of every progress bar of a run).

    Args:
        evaluate_at_start: evaluate the initial policy before training (phase 0 of the history).
        plots: draw ``plots/phases.png`` in the run directory when the fit ends (``report.json`` is written after every
            evaluation).
    """

    def __init__(self, evaluate_at_start: bool = True, plots: bool = True) -> None:
        self.evaluate_at_start = evaluate_at_start
        self.plots = plots
        self.history: list[dict] = []
        self._pending: dict | None = None  # the evaluation at the end of the current phase
        self._phase_start = time.perf_counter()
        self._bar: tqdm | None = None
        self._paused: tuple | None = None  # the training bar's place while an evaluation inside the phase runs

    # -- progress bars ---------------------------------------------------------------------------------------------

    @staticmethod
    def _show_bars(trainer: L.Trainer) -> bool:
        from bpo_lightning.data import OnlineDataModule

        data = trainer.datamodule
        sampler = data.sampler if isinstance(data, OnlineDataModule) else None
        own = trainer.progress_bar_callback is None  # Lightning's bar, where on, already shows the loops
        return own and trainer.global_rank == 0 and isinstance(sampler, Sampler) and sampler.progress

    def _open_bar(self, trainer: L.Trainer, total, desc: str, unit: str = "batch", initial: int = 0) -> None:
        self._close_bar()
        if self._show_bars(trainer):
            total = int(total) if total is not None and math.isfinite(total) else None
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def _advance_bar(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _counted(self, batches):
        for batch in batches:
            yield batch
            self._advance_bar()

    @staticmethod
    def _evaluation_name(trainer: L.Trainer) -> str:
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        return f"phase {trainer.current_epoch + 1}: evaluating" if fn == "fit" else f"{fn}: evaluating"

    def on_train_epoch_start(self, trainer: L.Trainer, module) -> None:
        self._open_bar(trainer, trainer.num_training_batches, f"phase {trainer.current_epoch + 1}: training", "step")

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        self._advance_bar()

    def on_validation_epoch_start(self, trainer: L.Trainer, module) -> None:
        if self._bar is not None and self._bar.total is not None and self._bar.n < self._bar.total:
            self._paused = (self._bar.total, self._bar.desc, self._bar.unit, self._bar.n)  # resumed after it
        if not trainer.sanity_checking:
            self._open_bar(trainer, sum(trainer.num_val_batches), self._evaluation_name(trainer))

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._advance_bar()

    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._close_bar()
        if self._paused is not None:
            total, desc, unit, done = self._paused
            self._paused = None
            self._open_bar(trainer, total, desc, unit, initial=done)

    def on_test_epoch_start(self, trainer: L.Trainer, module) -> None:
        self._open_bar(trainer, sum(trainer.num_test_batches), self._evaluation_name(trainer))

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._advance_bar()

    def on_test_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._close_bar()

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        self._close_bar()
        self._paused = None
        self.draw(trainer)  # what the run has so far

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        self.draw(trainer)

    # -- the report ------------------------------------------------------------------------------------------------

    def save(self, trainer: L.Trainer) -> None:
        """Write ``report.json`` into the run directory (rank zero only), after every evaluation."""
        if trainer.global_rank != 0 or not self.history:
            return
        run_dir = trainer.datamodule.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "report.json", json.dumps(_strict(self.history), indent=1, allow_nan=False))

    def draw(self, trainer: L.Trainer) -> None:
        """``plots/phases.png`` from the history, once at the end of the fit (or when it stops): drawing is not on the
        training path (``bpo compare`` draws any run's report at any time)."""
        if trainer.global_rank != 0 or not self.history or not self.plots:
            return
        from bpo_lightning.plots import plot_histories

        run_dir = trainer.datamodule.run_dir
        plot_histories({run_dir.name: self.history}, run_dir / "plots" / "phases.png")

    def _record(self, trainer: L.Trainer, entry: dict) -> None:
        # evaluations arrive in order: entries at or after this point come from an interrupted earlier attempt
        self.history = [h for h in self.history if h["phase"] < entry["phase"]] + [entry]
        self.save(trainer)

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        # not on_fit_start: with DeepSpeed, Lightning restores a checkpoint only after on_fit_start, so only here
        # does every strategy know whether this fit resumes
        self._phase_start = time.perf_counter()
        if trainer.ckpt_path is not None:  # resumed: the start was evaluated by the first run; keep its report
            path = trainer.datamodule.run_dir / "report.json"
            self.history = json.loads(path.read_text()) if path.exists() else []
            return
        dm = trainer.datamodule
        if not self.evaluate_at_start or not dm.eval_rows:
            return
        batches = dm.eval_batches(trainer.global_rank, trainer.world_size)
        self._open_bar(trainer, len(batches), "start: evaluating")
        result = module.evaluate(self._counted(batches), dm.evaluation_inputs(), stage="start")
        self._close_bar()
        self._record(trainer, {"phase": 0, "step": 0, **result})
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"eval/{k}": v for k, v in result.items()}, step=0)
        _say(f"start     | {_describe(result)} | length {result['length']:.1f} words")
        self._phase_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or module.last_evaluation is None:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        total = max(trainer.num_training_batches, 1) if math.isfinite(trainer.num_training_batches) else None
        done = epoch_loop.batch_progress.current.completed
        at_end = total is None or done >= total
        phase = trainer.current_epoch + (1.0 if at_end else done / total)
        entry = {"phase": round(phase, 4), "step": trainer.global_step, **module.last_evaluation}
        if at_end:
            self._pending = entry  # printed and recorded with the phase's line
            return
        self._record(trainer, entry)
        where = f"phase {trainer.current_epoch + 1}/{trainer.datamodule.num_phases} at {done / total:.0%}"
        _say(f"step {trainer.global_step:<5}| {where} | {_describe(entry)}")

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        self._close_bar()
        phase = trainer.current_epoch + 1
        summary = module.phase_summary()
        stats = module.phase_stats
        line = f"phase {phase}/{trainer.datamodule.num_phases} | pairs {stats.describe() if stats else '?'}"
        entry = {"phase": phase, "step": trainer.global_step, "kl": summary["behavior/kl"],
                 "pairs": stats.kept if stats else None}  # fmt: skip
        if self._pending is not None:
            entry.update({k: v for k, v in self._pending.items() if k not in ("phase", "step")})
            line += f" | {_describe(self._pending)}"
            self._pending = None
        else:  # no evaluation this phase: the training-time estimate on the phase's pairs
            line += f" | KL(policy‖behavior) {summary['behavior/kl']:.4f} (train pairs)"
        line += f" | {time.perf_counter() - self._phase_start:.1f}s"
        self._record(trainer, entry)
        _say(line)
        self._phase_start = time.perf_counter()  # the next phase's time includes its data collection
