"""Streaming error statistics of a tensor against its reference, and the seed notes' ratings.

`StreamingErrorStats` replaces the seed fork's save-everything-then-compare tools (spec
seed-system.md §6.4, which broke on file names and memory): each batch of (reference, other)
tensors is folded into constant-size float64 accumulators and then dropped, so a whole
evaluation set can be compared layer by layer. Accumulators from different processes or shards
combine with `merge`, and round-trip through JSON with `to_dict` / `from_dict`.

With d = other - ref (elementwise, in float64):
- mse = mean(d^2), rmse, mae = mean|d|, relative_mse = mse / mean(ref^2),
  relative_mae = mae / mean|ref| (fractions, not percent), max_abs_diff, mean_diff, std_diff;
- pearson: correlation of ref and other over all elements, from co-moments updated with the
  pairwise (Chan et al.) formulas, which stay accurate when the means are large;
- sqnr_db = 10 log10(sum ref^2 / sum d^2), +inf when the tensors are identical;
- abs_diff_percentiles of |d| at 50/90/95/99/99.9 from a fixed log-spaced histogram (below).

Percentile histogram: |d| == 0 is counted exactly; nonzero |d| falls into 64 bins per decade
from 1e-12 to 1e6 (1152 bins; each bin spans a factor 10^(1/64) ~ 1.037), plus an underflow
bin (0, 1e-12) and an overflow bin [1e6, inf). A percentile is read as the geometric centre of
the bin holding the ranked element (so within a factor ~1.018 of the exact value, i.e. within
one bin), interpolated between neighbouring ranks like numpy's default "linear" method, and
clipped to max_abs_diff. Underflow values read as 1e-12, overflow values as max_abs_diff.

Elements where ref or other is NaN/inf are not folded into any statistic; they are counted in
`nonfinite_count` (and `rate` then reports an overall "poor").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "ABS_DIFF_PERCENTILES",
    "RATINGS",
    "RATING_THRESHOLDS",
    "StreamingErrorStats",
    "rate",
]

# |d| histogram layout (see the module docstring).
HISTOGRAM_MIN_EXPONENT = -12
HISTOGRAM_MAX_EXPONENT = 6
HISTOGRAM_BINS_PER_DECADE = 64
_LOG_BIN_COUNT = (HISTOGRAM_MAX_EXPONENT - HISTOGRAM_MIN_EXPONENT) * HISTOGRAM_BINS_PER_DECADE
# Stored counts: [underflow, log bins..., overflow]; exact zeros are counted separately.
_HISTOGRAM_LENGTH = _LOG_BIN_COUNT + 2

ABS_DIFF_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)

_SERIAL_VERSION = 1

# Ratings of the seed notes' layer-comparison table, best to worst.
RATINGS = ("excellent", "good", "fair", "mediocre", "poor")
# Thresholds from seed 004 (the fork's QUICK_REFERENCE.md metric table) and spec
# seed-system.md §6.4. Per metric: (direction, ((bound, rating), ...) best first, fallback).
# "lower": rating applies when value < bound; "higher": when value > bound. MSE has no
# "mediocre" band in the notes; correlation 0.95-0.99 is named "mediocre" here (the notes skip it).
RATING_THRESHOLDS: dict[str, tuple[str, tuple[tuple[float, str], ...], str]] = {
    "mse": ("lower", ((1e-4, "excellent"), (1e-3, "good"), (1e-2, "fair")), "poor"),
    "pearson": (
        "higher",
        ((0.9999, "excellent"), (0.999, "good"), (0.99, "fair"), (0.95, "mediocre")),
        "poor",
    ),
    # relative MAE as a fraction: 0.1 %, 1 %, 5 %, 10 %.
    "relative_mae": (
        "lower",
        ((0.001, "excellent"), (0.01, "good"), (0.05, "fair"), (0.10, "mediocre")),
        "poor",
    ),
}
UNDEFINED_RATING = "undefined"


def _percentile_key(percentile: float) -> str:
    return f"p{percentile:g}"


def _safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator with 0/0 = 0 and x/0 = inf (for x > 0)."""
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


