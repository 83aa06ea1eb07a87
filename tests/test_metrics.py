"""Hand-checkable tests of the torchmetrics evaluation metrics in ``bpo_lightning.metrics``."""

import math

import pytest
import torch

from bpo_lightning.metrics import ImportanceKL, ResponseStats, SequenceKL, WinTieLoss, repeated_ngram_rate

NAN = float("nan")
# The categorical pair used by the sampled KL checks: p = [0.5, 0.3, 0.2], q = [0.2, 0.3, 0.5].
P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
Q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
# KL(p||q) = 0.5 ln(0.5/0.2) + 0.3 ln(1) + 0.2 ln(0.2/0.5) = 0.5 ln 2.5 - 0.2 ln 2.5 = 0.3 ln 2.5 ≈ 0.274887
KL_PQ = 0.3 * math.log(2.5)
N_SAMPLES = 20_000


def _values(out: dict[str, torch.Tensor]) -> dict[str, float]:
    assert all(v.dtype == torch.float64 and v.ndim == 0 for v in out.values())
    return {k: v.item() for k, v in out.items()}


def _samples(probs: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs, N_SAMPLES, replacement=True, generator=gen)


# ---------------------------------------------------------------- WinTieLoss


def test_win_tie_loss_hand_example():
    """[1,2,3,nan] vs [2,2,1,0]: 1<2 loss, 2=2 tie, 3>1 win, nan invalid; diff ((1-2)+(2-2)+(3-1))/3 = 1/3."""
    metric = WinTieLoss()
    metric.update(torch.tensor([1.0, 2.0, 3.0, NAN]), torch.tensor([2.0, 2.0, 1.0, 0.0]))
    out = _values(metric.compute())
    assert out == pytest.approx(
        {"win_rate": 1 / 3, "tie_rate": 1 / 3, "loss_rate": 1 / 3, "invalid": 1, "count": 3, "reward_diff": 1 / 3}
    )


def test_win_tie_loss_nan_reference_is_invalid():
    """A NaN reference is invalid too: only 5>4 counts, so win_rate = 1/1 and reward_diff = 1."""
    metric = WinTieLoss()
    metric.update(torch.tensor([5.0, 1.0]), torch.tensor([4.0, NAN]))
    out = _values(metric.compute())
    assert (out["win_rate"], out["invalid"], out["count"], out["reward_diff"]) == (1.0, 1.0, 1.0, 1.0)


def test_win_tie_loss_merge_equals_single_pass():
    """Merging the sum states of two halves (what distributed reduction does) equals one pass over all."""
    scores, refs = torch.tensor([1.0, 2.0, 3.0, NAN, 0.5, 7.0]), torch.tensor([2.0, 2.0, 1.0, 0.0, 0.5, NAN])
    whole, first, second = WinTieLoss(), WinTieLoss(), WinTieLoss()
    whole.update(scores, refs)
    first.update(scores[:3], refs[:3])
    second.update(scores[3:], refs[3:])
    first.merge_state(second)
    assert _values(first.compute()) == _values(whole.compute())
    # 4 valid (1 win, 2 ties, 1 loss), 2 invalid: diff = (-1 + 0 + 2 + 0) / 4 = 1/4
    assert _values(whole.compute()) == pytest.approx(
        {"win_rate": 0.25, "tie_rate": 0.5, "loss_rate": 0.25, "invalid": 2, "count": 4, "reward_diff": 0.25}
    )


