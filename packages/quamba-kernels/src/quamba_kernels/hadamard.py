"""Fast Hadamard transform of the last axis with INT8 (or float) output.

Reference: ``quamba_layers.reference_ops.hadamard`` (``quamba_layers.hadamard.
hadamard_transform_ref``), bit-identical: n = m·2^k with m in {1, 12, 20} and n <= 8192; the axis
is viewed as (m, 2^k) row-major; butterflies (a + b, a - b) over the 2^k axis with increasing
stride; the m×m ±1 matrix with a sequential sum over its columns; times float32(scale); then
``Q8(., out_scale, rounding)`` or a float output.

The m×m matrices are Paley's construction I (q = 11, 19), generated here the same way as
``quamba_layers.hadamard.hadamard_matrix(m)`` (a test checks they are equal); this package does
not import quamba_layers (layers depend on kernels, not the reverse).
"""

from __future__ import annotations

from quamba_kernels._loader import require
from quamba_kernels._torch import (
    check_cuda,
    check_tensor,
    current_stream,
    output_spec,
    rounding_code,
    scale32,
)

__all__ = ["base_matrix", "hadamard", "hadamard_factors"]

MAX_SIZE = 8192
BASE_SIZES = (1, 12, 20)

_device_matrices: dict = {}


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m·2^k, m in {1, 12, 20}; ValueError for any other size or n > 8192."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"hadamard size must be an int, got {type(n).__name__}")
    if 1 <= n <= MAX_SIZE:
        for m in BASE_SIZES:
            p = n // m
            if n % m == 0 and p >= 1 and p & (p - 1) == 0:
                return m, p
    raise ValueError(
        f"unsupported Hadamard size {n}: the kernel takes 2^k, 12·2^k or 20·2^k up to {MAX_SIZE}"
    )


def base_matrix(m: int) -> list[list[int]]:
    """The m×m ±1 matrix (m in {1, 12, 20}): 1, or Paley I with q = m - 1 (H = I + S)."""
    if m == 1:
        return [[1]]
    if m not in BASE_SIZES:
        raise ValueError(f"m must be one of {BASE_SIZES}, got {m}")
    q = m - 1
    squares = {(a * a) % q for a in range(1, q)}

    def chi(a: int) -> int:
        a %= q
        return 0 if a == 0 else (1 if a in squares else -1)

    # S = [[0, 1^T], [-1, Q]] with the Jacobsthal matrix Q[i, j] = chi(j - i); H = I + S.
    h = [[0] * m for _ in range(m)]
    for j in range(1, m):
        h[0][j] = 1
        h[j][0] = -1
    for i in range(q):
        for j in range(q):
            h[i + 1][j + 1] = chi(j - i)
    for i in range(m):
        h[i][i] += 1
    return h


def _matrix_on(m: int, device):
    """The float32 m×m matrix on ``device``, built once per (m, device)."""
    import torch

    key = (m, str(device))
    matrix = _device_matrices.get(key)
    if matrix is None:
        matrix = torch.tensor(base_matrix(m), dtype=torch.float32, device=device)
        _device_matrices[key] = matrix
    return matrix


def hadamard(x, scale, out_scale=None, rounding: str = "half_away", *, out_dtype=None, out=None):
    """Hadamard transform of the last axis of ``x`` (..., n) on the GPU.

    ``x`` float16/bfloat16/float32; ``scale`` (usually 1/sqrt(n)) and ``out_scale`` are floats.
    Returns int8 ``Q8(., out_scale, rounding)`` when ``out_scale`` is given, else a float tensor
    (``out_dtype`` float32 by default, or float16/bfloat16).
    """
    import torch

    floats = (torch.float16, torch.bfloat16, torch.float32)
    check_tensor("x", x, floats)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transformed last axis)")
    m, p = hadamard_factors(int(x.shape[-1]))
    scale = scale32("scale", scale)
    code = rounding_code(rounding)
    out_scale, out_dtype = output_spec(x, out_scale, out_dtype, out)

    module = require()
    check_cuda(x=x, out=out)
    # For 2^k >= 8 the kernel moves 8 elements at a time: rows must start 8-element aligned.
    if p >= 8 and x.data_ptr() % (8 * x.element_size()) != 0:
        x = x.clone()  # a view that starts mid-row
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif p >= 8 and out.data_ptr() % (8 * out.element_size()) != 0:
        raise ValueError("out must start at an address aligned to 8 elements (allocate it fresh)")
    h_m = _matrix_on(m, x.device) if m > 1 else None
    module.hadamard(
        x, out, h_m, m, scale, out_scale if out_scale is not None else 1.0, code,
        current_stream(x.device),
    )  # fmt: skip
    return out