class StreamingErrorStats:
    """Constant-memory comparison of `other` against `ref`, accumulated batch by batch.

    Usage: `stats = StreamingErrorStats(); stats.update(ref, other)` for every batch (tensors of
    any matching shape, any real dtype, any device; cast to float64), then `stats.result()`.
    """

    def __init__(self) -> None:
        self.count = 0
        self.nonfinite_count = 0
        self.sum_diff = 0.0
        self.sum_sq_diff = 0.0
        self.sum_abs_diff = 0.0
        self.sum_sq_ref = 0.0
        self.sum_abs_ref = 0.0
        self.max_abs_diff = 0.0
        # Pearson accumulators: means and centred (co-)moments, merged pairwise.
        self.mean_ref = 0.0
        self.mean_other = 0.0
        self.m2_ref = 0.0
        self.m2_other = 0.0
        self.comoment = 0.0
        self.zero_diff_count = 0
        self.histogram = np.zeros(_HISTOGRAM_LENGTH, dtype=np.int64)

    # -- accumulation ------------------------------------------------------------------------

    @staticmethod
    def _as_float64_tensor(value: Any, name: str) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (or numpy array), got {type(value)}")
        if value.is_complex():
            raise TypeError(f"{name} must be real-valued, got dtype {value.dtype}")
        return value.detach().to(torch.float64)

    def update(self, ref: torch.Tensor, other: torch.Tensor) -> StreamingErrorStats:
        """Fold one batch (`ref` and `other` of identical shape) into the statistics."""
        ref64 = self._as_float64_tensor(ref, "ref")
        other64 = self._as_float64_tensor(other, "other")
        if ref64.shape != other64.shape:
            raise ValueError(
                f"ref and other must have the same shape, got {tuple(ref64.shape)} and "
                f"{tuple(other64.shape)}"
            )
        if ref64.device != other64.device:
            other64 = other64.to(ref64.device)
        ref64 = ref64.reshape(-1)
        other64 = other64.reshape(-1)
        finite = torch.isfinite(ref64) & torch.isfinite(other64)
        finite_count = int(finite.sum())
        self.nonfinite_count += int(ref64.numel()) - finite_count
        if finite_count != ref64.numel():
            ref64 = ref64[finite]
            other64 = other64[finite]
        if finite_count == 0:
            return self

        batch = StreamingErrorStats()
        diff = other64 - ref64
        abs_diff = diff.abs()
        batch.count = finite_count
        batch.sum_diff = float(diff.sum())
        batch.sum_sq_diff = float((diff * diff).sum())
        batch.sum_abs_diff = float(abs_diff.sum())
        batch.sum_sq_ref = float((ref64 * ref64).sum())
        batch.sum_abs_ref = float(ref64.abs().sum())
        batch.max_abs_diff = float(abs_diff.max())
        batch.mean_ref = float(ref64.mean())
        batch.mean_other = float(other64.mean())
        centred_ref = ref64 - batch.mean_ref
        centred_other = other64 - batch.mean_other
        batch.m2_ref = float((centred_ref * centred_ref).sum())
        batch.m2_other = float((centred_other * centred_other).sum())
        batch.comoment = float((centred_ref * centred_other).sum())
        batch.zero_diff_count, batch.histogram = self._histogram_of(abs_diff)
        self._merge_moments(batch)
        return self

    @staticmethod
    def _histogram_of(abs_diff: torch.Tensor) -> tuple[int, np.ndarray]:
        nonzero = abs_diff[abs_diff > 0]
        zero_count = int(abs_diff.numel() - nonzero.numel())
        if nonzero.numel() == 0:
            return zero_count, np.zeros(_HISTOGRAM_LENGTH, dtype=np.int64)
        position = (torch.log10(nonzero) - HISTOGRAM_MIN_EXPONENT) * HISTOGRAM_BINS_PER_DECADE
        # +1: slot 0 is the underflow bin; positions beyond the last log bin go to overflow.
        slots = torch.floor(position).clamp(-1, _LOG_BIN_COUNT).to(torch.int64) + 1
        counts = torch.bincount(slots, minlength=_HISTOGRAM_LENGTH)
        return zero_count, counts.cpu().numpy().astype(np.int64)

    def _merge_moments(self, other: StreamingErrorStats) -> None:
        """Add `other`'s accumulators into self (pairwise update of means and co-moments)."""
        if other.count > 0 and self.count == 0:
            # Take the other's moments as they are (the pairwise formula would round them).
            for name in self._FLOAT_FIELDS:
                setattr(self, name, getattr(other, name))
            self.count = other.count
            self.zero_diff_count = other.zero_diff_count
            self.histogram = other.histogram.copy()
        elif other.count > 0:
            total = self.count + other.count
            delta_ref = other.mean_ref - self.mean_ref
            delta_other = other.mean_other - self.mean_other
            weight = self.count * other.count / total
            self.mean_ref += delta_ref * other.count / total
            self.mean_other += delta_other * other.count / total
            self.m2_ref += other.m2_ref + delta_ref * delta_ref * weight
            self.m2_other += other.m2_other + delta_other * delta_other * weight
            self.comoment += other.comoment + delta_ref * delta_other * weight
            self.count = total
            self.sum_diff += other.sum_diff
            self.sum_sq_diff += other.sum_sq_diff
            self.sum_abs_diff += other.sum_abs_diff
            self.sum_sq_ref += other.sum_sq_ref
            self.sum_abs_ref += other.sum_abs_ref
            self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
            self.zero_diff_count += other.zero_diff_count
            self.histogram += other.histogram
        self.nonfinite_count += other.nonfinite_count

    def merge(self, other: StreamingErrorStats) -> StreamingErrorStats:
        """Add the statistics of `other` (e.g. another shard) into self; returns self."""
        if not isinstance(other, StreamingErrorStats):
            raise TypeError(f"can only merge a StreamingErrorStats, got {type(other).__name__}")
        self._merge_moments(other)
        return self

    # -- results -------------------------------------------------------------------------------

    def _abs_diff_percentile(self, percentile: float) -> float:
        """|d| percentile from the histogram (numpy 'linear' ranks, bin centres)."""
        rank = percentile / 100.0 * (self.count - 1)
        lower_rank = math.floor(rank)
        upper_rank = min(lower_rank + 1, self.count - 1)
        fraction = rank - lower_rank
        lower_value = self._value_at_rank(lower_rank)
        upper_value = self._value_at_rank(upper_rank)
        return lower_value + fraction * (upper_value - lower_value)

    def _value_at_rank(self, rank: int) -> float:
        """Estimate of the rank-th smallest |d| (0-based)."""
        if rank < self.zero_diff_count:
            return 0.0
        cumulative = np.cumsum(self.histogram)
        slot = int(np.searchsorted(cumulative, rank - self.zero_diff_count, side="right"))
        if slot == 0:
            value = 10.0**HISTOGRAM_MIN_EXPONENT
        elif slot == _HISTOGRAM_LENGTH - 1:
            value = self.max_abs_diff
        else:
            centre_exponent = HISTOGRAM_MIN_EXPONENT + (slot - 0.5) / HISTOGRAM_BINS_PER_DECADE
            value = 10.0**centre_exponent
        return min(value, self.max_abs_diff)

    def result(self) -> dict[str, Any]:
        """Metrics of everything accumulated so far (plain floats; JSON-serialisable except inf).

        Raises ValueError when nothing was accumulated. When every element was non-finite the
        metrics are NaN and count is 0.
        """
        if self.count == 0 and self.nonfinite_count == 0:
            raise ValueError("no elements accumulated: call update(ref, other) first")
        if self.count == 0:
            nan = math.nan
            return {
                "count": 0,
                "nonfinite_count": self.nonfinite_count,
                "mse": nan,
                "rmse": nan,
                "mae": nan,
                "relative_mse": nan,
                "relative_mae": nan,
                "pearson": nan,
                "sqnr_db": nan,
                "max_abs_diff": nan,
                "mean_diff": nan,
                "std_diff": nan,
                "ref_mean": nan,
                "ref_std": nan,
                "other_mean": nan,
                "other_std": nan,
                "fraction_identical": nan,
                "abs_diff_percentiles": {_percentile_key(q): nan for q in ABS_DIFF_PERCENTILES},
            }
        n = self.count
        mse = self.sum_sq_diff / n
        mae = self.sum_abs_diff / n
        if self.sum_sq_diff == 0.0:
            # Identical tensors: correlation 1 by convention even when they are constant.
            pearson = 1.0
        elif self.m2_ref == 0.0 or self.m2_other == 0.0:
            pearson = math.nan
        else:
            pearson = self.comoment / (math.sqrt(self.m2_ref) * math.sqrt(self.m2_other))
            pearson = min(1.0, max(-1.0, pearson))
        if self.sum_sq_diff == 0.0:
            sqnr_db = math.inf
        elif self.sum_sq_ref == 0.0:
            sqnr_db = -math.inf
        else:
            sqnr_db = 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_diff)
        # Var(d) from the co-moments: stable when the means are large.
        diff_m2 = max(0.0, self.m2_ref + self.m2_other - 2.0 * self.comoment)
        return {
            "count": n,
            "nonfinite_count": self.nonfinite_count,
            "mse": mse,
            "rmse": math.sqrt(mse),
            "mae": mae,
            "relative_mse": _safe_ratio(mse, self.sum_sq_ref / n),
            "relative_mae": _safe_ratio(mae, self.sum_abs_ref / n),
            "pearson": pearson,
            "sqnr_db": sqnr_db,
            "max_abs_diff": self.max_abs_diff,
            "mean_diff": self.sum_diff / n,
            "std_diff": math.sqrt(diff_m2 / n),
            "ref_mean": self.mean_ref,
            "ref_std": math.sqrt(self.m2_ref / n),
            "other_mean": self.mean_other,
            "other_std": math.sqrt(self.m2_other / n),
            "fraction_identical": self.zero_diff_count / n,
            "abs_diff_percentiles": {
                _percentile_key(q): self._abs_diff_percentile(q) for q in ABS_DIFF_PERCENTILES
            },
        }

    # -- serialisation -------------------------------------------------------------------------

    _FLOAT_FIELDS = (
        "sum_diff",
        "sum_sq_diff",
        "sum_abs_diff",
        "sum_sq_ref",
        "sum_abs_ref",
        "max_abs_diff",
        "mean_ref",
        "mean_other",
        "m2_ref",
        "m2_other",
        "comoment",
    )
    _INT_FIELDS = ("count", "nonfinite_count", "zero_diff_count")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (histogram stored sparsely as [slot, count] pairs)."""
        state: dict[str, Any] = {"version": _SERIAL_VERSION}
        for name in self._INT_FIELDS:
            state[name] = int(getattr(self, name))
        for name in self._FLOAT_FIELDS:
            state[name] = float(getattr(self, name))
        state["histogram"] = {
            "min_exponent": HISTOGRAM_MIN_EXPONENT,
            "max_exponent": HISTOGRAM_MAX_EXPONENT,
            "bins_per_decade": HISTOGRAM_BINS_PER_DECADE,
            "nonzero_slots": [
                [int(slot), int(self.histogram[slot])] for slot in np.flatnonzero(self.histogram)
            ],
        }
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> StreamingErrorStats:
        """Rebuild from `to_dict` output; rejects other versions or histogram layouts."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from to_dict(), got {type(state).__name__}")
        if state.get("version") != _SERIAL_VERSION:
            raise ValueError(
                f"unsupported StreamingErrorStats state version {state.get('version')!r} "
                f"(expected {_SERIAL_VERSION})"
            )
        missing = [
            name
            for name in (*cls._INT_FIELDS, *cls._FLOAT_FIELDS, "histogram")
            if name not in state
        ]
        if missing:
            raise ValueError(f"StreamingErrorStats state is missing keys: {missing}")
        layout = state["histogram"]
        expected_layout = (
            HISTOGRAM_MIN_EXPONENT,
            HISTOGRAM_MAX_EXPONENT,
            HISTOGRAM_BINS_PER_DECADE,
        )
        found_layout = (
            layout.get("min_exponent"),
            layout.get("max_exponent"),
            layout.get("bins_per_decade"),
        )
        if found_layout != expected_layout:
            raise ValueError(
                f"histogram layout (min_exponent, max_exponent, bins_per_decade) {found_layout} "
                f"does not match this version's {expected_layout}"
            )
        stats = cls()
        for name in cls._INT_FIELDS:
            setattr(stats, name, int(state[name]))
        for name in cls._FLOAT_FIELDS:
            setattr(stats, name, float(state[name]))
        for slot, count in layout["nonzero_slots"]:
            if not 0 <= int(slot) < _HISTOGRAM_LENGTH:
                raise ValueError(f"histogram slot {slot} out of range 0..{_HISTOGRAM_LENGTH - 1}")
            stats.histogram[int(slot)] = int(count)
        if int(stats.histogram.sum()) + stats.zero_diff_count != stats.count:
            raise ValueError("inconsistent state: histogram counts do not add up to count")
        return stats


