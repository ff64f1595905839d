"""Statistics for evaluation results: uncertainty of one run and paired comparison of two runs.

Why this module exists: the seed fork compared precision modes on 100 lambada examples and read
1-2 example differences as effects (spec seed-system.md §7-§8), although the stderr of a
100-example accuracy is about 0.049. The functions here put an interval on every number, compare
two modes on the *same* examples with a paired test (McNemar for accuracy, Wilcoxon signed-rank
for log-likelihoods) and warn when the sample is too small to detect the observed difference.

Conventions
- Accuracies and their differences are fractions in [0, 1]; verdict strings print points (x 100).
- `stderr` of a mean is the lm-eval one: sample standard deviation (n - 1) / sqrt(n).
- Intervals are two-sided at level `confidence` (default 0.95).
- Per-sample inputs may be Python sequences, numpy arrays or CPU torch tensors (1-D).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "MetricSummary",
    "PairedComparison",
    "PairedLoglikComparison",
    "PerplexitySummary",
    "metric_summary",
    "minimum_detectable_difference",
    "paired_comparison",
    "paired_loglik_comparison",
    "perplexity_summary",
    "power_warning",
    "wilson_interval",
]

DEFAULT_BOOTSTRAP_ITERATIONS = 1000
# The project's deterministic seed (the seed fork's set_deterministic(1234)).
DEFAULT_BOOTSTRAP_SEED = 1234
# Upper bound on the number of resampled indices held in memory at once during the bootstrap.
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000

_METRIC_KINDS = ("accuracy", "mean")


# ---------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSummary:
    """Mean of per-sample values with its standard error and a two-sided interval."""

    kind: str
    mean: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class PerplexitySummary:
    """Perplexity exp(-mean loglik) with a bootstrap stderr and percentile interval."""

    perplexity: float
    mean_loglik: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    weighted: bool
    iterations: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """Paired comparison of two 0/1 correctness arrays over the same examples.

    `b` = examples the reference got right and the other got wrong, `c` = the reverse
    (McNemar's discordant counts); `difference` = other accuracy - reference accuracy = (c - b) / n.
    """

    ref_name: str
    other_name: str
    n: int
    ref_accuracy: float
    other_accuracy: float
    difference: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    b: int
    c: int
    both_correct: int
    both_wrong: int
    p_value: float
    alpha: float
    significant: bool
    verdict: str
    power_warning: str | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class PairedLoglikComparison:
    """Paired comparison of per-sample log-likelihoods (perplexity-type metrics).

    `mean_difference` = mean(other_ll - ref_ll) in nats per example (positive: other assigns the
    targets more probability); `perplexity_ratio` = exp(-mean_difference) = other ppl / ref ppl
    for the unweighted (lm-eval `perplexity`) aggregation.
    """

    ref_name: str
    other_name: str
    n: int
    ref_mean_loglik: float
    other_mean_loglik: float
    mean_difference: float
    stderr: float
    ci_low: float
    ci_high: float
    confidence: float
    perplexity_ratio: float
    n_other_higher: int
    n_ref_higher: int
    n_tied: int
    p_value: float
    alpha: float
    significant: bool
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Input validation helpers
# ---------------------------------------------------------------------------------------------


def _as_1d_float_array(values: Any, name: str) -> np.ndarray:
    """Convert per-sample values to a 1-D float64 array, with clear errors."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch tensor
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got a {type(values).__name__}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be a 1-D sequence of numbers (list, numpy array, torch tensor); "
            f"could not convert {type(values).__name__}: {error}"
        ) from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per sample), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; at least one sample is needed")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    return array


def _as_binary_array(values: Any, name: str) -> np.ndarray:
    """1-D float64 array whose entries are all 0 or 1 (correctness per example)."""
    array = _as_1d_float_array(values, name)
    not_binary = (array != 0.0) & (array != 1.0)
    if np.any(not_binary):
        first = array[np.argmax(not_binary)]
        raise ValueError(
            f"{name} must contain only 0/1 (or False/True) per-example correctness values; "
            f"found {int(np.count_nonzero(not_binary))} other value(s), e.g. {first!r}"
        )
    return array


