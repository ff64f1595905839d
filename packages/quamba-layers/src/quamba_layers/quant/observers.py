"""Calibration observers: per-tensor symmetric scales from activation statistics.

Semantics follow upstream Quamba (seed-system.md §4.2):
- min-max: ``m = max over batches of max|x|`` (each batch max clamped to >= 1e-5), ``s = m / 127``;
- percentile: per batch ``c = quantile(|x|, alpha)`` (linear interpolation), running value
  ``m_1 = c_1``, ``m_k = m_{k-1} + momentum * (c_k - m_{k-1})`` (an EMA, not a max), ``s = m / 127``.
Scales are clamped to >= 1e-6 and rounded to float32, the precision every consumer uses.
"""

from __future__ import annotations

import math

import torch

MIN_BATCH_MAX = 1e-5
MIN_SCALE = 1e-6


def as_float32(value: float) -> float:
    """The float32 value nearest to ``value``, as a Python float (exactly representable)."""
    return float(torch.tensor(value, dtype=torch.float32))


def quantile_linear(values: torch.Tensor, q: float) -> float:
    """Quantile with linear interpolation (torch.quantile's default) without its size limit."""
    flat = values.reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot take a quantile of an empty tensor")
    position = q * (n - 1)
    lo = math.floor(position)
    hi = min(lo + 1, n - 1)
    lo_value = torch.kthvalue(flat, lo + 1).values.item()
    if hi == lo:
        return lo_value
    hi_value = torch.kthvalue(flat, hi + 1).values.item()
    return lo_value + (position - lo) * (hi_value - lo_value)


class MinMaxObserver:
    """Per-tensor symmetric min-max observer."""

    kind = "minmax"

    def __init__(self) -> None:
        self.max_abs: float | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        batch_max = max(x.detach().abs().max().item(), MIN_BATCH_MAX)
        self.max_abs = batch_max if self.max_abs is None else max(self.max_abs, batch_max)
        self.batches += 1

    def scale(self) -> float:
        if self.max_abs is None:
            raise RuntimeError("observer saw no data: run calibration before asking for a scale")
        return as_float32(max(self.max_abs / 127.0, MIN_SCALE))

    def describe(self) -> dict:
        return {"observer": self.kind, "batches": self.batches, "max_abs": self.max_abs}


class PercentileObserver:
    """Per-tensor symmetric observer on the EMA of per-batch |x| percentiles."""

    kind = "percentile"

    def __init__(self, alpha: float = 0.9995, momentum: float = 0.01) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"percentile alpha must be in (0, 1], got {alpha}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in (0, 1], got {momentum}")
        self.alpha = alpha
        self.momentum = momentum
        self.running: float | None = None
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        current = quantile_linear(x.detach().abs(), self.alpha)
        if self.running is None:
            self.running = current
        else:
            self.running = self.running + self.momentum * (current - self.running)
        self.batches += 1

    def scale(self) -> float:
        if self.running is None:
            raise RuntimeError("observer saw no data: run calibration before asking for a scale")
        return as_float32(max(self.running / 127.0, MIN_SCALE))

    def describe(self) -> dict:
        return {
            "observer": self.kind,
            "alpha": self.alpha,
            "momentum": self.momentum,
            "batches": self.batches,
            "ema": self.running,
        }