def _rate_value(metric: str, value: float) -> str:
    direction, bands, fallback = RATING_THRESHOLDS[metric]
    if math.isnan(value):
        return UNDEFINED_RATING
    for bound, rating in bands:
        if (direction == "lower" and value < bound) or (direction == "higher" and value > bound):
            return rating
    return fallback


def rate(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Rate mse, pearson and relative_mae with the seed notes' thresholds (RATING_THRESHOLDS).

    `metrics` is a `StreamingErrorStats.result()` dict (or any mapping with those keys;
    relative_mae as a fraction). Returns {"mse", "pearson", "relative_mae", "overall"} with
    ratings from RATINGS; "overall" is the worst of the three. A NaN metric (e.g. correlation
    of a constant reference) rates "undefined" and is left out of the overall rating; a
    positive `nonfinite_count` makes the overall rating "poor".
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping (result() dict), got {type(metrics).__name__}")
    missing = [name for name in RATING_THRESHOLDS if name not in metrics]
    if missing:
        raise ValueError(f"metrics is missing {missing}; needed keys: {list(RATING_THRESHOLDS)}")
    ratings: dict[str, str] = {}
    for name in RATING_THRESHOLDS:
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"metrics[{name!r}] must be a number, got {type(value).__name__}")
        ratings[name] = _rate_value(name, float(value))
    defined = [rating for rating in ratings.values() if rating != UNDEFINED_RATING]
    if metrics.get("nonfinite_count", 0) > 0:
        overall = "poor"
    elif defined:
        overall = max(defined, key=RATINGS.index)
    else:
        overall = UNDEFINED_RATING
    ratings["overall"] = overall
    return ratings
