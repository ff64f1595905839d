"""Tests of quamba_eval.stats against direct numpy/scipy/lm-eval computations."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from lm_eval.api import metrics as lm_metrics
from scipy import stats as scipy_stats

from quamba_eval.stats import (
    metric_summary,
    minimum_detectable_difference,
    paired_comparison,
    paired_loglik_comparison,
    perplexity_summary,
    power_warning,
    wilson_interval,
)

Z95 = NormalDist().inv_cdf(0.975)


def _random_correct(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return (rng.random(n) < rate).astype(np.int64)


def _wilson_by_quadratic(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson bounds as the roots of (phat - p)^2 = z^2 p (1 - p) / n, solved with numpy."""
    phat = successes / n
    k = z * z / n
    # (1 + k) p^2 - (2 phat + k) p + phat^2 = 0
    roots = np.sort(np.roots([1.0 + k, -(2.0 * phat + k), phat * phat]).real)
    return float(roots[0]), float(roots[1])


# --------------------------------------------------------------------------------- summaries


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [7, 100, 5153])
def test_accuracy_summary_matches_direct_computation(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    values = _random_correct(rng, n, 0.4)
    summary = metric_summary(values.tolist(), kind="accuracy")
    assert summary.n == n
    assert summary.mean == pytest.approx(values.mean(), rel=1e-12)
    assert summary.stderr == pytest.approx(lm_metrics.mean_stderr(values.tolist()), rel=1e-12)
    low, high = _wilson_by_quadratic(int(values.sum()), n, Z95)
    assert summary.ci_low == pytest.approx(low, rel=1e-9, abs=1e-12)
    assert summary.ci_high == pytest.approx(high, rel=1e-9)


def test_accuracy_stderr_of_seed_runs() -> None:
    # Spec §7.1: 39/100 -> stderr 0.0490, 43/100 -> 0.0498 (lm-eval's numbers).
    assert metric_summary([1] * 39 + [0] * 61).stderr == pytest.approx(0.0490, abs=5e-5)
    assert metric_summary([1] * 43 + [0] * 57).stderr == pytest.approx(0.0498, abs=5e-5)


def test_wilson_known_values() -> None:
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(Z95**2 / (10 + Z95**2), rel=1e-12)
    assert wilson_interval(10, 10)[1] == 1.0


def test_accuracy_summary_accepts_bool_and_torch() -> None:
    values = torch.tensor([True, False, True, True])
    summary = metric_summary(values, kind="accuracy")
    assert summary.mean == 0.75
    assert summary.to_dict()["n"] == 4


@pytest.mark.parametrize("seed", [3, 4])
def test_mean_summary_normal_interval(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(2.0, 3.0, size=257)
    summary = metric_summary(values, kind="mean", confidence=0.9)
    stderr = values.std(ddof=1) / math.sqrt(values.size)
    z90 = NormalDist().inv_cdf(0.95)
    assert summary.stderr == pytest.approx(stderr, rel=1e-12)
    assert summary.ci_low == pytest.approx(values.mean() - z90 * stderr, rel=1e-12)
    assert summary.ci_high == pytest.approx(values.mean() + z90 * stderr, rel=1e-12)


def test_single_sample_stderr_is_nan() -> None:
    summary = metric_summary([1], kind="accuracy")
    assert math.isnan(summary.stderr)
    assert 0.0 < summary.ci_low < 1.0


# --------------------------------------------------------------------------------- perplexity


def _random_logliks(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return -rng.gamma(shape=1.5, scale=2.0, size=n)


@pytest.mark.parametrize("seed", [0, 5])
def test_perplexity_matches_lm_eval_aggregation(seed: int) -> None:
    logliks = _random_logliks(seed, 300)
    summary = perplexity_summary(logliks, iterations=200)
    assert summary.perplexity == pytest.approx(lm_metrics.perplexity(logliks.tolist()), rel=1e-12)
    counts = np.random.default_rng(seed + 1).integers(1, 6, size=logliks.size)
    weighted = perplexity_summary(logliks, counts, iterations=200)
    pairs = list(zip(logliks.tolist(), counts.tolist()))
    assert weighted.perplexity == pytest.approx(lm_metrics.weighted_perplexity(pairs), rel=1e-12)
    assert weighted.weighted and not summary.weighted


def test_perplexity_bootstrap_is_deterministic_and_sensible() -> None:
    logliks = _random_logliks(7, 500)
    first = perplexity_summary(logliks, iterations=400, seed=11)
    second = perplexity_summary(logliks, iterations=400, seed=11)
    other_seed = perplexity_summary(logliks, iterations=400, seed=12)
    assert first == second
    assert first.stderr != other_seed.stderr
    assert first.ci_low < first.perplexity < first.ci_high
    # Delta method: sd(ppl) ~ ppl * sd(loglik) / sqrt(n).
    delta_stderr = first.perplexity * logliks.std(ddof=1) / math.sqrt(logliks.size)
    assert first.stderr == pytest.approx(delta_stderr, rel=0.2)


def test_perplexity_default_iterations() -> None:
    summary = perplexity_summary(_random_logliks(1, 50))
    assert summary.iterations == 1000


# --------------------------------------------------------------------------------- paired accuracy


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [100, 1000])
def test_paired_comparison_matches_direct_computation(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    ref = _random_correct(rng, n, 0.4)
    flip = rng.random(n) < 0.08  # modes of one model mostly agree
    other = np.where(flip, 1 - ref, ref)
    result = paired_comparison(ref, other, ref_name="mode 0", other_name="mode 2-1")
    b = int(np.sum((ref == 1) & (other == 0)))
    c = int(np.sum((ref == 0) & (other == 1)))
    assert (result.b, result.c) == (b, c)
    assert result.both_correct + result.both_wrong + b + c == n
    diff = other.astype(float) - ref
    assert result.difference == pytest.approx(diff.mean(), abs=1e-15)
    assert result.difference == pytest.approx((c - b) / n, abs=1e-15)
    assert result.stderr == pytest.approx(diff.std(ddof=1) / math.sqrt(n), rel=1e-12)
    assert result.ci_low == pytest.approx(result.difference - Z95 * result.stderr, rel=1e-12)
    expected_p = scipy_stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert result.p_value == pytest.approx(expected_p, rel=1e-12)
    assert result.significant == (expected_p < 0.05)
    assert "mode 2-1" in result.verdict and "mode 0" in result.verdict


@pytest.mark.parametrize(
    ("b", "c", "expected_p"),
    [(2, 0, 0.5), (0, 2, 0.5), (10, 0, 0.001953125), (0, 0, 1.0), (3, 3, 1.0)],
)
def test_mcnemar_hand_checked(b: int, c: int, expected_p: float) -> None:
    both_right, both_wrong = 40, 50
    ref = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    other = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    result = paired_comparison(ref, other)
    assert result.p_value == pytest.approx(expected_p, rel=1e-12)


def test_verdicts_in_plain_words() -> None:
    # b=10, c=0 on 100 examples: other worse by 10 points, significant.
    ref = [1] * 50 + [0] * 50
    other = [0] * 10 + [1] * 40 + [0] * 50
    worse = paired_comparison(ref, other, other_name="mode X")
    assert worse.significant
    assert worse.verdict.startswith("mode X is worse than reference by 10.0 points")
    better = paired_comparison(other, ref, ref_name="mode X", other_name="mode Y")
    assert better.verdict.startswith("mode Y is better than mode X by 10.0 points")
    # The seeds' kind of difference: 2 examples out of 100.
    other_small = [0] * 2 + [1] * 48 + [0] * 50
    small = paired_comparison(ref, other_small)
    assert not small.significant
    assert small.verdict.startswith("no detectable difference")
    assert "CI of the accuracy change" in small.verdict
    assert small.power_warning is not None and "n=100" in small.power_warning


def test_identical_runs_give_no_difference() -> None:
    ref = _random_correct(np.random.default_rng(9), 200, 0.5)
    result = paired_comparison(ref, ref.copy())
    assert result.p_value == 1.0
    assert result.difference == 0.0
    assert result.b == result.c == 0
    assert result.power_warning is None


# --------------------------------------------------------------------------------- power


def test_power_warning_for_seed_sized_differences() -> None:
    # Spec §7/§8: 100-example runs, differences of 1-2 examples at ~38 % accuracy.
    assert power_warning(100, 0.02, base_rate=0.38) is not None
    assert power_warning(100, -0.04, base_rate=0.36) is not None
    assert power_warning(100, 0.02, discordant_rate=0.02) is not None
    # A real 5-point change on the full lambada set is detectable.
    assert power_warning(5000, 0.05, base_rate=0.4) is None
    assert power_warning(5153, -0.05, base_rate=0.4) is None


def test_minimum_detectable_difference_formula() -> None:
    z_sum = Z95 + NormalDist().inv_cdf(0.8)
    assert minimum_detectable_difference(100, 0.4) == pytest.approx(
        z_sum * math.sqrt(2 * 0.4 * 0.6 / 100), rel=1e-12
    )
    assert minimum_detectable_difference(100, None, discordant_rate=0.1) == pytest.approx(
        z_sum * math.sqrt(0.1 / 100), rel=1e-12
    )
    # More examples detect smaller changes.
    assert minimum_detectable_difference(5000, 0.4) < minimum_detectable_difference(100, 0.4)


@pytest.mark.parametrize(("n", "psi"), [(2000, 0.1), (500, 0.3)])
def test_minimum_detectable_difference_has_about_requested_power(n: int, psi: float) -> None:
    # Monte Carlo: paired data with discordant rate psi and true change = MDD; a two-sided
    # McNemar z-test at 5 % should reject about 80 % of the time.
    delta = minimum_detectable_difference(n, None, discordant_rate=psi)
    rng = np.random.default_rng(42)
    probabilities = [(psi - delta) / 2, (psi + delta) / 2, 1 - psi]  # b, c, concordant
    counts = rng.multinomial(n, probabilities, size=20000)
    b, c = counts[:, 0], counts[:, 1]
    z = (c - b) / np.sqrt(np.maximum(b + c, 1))
    power = np.mean(np.abs(z) > Z95)
    assert power == pytest.approx(0.8, abs=0.04)


def test_power_warning_mentions_needed_examples() -> None:
    message = power_warning(100, 0.02, base_rate=0.4)
    assert message is not None
    needed = math.ceil((Z95 + NormalDist().inv_cdf(0.8)) ** 2 * 0.48 / 0.02**2)
    assert f"about {needed} examples" in message


# --------------------------------------------------------------------------------- paired loglik


@pytest.mark.parametrize("seed", [0, 1])
def test_paired_loglik_comparison_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = _random_logliks(seed, 400)
    other = np.minimum(ref + rng.normal(-0.05, 0.2, size=ref.size), 0.0)
    result = paired_loglik_comparison(torch.from_numpy(ref), other, other_name="mode 3")
    diff = other - ref
    assert result.mean_difference == pytest.approx(diff.mean(), rel=1e-12)
    assert result.stderr == pytest.approx(diff.std(ddof=1) / math.sqrt(diff.size), rel=1e-12)
    assert result.p_value == pytest.approx(scipy_stats.wilcoxon(diff).pvalue, rel=1e-12)
    ratio = math.exp(-other.mean()) / math.exp(-ref.mean())
    assert result.perplexity_ratio == pytest.approx(ratio, rel=1e-12)
    assert result.n_other_higher + result.n_ref_higher + result.n_tied == ref.size
    assert result.significant
    assert result.verdict.startswith("mode 3 has lower log-likelihood than reference")


def test_paired_loglik_identical() -> None:
    ref = _random_logliks(3, 30)
    result = paired_loglik_comparison(ref, ref.copy())
    assert result.p_value == 1.0
    assert result.perplexity_ratio == 1.0
    assert result.verdict.startswith("no detectable log-likelihood difference")


# --------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: metric_summary([], kind="accuracy"), ValueError, "empty"),
        (lambda: metric_summary([0, 1, 0.5]), ValueError, "only 0/1"),
        (lambda: metric_summary([0, 1, 2]), ValueError, "only 0/1"),
        (lambda: metric_summary([[0, 1], [1, 0]]), ValueError, "1-D"),
        (lambda: metric_summary([1.0, float("nan")], kind="mean"), ValueError, "non-finite"),
        (lambda: metric_summary([1, 0], kind="median"), ValueError, "kind"),
        (lambda: metric_summary("0101"), TypeError, "1-D sequence"),
        (lambda: metric_summary([1, 0], confidence=1.5), ValueError, "confidence"),
        (lambda: paired_comparison([1, 0, 1], [1, 0]), ValueError, "same length"),
        (lambda: paired_comparison([1, 0], [1, 3]), ValueError, "other_correct"),
        (lambda: paired_comparison([1, 0], [1, 0], alpha=0.0), ValueError, "alpha"),
        (lambda: paired_loglik_comparison([-1.0, -2.0], [-1.0]), ValueError, "same length"),
        (lambda: perplexity_summary([-1.0, 0.5]), ValueError, "negative log-likelihoods"),
        (lambda: perplexity_summary([-1.0, -2.0], [1, 0]), ValueError, "token_counts"),
        (lambda: perplexity_summary([-1.0, -2.0], [1]), ValueError, "same length"),
        (lambda: perplexity_summary([-1.0, -2.0], iterations=1), ValueError, "iterations"),
        (lambda: minimum_detectable_difference(0, 0.4), ValueError, "n must be"),
        (lambda: minimum_detectable_difference(100, 1.4), ValueError, "base_rate"),
        (lambda: minimum_detectable_difference(100, None), ValueError, "discordant_rate"),
        (lambda: minimum_detectable_difference(100, 0.4, power=1.0), ValueError, "power"),
        (lambda: power_warning(100, 2.0), ValueError, "observed_diff"),
        (lambda: power_warning(100, "0.02"), TypeError, "observed_diff"),
        (lambda: wilson_interval(11, 10), ValueError, "exceed"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()