def test_win_tie_loss_shape_mismatch():
    with pytest.raises(ValueError, match="scores has 2 elements but reference_scores has 3"):
        WinTieLoss().update(torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------- ResponseStats


def test_repeated_ngram_rate_hand_examples():
    """'a b c a b c', n=3: abc, bca, cab, abc -> 1 of 4 repeats; 'x y' has no 3-gram -> 0."""
    assert repeated_ngram_rate("a b c a b c".split(), 3) == 0.25
    assert repeated_ngram_rate(["x", "y"], 3) == 0.0
    # n=1 on 'a a a b': a, a, a, b -> the 2nd and 3rd 'a' repeat -> 2/4
    assert repeated_ngram_rate("a a a b".split(), 1) == 0.5


def test_response_stats_hand_example():
    """Words 6 and 2 -> mean 4; tokens 8 and 2 -> 5; EOS 1 of 2; repetition (0.25 + 0) / 2 = 0.125."""
    metric = ResponseStats()
    metric.update(["a b c a b c", "x y"], [True, False], token_counts=[8, 2])
    out = _values(metric.compute())
    assert out == {"mean_words": 4.0, "mean_tokens": 5.0, "eos_rate": 0.5, "repeated_ngram_rate": 0.125, "count": 2}


def test_response_stats_without_tokens_and_merge():
    """No token counts -> mean_tokens is nan; 3 responses over two merged objects: words (6+2+1)/3 = 3."""
    first, second = ResponseStats(ngram=3), ResponseStats(ngram=3)
    first.update(["a b c a b c", "x y"], [True, False])
    second.update(["z"], [True])
    first.merge_state(second)
    out = _values(first.compute())
    assert math.isnan(out.pop("mean_tokens"))
    assert out == pytest.approx({"mean_words": 3.0, "eos_rate": 2 / 3, "repeated_ngram_rate": 0.25 / 3, "count": 3})


def test_response_stats_validation():
    with pytest.raises(ValueError, match="ngram must be >= 1, got 0"):
        ResponseStats(ngram=0)
    with pytest.raises(ValueError, match="1 responses but 2 finished flags"):
        ResponseStats().update(["a"], [True, False])
    with pytest.raises(ValueError, match="1 responses but 2 token counts"):
        ResponseStats().update(["a"], [True], token_counts=[1, 2])


# ---------------------------------------------------------------- SequenceKL


def test_sequence_kl_identical_logps_is_exactly_zero():
    metric = SequenceKL()
    logps = torch.tensor([-1.5, -0.2, -7.0])
    metric.update(logps, logps.clone())
    assert _values(metric.compute()) == {"kl": 0.0, "stderr": 0.0, "count": 3.0}


def test_sequence_kl_hand_example_and_weights():
    """Log-ratios [1, 2]: mean 1.5, unbiased std sqrt(0.5), SE sqrt(0.5/2) = 0.5; weights [1, 3]: (1+6)/4."""
    metric = SequenceKL()
    metric.update(torch.tensor([1.0, 2.0]), torch.zeros(2))
    assert _values(metric.compute()) == pytest.approx({"kl": 1.5, "stderr": 0.5, "count": 2})
    weighted = SequenceKL()
    weighted.update(torch.tensor([1.0, 2.0]), torch.zeros(2), weights=torch.tensor([1.0, 3.0]))
    assert weighted.compute()["kl"].item() == pytest.approx(1.75)


def test_sequence_kl_sampled_categorical():
    """y ~ p (the sampler is pi = p); the estimate of KL(p||q) = 0.3 ln 2.5 lies within 3 standard errors."""
    metric = SequenceKL()
    y = _samples(P, seed=0)
    half = N_SAMPLES // 2  # two updates: the sums must not depend on batching
    metric.update(P.log()[y[:half]], Q.log()[y[:half]])
    metric.update(P.log()[y[half:]], Q.log()[y[half:]])
    out = _values(metric.compute())
    # per-sample std is about 0.65, so SE ≈ 0.65 / sqrt(20000) ≈ 0.0046
    assert 0.003 < out["stderr"] < 0.006
    assert abs(out["kl"] - KL_PQ) < 3 * out["stderr"]


# ---------------------------------------------------------------- ImportanceKL


def test_importance_kl_identical_logps_is_exactly_zero():
    metric = ImportanceKL()
    logps = torch.tensor([-1.5, -0.2, -7.0])
    metric.update(logps, logps.clone())
    assert _values(metric.compute()) == {"kl": 0.0, "stderr": 0.0, "count": 3.0}


def test_importance_kl_hand_example():
    """r = 2: 2 ln 2 - 2 + 1 = 2 ln 2 - 1; r = 1/2: (1/2)(-ln 2) - 1/2 + 1 = 1/2 - (ln 2)/2; mean (3/4) ln 2 - 1/4."""
    metric = ImportanceKL()
    ln2 = math.log(2.0)
    metric.update(torch.tensor([ln2, -ln2], dtype=torch.float64), torch.zeros(2))  # float64: exact ln 2
    assert metric.compute()["kl"].item() == pytest.approx(0.75 * ln2 - 0.25, rel=1e-12)


def test_importance_kl_clamps_huge_log_ratios():
    """Log-ratio 1000 is clamped at 50: term 50 e^50 - (e^50 - 1) = 49 e^50 + 1, finite; -1000 gives ~1."""
    metric = ImportanceKL()
    metric.update(torch.tensor([1000.0]), torch.zeros(1))
    assert metric.compute()["kl"].item() == pytest.approx(49 * math.exp(50) + 1, rel=1e-12)
    low = ImportanceKL()
    low.update(torch.tensor([-1000.0]), torch.zeros(1))
    assert low.compute()["kl"].item() == pytest.approx(1.0, abs=1e-15)


def test_importance_kl_sampled_categorical():
    """y ~ q (= beta), r = p/q; E_q[r ln r - r + 1] = KL(p||q) = 0.3 ln 2.5.

    Tolerance: with f(r) = r ln r - r + 1, the exact per-sample variance is sigma^2 = E_q[f^2] - KL^2
    (f = 0.790727, 0, 0.233484 for r = 2.5, 1, 0.4, so sigma ≈ 0.2770). Chebyshev bounds the chance of an
    error beyond 4 sigma / sqrt(N) ≈ 0.0078 by 1/16 for any distribution (about 6e-5 by the CLT); the fixed
    seed makes the check deterministic.
    """
    r = P / Q
    f = r * r.log() - r + 1
    assert (Q * f).sum().item() == pytest.approx(KL_PQ, rel=1e-12)
    sigma = math.sqrt((Q * f * f).sum().item() - KL_PQ**2)
    metric = ImportanceKL()
    y = _samples(Q, seed=1)
    metric.update(P.log()[y], Q.log()[y])
    out = _values(metric.compute())
    assert out["stderr"] == pytest.approx(sigma / math.sqrt(N_SAMPLES), rel=0.1)
    assert abs(out["kl"] - KL_PQ) < 4 * sigma / math.sqrt(N_SAMPLES)


def test_metrics_csv_writes_float32_values_in_their_shortest_form(tmp_path):
    import torch

    from bpo_lightning.logs import RunCSVLogger

    logger = RunCSVLogger(save_dir=str(tmp_path), name="", version="")
    f32 = float(torch.tensor(0.9))  # what Lightning hands over for a float32 metric: 0.8999999761581421
    assert repr(f32) == "0.8999999761581421"
    logger.log_metrics({"f32": f32, "f64": 0.1, "third": 1 / 3, "big": 1e300, "nan": float("nan"), "n": 7}, step=3)
    logger.save()
    header, row = (tmp_path / "metrics.csv").read_text().splitlines()
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert values == {
        "f32": "0.9",
        "f64": "0.1",
        "third": repr(1 / 3),
        "big": "1e+300",
        "nan": "nan",
        "n": "7",
        "step": "3",
    }
    assert torch.tensor(float(values["f32"])) == torch.tensor(f32)  # the same float32 when read back
