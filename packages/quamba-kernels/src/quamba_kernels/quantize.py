"""Per-tensor symmetric INT8 quantization (the small kernel that shows the binding pattern).

Reference: ``quamba_layers.reference_ops.quantize_int8``.
"""

from __future__ import annotations

from quamba_kernels._loader import require
from quamba_kernels._torch import (
    check_cuda,
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
