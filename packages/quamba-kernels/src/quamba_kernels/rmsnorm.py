"""Residual add + RMSNorm with INT8 (or float) output, deterministic.

Reference: ``quamba_layers.reference_ops.rmsnorm``. Same float32 operations in the same order
(``r = x + residual``; ``ms = float32(sum_f64(r^2) / D)``; ``inv = 1 / sqrt(ms + eps)``;
``y = (r * inv) * weight``; ``Q8(y, out_scale)``). The float64 sum of squares runs in a fixed order
that depends only on D (no autotuning), so repeated calls give identical bits; it may differ from
the reference's float64 sum in the last float64 bit, which reaches the float32 mean square only
when that lies within ~1e-13 (relative) of a float32 rounding boundary.
"""

from __future__ import annotations

import math
import numbers

from quamba_kernels._loader import require
from quamba_kernels._torch import (
    check_cuda,
    check_optional,
    check_tensor,
    current_stream,
    dtype_name,
    float32_value,
    output_spec,
    rounding_code,
)

__all__ = ["rmsnorm"]

MAX_DIM = 16384


def rmsnorm(
    x,
    residual,
    weight,
    eps: float,
    out_scale=None,
    rounding: str = "half_even",
    *,
    out_dtype=None,
    out=None,
    residual_out=None,
):
    """Residual add + RMSNorm over the last axis (D <= 16384) on the GPU; returns ``(y, r)``.

    ``x`` (..., D) float16/bfloat16/float32; ``residual`` float32 of x's shape or None;
    ``weight`` (D,) of x's dtype or float32, or None (ones). ``y`` is int8 ``Q8(y, out_scale,
    rounding)`` when ``out_scale`` is given, else float (``out_dtype``: float32 by default, or
    float16/bfloat16). ``r = x.float() + residual`` (float32) is the new residual stream.
    ``out`` / ``residual_out`` may be passed preallocated.
    """
    import torch

    floats = (torch.float16, torch.bfloat16, torch.float32)
    check_tensor("x", x, floats)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis (D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d > MAX_DIM:
        raise ValueError(f"D = x.shape[-1] = {d} is larger than the kernel's limit {MAX_DIM}")
    check_optional("residual", residual, torch.float32)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    check_optional("weight", weight, floats, ndim=1)
    if weight is not None:
        if weight.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"weight must have x's dtype ({dtype_name(x.dtype)}) or float32, "
                f"got {dtype_name(weight.dtype)}"
            )
        if weight.shape[0] != d:
            raise ValueError(f"weight must have shape (D,) = ({d},), got {tuple(weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    code = rounding_code(rounding)
    out_scale, out_dtype = output_spec(x, out_scale, out_dtype, out)
    if residual_out is not None:
        check_tensor("residual_out", residual_out, torch.float32)
        if residual_out.shape != x.shape:
            raise ValueError(
                f"residual_out must have x's shape {tuple(x.shape)}, got {tuple(residual_out.shape)}"
            )

    module = require()
    check_cuda(x=x, residual=residual, weight=weight, out=out, residual_out=residual_out)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    module.rmsnorm(
        x, residual, weight, out, residual_out, float32_value(float(eps)),
        out_scale if out_scale is not None else 1.0, code, current_stream(x.device),
    )  # fmt: skip
    return out, residual_out
