"""Evaluation metrics as torchmetrics ``Metric`` objects, exact under distributed reduction.

Every state is a float64 scalar sum or count registered with ``dist_reduce_fx="sum"``, so summing the
states of the ranks (what ``sync`` does, and what ``Metric.merge_state`` does for two objects) and then
calling ``compute()`` gives exactly the result of one metric that saw every item. ``compute()`` returns
a ``dict`` of float64 scalar tensors; a quantity with an empty denominator is ``nan``.

* :class:`WinTieLoss` -- win/tie/loss rates of scores against reference scores.
* :class:`ResponseStats` -- length, EOS rate and repeated-n-gram rate of generated responses.
* :class:`SequenceKL` -- Monte-Carlo ``KL(pi || q)`` from samples of ``pi``.
* :class:`ImportanceKL` -- ``KL(pi || beta)`` from samples of the behavior model ``beta``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ImportanceKL", "ResponseStats", "SequenceKL", "WinTieLoss", "repeated_ngram_rate"]

_F64 = torch.float64


def _sum_state(metric: Metric, *names: str) -> None:
    """Register float64 scalar sum states (``dist_reduce_fx="sum"``) named ``names`` on ``metric``."""
    for name in names:
        metric.add_state(name, default=torch.zeros((), dtype=_F64), dist_reduce_fx="sum")


def _as_f64(metric: Metric, x: Tensor | list | float) -> Tensor:
    """Detach ``x`` and return it flattened as float64 on the metric's device."""
    return torch.as_tensor(x).detach().to(device=metric.device, dtype=_F64).reshape(-1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``nan`` (not an error or ``inf``) where ``den == 0``."""
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


class _WeightedMean(Metric):
    """Weighted mean of per-sample values with its standard error; base of the KL metrics.

    With values :math:`d_i` and weights :math:`w_i` (all 1 by default) the states are the sums
    :math:`W=\\sum w_i`, :math:`W_2=\\sum w_i^2`, :math:`S=\\sum w_i d_i`, :math:`S_2=\\sum w_i d_i^2` and the count.

    .. math::
        \\bar d = S / W, \\qquad
        \\hat\\sigma^2 = S_2 / W - \\bar d^2, \\qquad
        n_\\text{eff} = W^2 / W_2, \\qquad
        \\mathrm{SE} = \\sqrt{\\hat\\sigma^2 / (n_\\text{eff} - 1)}

    With unit weights, ``SE`` is the usual ``std(d, unbiased=True) / sqrt(n)``; it is ``nan`` when
    :math:`n_\\text{eff} \\le 1`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        _sum_state(self, "weight_sum", "weight_sq_sum", "value_sum", "value_sq_sum", "count")

    def _accumulate(self, values: Tensor, weights: Tensor | None) -> None:
        """Add per-sample ``values`` with optional same-shape non-negative ``weights`` to the sums."""
        if weights is None:
            weights = torch.ones_like(values)
        else:
            weights = _as_f64(self, weights)
            if weights.shape != values.shape:
                raise ValueError(f"weights has {weights.numel()} elements, expected {values.numel()}")
            if bool((weights < 0).any()):
                raise ValueError("weights must be non-negative")
        self.weight_sum += weights.sum()
        self.weight_sq_sum += (weights * weights).sum()
        self.value_sum += (weights * values).sum()
        self.value_sq_sum += (weights * values * values).sum()
        self.count += values.numel()

    def compute(self) -> dict[str, Tensor]:
        """Return ``{"kl": weighted mean, "stderr": its standard error, "count": number of samples}``."""
        mean = _ratio(self.value_sum, self.weight_sum)
        var = (_ratio(self.value_sq_sum, self.weight_sum) - mean * mean).clamp_min(0.0)
        n_eff = _ratio(self.weight_sum * self.weight_sum, self.weight_sq_sum)
        stderr = torch.where(n_eff > 1, (var / (n_eff - 1).clamp_min(1e-300)).sqrt(), math.nan)
        return {"kl": mean, "stderr": stderr, "count": self.count.clone()}


class WinTieLoss(Metric):
    """Win/tie/loss rates of ``scores`` against ``reference_scores`` (e.g. policy vs. reference reward).

    Item :math:`i` is a *win* if :math:`s_i > r_i`, a *tie* if :math:`s_i = r_i`, a *loss* if :math:`s_i < r_i`
    and *invalid* if either side is NaN. Invalid items are counted but excluded from every denominator:

    .. math::
        \\text{win\\_rate} = \\frac{\\#\\text{win}}{n}, \\quad
        \\text{reward\\_diff} = \\frac{1}{n} \\sum_{i\\ \\text{valid}} (s_i - r_i), \\quad
        n = \\#\\text{win} + \\#\\text{tie} + \\#\\text{loss}.

    ``compute()`` returns ``win_rate``, ``tie_rate``, ``loss_rate``, ``invalid`` (number of invalid items),
    ``count`` (``n``, the number of valid items) and ``reward_diff``; rates are ``nan`` when ``n == 0``.

    Example:
        scores ``[1, 2, 3, nan]`` vs. references ``[2, 2, 1, 0]``: one loss, one tie, one win, one invalid;
        ``win_rate = 1/3`` and ``reward_diff = ((1-2) + (2-2) + (3-1)) / 3 = 1/3``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        _sum_state(self, "wins", "ties", "losses", "invalid", "diff_sum")

    def update(self, scores: Tensor, reference_scores: Tensor) -> None:
        """Compare same-shape ``scores`` and ``reference_scores`` item by item."""
        s, r = _as_f64(self, scores), _as_f64(self, reference_scores)
        if s.shape != r.shape:
            raise ValueError(f"scores has {s.numel()} elements but reference_scores has {r.numel()}")
        valid = ~(s.isnan() | r.isnan())
        s, r = s[valid], r[valid]
        self.wins += (s > r).sum()
        self.ties += (s == r).sum()
        self.losses += (s < r).sum()
        self.invalid += (~valid).sum()
        self.diff_sum += (s - r).sum()

    def compute(self) -> dict[str, Tensor]:
        """Return the rates, the invalid and valid counts and the mean reward difference."""
        n = self.wins + self.ties + self.losses
        return {
            "win_rate": _ratio(self.wins, n),
            "tie_rate": _ratio(self.ties, n),
            "loss_rate": _ratio(self.losses, n),
            "invalid": self.invalid.clone(),
            "count": n,
            "reward_diff": _ratio(self.diff_sum, n),
        }


def repeated_ngram_rate(words: list[str], n: int = 3) -> float:
    """Fraction of the word n-grams of one response that repeat an earlier n-gram of the same response.

    With n-grams :math:`g_1, \\dots, g_m` (:math:`m = \\text{len(words)} - n + 1`) the rate is
    :math:`\\frac{1}{m} \\#\\{j : g_j \\in \\{g_1, \\dots, g_{j-1}\\}\\}`, and 0 when :math:`m \\le 0`.

    Example:
        ``"a b c a b c".split()`` with ``n=3``: n-grams ``abc, bca, cab, abc``; only the last repeats an
        earlier one, so the rate is ``1/4 = 0.25``. ``["x", "y"]`` has no 3-gram, so its rate is 0.
    """
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


class ResponseStats(Metric):
    """Length, EOS and repetition statistics of generated responses, averaged over responses.

    Words are ``str.split()`` tokens (whitespace-separated). For :math:`N` responses:

    * ``mean_words`` :math:`= \\frac{1}{N} \\sum_i \\text{len(words}_i)`.
    * ``mean_tokens`` = mean of ``token_counts`` over the responses that were given one (``nan`` if none).
    * ``eos_rate`` = fraction of responses with ``finished=True`` (they ended with EOS, not at the length cap).
    * ``repeated_ngram_rate`` :math:`= \\frac{1}{N} \\sum_i \\rho_i`, where :math:`\\rho_i` is the fraction of
      the word n-grams of response :math:`i` that repeat an earlier n-gram of the same response (0 when the
      response has fewer than ``n`` words); see :func:`repeated_ngram_rate`.
    * ``count`` = :math:`N`.

    Example (``n=3``):
        responses ``["a b c a b c", "x y"]``, finished ``[True, False]``, token counts ``[8, 2]``:
        ``mean_words = (6 + 2) / 2 = 4``, ``mean_tokens = (8 + 2) / 2 = 5``, ``eos_rate = 1/2``;
        the first response has n-grams ``abc, bca, cab, abc`` of which 1 repeats, :math:`\\rho_1 = 1/4`; the
        second has none, :math:`\\rho_2 = 0`; so ``repeated_ngram_rate = (0.25 + 0) / 2 = 0.125``.

    Args:
        ngram: n-gram order ``n`` (>= 1) of the repetition rate.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, ngram: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        _sum_state(self, "responses", "words", "tokens", "token_responses", "finished", "repeat_rate_sum")

    def update(self, responses: list[str], finished: list[bool], token_counts: list[int] | None = None) -> None:
        """Add a batch of ``responses`` with their EOS flags and, optionally, their token counts."""
        if len(finished) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(finished)} finished flags")
        if token_counts is not None:
            if len(token_counts) != len(responses):
                raise ValueError(f"{len(responses)} responses but {len(token_counts)} token counts")
            self.tokens += float(sum(token_counts))
            self.token_responses += len(token_counts)
        split = [r.split() for r in responses]
        self.responses += len(responses)
        self.words += float(sum(len(w) for w in split))
        self.finished += float(sum(bool(f) for f in finished))
        self.repeat_rate_sum += math.fsum(repeated_ngram_rate(w, self.ngram) for w in split)

    def compute(self) -> dict[str, Tensor]:
        """Return ``mean_words``, ``mean_tokens``, ``eos_rate``, ``repeated_ngram_rate`` and ``count``."""
        return {
            "mean_words": _ratio(self.words, self.responses),
            "mean_tokens": _ratio(self.tokens, self.token_responses),
            "eos_rate": _ratio(self.finished, self.responses),
            "repeated_ngram_rate": _ratio(self.repeat_rate_sum, self.responses),
            "count": self.responses.clone(),
        }


