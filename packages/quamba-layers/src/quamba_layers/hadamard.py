"""Hadamard matrices of size n = m·2^k (m in {1, 12, 20}) and the reference fast transform.

Conventions (the quantization pipeline and the CUDA kernel rely on them):

- ``hadamard_matrix(n)`` is the unnormalised ±1 matrix ``kron(H_m, H_{2^k})`` with ``H_{2^k}`` the
  Sylvester matrix in natural order (``H_{2p} = [[H_p, H_p], [H_p, -H_p]]``) and ``H_12``/``H_20``
  from Paley's construction I (q = 11 and q = 19). ``H @ H.T == n * I``.
- The transform of a vector ``x`` (last axis) is ``H @ x``, i.e. ``x @ H.T`` for row vectors:
  ``hadamard_transform_ref(x, scale) ≈ scale * (x @ hadamard_matrix(n).T)``, with the float32
  evaluation order fixed below.
"""

from __future__ import annotations

import math
import numbers

import torch

# Base sizes m of the accepted forms n = m·2^k. 20·2^k with k >= 1 covers 40·2^(k-1).
HADAMARD_BASE_SIZES = (1, 12, 20)
_FORMS = "2^k, 12·2^k or 20·2^k (k >= 0; e.g. 64, 768, 1536, 2048, 2560, 4096, 5120)"


def _check_size(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"hadamard size must be an int, got {type(n).__name__}")
    return int(n)


def _is_power_of_two(p: int) -> bool:
    return p >= 1 and (p & (p - 1)) == 0


def supported_hadamard_size(n) -> bool:
    """True when ``n`` is 2^k, 12·2^k or 20·2^k (k >= 0)."""
    n = _check_size(n)
    return any(n % m == 0 and _is_power_of_two(n // m) for m in HADAMARD_BASE_SIZES)


def hadamard_factors(n) -> tuple[int, int]:
    """Split ``n`` into ``(m, 2^k)`` with m in {1, 12, 20}; ValueError for any other size."""
    n = _check_size(n)
    for m in HADAMARD_BASE_SIZES:
        if n >= m and n % m == 0 and _is_power_of_two(n // m):
            return m, n // m
    raise ValueError(f"unsupported Hadamard size {n}: the size must be {_FORMS}")


def _quadratic_character(q: int) -> list[int]:
    """chi(a) for a in 0..q-1: 0 for a = 0, +1 for a nonzero square mod q, -1 otherwise."""
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _paley_matrix(q: int) -> torch.Tensor:
    """Paley construction I for a prime q ≡ 3 (mod 4): a ±1 Hadamard matrix of order q + 1.

    With the Jacobsthal matrix Q[i, j] = chi(j - i) (skew-symmetric because q ≡ 3 mod 4) and the
    skew matrix S = [[0, 1^T], [-1, Q]], H = I + S satisfies H H^T = I - S^2 = (q + 1) I.
    """
    chi = _quadratic_character(q)
    jacobsthal = torch.tensor(
        [[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64
    )
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:] = 1.0
    skew[1:, 0] = -1.0
    skew[1:, 1:] = jacobsthal
    return torch.eye(q + 1, dtype=torch.float64) + skew


def _base_matrix(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    # Paley I with q = m - 1: q = 11 and q = 19 are primes ≡ 3 (mod 4).
    return _paley_matrix(m - 1)


def _sylvester_matrix(p: int) -> torch.Tensor:
    """Sylvester ±1 matrix of order p = 2^k in natural order: H_2p = [[H_p, H_p], [H_p, -H_p]]."""
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


def hadamard_matrix(n, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalised ±1 Hadamard matrix of order n = m·2^k: ``kron(H_m, H_{2^k})``.

    ``H_m`` is 1 (m = 1) or Paley's construction I (m = 12, 20); ``H_{2^k}`` is Sylvester's in
    natural order. The Kronecker order matches ``hadamard_transform_ref``, which views the last
    axis as (m, 2^k) row-major. ``H @ H.T == n * I``. Returned on the CPU in ``dtype``.
    """
    m, p = hadamard_factors(n)
    return torch.kron(_base_matrix(m), _sylvester_matrix(p)).to(dtype)


def hadamard_transform_ref(x: torch.Tensor, scale) -> torch.Tensor:
    """Reference fast Hadamard transform of the last axis, float32 in and out.

    Semantics (fixed float32 order, every operation rounded separately):

    1. ``x`` is converted to float32 (float16/bfloat16 exactly), the last axis (size n = m·2^k)
       viewed as (m, 2^k) row-major;
    2. butterfly stages over the 2^k axis with increasing stride h = 1, 2, 4, ..., 2^(k-1):
       each pair (a, b) = (x[i], x[i + h]) in a block of 2h becomes (a + b, a - b);
    3. (m > 1) the ±1 matrix ``H_m`` is applied along the m axis with a sequential sum over its
       columns: ``out_i = ((H[i,0]·x_0 + H[i,1]·x_1) + H[i,2]·x_2) + ...`` (the products by ±1
       are exact);
    4. the result is multiplied by ``float32(scale)`` (usually 1/sqrt(n)).

    Equals ``scale * (x @ hadamard_matrix(n).T)`` up to float32 rounding. Works on any device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transformed last axis)")
    scale = _check_transform_scale(scale)
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    batch_shape = x.shape[:-1]
    v = x.float().reshape(*batch_shape, m, p)

    stride = 1
    while stride < p:
        blocks = v.reshape(*batch_shape, m, p // (2 * stride), 2, stride)
        a = blocks[..., 0, :]
        b = blocks[..., 1, :]
        v = torch.stack((a + b, a - b), dim=-2).reshape(*batch_shape, m, p)
        stride *= 2

    if m > 1:
        h_m = _base_matrix(m).to(dtype=torch.float32, device=v.device)
        # acc[..., i, :] accumulates H[i, j] * v[..., j, :] for j = 0, 1, ... in order.
        acc = h_m[:, 0, None] * v[..., 0:1, :]
        for j in range(1, m):
            acc = acc + h_m[:, j, None] * v[..., j : j + 1, :]
        v = acc

    scale_t = torch.tensor(scale, dtype=torch.float32, device=v.device)
    return (v * scale_t).reshape(*batch_shape, n)


def _check_transform_scale(scale) -> float:
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a finite float > 0, got {type(scale).__name__}")
    value = float(scale)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"scale must be a finite float > 0 (usually 1/sqrt(n)), got {value}")
    value32 = float(torch.tensor(value, dtype=torch.float32))
    if not (math.isfinite(value32) and value32 > 0.0):
        raise ValueError(f"scale={value} is not representable as a positive finite float32")
    return value32
