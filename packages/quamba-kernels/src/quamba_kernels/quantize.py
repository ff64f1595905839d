"""Per-tensor symmetric INT8 quantization (the small kernel that shows the binding pattern).

Reference: ``quamba_layers.reference_ops.quantize_int8``.
"""

from __future__ import annotations

from quamba_kernels._loader import require
from quamba_kernels._torch import check_scale, check_tensor, current_stream, rounding_code


def quantize_int8(x, scale: float, rounding: str = "half_away", out=None):
    """clamp(round(x / scale), -128, 127) as int8, on the GPU.

    x: contiguous float32 CUDA tensor. out: optional contiguous int8 tensor of the same shape.
    """
    import torch

    module = require()
    check_tensor("x", x, torch.float32)
    scale = check_scale("scale", scale)
    code = rounding_code(rounding)
    if out is None:
        out = torch.empty_like(x, dtype=torch.int8)
    check_tensor("out", out, torch.int8)
    if out.shape != x.shape:
        raise ValueError(f"out must have shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if out.device != x.device:
        raise ValueError(f"out must be on {x.device}, got {out.device}")
    module.quantize_int8(x, out, scale, code, current_stream(x.device))
    return out