class SequenceKL(_WeightedMean):
    """Monte-Carlo estimate of :math:`\\mathrm{KL}(\\pi \\,\\|\\, q)` from sequences sampled from :math:`\\pi`.

    .. math::
        \\mathrm{KL}(\\pi \\,\\|\\, q) = \\mathbb{E}_{y \\sim \\pi}[\\log \\pi(y) - \\log q(y)]
        \\approx \\frac{\\sum_i w_i (\\log \\pi(y_i) - \\log q(y_i))}{\\sum_i w_i}

    **The samples** :math:`y_i` **must have been drawn from** :math:`\\pi` **, the model that gave
    ``policy_logps``.** On samples from another model (e.g. the behavior model) this is not a KL estimate;
    use :class:`ImportanceKL` there. Single terms can be negative; only their expectation is >= 0.

    ``compute()`` returns ``kl``, ``stderr`` (its standard error, see :class:`_WeightedMean`) and ``count``.
    """

    def update(self, policy_logps: Tensor, other_logps: Tensor, weights: Tensor | None = None) -> None:
        """Add samples with their log-probs under ``pi`` (sampler) and ``q``, optionally weighted."""
        lp, lq = _as_f64(self, policy_logps), _as_f64(self, other_logps)
        if lp.shape != lq.shape:
            raise ValueError(f"policy_logps has {lp.numel()} elements but other_logps has {lq.numel()}")
        self._accumulate(lp - lq, weights)


