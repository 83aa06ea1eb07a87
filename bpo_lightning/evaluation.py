"""Evaluation against reference answers (the one-line-per-phase report is ``reporting``).

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
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torchmetrics import MeanMetric

from bpo_lightning.annotation import Annotator, PairwiseAnnotator, cached_verdicts
from bpo_lightning.cache import AnnotationCache, cached_score
from bpo_lightning.errors import InputError
from bpo_lightning.files import atomic_write, strict_json
from bpo_lightning.metrics import ResponseStats, SequenceKL, WinTieLoss
from bpo_lightning.prompts import model_input
from bpo_lightning.sampling import Sampler, Samples, check_context


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
        answers = data_sampler.evaluation_sampler(
            num_samples=self.samples_per_prompt, temperature=self.temperature, top_k=self.top_k, **limits
        )
        if not self.kl_samples:
            return answers, None
        return answers, data_sampler.evaluation_sampler(num_samples=self.kl_samples, temperature=1.0, top_k=0, **limits)


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
        out.update(
            length=text["mean_words"],
            tokens=text["mean_tokens"],
            eos_rate=text["eos_rate"],
            repetition=text["repeated_ngram_rate"],
        )
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
    return one record per answer (what ``save_responses`` writes): :func:`answer_batch`, then :func:`judge_batch`.
    """
    return judge_batch(answer_batch(module, inputs, batch, metrics), inputs, metrics)


def answer_batch(
    module: EvaluatedPolicy, inputs: EvaluationInputs, batch: list[tuple[int, dict]], metrics: EvaluationMetrics
) -> tuple:
    """The policy's part of :func:`evaluation_step`: its answers (and the KL draws, into ``metrics``). Under ZeRO-3
    every forward here is collective; judging the answers is not, and can wait (the module judges them once every
    batch is answered, so a process waiting on a slow judge holds no other inside a collective).

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
    check_context(
        answer_sampler,
        module.policy,
        module.tokenizer,
        inputs,
        key="data.eval_prompts",
        settings="model.evaluation" if own else "data.sampler.init_args",
    )
    with module.policy_weights(), module.sampling_context():  # an ensemble is evaluated through its merged adapter
        answer_sampler.prepare(module.policy, module.weights_name())
        answers = answer_sampler.sample(module.policy, module.tokenizer, inputs, seed=settings.seed + indices[0])
    if kl_sampler is not None:  # before anything is dropped: under ZeRO-3 every process answers as many prompts
        _update_kl(module, kl_sampler, inputs, settings.seed + 1_000_003 + indices[0], metrics, indices)
    return batch, answers, settings.samples_per_prompt


def judge_batch(answered: tuple, inputs: EvaluationInputs, metrics: EvaluationMetrics) -> list[dict]:
    """The evaluator's part of :func:`evaluation_step`: score the answers of :func:`answer_batch`, update
    ``metrics``, return the records."""
    data = inputs
    batch, answers, n = answered
    indices, rows = [i for i, _ in batch], [r for _, r in batch]
    real = [k for k, i in enumerate(indices) if i >= 0]  # index -1: a stand-in that kept the processes in step
    indices, rows = [indices[k] for k in real], [rows[k] for k in real]  # may be none: metrics get empty updates
    prompts = [r["prompt"] for r in rows for _ in range(n)]
    references = [r["reference"] for r in rows for _ in range(n)]
    responses = [answers.responses[k][j] for k in real for j in range(n)]
    finished = [answers.finished[k][j] for k in real for j in range(n)]
    tokens = [len(answers.response_ids[k][j]) for k in real for j in range(n)]
    if isinstance(data.evaluator, PairwiseAnnotator):  # a verdict > 0 means the policy's answer wins
        scores = _nan(cached_verdicts(data.evaluator, data.cache, prompts, responses, references)[0])
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
        {
            "index": indices[k // n],
            "prompt": prompts[k],
            "reference": references[k],
            "response": responses[k],
            "finished": finished[k],
            "score": _float(scores[k]),
            "reference_score": _float(reference_scores[k]),
            **({"proxy_score": _float(proxy[k])} if proxy is not None else {}),
        }
        for k in range(len(responses))
    ]


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


def save_records(records: list[dict], path: Path) -> None:
    """Write one evaluation's answer records as JSONL (atomically: a complete file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(strict_json(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records))
