"""Hadamard matrices (orthogonality, structure) and the reference fast transform (fixed order)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quamba_layers.hadamard import (
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform_ref,
    supported_hadamard_size,
)

LISTED_SIZES = [1, 2, 4, 12, 20, 24, 40, 48, 64, 80, 256, 768, 1536, 2048, 2560, 4096, 5120]
UNSUPPORTED_SIZES = [0, -4, 3, 5, 6, 10, 28, 36, 60, 100, 1000, 4608]


@pytest.mark.parametrize("n", LISTED_SIZES)
def test_matrix_is_pm1_and_orthogonal(n):
    h = hadamard_matrix(n, dtype=torch.float32)
    assert h.shape == (n, n)
    assert h.dtype == torch.float32
    assert bool(torch.all(h.abs() == 1))
    # Integer entries below 2^24: the float32 product is exact whatever the summation order.
    # Above 2048 a full Gram matrix costs seconds on 2 cores: check 256 random rows against all
    # rows (the Kronecker test below covers the rest through the orthogonal factors).
    if n <= 2048:
        rows = torch.arange(n)
    else:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:256]
    gram = h[rows] @ h.T
    assert torch.equal(gram, n * torch.eye(n)[rows])


@pytest.mark.parametrize(
    ("n", "factors"),
    [(1, (1, 1)), (64, (1, 64)), (12, (12, 1)), (20, (20, 1)), (40, (20, 2)), (768, (12, 64)),
     (1536, (12, 128)), (2048, (1, 2048)), (2560, (20, 128)), (5120, (20, 256))],
)  # fmt: skip
def test_factors_and_kronecker_structure(n, factors):
    assert hadamard_factors(n) == factors
    assert supported_hadamard_size(n)
    m, p = factors
    expected = torch.kron(hadamard_matrix(m), hadamard_matrix(p))
    assert torch.equal(hadamard_matrix(n), expected)


@pytest.mark.parametrize("m", [12, 20])
def test_paley_matrices_are_skew_hadamard(m):
    # Paley construction I: H = I + S with S skew-symmetric, first row all ones.
    h = hadamard_matrix(m)
    assert torch.equal(h + h.T, 2 * torch.eye(m, dtype=torch.float64))
    assert bool(torch.all(h[0] == 1))
    assert bool(torch.all(h[1:, 0] == -1))


def test_sylvester_is_natural_order():
    # H_2p = [[H_p, H_p], [H_p, -H_p]]: entry (i, j) = (-1)^popcount(i & j).
    p = 32
    h = hadamard_matrix(p)
    i = torch.arange(p)[:, None]
    j = torch.arange(p)[None, :]
    parity = torch.zeros(p, p, dtype=torch.int64)
    bits = i & j
    for _ in range(5):
        parity ^= bits & 1
        bits = bits >> 1
    assert torch.equal(h, (1 - 2 * parity).double())


@pytest.mark.parametrize("n", UNSUPPORTED_SIZES)
def test_unsupported_sizes_raise_with_accepted_forms(n):
    assert not supported_hadamard_size(n)
    with pytest.raises(ValueError, match=r"2\^k, 12·2\^k or 20·2\^k"):
        hadamard_factors(n)
    with pytest.raises(ValueError, match=f"unsupported Hadamard size {n}"):
        hadamard_matrix(n)


@pytest.mark.parametrize("bad", [64.0, True, "64", None])
def test_non_integer_sizes_raise_type_error(bad):
    with pytest.raises(TypeError, match="must be an int"):
        hadamard_factors(bad)


def _emulate_fast_transform(x: np.ndarray, scale: float) -> np.ndarray:
    """Independent numpy float32 emulation of the documented order, one row at a time."""
    n = x.shape[-1]
    m, p = hadamard_factors(n)
    h_m = hadamard_matrix(m).numpy().astype(np.float32)
    out = np.empty_like(x)
    for row_index, row in enumerate(x.reshape(-1, n)):
        v = row.astype(np.float32).reshape(m, p).copy()
        stride = 1
        while stride < p:
            for start in range(0, p, 2 * stride):
                for i in range(start, start + stride):
                    a = v[:, i].copy()
                    b = v[:, i + stride].copy()
                    v[:, i] = a + b
                    v[:, i + stride] = a - b
            stride *= 2
        if m > 1:
            mixed = np.empty_like(v)
            for i in range(m):
                acc = h_m[i, 0] * v[0]
                for j in range(1, m):
                    acc = acc + h_m[i, j] * v[j]
                mixed[i] = acc
            v = mixed
        out.reshape(-1, n)[row_index] = (v * np.float32(scale)).reshape(n)
    return out


@pytest.mark.parametrize("n", [1, 8, 12, 20, 40, 64, 96])
def test_fast_transform_bit_exact_against_emulated_order(n):
    gen = torch.Generator().manual_seed(100 + n)
    # Mixed magnitudes so that a different summation order would change low bits.
    x = torch.randn(3, n, generator=gen) * torch.exp(3 * torch.randn(3, n, generator=gen))
    scale = 1.0 / math.sqrt(n)
    got = hadamard_transform_ref(x, scale)
    expected = _emulate_fast_transform(x.numpy(), scale)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("n", [12, 20, 24, 40, 64, 256, 768, 1536, 2560])
@pytest.mark.parametrize("batch_shape", [(), (1,), (2, 3)])
def test_fast_transform_matches_matrix_product(n, batch_shape):
    gen = torch.Generator().manual_seed(n + len(batch_shape))
    x = torch.randn(*batch_shape, n, generator=gen)
    scale = 1.0 / math.sqrt(n)
    got = hadamard_transform_ref(x, scale)
    assert got.shape == x.shape
    expected = (x.double() @ hadamard_matrix(n).T) * scale
    # Each output passes through k butterfly adds, m - 1 sequential adds and one product, each
    # with a relative rounding error <= 2^-24 of a partial sum bounded by sum|x|.
    m, p = hadamard_factors(n)
    steps = int(math.log2(p)) + m + 1
    bound = 1.01 * steps * 2.0**-24 * scale * x.double().abs().sum(dim=-1, keepdim=True)
    assert bool(torch.all((got.double() - expected).abs() <= bound))


def test_transform_convention_is_h_times_x_not_h_transpose():
    # H_12 is not symmetric, so this pins the convention y = H @ x (row vectors: x @ H.T).
    n = 24
    x = torch.randn(n, generator=torch.Generator().manual_seed(5))
    h = hadamard_matrix(n)
    got = hadamard_transform_ref(x, 1.0).double()
    assert torch.allclose(got, h @ x.double(), atol=1e-5)
    assert not torch.allclose(got, h.T @ x.double(), atol=1e-3)


def test_float16_input_is_converted_first():
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(6)).half()
    got = hadamard_transform_ref(x, 0.25)
    assert got.dtype == torch.float32
    assert torch.equal(got, hadamard_transform_ref(x.float(), 0.25))


def test_transform_involution():
    # For symmetric H_{2^k}: H (H x) = n x (exact in float64 of small integers).
    n = 256
    x = torch.randint(-50, 50, (2, n), generator=torch.Generator().manual_seed(7)).float()
    twice = hadamard_transform_ref(hadamard_transform_ref(x, 1.0), 1.0)
    assert torch.equal(twice, n * x)


def test_transform_rejects_bad_input():
    with pytest.raises(ValueError, match="unsupported Hadamard size 100"):
        hadamard_transform_ref(torch.ones(3, 100), 0.1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        hadamard_transform_ref(torch.ones(3, 64, dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        hadamard_transform_ref(np.ones((3, 64), dtype=np.float32), 0.1)
    for bad_scale in (0.0, -0.125, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite float > 0"):
            hadamard_transform_ref(torch.ones(3, 64), bad_scale)
    with pytest.raises(ValueError, match="float32"):
        hadamard_transform_ref(torch.ones(3, 64), 1e-60)