MAX_LOG_RATIO = 50.0


def importance_kl_terms(policy_logps: Tensor, behavior_logps: Tensor) -> Tensor:
    """Per-sample terms r·log r − r + 1 (r = π/β) of :class:`ImportanceKL`, in float64: ℓe^ℓ − expm1(ℓ) with the
    log-ratio ℓ clamped to ±``MAX_LOG_RATIO``; each term is ≥ 0 and exactly 0 where π = β."""
    log_r = (policy_logps.double() - behavior_logps.double()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return (log_r * log_r.exp() - torch.expm1(log_r)).clamp_min(0.0)


class ImportanceKL(_WeightedMean):
    """Estimate of :math:`\\mathrm{KL}(\\pi \\,\\|\\, \\beta)` from sequences sampled from the behavior model.

    With :math:`r = \\pi(y) / \\beta(y) = \\exp(\\log \\pi(y) - \\log \\beta(y))` and :math:`y \\sim \\beta`,

    .. math::
        \\mathrm{KL}(\\pi \\,\\|\\, \\beta) = \\mathbb{E}_{\\beta}[r \\log r] = \\mathbb{E}_{\\beta}[r \\log r - r + 1]
        \\approx \\frac{1}{N} \\sum_i (r_i \\log r_i - r_i + 1),

    since :math:`\\mathbb{E}_\\beta[r] = 1`. Each term is >= 0 (``x log x - x + 1 >= 0`` for ``x > 0``) and is
    exactly 0 when :math:`\\pi = \\beta`. Terms are computed in float64 as
    :math:`\\ell e^{\\ell} - \\mathrm{expm1}(\\ell)` with :math:`\\ell = \\log r` clamped to ``[-50, 50]``, accurate
    near :math:`r = 1`, finite for huge ratios and close to 1 (its limit) when :math:`\\pi(y) = 0`.
    **The samples must come from** :math:`\\beta` (the model that gave ``behavior_logps``).

    Example:
        log-ratios ``[ln 2, -ln 2]`` (``r = 2, 1/2``): terms ``2 ln 2 - 1`` and ``1/2 - (ln 2)/2``, mean
        ``(3/4) ln 2 - 1/4 ≈ 0.26986``.

    ``compute()`` returns ``kl``, ``stderr`` and ``count`` as :class:`SequenceKL` does.
    """

    def update(self, policy_logps: Tensor, behavior_logps: Tensor, weights: Tensor | None = None) -> None:
        """Add samples of ``beta`` with their log-probs under ``pi`` and ``beta``, optionally weighted."""
        lp, lb = _as_f64(self, policy_logps), _as_f64(self, behavior_logps)
        if lp.shape != lb.shape:
            raise ValueError(f"policy_logps has {lp.numel()} elements but behavior_logps has {lb.numel()}")
        self._accumulate(importance_kl_terms(lp, lb), weights)
