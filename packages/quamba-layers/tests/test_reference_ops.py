"""The reference ops against independent float64 computations and float32 emulations.

Conventions of these tests:
- "float64 reference": the same formula evaluated in float64 (numpy / torch float64), written
  independently of the module. INT8 codes must equal the float64-derived codes except where the
  float64 quotient lies within 1e-6 (relative) of a .5 tie; those are counted and must be rare.
- "emulation": where the specified float32 order involves only correctly rounded operations,
  an independent numpy float32 evaluation of that order must match bit for bit.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quamba_layers import reference_ops as ref
from quamba_layers.hadamard import hadamard_matrix, hadamard_transform_ref

F32_EPS = 2.0**-24  # unit roundoff of float32
BAD_SCALES = [0.0, -0.5, float("nan"), float("inf"), -float("inf")]
RULES = ["half_away", "half_even"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint8(shape, seed, low=-128, high=128) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=_gen(seed), dtype=torch.int8)


def _f32(value: float) -> float:
    return float(np.float32(value))


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """|got - expected| <= atol + rtol·|expected| elementwise (numpy: torch.testing imports slowly)."""
    got_np = got.detach().cpu().double().numpy()
    expected_np = expected.detach().cpu().double().numpy()
    assert got_np.shape == expected_np.shape
    np.testing.assert_allclose(got_np, expected_np, rtol=rtol, atol=atol)


def _round64(r: np.ndarray, rule: str) -> np.ndarray:
    """Independent float64 rounding (exact for the float32 range we use)."""
    if rule == "half_away":
        return np.sign(r) * np.floor(np.abs(r) + 0.5)
    return np.round(r)  # numpy rounds half to even


def _codes64(r: np.ndarray, rule: str) -> np.ndarray:
    return np.clip(_round64(r, rule), -128, 127).astype(np.int8)


def _near_tie(r: np.ndarray, extra_tol: np.ndarray | float = 0.0) -> np.ndarray:
    """|r - (nearest k + 0.5)| <= 1e-6·|r| (+ an optional absolute error bound)."""
    distance = np.abs(np.abs(r) - np.floor(np.abs(r)) - 0.5)
    return distance <= 1e-6 * np.abs(r) + extra_tol


def assert_codes_match(got: torch.Tensor, r64, rule: str, error_bound=0.0) -> int:
    """INT8 codes equal the float64-derived ones except near .5 ties; returns the mismatches.

    A mismatch is allowed only where the float64 quotient is within 1e-6 (relative) of a tie, or
    within ``error_bound`` (a float32 evaluation error bound, for ops with cancellation) of one.
    Near-ties (1e-6) and mismatches are counted and must be rare: at most 0.1% of the codes
    (or 3).
    """
    r64 = np.asarray(r64, dtype=np.float64)
    got_np = got.cpu().numpy()
    assert got.dtype == torch.int8
    assert got_np.shape == r64.shape
    expected = _codes64(r64, rule)
    mismatch = got_np != expected
    unexplained = mismatch & ~_near_tie(r64, error_bound)
    assert not unexplained.any(), (
        f"{int(unexplained.sum())} codes differ away from ties, e.g. got "
        f"{got_np[unexplained][:5]} expected {expected[unexplained][:5]} for {r64[unexplained][:5]}"
    )
    allowed = max(3, r64.size // 1000)
    assert int(_near_tie(r64).sum()) <= allowed
    assert int(mismatch.sum()) <= allowed
    return int(mismatch.sum())


# --------------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------------

JUST_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))  # 0.49999997


def _rounding_inputs() -> torch.Tensor:
    ties = [k + 0.5 for k in range(-6, 6)]
    special = [JUST_BELOW_HALF, -JUST_BELOW_HALF, 0.5000001, 0.0, -0.0, 1.0, -1.0, 8388607.5,
               8388606.5, -8388606.5, 2.0**24 + 2, 1e-30, -1e-30]  # fmt: skip
    random = (torch.randn(500, generator=_gen(1)) * 40).tolist()
    return torch.tensor(ties + special + random, dtype=torch.float32)


@pytest.mark.parametrize("rule", RULES)
def test_rounding_matches_float64(rule):
    v = _rounding_inputs()
    got = ref.round_with(v, rule)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().astype(np.float64), _round64(v.double().numpy(), rule))


def test_rounding_known_values():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, JUST_BELOW_HALF, -JUST_BELOW_HALF])
    assert ref.round_half_away(v).tolist() == [1, 2, 3, -1, -2, -3, 4, 0, 0]
    assert ref.round_half_even(v).tolist() == [0, 2, 2, -0, -2, -2, 4, 0, 0]
    # floor(v + 0.5) is wrong for 0.49999997: float32 0.49999997 + 0.5 rounds to 1.
    assert math.floor(np.float32(JUST_BELOW_HALF) + np.float32(0.5)) == 1


def test_rules_differ_exactly_at_ties_with_even_floor():
    v = _rounding_inputs()
    differ = ref.round_half_away(v) != ref.round_half_even(v)
    v64 = v.double()
    truncated = torch.trunc(v64)
    is_tie = (v64 - truncated).abs() == 0.5
    even_trunc = torch.remainder(truncated, 2) == 0
    assert int(differ.sum()) > 0
    assert torch.equal(differ, is_tie & even_trunc)


def test_round_with_rejects_unknown_rule():
    with pytest.raises(ValueError, match=r"rounding must be one of \['half_away', 'half_even'\]"):
        ref.round_with(torch.ones(3), "nearest")


# --------------------------------------------------------------------------------------------
# quantize_int8 / dequantize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("scale", [0.0123, 1.0, 3.7e-3, 0.1])
@pytest.mark.parametrize("shape", [(1,), (7, 5), (2, 3, 97)])
def test_quantize_matches_float64(rule, scale, shape):
    v = torch.randn(shape, generator=_gen(len(shape))) * (60 * scale)
    got = ref.quantize_int8(v, scale, rule)
    assert got.shape == v.shape
    assert_codes_match(got, v.double().numpy() / _f32(scale), rule)


@pytest.mark.parametrize("scale", [2.0**-7, 3.0 / 128])
def test_quantize_exact_ties_and_rule_difference(scale):
    ks = np.arange(-20, 20)
    # (k + 0.5)·s is exact in float32 for these scales, and so is the division back.
    v = torch.tensor((ks + 0.5) * scale, dtype=torch.float32)
    away = ref.quantize_int8(v, scale, "half_away")
    even = ref.quantize_int8(v, scale, "half_even")
    ties = [Fraction(2 * int(k) + 1, 2) for k in ks]
    assert away.tolist() == [math.floor(t) + 1 if t > 0 else math.ceil(t) - 1 for t in ties]
    assert even.tolist() == [round(t) for t in ties]  # Python rounds Fractions half to even
    differ = (away != even).numpy()
    # Exactly the ties whose integer part (truncation towards zero) is even.
    assert np.array_equal(differ, np.array([int(t) % 2 == 0 for t in ties]))


def test_quantize_just_below_half_and_saturation():
    s = 0.25
    v = torch.tensor([JUST_BELOW_HALF, -JUST_BELOW_HALF]) * s
    for rule in RULES:
        assert ref.quantize_int8(v, s, rule).tolist() == [0, 0]
    big = torch.tensor([127.4, 127.5, 127.6, 1000.0, -128.4, -128.5, -128.6, -1000.0]) * s
    big = torch.cat((big, torch.tensor([float("inf"), -float("inf")])))
    expected = [127, 127, 127, 127, -128, -128, -128, -128, 127, -128]
    for rule in RULES:
        assert ref.quantize_int8(big, s, rule).tolist() == expected


def test_quantize_converts_half_precision_exactly():
    v = (torch.randn(200, generator=_gen(3)) * 3).half()
    assert torch.equal(
        ref.quantize_int8(v, 0.05, "half_even"), ref.quantize_int8(v.float(), 0.05, "half_even")
    )


@pytest.mark.parametrize("bad", BAD_SCALES)
def test_quantize_rejects_bad_scale(bad):
    with pytest.raises(ValueError, match="scale must be a finite float > 0"):
        ref.quantize_int8(torch.ones(4), bad, "half_away")


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not representable as a positive finite float32"):
        ref.quantize_int8(torch.ones(4), 1e-50, "half_away")
    with pytest.raises(TypeError, match="scale must be a finite float > 0"):
        ref.quantize_int8(torch.ones(4), "0.1", "half_away")
    with pytest.raises(TypeError, match="v must have dtype float32, float16, bfloat16"):
        ref.quantize_int8(torch.ones(4, dtype=torch.float64), 0.1, "half_away")
    with pytest.raises(ValueError, match="rounding must be one of"):
        ref.quantize_int8(torch.ones(4), 0.1, "up")
    with pytest.raises(ValueError, match="NaN"):
        ref.quantize_int8(torch.tensor([1.0, float("nan")]), 0.1, "half_away")
    with pytest.raises(ValueError, match="single per-tensor scale"):
        ref.quantize_int8(torch.ones(4), torch.ones(2), "half_away")


def test_dequantize_is_one_rounded_product():
    q = _randint8((5, 33), seed=4)
    scale = 0.0123456789
    got = ref.dequantize(q, scale)
    assert got.dtype == torch.float32
    # The exact float64 product rounded once to float32.
    expected = (q.double().numpy() * _f32(scale)).astype(np.float32)
    assert np.array_equal(got.numpy(), expected)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        ref.dequantize(q.int(), scale)
    with pytest.raises(ValueError, match="scale must be a finite float > 0"):
        ref.dequantize(q, -1.0)


# --------------------------------------------------------------------------------------------
# pairwise_sum
# --------------------------------------------------------------------------------------------


def test_pairwise_sum_order():
    p = torch.tensor([[1e8, 1.0, -1e8, 1.0]])
    assert ref.pairwise_sum(p).item() == 2.0  # (1e8 + -1e8) + (1 + 1); sequential gives 1
    # N = 3 is padded to 4: (p0 + p2) + (p1 + 0).
    assert ref.pairwise_sum(torch.tensor([1e8, 1.0, -1e8])).item() == 1.0
    assert ref.pairwise_sum(torch.tensor([3.0])).item() == 3.0
    with pytest.raises(ValueError, match="non-empty last axis"):
        ref.pairwise_sum(torch.ones(2, 0))


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17])
def test_pairwise_sum_matches_float64(n):
    p = torch.randn(3, 4, n, generator=_gen(n))
    got = ref.pairwise_sum(p)
    expected = p.double().sum(dim=-1)
    bound = n * F32_EPS * p.double().abs().sum(dim=-1)
    assert got.shape == (3, 4)
    assert bool(torch.all((got.double() - expected).abs() <= bound))


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------


def _rmsnorm64(x, residual, weight, eps):
    r = x.double() + (residual.double() if residual is not None else 0.0)
    inv = 1.0 / torch.sqrt((r * r).mean(dim=-1, keepdim=True) + eps)
    y = r * inv
    return y * weight.double() if weight is not None else y


def _rmsnorm_emulated(x, residual, weight, eps):
    """numpy float32 emulation of the documented order."""
    r = x.float().numpy()
    if residual is not None:
        r = r + residual.numpy()
    r64 = r.astype(np.float64)
    mean_square = (np.sum(r64 * r64, axis=-1, keepdims=True) / r.shape[-1]).astype(np.float32)
    inv = np.float32(1.0) / np.sqrt(mean_square + np.float32(eps))
    y = r * inv
    return (y * weight.float().numpy() if weight is not None else y), r


@pytest.mark.parametrize("shape", [(1, 1, 37), (2, 7, 64), (3, 5, 768)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_float_output(shape, x_dtype, with_residual):
    d = shape[-1]
    x = (torch.randn(shape, generator=_gen(d)) * 2).to(x_dtype)
    residual = torch.randn(shape, generator=_gen(d + 1)) * 3 if with_residual else None
    weight = torch.rand(d, generator=_gen(d + 2)) + 0.5
    eps = 1e-5
    y, r = ref.rmsnorm(x, residual, weight, eps)
    assert y.dtype == torch.float32 and r.dtype == torch.float32
    expected_y, expected_r = _rmsnorm_emulated(x, residual, weight, eps)
    assert np.array_equal(r.numpy(), expected_r)
    assert np.array_equal(y.numpy(), expected_y)
    assert_close(y.double(), _rmsnorm64(x, residual, weight, eps), rtol=2e-6, atol=0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(2, 7, 64), (3, 9, 768)])
def test_rmsnorm_int8_output(rule, shape):
    d = shape[-1]
    x = torch.randn(shape, generator=_gen(10 + d))
    residual = torch.randn(shape, generator=_gen(11 + d))
    weight = torch.randn(d, generator=_gen(12 + d))
    out_scale = 0.0271
    y_q, r = ref.rmsnorm(x, residual, weight, 1e-6, out_scale=out_scale, rounding=rule)
    y_float, r_float = ref.rmsnorm(x, residual, weight, 1e-6)
    assert torch.equal(r, r_float)
    assert torch.equal(y_q, ref.quantize_int8(y_float, out_scale, rule))
    r64 = _rmsnorm64(x, residual, weight, 1e-6).numpy() / _f32(out_scale)
    assert np.abs(r64).max() > 127.5  # some saturation is exercised
    assert_codes_match(y_q, r64, rule)


def test_rmsnorm_exact_ties():
    # x = 2 everywhere: mean square 4, inv = 0.5 exactly, so y = weight exactly (eps = 0).
    weight = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 100.5])
    x = torch.full((1, 8), 2.0)
    away, _ = ref.rmsnorm(x, None, weight, 0.0, out_scale=1.0, rounding="half_away")
    even, _ = ref.rmsnorm(x, None, weight, 0.0, out_scale=1.0, rounding="half_even")
    assert away.tolist() == [[1, 2, 3, -1, -2, -3, 4, 101]]
    assert even.tolist() == [[0, 2, 2, 0, -2, -2, 4, 100]]


def test_rmsnorm_rejects_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="residual must have shape"):
        ref.rmsnorm(x, torch.randn(2, 7), None, 1e-5)
    with pytest.raises(TypeError, match="residual must have dtype float32"):
        ref.rmsnorm(x, torch.randn(2, 8).half(), None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(D,\)"):
        ref.rmsnorm(x, None, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        ref.rmsnorm(x, None, None, -1.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        ref.rmsnorm(x.int(), None, None, 1e-5)
    for bad in BAD_SCALES:
        with pytest.raises(ValueError, match="out_scale must be a finite float > 0"):
            ref.rmsnorm(x, None, None, 1e-5, out_scale=bad)


# --------------------------------------------------------------------------------------------
# w8a8_linear
# --------------------------------------------------------------------------------------------


def _exact_acc(x_q, w_q) -> np.ndarray:
    return x_q.numpy().astype(np.int64) @ w_q.numpy().astype(np.int64).T


@pytest.mark.parametrize(("x_shape", "n"), [((1, 5), 3), ((2, 7, 37), 11), ((3, 16, 768), 24)])
def test_w8a8_float_output(x_shape, n):
    k = x_shape[-1]
    x_q = _randint8(x_shape, seed=k)
    w_q = _randint8((n, k), seed=k + 1)
    s_x, s_w = 0.0173, 0.00291
    v = ref.w8a8_linear(x_q, w_q, s_x, s_w, out_dtype=torch.float32)
    acc = _exact_acc(x_q, w_q)
    # Emulation: float32(acc) (round to nearest even) times float32(s_x * s_w).
    expected = acc.astype(np.float32) * np.float32(s_x * s_w)
    assert v.shape == (*x_shape[:-1], n) and v.dtype == torch.float32
    assert np.array_equal(v.numpy(), expected)
    assert_close(v.double(), torch.from_numpy(acc * s_x * s_w), rtol=1e-6, atol=0)
    v16 = ref.w8a8_linear(x_q, w_q, s_x, s_w)
    assert v16.dtype == torch.float16
    assert torch.equal(v16, v.half())


def test_w8a8_large_k_rounds_accumulator_to_float32():
    k = 4096
    x_q = _randint8((3, k), seed=20, low=100)
    w_q = _randint8((5, k), seed=21, low=100)
    acc = _exact_acc(x_q, w_q)
    assert np.abs(acc).max() > 2**24  # float32(acc) is inexact here
    v = ref.w8a8_linear(x_q, w_q, 1.0, 1.0, out_dtype=torch.float32)
    assert np.array_equal(v.numpy(), acc.astype(np.float32))


@pytest.mark.parametrize("rule", RULES)
def test_w8a8_int8_output(rule):
    x_q = _randint8((2, 9, 96), seed=30)
    w_q = _randint8((40, 96), seed=31)
    s_x, s_w, s_out = 0.021, 0.0037, 0.1
    y = ref.w8a8_linear(x_q, w_q, s_x, s_w, s_out=s_out, rounding=rule)
    v = ref.w8a8_linear(x_q, w_q, s_x, s_w, out_dtype=torch.float32)
    assert torch.equal(y, ref.quantize_int8(v, s_out, rule))
    r64 = _exact_acc(x_q, w_q) * s_x * s_w / _f32(s_out)
    assert np.abs(r64).max() > 127.5
    assert_codes_match(y, r64, rule)


def test_w8a8_exact_ties():
    # scale = 0.25 * 2 = 0.5 exactly and s_out = 1: v = acc / 2, a tie for every odd acc.
    x_q = _randint8((4, 12), seed=40, low=-20, high=20)
    w_q = _randint8((30, 12), seed=41, low=-3, high=3)
    acc = _exact_acc(x_q, w_q)
    away = ref.w8a8_linear(x_q, w_q, 0.25, 2.0, s_out=1.0, rounding="half_away").numpy()
    even = ref.w8a8_linear(x_q, w_q, 0.25, 2.0, s_out=1.0, rounding="half_even").numpy()
    halves = [Fraction(int(a), 2) for a in acc.ravel()]
    expected_even = np.array([round(h) for h in halves]).reshape(acc.shape)
    expected_away = np.array(
        [
            math.floor(h + Fraction(1, 2)) if h >= 0 else -math.floor(-h + Fraction(1, 2))
            for h in halves
        ]
    ).reshape(acc.shape)
    assert np.array_equal(away, np.clip(expected_away, -128, 127))
    assert np.array_equal(even, np.clip(expected_even, -128, 127))
    odd = acc % 2 == 1
    assert odd.sum() > 10
    # The rules differ exactly at the ties whose integer part is even.
    assert np.array_equal(away != even, odd & (np.trunc(acc / 2) % 2 == 0))


def test_w8a8_rejects_bad_input():
    x_q = _randint8((2, 8), seed=50)
    w_q = _randint8((3, 8), seed=51)
    with pytest.raises(ValueError, match="must equal w_q's in_features"):
        ref.w8a8_linear(x_q, _randint8((3, 7), seed=52), 0.1, 0.1)
    with pytest.raises(TypeError, match="x_q must have dtype int8"):
        ref.w8a8_linear(x_q.float(), w_q, 0.1, 0.1)
    with pytest.raises(ValueError, match="w_q must have 2 dimensions"):
        ref.w8a8_linear(x_q, w_q[None], 0.1, 0.1)
    for name, args in (("s_x", (0.0, 0.1)), ("s_w", (0.1, float("nan")))):
        with pytest.raises(ValueError, match=f"{name} must be a finite float > 0"):
            ref.w8a8_linear(x_q, w_q, *args)
    with pytest.raises(ValueError, match="s_out must be a finite float > 0"):
        ref.w8a8_linear(x_q, w_q, 0.1, 0.1, s_out=float("inf"))
    with pytest.raises(TypeError, match="out_dtype"):
        ref.w8a8_linear(x_q, w_q, 0.1, 0.1, out_dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# conv1d_int8 and its decode update
# --------------------------------------------------------------------------------------------

CONV_SHAPES = [
    (1, 1, 1, 4),
    (2, 5, 7, 4),
    (3, 37, 33, 4),
    (1, 8, 130, 4),
    (2, 3, 9, 3),
    (2, 6, 5, 2),
]


def _conv_inputs(batch, e, length, k, seed):
    x_q = _randint8((batch, e, length), seed=seed)
    w_q = _randint8((e, k), seed=seed + 1)
    b_q = _randint8((e,), seed=seed + 2)
    return x_q, w_q, b_q


def _conv64(x_q, s_x, w_q, s_w, b_q, s_b):
    """float64: (acc exact via F.conv1d on small integers, pre-activation, SiLU)."""
    e, k = w_q.shape
    acc = F.conv1d(F.pad(x_q.double(), (k - 1, 0)), w_q.double()[:, None, :], groups=e)
    s_x64 = s_x.double()[:, None, None] if isinstance(s_x, torch.Tensor) else s_x
    scaled = acc * s_x64 * s_w
    bias = b_q.double()[None, :, None] * s_b
    v = scaled + bias
    return v / (1.0 + torch.exp(-v)), (scaled.abs() + bias.abs())


@pytest.mark.parametrize(("batch", "e", "length", "k"), CONV_SHAPES)
def test_conv_float_output_matches_float64(batch, e, length, k):
    x_q, w_q, b_q = _conv_inputs(batch, e, length, k, seed=e * 7 + length)
    s_x, s_w, s_b = 0.031, 0.0047, 0.0113
    got = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b)
    assert got.dtype == torch.float32 and got.shape == (batch, e, length)
    silu64, magnitude = _conv64(x_q, s_x, w_q, s_w, b_q, s_b)
    # Pre-activation: 3 roundings of terms bounded by `magnitude`; SiLU: ~4 more relative ulps.
    tol = 4 * F32_EPS * magnitude + 8 * F32_EPS * silu64.abs()
    assert bool(torch.all((got.double() - silu64).abs() <= tol))
    # The first K - 1 outputs see zeros on the left: dropping the padding would change them.
    assert got[..., 0].abs().sum() > 0


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("batch", "e", "length", "k"), CONV_SHAPES)
def test_conv_int8_output_matches_float64(rule, batch, e, length, k):
    x_q, w_q, b_q = _conv_inputs(batch, e, length, k, seed=e * 11 + length)
    s_x, s_w, s_b, s_out = 0.031, 0.0047, 0.0113, 0.0021
    got = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out=s_out, rounding=rule)
    fp = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b)
    assert torch.equal(got, ref.quantize_int8(fp, s_out, rule))
    silu64, magnitude = _conv64(x_q, s_x, w_q, s_w, b_q, s_b)
    s_out32 = _f32(s_out)
    # Near-tie tolerance widened by the float32 error bound of the pre-activation (cancellation).
    extra = (4 * F32_EPS * magnitude / s_out32).numpy()
    assert_codes_match(got, silu64.numpy() / s_out32, rule, error_bound=extra)


def test_conv_per_sequence_scales():
    x_q, w_q, b_q = _conv_inputs(3, 9, 17, 4, seed=60)
    s_x = torch.tensor([0.011, 0.052, 0.0031])
    s_w, s_b, s_out = 0.0047, 0.0113, 0.0019
    for s_out_value in (None, s_out):
        got = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out=s_out_value)
        for b in range(3):
            one = ref.conv1d_int8(
                x_q[b : b + 1], s_x[b].item(), w_q, s_w, b_q, s_b, s_out=s_out_value
            )
            assert torch.equal(got[b : b + 1], one)
    silu64, magnitude = _conv64(x_q, s_x, w_q, s_w, b_q, s_b)
    got = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out=s_out)
    assert_codes_match(got, silu64.numpy() / _f32(s_out), "half_away",
                       error_bound=(4 * F32_EPS * magnitude / _f32(s_out)).numpy())  # fmt: skip


def test_conv_exact_ties():
    # s_w * s_x = 2^-4 exactly, bias integer >= 17 so that SiLU(v) == v in float32 exactly
    # (exp(-v) < 2^-24), s_out = 1: the code is round(acc / 16 + b), a tie when acc ≡ 8 (mod 16).
    batch, e, length, k = 2, 6, 40, 4
    x_q = _randint8((batch, e, length), seed=70, low=1, high=20)
    w_q = _randint8((e, k), seed=71, low=1, high=9)
    b_q = _randint8((e,), seed=72, low=17, high=30)
    acc = F.conv1d(F.pad(x_q.double(), (k - 1, 0)), w_q.double()[:, None, :], groups=e)
    acc = acc.round().long().numpy()
    exact = [Fraction(int(a), 16) + int(b) for a, b in
             zip(acc.ravel(), np.broadcast_to(b_q.numpy()[None, :, None], acc.shape).ravel())]  # fmt: skip
    expected_away = np.array([math.floor(v + Fraction(1, 2)) for v in exact]).reshape(acc.shape)
    expected_even = np.array([round(v) for v in exact]).reshape(acc.shape)
    away = ref.conv1d_int8(x_q, 0.125, w_q, 0.5, b_q, 1.0, s_out=1.0, rounding="half_away")
    even = ref.conv1d_int8(x_q, 0.125, w_q, 0.5, b_q, 1.0, s_out=1.0, rounding="half_even")
    assert np.array_equal(away.numpy(), expected_away)
    assert np.array_equal(even.numpy(), expected_even)
    ties = acc % 16 == 8
    assert ties.sum() > 5
    trunc_even = np.array([int(v) % 2 == 0 for v in exact]).reshape(acc.shape)
    assert np.array_equal(away.numpy() != even.numpy(), ties & trunc_even)


def _decode_all(x_q, s_x, w_q, s_w, b_q, s_b, s_out, state=None, start=0):
    batch, e, length = x_q.shape
    k = w_q.shape[-1]
    if state is None:
        state = torch.zeros(batch, e, k - 1, dtype=torch.int8)
    outputs = []
    for t in range(start, length):
        out, state = ref.conv1d_int8_update(
            x_q[:, :, t], state, s_x, w_q, s_w, b_q, s_b, s_out=s_out
        )
        outputs.append(out)
    return torch.stack(outputs, dim=-1), state


@pytest.mark.parametrize(("batch", "e", "length", "k"), CONV_SHAPES)
@pytest.mark.parametrize("s_out", [None, 0.0021])
def test_conv_decode_equals_prefill(batch, e, length, k, s_out):
    x_q, w_q, b_q = _conv_inputs(batch, e, length, k, seed=e * 13 + length)
    s_x = torch.linspace(0.01, 0.05, batch) if batch > 1 else 0.031
    s_w, s_b = 0.0047, 0.0113
    prefill = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out=s_out)
    decoded, state = _decode_all(x_q, s_x, w_q, s_w, b_q, s_b, s_out)
    assert decoded.dtype == prefill.dtype
    assert torch.equal(decoded, prefill)
    # The state holds the last K - 1 inputs (zero-padded on the left for short sequences).
    assert torch.equal(state, F.pad(x_q, (k - 1, 0))[:, :, -(k - 1) :])
    # Prefill a prefix, then decode the rest from its state.
    split = length // 2
    prefix_state = F.pad(x_q[:, :, :split], (k - 1, 0))[:, :, -(k - 1) :]
    rest, _ = _decode_all(x_q, s_x, w_q, s_w, b_q, s_b, s_out, state=prefix_state, start=split)
    assert torch.equal(rest, prefill[:, :, split:])


def test_conv_without_bias_and_3d_weight():
    x_q, w_q, _ = _conv_inputs(2, 5, 11, 4, seed=80)
    got = ref.conv1d_int8(x_q, 0.02, w_q[:, None, :], 0.004, None, None)
    zero_bias = torch.zeros(5, dtype=torch.int8)
    assert torch.equal(got, ref.conv1d_int8(x_q, 0.02, w_q, 0.004, zero_bias, 1.0))


def test_conv_rejects_bad_input():
    x_q, w_q, b_q = _conv_inputs(2, 5, 11, 4, seed=90)
    args = (0.02, w_q, 0.004, b_q, 0.01)
    with pytest.raises(TypeError, match="x_q must have dtype int8"):
        ref.conv1d_int8(x_q.float(), *args)
    with pytest.raises(ValueError, match="x_q must have 3 dimensions"):
        ref.conv1d_int8(x_q[0], *args)
    with pytest.raises(ValueError, match=r"w_q must have shape \(E, K\)"):
        ref.conv1d_int8(x_q, 0.02, w_q[:4], 0.004, b_q, 0.01)
    with pytest.raises(ValueError, match=r"b_q must have shape \(E,\)"):
        ref.conv1d_int8(x_q, 0.02, w_q, 0.004, b_q[:3], 0.01)
    with pytest.raises(ValueError, match=r"s_x must have shape \(B,\)"):
        ref.conv1d_int8(x_q, torch.tensor([0.1, 0.2, 0.3]), w_q, 0.004, b_q, 0.01)
    with pytest.raises(ValueError, match="s_x must hold finite per-sequence scales > 0"):
        ref.conv1d_int8(x_q, torch.tensor([0.1, 0.0]), w_q, 0.004, b_q, 0.01)
    for bad in BAD_SCALES:
        for name, call_args in (
            ("s_x", (bad, w_q, 0.004, b_q, 0.01)),
            ("s_w", (0.02, w_q, bad, b_q, 0.01)),
            ("s_b", (0.02, w_q, 0.004, b_q, bad)),
        ):
            with pytest.raises(ValueError, match=f"{name} must be a finite float > 0"):
                ref.conv1d_int8(x_q, *call_args)
        with pytest.raises(ValueError, match="s_out must be a finite float > 0"):
            ref.conv1d_int8(x_q, *args, s_out=bad)
    state = torch.zeros(2, 5, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"conv_state must have shape \(B, E, K-1\)"):
        ref.conv1d_int8_update(x_q[:, :, 0], state, *args)


# --------------------------------------------------------------------------------------------
# Selective scan
# --------------------------------------------------------------------------------------------


def _scan_inputs(batch, e, length, n, seed):
    g = _gen(seed)
    u = torch.randn(batch, e, length, generator=g)
    delta_raw = torch.randn(batch, e, length, generator=g) - 1.0
    A = -torch.exp(torch.randn(e, n, generator=g))
    B = torch.randn(batch, n, length, generator=g)
    C = torch.randn(batch, n, length, generator=g)
    D = torch.randn(e, generator=g)
    z = torch.randn(batch, e, length, generator=g)
    delta_bias = torch.randn(e, generator=g) * 0.5
    return u, delta_raw, A, B, C, D, z, delta_bias


def _scan64(u, delta_raw, A, B, C, D, z, delta_bias, h0=None):
    """Independent float64 scan: softplus from torch, einsum-precomputed dA / dBu."""
    u, delta_raw, A, B, C = (t.double() for t in (u, delta_raw, A, B, C))
    delta = delta_raw + delta_bias.double()[:, None] if delta_bias is not None else delta_raw
    delta = F.softplus(delta, beta=1.0, threshold=20.0)
    d_a = torch.exp(torch.einsum("bel,en->beln", delta, A))
    d_bu = torch.einsum("bel,bnl,bel->beln", delta, B, u)
    h = torch.zeros_like(d_a[:, :, 0]) if h0 is None else h0.double()
    ys = []
    for t in range(u.shape[-1]):
        h = d_a[:, :, t] * h + d_bu[:, :, t]
        ys.append(torch.einsum("ben,bn->be", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y.transpose(1, 2), h


SCAN_SHAPES = [(1, 5, 1, 16), (2, 37, 7, 16), (3, 8, 64, 5), (2, 4, 33, 1)]


@pytest.mark.parametrize(("batch", "e", "length", "n"), SCAN_SHAPES)
def test_scan_matches_float64(batch, e, length, n):
    inputs = _scan_inputs(batch, e, length, n, seed=e + length + n)
    y, h = ref.selective_scan(*inputs)
    assert y.shape == (batch, length, e) and y.dtype == torch.float32
    assert h.shape == (batch, e, n) and h.dtype == torch.float32
    y64, h64 = _scan64(*inputs)
    assert_close(y.double(), y64, rtol=1e-5, atol=1e-5 * y64.abs().max().item())
    assert_close(h.double(), h64, rtol=1e-5, atol=1e-5 * h64.abs().max().item())


def _scan_emulated_exact(u, delta, B, C, D, sequential_n=False):
    """numpy float32 emulation for A = 0 (dA = 1 exactly), delta > 20 (softplus = identity)
    and no gate: every remaining operation is a correctly rounded float32 operation."""
    u, delta, B, C, D = (t.numpy() for t in (u, delta, B, C, D))
    batch, e, length = u.shape
    n = B.shape[1]
    h = np.zeros((batch, e, n), dtype=np.float32)
    y = np.zeros((batch, length, e), dtype=np.float32)
    one = np.float32(1.0)
    for t in range(length):
        d_bu = (delta[:, :, t, None] * B[:, None, :, t]) * u[:, :, t, None]
        h = one * h + d_bu
        p = h * C[:, None, :, t]
        if sequential_n:
            acc = p[..., 0]
            for i in range(1, n):
                acc = acc + p[..., i]
        else:
            size = 1 << (n - 1).bit_length()
            p = np.concatenate((p, np.zeros((*p.shape[:-1], size - n), np.float32)), axis=-1)
            while p.shape[-1] > 1:
                half = p.shape[-1] // 2
                p = p[..., :half] + p[..., half:]
            acc = p[..., 0]
        y[:, t, :] = acc
    y = y + u.transpose(0, 2, 1) * D
    return y, h


@pytest.mark.parametrize("n", [1, 5, 16])
def test_scan_bit_exact_order(n):
    batch, e, length = 2, 7, 12
    g = _gen(200 + n)
    u = torch.randn(batch, e, length, generator=g) * torch.exp(
        2 * torch.randn(batch, e, length, generator=g)
    )
    delta_raw = 21.0 + 10 * torch.rand(batch, e, length, generator=g)
    A = torch.zeros(e, n)
    B = torch.randn(batch, n, length, generator=g) * torch.exp(
        2 * torch.randn(batch, n, length, generator=g)
    )
    C = torch.randn(batch, n, length, generator=g)
    D = torch.randn(e, generator=g)
    y, h = ref.selective_scan(u, delta_raw, A, B, C, D, None, None)
    expected_y, expected_h = _scan_emulated_exact(u, delta_raw, B, C, D)
    assert np.array_equal(h.numpy(), expected_h)
    assert np.array_equal(y.numpy(), expected_y)
    if n >= 5:  # the test distinguishes the pairwise order from a sequential sum
        sequential_y, _ = _scan_emulated_exact(u, delta_raw, B, C, D, sequential_n=True)
        assert not np.array_equal(y.numpy(), sequential_y)


def test_scan_softplus_threshold():
    # u = B = 1, N = 1, L = 1 from a zero state: h_last = softplus(delta) * 1 * 1 exactly.
    delta_raw = torch.tensor([-30.0, -5.0, 0.0, 5.0, 19.5, 20.0, 20.5, 25.0, 88.8, 1000.0])
    e = delta_raw.numel()
    ones = torch.ones(1, e, 1)
    _, h = ref.selective_scan(ones, delta_raw[None, :, None], -torch.ones(e, 1), torch.ones(1, 1, 1),
                              torch.ones(1, 1, 1), None, None, None)  # fmt: skip
    h = h[0, :, 0].double()
    expected = F.softplus(delta_raw.double(), threshold=20.0)
    assert_close(h, expected, rtol=2e-7, atol=1e-20)
    above = delta_raw > 20
    assert torch.equal(h[above], delta_raw[above].double())  # identity branch, no inf/NaN


def test_scan_gate_and_skip():
    inputs = _scan_inputs(2, 6, 9, 4, seed=300)
    u, delta_raw, A, B, C, D, z, delta_bias = inputs
    y_plain, _ = ref.selective_scan(u, delta_raw, A, B, C, None, None, delta_bias)
    y_full, _ = ref.selective_scan(*inputs)
    # Same scan part, then + u * D and * silu(z), each rounded separately.
    u_le, z_le = u.transpose(1, 2), z.transpose(1, 2)
    expected = (y_plain + u_le * D) * (z_le / (1.0 + torch.exp(-z_le)))
    assert torch.equal(y_full, expected)


def test_scan_initial_state_splits_exactly():
    inputs = _scan_inputs(2, 5, 20, 16, seed=400)
    u, delta_raw, A, B, C, D, z, delta_bias = inputs
    y, h = ref.selective_scan(*inputs)
    split = 8

    def part(t, sl):
        return t[..., sl].contiguous()

    first = slice(0, split)
    second = slice(split, None)
    y1, h1 = ref.selective_scan(part(u, first), part(delta_raw, first), A, part(B, first),
                                part(C, first), D, part(z, first), delta_bias)  # fmt: skip
    y2, h2 = ref.selective_scan(part(u, second), part(delta_raw, second), A, part(B, second),
                                part(C, second), D, part(z, second), delta_bias,
                                initial_state=h1)  # fmt: skip
    assert torch.equal(torch.cat((y1, y2), dim=1), y)
    assert torch.equal(h2, h)
    y64, _ = _scan64(part(u, second), part(delta_raw, second), A, part(B, second),
                     part(C, second), D, part(z, second), delta_bias, h0=h1)  # fmt: skip
    assert_close(y2.double(), y64, rtol=1e-5, atol=1e-5 * y64.abs().max().item())


def test_scan_rejects_bad_input():
    u, delta_raw, A, B, C, D, z, delta_bias = _scan_inputs(2, 5, 6, 4, seed=500)
    with pytest.raises(TypeError, match="u must have dtype float32"):
        ref.selective_scan(u.half(), delta_raw, A, B, C, D, z, delta_bias)
    with pytest.raises(ValueError, match=r"B must have shape \(B, N, L\)"):
        ref.selective_scan(u, delta_raw, A, B[:, :3], C, D, z, delta_bias)
    with pytest.raises(ValueError, match=r"A must have shape \(E, N\)"):
        ref.selective_scan(u, delta_raw, A[:4], B, C, D, z, delta_bias)
    with pytest.raises(ValueError, match=r"delta_bias must have shape \(E,\)"):
        ref.selective_scan(u, delta_raw, A, B, C, D, z, delta_bias[:2])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, E, N\)"):
        ref.selective_scan(u, delta_raw, A, B, C, D, z, delta_bias, initial_state=torch.zeros(2, 5))


# --------------------------------------------------------------------------------------------
# INT8 selective scan and the decode step
# --------------------------------------------------------------------------------------------

INT8_SCALES = {"s_u": 0.021, "s_dt": 0.013, "s_A": 0.017, "s_B": 0.019, "s_C": 0.023,
               "s_D": 0.011, "s_z": 0.027, "s_dtb": 0.009}  # fmt: skip


def _int8_scan_inputs(batch, e, length, n, seed):
    return {
        "u_q": _randint8((batch, e, length), seed),
        "dt_q": _randint8((batch, e, length), seed + 1),
        "A_log_q": _randint8((e, n), seed + 2, low=-100, high=100),
        "B_q": _randint8((batch, n, length), seed + 3),
        "C_q": _randint8((batch, n, length), seed + 4),
        "D_q": _randint8((e,), seed + 5),
        "z_q": _randint8((batch, e, length), seed + 6),
        "dtb_q": _randint8((e,), seed + 7, low=-128, high=0),
    }


def _call_int8_scan(q, s_h, **kwargs):
    s = INT8_SCALES
    return ref.selective_scan_int8(
        q["u_q"], s["s_u"], q["dt_q"], s["s_dt"], q["A_log_q"], s["s_A"], q["B_q"], s["s_B"],
        q["C_q"], s["s_C"], q["D_q"], s["s_D"], q["z_q"], s["s_z"], q["dtb_q"], s["s_dtb"], s_h,
        **kwargs,
    )  # fmt: skip


def _dequantized(q):
    s = INT8_SCALES
    return (
        ref.dequantize(q["u_q"], s["s_u"]),
        ref.dequantize(q["dt_q"], s["s_dt"]),
        -torch.exp(ref.dequantize(q["A_log_q"], s["s_A"])),
        ref.dequantize(q["B_q"], s["s_B"]),
        ref.dequantize(q["C_q"], s["s_C"]),
        ref.dequantize(q["D_q"], s["s_D"]),
        ref.dequantize(q["z_q"], s["s_z"]),
        ref.dequantize(q["dtb_q"], s["s_dtb"]),
    )


@pytest.mark.parametrize(
    ("batch", "e", "length", "n"), [(1, 5, 1, 16), (2, 37, 7, 16), (3, 6, 50, 8)]
)
def test_int8_scan_is_dequantize_then_scan(batch, e, length, n):
    q = _int8_scan_inputs(batch, e, length, n, seed=600 + e)
    s_h = 0.013
    y, h_q = _call_int8_scan(q, s_h)
    assert y.dtype == torch.float16 and y.shape == (batch, length, e)
    assert h_q.dtype == torch.int8 and h_q.shape == (batch, e, n)
    y32, h32 = ref.selective_scan(*_dequantized(q))
    assert torch.equal(y, y32.half())
    assert torch.equal(h_q, ref.quantize_int8(h32, s_h, "half_away"))
    assert torch.equal(
        _call_int8_scan(q, s_h, state_rounding="half_even")[1],
        ref.quantize_int8(h32, s_h, "half_even"),
    )
    # Against the independent float64 scan on float64-dequantized inputs.
    s = INT8_SCALES
    inputs64 = (
        q["u_q"].double() * s["s_u"], q["dt_q"].double() * s["s_dt"],
        -torch.exp(q["A_log_q"].double() * s["s_A"]), q["B_q"].double() * s["s_B"],
        q["C_q"].double() * s["s_C"], q["D_q"].double() * s["s_D"], q["z_q"].double() * s["s_z"],
        q["dtb_q"].double() * s["s_dtb"],
    )  # fmt: skip
    y64, h64 = _scan64(*inputs64)
    assert_close(y.double(), y64, rtol=2e-3, atol=1e-3 * y64.abs().max().item())
    codes64 = _codes64(h64.numpy() / _f32(s_h), "half_away")
    # h accumulates float32 rounding over L steps: codes within one step of the float64 ones.
    assert np.abs(h_q.numpy().astype(int) - codes64.astype(int)).max() <= 1
    assert (h_q.numpy() == codes64).mean() > 0.99


def test_int8_scan_fp32_input_variant():
    q = _int8_scan_inputs(2, 5, 9, 16, seed=700)
    u_float = torch.randn(2, 5, 9, generator=_gen(701)) * 3  # off the INT8 grid, beyond 127·s_u
    y, h_q = ref.selective_scan_int8(
        u_float, None, q["dt_q"], INT8_SCALES["s_dt"], q["A_log_q"], INT8_SCALES["s_A"], q["B_q"],
        INT8_SCALES["s_B"], q["C_q"], INT8_SCALES["s_C"], q["D_q"], INT8_SCALES["s_D"], q["z_q"],
        INT8_SCALES["s_z"], q["dtb_q"], INT8_SCALES["s_dtb"], 0.05,
    )  # fmt: skip
    _, *rest = _dequantized(q)
    y32, h32 = ref.selective_scan(u_float, *rest)
    assert torch.equal(y, y32.half())
    assert torch.equal(h_q, ref.quantize_int8(h32, 0.05, "half_away"))


def test_int8_scan_rejects_bad_input():
    q = _int8_scan_inputs(2, 5, 6, 4, seed=800)
    with pytest.raises(TypeError, match="dt_q must have dtype int8"):
        _call_int8_scan({**q, "dt_q": q["dt_q"].float()}, 0.01)
    with pytest.raises(ValueError, match=r"B_q must have shape \(B, N, L\)"):
        _call_int8_scan({**q, "B_q": q["B_q"][:, :2]}, 0.01)
    with pytest.raises(ValueError, match=r"A_log_q must have shape \(E, N\)"):
        _call_int8_scan({**q, "A_log_q": q["A_log_q"][:3]}, 0.01)
    for bad in BAD_SCALES:
        with pytest.raises(ValueError, match="s_h must be a finite float > 0"):
            _call_int8_scan(q, bad)
    with pytest.raises(ValueError, match="s_dt must be a finite float > 0"):
        ref.selective_scan_int8(
            q["u_q"], 0.1, q["dt_q"], float("nan"), q["A_log_q"], 0.1, q["B_q"], 0.1, q["C_q"], 0.1,
            q["D_q"], 0.1, q["z_q"], 0.1, q["dtb_q"], 0.1, 0.1,
        )  # fmt: skip


def _step(state_q, q, t, s_h, **kwargs):
    s = INT8_SCALES
    return ref.selective_scan_step(
        state_q, q["u_q"][:, :, t], s["s_u"], q["dt_q"][:, :, t], s["s_dt"], q["A_log_q"],
        s["s_A"], q["B_q"][:, :, t], s["s_B"], q["C_q"][:, :, t], s["s_C"], q["D_q"], s["s_D"],
        q["z_q"][:, :, t], s["s_z"], q["dtb_q"], s["s_dtb"], s_h, **kwargs,
    )  # fmt: skip


def test_step_from_zero_state_equals_one_token_scan():
    q = _int8_scan_inputs(3, 7, 1, 16, seed=900)
    s_h = 0.02
    y_step, state_step = _step(torch.zeros(3, 7, 16, dtype=torch.int8), q, 0, s_h)
    y_scan, state_scan = _call_int8_scan(q, s_h)
    assert y_step.shape == (3, 7) and y_step.dtype == torch.float16
    assert torch.equal(y_step, y_scan[:, 0, :])
    assert torch.equal(state_step, state_scan)


@pytest.mark.parametrize("rule", RULES)
def test_step_requantizes_state_every_step(rule):
    batch, e, length, n = 2, 9, 12, 16
    q = _int8_scan_inputs(batch, e, length, n, seed=1000)
    s_h = 0.004
    s = INT8_SCALES
    state = torch.zeros(batch, e, n, dtype=torch.int8)
    total_mismatches = 0
    for t in range(length):
        y, new_state = _step(state, q, t, s_h, state_rounding=rule)
        # Exactly: the float32 scan of one token started from the dequantized state.
        token = {
            key: (v[..., t : t + 1] if v.dim() == 3 and key != "A_log_q" else v)
            for key, v in q.items()
        }
        y32, h32 = ref.selective_scan(
            *_dequantized(token), initial_state=ref.dequantize(state, s_h)
        )
        assert torch.equal(y, y32[:, 0, :].half())
        assert torch.equal(new_state, ref.quantize_int8(h32, s_h, rule))
        # Independently in float64 from the same INT8 state.
        h0 = state.double() * _f32(s_h)
        delta = F.softplus(
            q["dt_q"][:, :, t].double() * s["s_dt"] + q["dtb_q"].double() * s["s_dtb"]
        )
        a = -torch.exp(q["A_log_q"].double() * s["s_A"])
        u = q["u_q"][:, :, t].double() * s["s_u"]
        b = q["B_q"][:, :, t].double() * s["s_B"]
        c = q["C_q"][:, :, t].double() * s["s_C"]
        h64 = torch.exp(delta[..., None] * a) * h0 + delta[..., None] * b[:, None, :] * u[..., None]
        y64 = (h64 * c[:, None, :]).sum(-1) + u * q["D_q"].double() * s["s_D"]
        y64 = y64 * F.silu(q["z_q"][:, :, t].double() * s["s_z"])
        assert_close(y.double(), y64, rtol=2e-3, atol=1e-3 * y64.abs().max().item())
        r64 = h64.numpy() / _f32(s_h)
        extra = 8 * F32_EPS * (np.abs(h0.numpy()) + np.abs(r64) * _f32(s_h)) / _f32(s_h)
        total_mismatches += assert_codes_match(new_state, r64, rule, error_bound=extra)
        state = new_state
    assert state.abs().max() > 10  # the state is really carried and requantized
    assert total_mismatches <= 3


def test_step_rejects_bad_state():
    q = _int8_scan_inputs(2, 5, 3, 4, seed=1100)
    with pytest.raises(ValueError, match=r"state_q must have shape \(B, E, N\)"):
        _step(torch.zeros(2, 5, 3, dtype=torch.int8), q, 0, 0.01)
    with pytest.raises(TypeError, match="state_q must have dtype int8"):
        _step(torch.zeros(2, 5, 4), q, 0, 0.01)
    with pytest.raises(ValueError, match="s_h must be a finite float > 0"):
        _step(torch.zeros(2, 5, 4, dtype=torch.int8), q, 0, 0.0)


# --------------------------------------------------------------------------------------------
# Hadamard op
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(12,), (1, 20), (2, 3, 40), (2, 64), (3, 768)])
def test_hadamard_op(rule, shape):
    n = shape[-1]
    x = torch.randn(shape, generator=_gen(n + len(shape)))
    scale = 1.0 / math.sqrt(n)
    y = ref.hadamard(x, scale)
    assert torch.equal(y, hadamard_transform_ref(x, scale))
    out_scale = 0.011
    y_q = ref.hadamard(x, scale, out_scale=out_scale, rounding=rule)
    assert torch.equal(y_q, ref.quantize_int8(y, out_scale, rule))
    r64 = (x.double() @ hadamard_matrix(n).T).numpy() * _f32(scale) / _f32(out_scale)
    m_plus_k = 20 + int(math.log2(n))
    extra = (
        m_plus_k * F32_EPS * np.abs(x.double().numpy()).sum(-1, keepdims=True) * scale / out_scale
    )
    assert_codes_match(y_q, r64, rule, error_bound=extra)
    assert torch.equal(
        ref.hadamard(x.half(), scale), hadamard_transform_ref(x.half().float(), scale)
    )


def test_hadamard_exact_ties():
    # n = 64, scale 1/8, integer x with an odd sum: every H x is odd, so y / 0.25 = Hx / 2 is a tie.
    n = 64
    x = torch.randint(-3, 4, (3, n), generator=_gen(1200)).float()
    x[:, 0] += (x.sum(-1) % 2 == 0).float()  # make every row sum odd
    hx = (x.double() @ hadamard_matrix(n).T).long().numpy()
    assert np.all(hx % 2 == 1)
    away = ref.hadamard(x, 0.125, out_scale=0.25, rounding="half_away").numpy()
    even = ref.hadamard(x, 0.125, out_scale=0.25, rounding="half_even").numpy()
    halves = [Fraction(int(v), 2) for v in hx.ravel()]
    expected_even = np.array([round(h) for h in halves]).reshape(hx.shape)
    expected_away = np.sign(hx) * ((np.abs(hx) + 1) // 2)
    assert np.array_equal(even, expected_even)
    assert np.array_equal(away, expected_away)
    trunc_even = np.trunc(hx / 2) % 2 == 0
    assert np.array_equal(away != even, trunc_even)


def test_hadamard_op_rejects_bad_input():
    with pytest.raises(ValueError, match=r"2\^k, 12·2\^k or 20·2\^k"):
        ref.hadamard(torch.ones(2, 24 * 3), 0.1)
    with pytest.raises(TypeError, match="x must have dtype"):
        ref.hadamard(torch.ones(2, 64, dtype=torch.int8), 0.1)
    for bad in BAD_SCALES:
        with pytest.raises(ValueError, match="scale must be a finite float > 0"):
            ref.hadamard(torch.ones(2, 64), bad)
        with pytest.raises(ValueError, match="out_scale must be a finite float > 0"):
            ref.hadamard(torch.ones(2, 64), 0.125, out_scale=bad)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_exact_ops_agree_between_cpu_and_cuda():
    dev = torch.device("cuda")
    v = torch.randn(1000, generator=_gen(1300)) * 3
    for rule in RULES:
        assert torch.equal(
            ref.quantize_int8(v.to(dev), 0.0123, rule).cpu(), ref.quantize_int8(v, 0.0123, rule)
        )
    x_q = _randint8((3, 96), seed=1301)
    w_q = _randint8((10, 96), seed=1302)
    cpu = ref.w8a8_linear(x_q, w_q, 0.017, 0.0029, s_out=0.7)
    assert torch.equal(
        ref.w8a8_linear(x_q.to(dev), w_q.to(dev), 0.017, 0.0029, s_out=0.7).cpu(), cpu
    )
    x = torch.randn(4, 768, generator=_gen(1303))
    assert torch.equal(ref.hadamard(x.to(dev), 768**-0.5).cpu(), ref.hadamard(x, 768**-0.5))
    # RMSNorm: correctly rounded sqrt and IEEE division on both devices.
    residual = torch.randn(4, 768, generator=_gen(1305))
    weight = torch.rand(768, generator=_gen(1306))
    y_cpu, r_cpu = ref.rmsnorm(x, residual, weight, 1e-5)
    y_gpu, r_gpu = ref.rmsnorm(x.to(dev), residual.to(dev), weight.to(dev), 1e-5)
    assert torch.equal(r_gpu.cpu(), r_cpu)
    assert torch.equal(y_gpu.cpu(), y_cpu)
    # The scan differs between devices only through exp/log1p (not correctly rounded).
    inputs = _scan_inputs(2, 16, 40, 16, seed=1307)
    y_cpu, h_cpu = ref.selective_scan(*inputs)
    y_gpu, h_gpu = ref.selective_scan(*(t.to(dev) for t in inputs))
    assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5 * y_cpu.abs().max().item())
    assert_close(h_gpu, h_cpu, rtol=1e-5, atol=1e-5 * h_cpu.abs().max().item())
    # Conv decode equals prefill on the GPU as well.
    xc, wc, bc = (t.to(dev) for t in _conv_inputs(2, 5, 11, 4, seed=1304))
    prefill = ref.conv1d_int8(xc, 0.03, wc, 0.005, bc, 0.01, s_out=0.002)
    state = torch.zeros(2, 5, 3, dtype=torch.int8, device=dev)
    for t in range(11):
        out, state = ref.conv1d_int8_update(
            xc[:, :, t], state, 0.03, wc, 0.005, bc, 0.01, s_out=0.002
        )
        assert torch.equal(out, prefill[:, :, t])


def test_mixed_devices_are_rejected():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            ref.w8a8_linear(_randint8((2, 4), 1), _randint8((3, 4), 2).to("meta"), 0.1, 0.1)
        return
    with pytest.raises(ValueError, match="same device"):
        ref.w8a8_linear(_randint8((2, 4), 1), _randint8((3, 4), 2).cuda(), 0.1, 0.1)