def _as_loglik_array(values: Any, name: str) -> np.ndarray:
    """1-D float64 array of log-probabilities (all <= 0)."""
    array = _as_1d_float_array(values, name)
    if np.any(array > 0.0):
        raise ValueError(
            f"{name} must be log-likelihoods (log-probabilities, <= 0); found "
            f"{int(np.count_nonzero(array > 0.0))} positive value(s), max {array.max()!r}. "
            "Did you pass negative log-likelihoods (losses)?"
        )
    return array


def _check_same_length(first: np.ndarray, second: np.ndarray, names: str) -> None:
    if first.shape != second.shape:
        raise ValueError(
            f"{names} must be aligned per example (same length); got {first.size} and {second.size}"
        )


def _check_probability(value: float, name: str, *, open_interval: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if open_interval:
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return value


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _two_sided_z(confidence: float) -> float:
    """Normal quantile z with P(|Z| <= z) = confidence (1.959964 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _mean_stderr(values: np.ndarray) -> float:
    """lm-eval's mean_stderr: sample std (ddof=1) / sqrt(n); NaN for a single sample."""
    if values.size < 2:
        return math.nan
    return float(np.std(values, ddof=1) / math.sqrt(values.size))


def _format_p(p_value: float) -> str:
    return f"{p_value:.2f}" if p_value >= 0.01 else f"{p_value:.2g}"


# ---------------------------------------------------------------------------------------------
# One run: accuracy / mean / perplexity
# ---------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes / n.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which matters for small samples such as --limit 100.
    """
    n = _check_count(n, "n", 1)
    successes = _check_count(successes, "successes", 0)
    if successes > n:
        raise ValueError(f"successes ({successes}) must not exceed n ({n})")
    confidence = _check_probability(confidence, "confidence", open_interval=True)
    z = _two_sided_z(confidence)
    proportion = successes / n
    z2_over_n = z * z / n
    center = (proportion + z2_over_n / 2.0) / (1.0 + z2_over_n)
    half_width = (
        z / (1.0 + z2_over_n) * math.sqrt(proportion * (1.0 - proportion) / n + z2_over_n / (4 * n))
    )
    # At 0 or n successes the bound is exactly 0 or 1; avoid a rounding residue like 3e-17.
    low = 0.0 if successes == 0 else max(0.0, center - half_width)
    high = 1.0 if successes == n else min(1.0, center + half_width)
    return low, high


def metric_summary(values: Any, kind: str = "accuracy", confidence: float = 0.95) -> MetricSummary:
    """Summarise per-sample metric values of one evaluation run.

    kind "accuracy": values are 0/1 correctness; interval = Wilson score interval.
    kind "mean": any real values; interval = mean +- z * stderr (normal approximation).
    In both cases stderr = sample std (n - 1) / sqrt(n), as lm-eval reports it (NaN when n = 1;
    the "mean" interval is then NaN as well).
    """
    if kind not in _METRIC_KINDS:
        raise ValueError(f"kind must be one of {_METRIC_KINDS}, got {kind!r}")
    confidence = _check_probability(confidence, "confidence", open_interval=True)
    if kind == "accuracy":
        array = _as_binary_array(values, "values")
        ci_low, ci_high = wilson_interval(int(array.sum()), array.size, confidence)
        stderr = _mean_stderr(array)
    else:
        array = _as_1d_float_array(values, "values")
        stderr = _mean_stderr(array)
        half_width = _two_sided_z(confidence) * stderr
        ci_low, ci_high = float(array.mean() - half_width), float(array.mean() + half_width)
    return MetricSummary(
        kind=kind,
        mean=float(array.mean()),
        stderr=stderr,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        n=int(array.size),
    )


def _perplexity(logliks: np.ndarray, token_counts: np.ndarray | None) -> float:
    if token_counts is None:
        return math.exp(-float(logliks.mean()))
    return math.exp(-float(logliks.sum() / token_counts.sum()))


def perplexity_summary(
    logliks: Any,
    token_counts: Any = None,
    *,
    iterations: int = DEFAULT_BOOTSTRAP_ITERATIONS,
    seed: int = DEFAULT_BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> PerplexitySummary:
    """Perplexity of per-sample log-likelihoods with a deterministic bootstrap.

    Without `token_counts` this is lm-eval's `perplexity` aggregation (used by lambada_openai):
    exp(-mean of per-sample logliks), i.e. per *example*, not per token. With `token_counts`
    (tokens, words or bytes per sample) it is lm-eval's `weighted_perplexity`:
    exp(-sum(loglik) / sum(count)).

    Uncertainty: `iterations` bootstrap resamples of the examples (with replacement) drawn from
    numpy.random.default_rng(seed), so the same inputs and seed give the same numbers;
    stderr = sample std of the resampled perplexities (as lm-eval's bootstrap_stderr), interval =
    percentile interval of the resampled perplexities.
    """
    array = _as_loglik_array(logliks, "logliks")
    counts = None
    if token_counts is not None:
        counts = _as_1d_float_array(token_counts, "token_counts")
        _check_same_length(array, counts, "logliks and token_counts")
        if np.any(counts <= 0):
            raise ValueError("token_counts must all be > 0 (tokens/words/bytes per sample)")
    iterations = _check_count(iterations, "iterations", 2)
    seed = _check_count(seed, "seed", 0)
    confidence = _check_probability(confidence, "confidence", open_interval=True)

    n = array.size
    rng = np.random.default_rng(seed)
    replicates = np.empty(iterations, dtype=np.float64)
    chunk = max(1, min(iterations, _BOOTSTRAP_CHUNK_ELEMENTS // n))
    for start in range(0, iterations, chunk):
        stop = min(start + chunk, iterations)
        indices = rng.integers(0, n, size=(stop - start, n))
        if counts is None:
            resampled_mean = array[indices].mean(axis=1)
        else:
            resampled_mean = array[indices].sum(axis=1) / counts[indices].sum(axis=1)
        replicates[start:stop] = np.exp(-resampled_mean)

    tail = (1.0 - confidence) / 2.0 * 100.0
    ci_low, ci_high = np.percentile(replicates, [tail, 100.0 - tail])
    mean_loglik = float(array.mean()) if counts is None else float(array.sum() / counts.sum())
    return PerplexitySummary(
        perplexity=_perplexity(array, counts),
        mean_loglik=mean_loglik,
        stderr=float(np.std(replicates, ddof=1)),
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        confidence=confidence,
        n=int(n),
        weighted=counts is not None,
        iterations=iterations,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------
# Power: what can a sample of n examples detect?
# ---------------------------------------------------------------------------------------------


def _discordant_probability(base_rate: float | None, discordant_rate: float | None) -> float:
    if discordant_rate is not None:
        return _check_probability(discordant_rate, "discordant_rate", open_interval=False)
    if base_rate is None:
        raise ValueError("give base_rate (accuracy of the reference) or discordant_rate")
    base_rate = _check_probability(base_rate, "base_rate", open_interval=False)
    return 2.0 * base_rate * (1.0 - base_rate)


def minimum_detectable_difference(
    n: int,
    base_rate: float | None = 0.5,
    discordant_rate: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Smallest accuracy change (fraction) a paired test on n examples detects with `power`.

    Approximation (normal approximation for paired proportions, McNemar setting): the per-example
    difference d = other - ref is in {-1, 0, +1} with variance psi - delta^2, where psi is the
    probability that the two systems disagree on an example (the discordant rate). Dropping the
    small delta^2 term (which makes the result slightly conservative), a two-sided level-alpha
    test reaches the requested power when

        |delta| >= (z_{1 - alpha/2} + z_{power}) * sqrt(psi / n).

    psi: `discordant_rate` when known (e.g. (b + c) / n of an observed pair). Otherwise it is
    taken from `base_rate` p assuming the two systems err independently, psi = 2 p (1 - p) (this
    equals the variance of an unpaired comparison; modes of one model usually agree on most
    examples, so their real psi and detectable difference are smaller). The default
    base_rate=0.5 gives the largest psi (0.5), the most conservative answer.
    """
    n = _check_count(n, "n", 1)
    alpha = _check_probability(alpha, "alpha", open_interval=True)
    power = _check_probability(power, "power", open_interval=True)
    psi = _discordant_probability(base_rate, discordant_rate)
    z_sum = _two_sided_z(1.0 - alpha) + NormalDist().inv_cdf(power)
    return z_sum * math.sqrt(psi / n)


def power_warning(
    n: int,
    observed_diff: float,
    base_rate: float | None = 0.5,
    discordant_rate: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> str | None:
    """Warning text when n examples cannot reliably detect a change of size |observed_diff|.

    Returns None when |observed_diff| >= minimum_detectable_difference(...) (same arguments and
    approximation), else a sentence that gives the detectable size and roughly how many examples
    a change of the observed size would need. observed_diff is a fraction (0.02 = 2 points).
    """
    if isinstance(observed_diff, bool) or not isinstance(
        observed_diff, (int, float, np.floating, np.integer)
    ):
        raise TypeError(f"observed_diff must be a number, got {type(observed_diff).__name__}")
    observed_diff = float(observed_diff)
    if not math.isfinite(observed_diff) or abs(observed_diff) > 1.0:
        raise ValueError(
            f"observed_diff must be an accuracy change between -1 and 1, got {observed_diff}"
        )
    detectable = minimum_detectable_difference(n, base_rate, discordant_rate, alpha, power)
    if abs(observed_diff) >= detectable:
        return None
    message = (
        f"n={n} examples can only detect accuracy changes of about +-{detectable * 100:.1f} "
        f"points (two-sided alpha={alpha:g}, {power:.0%} power; normal approximation for paired "
        f"proportions); the observed change of {observed_diff * 100:+.1f} points is below that, "
        "so it is not evidence of a real difference"
    )
    if observed_diff != 0.0:
        psi = _discordant_probability(base_rate, discordant_rate)
        z_sum = _two_sided_z(1.0 - alpha) + NormalDist().inv_cdf(power)
        needed = math.ceil(z_sum * z_sum * psi / (observed_diff * observed_diff))
        message += f"; detecting a change of that size needs about {needed} examples"
    return message + "."


# ---------------------------------------------------------------------------------------------
# Two runs on the same examples
# ---------------------------------------------------------------------------------------------


def paired_comparison(
    ref_correct: Any,
    other_correct: Any,
    *,
    ref_name: str = "reference",
    other_name: str = "other",
    alpha: float = 0.05,
) -> PairedComparison:
    """Compare two 0/1 correctness arrays aligned per example (same examples, same order).

    - difference = other accuracy - reference accuracy; stderr = sample std (n - 1) of the
      per-example differences / sqrt(n); interval = difference +- z * stderr at 1 - alpha.
    - McNemar exact test: two-sided binomial test of b vs c with p = 0.5 (scipy binomtest);
      p = 1 when there are no discordant examples (b + c = 0).
    - significant = p < alpha. The verdict is a plain-words sentence; when nothing is detected,
      `power_warning` tells whether n examples could have detected the observed change (using
      the observed discordant rate (b + c) / n).
    Note the interval is a normal approximation and the p-value exact; near alpha they can
    disagree about zero.
    """
    ref = _as_binary_array(ref_correct, "ref_correct")
    other = _as_binary_array(other_correct, "other_correct")
    _check_same_length(ref, other, "ref_correct and other_correct")
    alpha = _check_probability(alpha, "alpha", open_interval=True)
    confidence = 1.0 - alpha

    n = int(ref.size)
    ref_right = ref == 1.0
    other_right = other == 1.0
    b = int(np.count_nonzero(ref_right & ~other_right))
    c = int(np.count_nonzero(~ref_right & other_right))
    per_example = other - ref
    difference = float(per_example.mean())
    stderr = _mean_stderr(per_example)
    half_width = _two_sided_z(confidence) * stderr
    ci_low, ci_high = difference - half_width, difference + half_width
    p_value = 1.0 if b + c == 0 else float(scipy_stats.binomtest(b, b + c, 0.5).pvalue)
    significant = p_value < alpha

    interval_points = f"[{ci_low * 100:+.1f}, {ci_high * 100:+.1f}] points"
    if significant:
        direction = "worse" if difference < 0 else "better"
        verdict = (
            f"{other_name} is {direction} than {ref_name} by {abs(difference) * 100:.1f} points "
            f"(McNemar p={_format_p(p_value)}, {b} vs {c} discordant of {n}; {confidence:.0%} CI {interval_points})"
        )
        warning = None
    else:
        verdict = (
            f"no detectable difference between {other_name} and {ref_name} "
            f"(McNemar p={_format_p(p_value)}, {b} vs {c} discordant of {n}); "
            f"{confidence:.0%} CI of the accuracy change {interval_points}"
        )
        warning = power_warning(
            n,
            difference,
            base_rate=float(ref.mean()),
            discordant_rate=(b + c) / n,
            alpha=alpha,
        )
    return PairedComparison(
        ref_name=ref_name,
        other_name=other_name,
        n=n,
        ref_accuracy=float(ref.mean()),
        other_accuracy=float(other.mean()),
        difference=difference,
        stderr=stderr,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
        b=b,
        c=c,
        both_correct=int(np.count_nonzero(ref_right & other_right)),
        both_wrong=int(np.count_nonzero(~ref_right & ~other_right)),
        p_value=p_value,
        alpha=alpha,
        significant=significant,
        verdict=verdict,
        power_warning=warning,
    )


def paired_loglik_comparison(
    ref_ll: Any,
    other_ll: Any,
    *,
    ref_name: str = "reference",
    other_name: str = "other",
    alpha: float = 0.05,
) -> PairedLoglikComparison:
    """Compare per-example log-likelihoods of two runs on the same examples.

    mean_difference = mean(other_ll - ref_ll) with stderr (n - 1) and a normal interval at
    1 - alpha; p-value from the two-sided Wilcoxon signed-rank test on the differences (scipy,
    zero differences dropped; p = 1 when all differences are zero).
    """
    ref = _as_loglik_array(ref_ll, "ref_ll")
    other = _as_loglik_array(other_ll, "other_ll")
    _check_same_length(ref, other, "ref_ll and other_ll")
    alpha = _check_probability(alpha, "alpha", open_interval=True)
    confidence = 1.0 - alpha

    differences = other - ref
    mean_difference = float(differences.mean())
    stderr = _mean_stderr(differences)
    half_width = _two_sided_z(confidence) * stderr
    if np.all(differences == 0.0):
        p_value = 1.0
    else:
        p_value = float(scipy_stats.wilcoxon(differences, alternative="two-sided").pvalue)
    significant = p_value < alpha
    perplexity_ratio = math.exp(-mean_difference)

    change_text = (
        f"mean change {mean_difference:+.4g} nats per example "
        f"({confidence:.0%} CI [{mean_difference - half_width:+.4g}, "
        f"{mean_difference + half_width:+.4g}]), perplexity x{perplexity_ratio:.4f}"
    )
    if significant:
        direction = "higher" if mean_difference > 0 else "lower"
        verdict = (
            f"{other_name} has {direction} log-likelihood than {ref_name} "
            f"(Wilcoxon p={_format_p(p_value)}): {change_text}"
        )
    else:
        verdict = (
            f"no detectable log-likelihood difference between {other_name} and {ref_name} "
            f"(Wilcoxon p={_format_p(p_value)}): {change_text}"
        )
    return PairedLoglikComparison(
        ref_name=ref_name,
        other_name=other_name,
        n=int(ref.size),
        ref_mean_loglik=float(ref.mean()),
        other_mean_loglik=float(other.mean()),
        mean_difference=mean_difference,
        stderr=stderr,
        ci_low=mean_difference - half_width,
        ci_high=mean_difference + half_width,
        confidence=confidence,
        perplexity_ratio=perplexity_ratio,
        n_other_higher=int(np.count_nonzero(differences > 0)),
        n_ref_higher=int(np.count_nonzero(differences < 0)),
        n_tied=int(np.count_nonzero(differences == 0)),
        p_value=p_value,
        alpha=alpha,
        significant=significant,
        verdict=verdict,
    )
