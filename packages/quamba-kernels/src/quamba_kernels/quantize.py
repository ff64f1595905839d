"""Symmetric INT8 quantization: per tensor (the small kernel that shows the binding pattern) and
per sequence with a dynamic scale (mode 3's conv input).

References: ``quamba_layers.reference_ops.quantize_int8``; ``quamba_layers.quant.modules.
dynamic_scale_per_sequence`` and ``quantize_per_sequence``.
"""

from __future__ import annotations

from quamba_kernels._loader import require
from quamba_kernels._torch import (
    check_cuda,
    check_optional,
    check_shape,
    check_tensor,
    current_stream,
    rounding_code,
    scale32,
)


def quantize_int8(x, scale: float, rounding: str = "half_away", out=None):
    """clamp(round(x / scale), -128, 127) as int8, on the GPU.

    x: contiguous float32 CUDA tensor. out: optional contiguous int8 tensor of the same shape.
    """
    import torch

    check_tensor("x", x, torch.float32)
    scale = scale32("scale", scale)
    code = rounding_code(rounding)
    if out is not None:
        check_tensor("out", out, torch.int8)
        check_shape("out", out, tuple(x.shape), "x.shape")
    module = require()
    check_cuda(x=x, out=out)
    if out is None:
        out = torch.empty_like(x, dtype=torch.int8)
    module.quantize_int8(x, out, scale, code, current_stream(x.device))
    return out


def quantize_int8_per_sequence(x, seq_lens=None, rounding: str = "half_away"):
    """Per-sequence dynamic INT8 of x (B, E, L) float32: ``(codes int8 (B, E, L), scales (B,))``.

    ``scales[b] = max |x[b, :, t]| / 127`` over the real positions ``t < seq_lens[b]`` (all of
    them without ``seq_lens``; IEEE division), 1 where that maximum is 0; ``codes = Q8(x /
    scales[b], rounding)`` at every position, padding included. Bit-identical to
    ``quantize_per_sequence(x, dynamic_scale_per_sequence(x, seq_lens), rounding)`` for inputs
    without NaN (the maximum skips NaN; the callers check for it).
    """
    import torch

    check_tensor("x", x, torch.float32, ndim=3)
    check_optional("seq_lens", seq_lens, torch.int64, ndim=1)
    check_shape("seq_lens", seq_lens, (x.shape[0],), "(B,)")
    code = rounding_code(rounding)
    module = require()
    check_cuda(x=x, seq_lens=seq_lens)
    codes = torch.empty_like(x, dtype=torch.int8)
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    peak_bits = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    module.quantize_int8_per_sequence(
        x, codes, scales, peak_bits, seq_lens, code, current_stream(x.device)
    )
    return codes, scales
