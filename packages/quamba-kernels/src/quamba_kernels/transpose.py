"""Int8 transpose of the last two axes (the token-major copy of a sequence-last activation).

Reference: ``x.transpose(-1, -2).contiguous()`` (a pure data movement: the result is exact).
"""

from __future__ import annotations

from quamba_kernels._loader import require
from quamba_kernels._torch import check_cuda, check_shape, check_tensor, current_stream


def transpose_int8(x, out=None):
    """``x.transpose(-1, -2).contiguous()`` for a contiguous int8 CUDA tensor of >= 2 dims.

    One pass through 64 x 64 shared-memory tiles with 16-byte loads and stores, instead of the
    byte-wise strided copy that ``.contiguous()`` of a transposed int8 view runs. ``out``: an
    optional contiguous int8 tensor of the transposed shape.
    """
    import torch

    check_tensor("x", x, torch.int8)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions, got shape {tuple(x.shape)}")
    *lead, rows, cols = x.shape
    shape = (*lead, cols, rows)
    if out is not None:
        check_tensor("out", out, torch.int8)
        check_shape("out", out, shape, "x.shape with the last two axes swapped")
    module = require()
    check_cuda(x=x, out=out)
    if out is None:
        out = torch.empty(shape, dtype=torch.int8, device=x.device)
    batch = x.numel() // (rows * cols) if rows * cols else 0
    if batch == 0:
        return out
    module.transpose_int8(
        x.view(batch, rows, cols), out.view(batch, cols, rows), current_stream(x.device)
    )
    return out
