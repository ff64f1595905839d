"""GPU parity tests of the CUDA kernels against quamba_layers.reference_ops / fp_ops.

The references run on the same GPU, so the transcendental functions are the same (torch's CUDA
exp/log1p call libdevice's expf/log1pf, as the kernels do). Everything the kernels define as exact
is compared bit for bit; the only tolerated INT8 differences are rounding ties (the unrounded
quotient within float32 resolution of k + 0.5), counted and required to stay below 1e-5. The fast
scan is compared with a float64 evaluation of the same math under a stated tolerance.

Every output is poisoned before the launch (NaN for floats; two runs with sentinels 127 and -128
for int8, so that an unwritten element mismatches in at least one run) and checked fully written.
Inputs are fresh random draws per case (seeded by the case for reproducibility).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
LENGTHS = (1, 7, 128, 256, 2047, 2048, 4100)
MAX_TIE_RATE = 1e-5

# Statistics printed at the end of the run by tools/gpu_check.sh (tie counts, fast-scan errors).
STATS: dict[str, list] = {"ties": [], "fast_scan": []}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _gen(*key) -> torch.Generator:
    seed = 0
    for part in key:
        seed = (seed * 1000003 + hash(str(part))) % (2**62)
    return torch.Generator().manual_seed(seed)


def _int8(g, shape, low=-128, high=128):
    return torch.randint(low, high, shape, generator=g, dtype=torch.int8).to(DEVICE)


def _normal(g, shape, std=1.0, mean=0.0, dtype=torch.float32):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype).to(DEVICE)


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _poisoned_float(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _run_int8_twice(launch, shape):
    """Run ``launch(out)`` into outputs poisoned with 127 and -128; both must agree."""
    outs = []
    for sentinel in (127, -128):
        out = torch.full(shape, sentinel, dtype=torch.int8, device=DEVICE)
        launch(out)
        outs.append(out)
    torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1]), "int8 output not fully written or not deterministic"
    return outs[0]


def _assert_written(t, name):
    assert not torch.isnan(t.float()).any(), (
        f"{name}: some elements were never written (NaN poison)"
    )


def _assert_codes(got, want, quotient, name):
    """INT8 codes equal except at rounding ties of the float64 quotient; rate < MAX_TIE_RATE."""
    assert got.dtype == torch.int8 and got.shape == want.shape, name
    diff = got.int() - want.int()
    bad = diff != 0
    n_bad = int(bad.sum())
    if n_bad:
        assert int(diff.abs().max()) == 1, f"{name}: codes differ by more than 1"
        q = quotient[bad].double().abs()
        distance_to_tie = (q - torch.floor(q) - 0.5).abs()
        # float32 resolution of the quotient (a few ulps of |q| <= 2^7): 2^-15.
        assert bool((distance_to_tie <= 2.0**-15).all()), (
            f"{name}: {n_bad} codes differ away from a rounding tie "
            f"(max distance {float(distance_to_tie.max()):.3g})"
        )
    rate = n_bad / max(got.numel(), 1)
    STATS["ties"].append((name, n_bad, got.numel()))
    assert rate < MAX_TIE_RATE, f"{name}: tie rate {rate:.2e} >= {MAX_TIE_RATE}"


def _assert_equal(got, want, name):
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(got, want):
        mismatch = (got != want) & ~(torch.isnan(got.float()) & torch.isnan(want.float()))
        idx = mismatch.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(mismatch.sum())} of {got.numel()} elements differ, first at {idx}: "
            f"{[float(got[tuple(i)]) for i in idx]} vs {[float(want[tuple(i)]) for i in idx]}"
        )


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (float64 tensor)."""
    finfo = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * finfo.eps


def _cases(lengths=LENGTHS):
    """(length, batch) pairs: batch cycles 1..8 over the lengths."""
    return [(length, 1 + (i * 3) % 8) for i, length in enumerate(lengths)]


# ------------------------------------------------------------------------------------------------
# quantize (the Q8 shared by every INT8 output: product by RN(1/s), IEEE division near ties)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize("scale", [0.0123, 0.05, 1.0, 3.7e-3, 0.1])
def test_quantize_int8_at_and_near_ties(rounding, scale):
    """Values at k + 0.5 quotients and 1..4 float32 steps around them, plus random values."""
    from quamba_kernels.quantize import quantize_int8
    from quamba_layers import reference_ops as ref

    g = _gen("quantize", rounding, scale)
    s32 = _f32(scale)
    k = torch.arange(-140, 140, dtype=torch.float64) + 0.5
    at_ties = (k * s32).float()
    around = [at_ties]
    below, above = at_ties.clone(), at_ties.clone()
    for _ in range(4):
        below = torch.nextafter(below, torch.full_like(below, -math.inf))
        above = torch.nextafter(above, torch.full_like(above, math.inf))
        around += [below, above]
    random = (torch.randn(200_000, generator=g, dtype=torch.float64) * 60 * s32).float()
    v = torch.cat([*around, random]).to(DEVICE)
    got = _run_int8_twice(lambda out: quantize_int8(v, scale, rounding, out=out), tuple(v.shape))
    _assert_equal(got, ref.quantize_int8(v, scale, rounding), f"quantize {rounding} s={scale}")


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
@pytest.mark.parametrize(("batch", "dim", "length"), [(1, 1, 1), (3, 37, 7), (5, 130, 300),
                                                      (2, 1536, 2047)])  # fmt: skip
def test_quantize_int8_per_sequence_matches_the_reference(rounding, batch, dim, length):
    """Mode 3's per-sequence dynamic INT8: scales and codes bit for bit, with right padding
    (lengths 0, shorter, equal, longer than L), an all-zero sequence (scale 1) and exact ties
    (a peak of 127 / 16: scale 1/16, values at k/16 + 1/32)."""
    from quamba_kernels.quantize import quantize_int8_per_sequence
    from quamba_layers.quant.modules import dynamic_scale_per_sequence, quantize_per_sequence

    g = _gen("per-seq", rounding, batch, dim, length)
    x = _normal(g, (batch, dim, length), std=3.0)
    x[0].clamp_(-7.9, 7.9)
    x[0, 0, 0] = 127.0 / 16  # sequence 0: peak 127/16, scale 1/16, and its ties below
    if dim * length > 8:
        ties = (torch.arange(-60, 60, device=DEVICE, dtype=torch.float32) + 0.5) / 16
        flat = x[0].reshape(-1)
        count = min(ties.numel(), flat.numel() - 1)
        flat[1 : 1 + count] = ties[:count].clamp(-7.9, 7.9)
    if batch > 2:
        x[2] = 0.0  # no peak: scale 1
    for seq_lens in (None, torch.tensor([length + 3, max(length - 2, 0), 0, length, 1][:batch])):
        lens = None if seq_lens is None else seq_lens.to(DEVICE)
        codes, scales = quantize_int8_per_sequence(x, lens, rounding)
        want_scales = dynamic_scale_per_sequence(x, lens)
        assert torch.equal(scales, want_scales), f"scales {seq_lens}"
        _assert_equal(codes, quantize_per_sequence(x, want_scales, rounding), f"codes {seq_lens}")


# ------------------------------------------------------------------------------------------------
# conv1d
# ------------------------------------------------------------------------------------------------

CONV_CASES = [(length, batch, 4 - i % 3) for i, (length, batch) in enumerate(_cases())]


def _conv_inputs(g, batch, channels, length, width):
    x_q = _int8(g, (batch, channels, length))
    w_q = _int8(g, (channels, width))
    b_q = _int8(g, (channels,))
    s_x = _uniform(g, 0.01, 0.05)
    s_w = _uniform(g, 0.005, 0.02)
    s_b = _uniform(g, 0.005, 0.05)
    return x_q, w_q, b_q, s_x, s_w, s_b


@pytest.mark.parametrize("length,batch,width", CONV_CASES)
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_conv1d_int8_codes(length, batch, width, rounding):
    from quamba_kernels.conv1d import conv1d_int8
    from quamba_layers import reference_ops as ref

    channels = 77
    g = _gen("conv8", length, batch, width, rounding)
    x_q, w_q, b_q, s_x, s_w, s_b = _conv_inputs(g, batch, channels, length, width)
    s_out = _uniform(g, 0.02, 0.08)
    got = _run_int8_twice(
        lambda out: conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out, rounding, out=out),
        (batch, channels, length),
    )
    want = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out, rounding)
    v = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, None)
    _assert_codes(got, want, v.double() / _f32(s_out), f"conv1d_int8 L={length} {rounding}")

    # Independent float64 check of the float32 epilogue: |v32 - v64| within a few float32 ulps.
    k = w_q.shape[1]
    xp = torch.nn.functional.pad(x_q.double(), (k - 1, 0))
    acc = sum(w_q.double()[None, :, j, None] * xp[:, :, j : j + length] for j in range(k))
    scaled, bias = acc * (s_w * s_x), (b_q.double() * s_b)[:, None]
    v64 = scaled + bias
    v64 = v64 / (1 + torch.exp(-v64))
    # ~6 float32 roundings of values bounded by |scaled| + |bias| (SiLU' <= 1.1).
    bound = 8 * _ulp(v64, torch.float32) + 1e-6 * (scaled.abs() + bias.abs())
    assert bool(((v.double() - v64).abs() <= bound).all())


@pytest.mark.parametrize("length,batch,width", CONV_CASES)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_conv1d_int8_float_output(length, batch, width, per_sequence):
    """Mode 3 / fp32 output: the true float32 value, per-tensor or per-sequence input scale."""
    from quamba_kernels.conv1d import conv1d_int8
    from quamba_layers import reference_ops as ref

    channels = 53
    g = _gen("conv32", length, batch, width, per_sequence)
    x_q, w_q, b_q, s_x, s_w, s_b = _conv_inputs(g, batch, channels, length, width)
    if per_sequence:
        s_x = (torch.rand(batch, generator=g, dtype=torch.float64) * 0.05 + 0.005).float()
        s_x = s_x.to(DEVICE)
    out = _poisoned_float((batch, channels, length), torch.float32)
    conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, None, out=out)
    torch.cuda.synchronize()
    _assert_written(out, "conv fp32")
    _assert_equal(out, ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, None), "conv1d fp32 out")


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("s_out", [None, 0.05])
@pytest.mark.parametrize("length", [300, 700])
def test_conv1d_int8_per_sequence_int8_and_no_bias(per_sequence, s_out, length):
    from quamba_kernels.conv1d import conv1d_int8
    from quamba_layers import reference_ops as ref

    g = _gen("conv-nobias", per_sequence, s_out, length)
    x_q, w_q, _, s_x, s_w, _ = _conv_inputs(g, 3, 41, length, 4)
    if per_sequence:
        s_x = torch.tensor([0.011, 0.03, 0.047], dtype=torch.float32, device=DEVICE)
    want = ref.conv1d_int8(x_q, s_x, w_q, s_w, None, 1.0, s_out)
    got = conv1d_int8(x_q, s_x, w_q[:, None, :].contiguous(), s_w, None, 1.0, s_out)
    if s_out is None:
        _assert_equal(got, want, "conv no bias fp32")
    else:
        v = ref.conv1d_int8(x_q, s_x, w_q, s_w, None, 1.0, None)
        _assert_codes(got, want, v.double() / _f32(s_out), "conv no bias int8")


@pytest.mark.parametrize("length", [80, 333, 600, 2000])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("s_out", [1e-4, 0.002, 0.5, 3.0])
def test_conv1d_int8_codes_across_output_scales(length, silu, s_out):
    """The fast Q8 path's margins across scales: small s_out saturates both signs and widens the
    negative-side margin (many exact fallbacks); large s_out gives few codes. Lengths: whole
    16-output chunks (80, 2000) or not (333, 600), rows ending inside a thread's chunk."""
    from quamba_kernels.conv1d import conv1d_int8
    from quamba_layers import reference_ops as ref

    g = _gen("conv-scales", length, silu, s_out)
    x_q, w_q, b_q, s_x, s_w, s_b = _conv_inputs(g, 2, 37, length, 4)
    got = _run_int8_twice(
        lambda out: conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out, silu=silu, out=out),
        (2, 37, length),
    )
    if silu:
        want = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out)
        v = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, None)
    else:  # the reference's pre-activation: float32(s_w s_x) * acc, then + float32(s_b b)
        xp = torch.nn.functional.pad(x_q.double(), (3, 0))
        acc = sum(w_q.double()[None, :, j, None] * xp[:, :, j : j + length] for j in range(4))
        scale = torch.tensor(s_w * s_x, dtype=torch.float64).float().to(DEVICE)
        v = scale * acc.float() + (b_q.double() * s_b).float()[:, None]
        want = ref.quantize_int8(v, s_out, "half_away")
    _assert_codes(got, want, v.double() / _f32(s_out), f"conv s_out={s_out} silu={silu}")
    if s_out <= 0.002:  # both signs saturate
        assert int((want == 127).sum()) > 0 and int((want == -128).sum()) > 0


@pytest.mark.parametrize("batch,channels,length", [(1, 5120, 2048), (2, 2051, 2049)])
def test_conv1d_int8_codes_two_chunks_per_thread(batch, channels, length):
    """Large inputs (2^19 chunks of 16 outputs and more) give each thread two consecutive chunks;
    with an odd length a thread's second chunk straddles the end of its row."""
    from quamba_kernels.conv1d import conv1d_int8
    from quamba_layers import reference_ops as ref

    assert batch * channels * -(-length // 16) >= 2**19  # the launch's two-chunk threshold
    g = _gen("conv-two-chunks", batch, channels, length)
    x_q, w_q, b_q, s_x, s_w, s_b = _conv_inputs(g, batch, channels, length, 4)
    s_out = _uniform(g, 0.02, 0.08)
    got = _run_int8_twice(
        lambda out: conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out, out=out),
        (batch, channels, length),
    )
    want = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out)
    v = ref.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, None)
    _assert_codes(got, want, v.double() / _f32(s_out), f"conv two chunks L={length}")


@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_conv1d_rounding_rule_at_exact_ties(rounding):
    """Without SiLU and with s_w*s_x = 0.5, s_out = 1: v = acc/2, half of the codes are ties."""
    from quamba_kernels.conv1d import conv1d_int8

    g = _gen("conv-ties", rounding)
    x_q = _int8(g, (2, 19, 500), -12, 12)
    w_q = _int8(g, (19, 3), -8, 8)
    got = conv1d_int8(x_q, 0.5, w_q, 1.0, None, 1.0, 1.0, rounding, silu=False)
    xp = torch.nn.functional.pad(x_q.double(), (2, 0))
    acc = sum(w_q.double()[None, :, j, None] * xp[:, :, j : j + 500] for j in range(3))
    half = acc / 2
    if rounding == "half_even":
        want = torch.round(half)
    else:
        want = torch.trunc(half) + torch.sign(half) * ((half - torch.trunc(half)).abs() >= 0.5)
    want = want.clamp(-128, 127).to(torch.int8)
    assert int((half - torch.floor(half) == 0.5).sum()) > 1000  # the test really has ties
    _assert_equal(got, want, f"conv ties {rounding}")


@pytest.mark.parametrize(
    "length,batch,width,channels",
    [(length, batch, width, 45) for length, batch, width in CONV_CASES]
    + [(2048, 1, 4, 4096)],  # two 16-output chunks per thread (the large-input rule)
)
@pytest.mark.parametrize("s_out", [None, 0.06])
def test_conv1d_int8_state_out(length, batch, width, channels, s_out):
    """The prefill's state output: each row's last K-1 input codes, zeros before the row (the
    state conv1d_int8_update continues from), beside unchanged outputs; poisoned twice."""
    from quamba_kernels.conv1d import conv1d_int8

    g = _gen("conv-state", length, batch, width, channels, s_out)
    x_q, w_q, b_q, s_x, s_w, s_b = _conv_inputs(g, batch, channels, length, width)
    want_out = conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out)
    keep = width - 1
    tail = x_q[..., max(length - keep, 0) :]
    want_state = torch.nn.functional.pad(tail, (keep - tail.shape[-1], 0))
    for sentinel in (127, -128):
        state = torch.full((batch, channels, keep), sentinel, dtype=torch.int8, device=DEVICE)
        out = conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out, state_out=state)
        torch.cuda.synchronize()
        _assert_equal(out, want_out, f"conv with state_out L={length}")
        _assert_equal(state, want_state, f"conv state_out L={length} K={width}")


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("s_out", [None, 0.06])
def test_conv1d_int8_update_equals_prefill(width, s_out):
    from quamba_kernels.conv1d import conv1d_int8, conv1d_int8_update
    from quamba_layers import reference_ops as ref

    batch, channels, length = 3, 45, 37
    g = _gen("conv-update", width, s_out)
    x_q, w_q, b_q, s_x, s_w, s_b = _conv_inputs(g, batch, channels, length, width)
    prefill = conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out)
    state = torch.zeros(batch, channels, width - 1, dtype=torch.int8, device=DEVICE)
    ref_state = state.clone()
    for t in range(length):
        x_t = x_q[:, :, t].contiguous()
        out, _ = conv1d_int8_update(x_t, state, s_x, w_q, s_w, b_q, s_b, s_out)
        want, ref_state = ref.conv1d_int8_update(x_t, ref_state, s_x, w_q, s_w, b_q, s_b, s_out)
        _assert_equal(out, want, f"conv update t={t}")
        _assert_equal(out, prefill[:, :, t], f"conv update vs prefill t={t}")
        _assert_equal(state, ref_state, f"conv state t={t}")


FP_CONV_DTYPES = [
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
]


@pytest.mark.parametrize("length,batch,width", CONV_CASES)
@pytest.mark.parametrize("dtype,wdtype", FP_CONV_DTYPES)
def test_causal_conv1d_float(length, batch, width, dtype, wdtype):
    from quamba_kernels.conv1d import causal_conv1d
    from quamba_layers import fp_ops

    channels = 65
    g = _gen("convfp", length, batch, width, dtype, wdtype)
    x = _normal(g, (batch, channels, length), dtype=dtype)
    w = _normal(g, (channels, width), 0.5, dtype=wdtype)
    b = _normal(g, (channels,), 0.5, dtype=wdtype)
    out = _poisoned_float((batch, channels, length), dtype)
    causal_conv1d(x, w, b, out=out)
    torch.cuda.synchronize()
    _assert_written(out, "conv fp")
    _assert_equal(out, fp_ops.causal_conv1d_ref(x, w, b, "silu"), f"causal_conv1d {dtype}")
    # float64 check: within one unit of the output dtype (plus float32 evaluation error).
    xp = torch.nn.functional.pad(x.double(), (width - 1, 0))
    terms = [w.double()[None, :, j, None] * xp[:, :, j : j + length] for j in range(width)]
    v = sum(terms) + b.double()[:, None]
    magnitude = sum(t.abs() for t in terms) + b.double().abs()[:, None]
    v = v / (1 + torch.exp(-v))
    # one rounding to the output dtype + ~8 float32 roundings of values bounded by the magnitude
    bound = _ulp(v, dtype) + 1e-6 * magnitude
    assert bool(((out.double() - v).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_causal_conv1d_update_equals_prefill(dtype):
    from quamba_kernels.conv1d import causal_conv1d, causal_conv1d_update
    from quamba_layers import fp_ops

    batch, channels, length, width = 2, 33, 20, 4
    g = _gen("convfp-update", dtype)
    x = _normal(g, (batch, channels, length), dtype=dtype)
    w = _normal(g, (channels, width), 0.5, dtype=dtype)
    b = _normal(g, (channels,), 0.5, dtype=dtype)
    prefill = causal_conv1d(x, w, b)
    state = torch.zeros(batch, channels, width - 1, dtype=dtype, device=DEVICE)
    ref_state = state.clone()
    for t in range(length):
        x_t = x[:, :, t].contiguous()
        out, _ = causal_conv1d_update(x_t, state, w, b)
        want, ref_state = fp_ops.causal_conv1d_update_ref(x_t, ref_state, w, b)
        _assert_equal(out, want, f"conv fp update t={t}")
        _assert_equal(out, prefill[:, :, t], f"conv fp update vs prefill t={t}")
        _assert_equal(state, ref_state, f"conv fp state t={t}")


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------

NORM_CASES = [
    (length, batch, dim, dtype, wdtype, residual, out)
    for (length, batch), dim, dtype, wdtype, residual, out in zip(
        _cases(),
        (2560, 768, 1001, 2560, 64, 8192, 16384),
        (torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float16,
         torch.float32, torch.float16),
        ("x", "f32", "x", None, "f32", "x", "f32"),
        (True, False, True, True, False, True, True),
        ("int8", "int8", "float32", "int8", "float16", "int8", "int8"),
    )
]  # fmt: skip


@pytest.mark.parametrize("length,batch,dim,dtype,wdtype,has_residual,out_kind", NORM_CASES)
def test_rmsnorm(length, batch, dim, dtype, wdtype, has_residual, out_kind):
    from quamba_kernels.rmsnorm import rmsnorm
    from quamba_layers import reference_ops as ref

    rows = min(length, 1024)  # D up to 16384: keep the tensors moderate
    g = _gen("norm", length, batch, dim, dtype, wdtype, has_residual, out_kind)
    x = _normal(g, (batch, rows, dim), 2.0, dtype=dtype)
    residual = _normal(g, (batch, rows, dim), 3.0) if has_residual else None
    weight = None
    if wdtype is not None:
        weight = _normal(g, (dim,), 0.3, 1.0, dtype=dtype if wdtype == "x" else torch.float32)
    eps = 1e-5
    r_out = _poisoned_float(x.shape, torch.float32)
    if out_kind == "int8":
        s_out = _uniform(g, 0.02, 0.05)
        for rounding in ("half_even", "half_away"):
            got = _run_int8_twice(
                lambda out, rounding=rounding: rmsnorm(
                    x, residual, weight, eps, s_out, rounding, out=out, residual_out=r_out
                ),
                tuple(x.shape),
            )
            want, r_want = ref.rmsnorm(x, residual, weight, eps, s_out, rounding)
            y_ref, _ = ref.rmsnorm(x, residual, weight, eps, None)
            _assert_codes(got, want, y_ref.double() / _f32(s_out), f"rmsnorm D={dim} {rounding}")
    else:
        out_dtype = getattr(torch, out_kind)
        out = _poisoned_float(x.shape, out_dtype)
        rmsnorm(x, residual, weight, eps, out_dtype=out_dtype, out=out, residual_out=r_out)
        torch.cuda.synchronize()
        _assert_written(out, "rmsnorm out")
        y_ref, r_want = ref.rmsnorm(x, residual, weight, eps, None)
        _assert_equal(out, y_ref.to(out_dtype), f"rmsnorm D={dim} {out_kind}")
    _assert_written(r_out, "rmsnorm residual_out")
    _assert_equal(r_out, r_want, "rmsnorm residual")


def test_rmsnorm_is_deterministic_and_matches_float64():
    from quamba_kernels.rmsnorm import rmsnorm

    g = _gen("norm-det")
    x = _normal(g, (64, 2560), 4.0, dtype=torch.float16)
    residual = _normal(g, (64, 2560), 10.0)
    weight = _normal(g, (2560,), 0.2, 1.0)
    first, _ = rmsnorm(x, residual, weight, 1e-6)
    for _ in range(3):
        again, _ = rmsnorm(x, residual, weight, 1e-6)
        _assert_equal(again, first, "rmsnorm repeat")
    r = x.double() + residual.double()
    y64 = r / torch.sqrt((r * r).mean(-1, keepdim=True) + 1e-6) * weight.double()
    # five float32 roundings (r, ms, sqrt, 1/sqrt, two products): within 8 ulps.
    assert bool(((first.double() - y64).abs() <= 8 * _ulp(y64, torch.float32) + 1e-30).all())


# ------------------------------------------------------------------------------------------------
# Hadamard
# ------------------------------------------------------------------------------------------------

HADAMARD_SIZES = (
    [2**k for k in range(14)] + [12 * 2**k for k in range(10)] + [20 * 2**k for k in range(9)]
)
HADAMARD_KINDS = [
    (torch.float16, "int8"),
    (torch.float32, "float32"),
    (torch.bfloat16, "int8"),
    (torch.float16, "float16"),
]


def _hadamard_float(x, scale, out_dtype):
    """The kernel's float output, launched into a NaN-poisoned tensor that must be all written."""
    from quamba_kernels.hadamard import hadamard

    out = _poisoned_float(x.shape, out_dtype)
    hadamard(x, scale, out_dtype=out_dtype, out=out)
    torch.cuda.synchronize()
    _assert_written(out, "hadamard")
    return out


@pytest.mark.parametrize("n", HADAMARD_SIZES)
def test_hadamard(n):
    from quamba_kernels.hadamard import hadamard, hadamard_factors
    from quamba_layers import reference_ops as ref

    i = HADAMARD_SIZES.index(n)
    dtype, out_kind = HADAMARD_KINDS[i % len(HADAMARD_KINDS)]
    rows = LENGTHS[i % len(LENGTHS)]
    rows = min(rows, max(1, 2**22 // n))  # at most 4M elements
    batch = 1 + i % 3
    g = _gen("hadamard", n, dtype, out_kind)
    x = _normal(g, (batch, rows, n), 1.0, dtype=dtype)
    scale = 1.0 / math.sqrt(n)
    if out_kind == "int8":
        s_out = 4.0 / 127
        for rounding in ("half_away", "half_even"):
            got = _run_int8_twice(
                lambda out, rounding=rounding: hadamard(x, scale, s_out, rounding, out=out),
                tuple(x.shape),
            )
            want = ref.hadamard(x, scale, s_out, rounding)
            y_ref = ref.hadamard(x, scale)
            _assert_codes(got, want, y_ref.double() / _f32(s_out), f"hadamard n={n} {rounding}")
    else:
        out_dtype = getattr(torch, out_kind)
        out = _hadamard_float(x, scale, out_dtype)
        y_ref = ref.hadamard(x, scale)
        _assert_equal(out, y_ref.to(out_dtype), f"hadamard n={n}")
        # float64 check against the explicit matrix.
        from quamba_layers.hadamard import hadamard_matrix

        h = hadamard_matrix(n).to(DEVICE)
        y64 = (x.double() @ h.T) * scale
        # one float32 rounding per butterfly stage and per column of H_m, each bounded by the
        # l1 norm of the row, plus the final rounding to the output dtype.
        m, p = hadamard_factors(n)
        roundings = int(math.log2(p)) + m + 1
        l1 = x.double().abs().sum(-1, keepdim=True) * scale
        bound = roundings * 2.0**-24 * l1 + _ulp(y64, out_dtype)
        assert bool(((out.double() - y64).abs() <= bound).all())


@pytest.mark.parametrize("n", [1024, 2048, 4096, 8192])
@pytest.mark.parametrize("dtype,out_kind", [*HADAMARD_KINDS, (torch.float32, "int8")])
@pytest.mark.parametrize("rows", [1, 3, 130])
def test_hadamard_power_of_two_kernel(n, dtype, out_kind, rows):
    """The radix-16 kernel (m = 1, 1024 <= n <= 8192): every input and output type, one row, row
    counts that leave part of a block idle (4 rows per block at n = 1024, 2 at 2048), and many
    rows; bit-identical to the reference."""
    from quamba_kernels.hadamard import hadamard
    from quamba_layers import reference_ops as ref

    g = _gen("hadamard-pow2", n, dtype, out_kind, rows)
    x = _normal(g, (rows, n), 1.0, dtype=dtype)
    scale = 1.0 / math.sqrt(n)
    if out_kind == "int8":
        s_out = 4.0 / 127
        got = _run_int8_twice(lambda out: hadamard(x, scale, s_out, out=out), tuple(x.shape))
        want = ref.hadamard(x, scale, s_out)
        _assert_codes(got, want, ref.hadamard(x, scale).double() / _f32(s_out), f"pow2 n={n}")
    else:
        out = _hadamard_float(x, scale, getattr(torch, out_kind))
        _assert_equal(out, ref.hadamard(x, scale).to(out.dtype), f"pow2 n={n}")


# ------------------------------------------------------------------------------------------------
# Selective scan
# ------------------------------------------------------------------------------------------------

SCAN_STATES = (16, 16, 5, 64, 1, 33, 16)
SCAN_CASES = [(length, batch, n) for (length, batch), n in zip(_cases(), SCAN_STATES)]


def _float_scan_inputs(g, batch, channels, length, n, dtype=torch.float32):
    u = _normal(g, (batch, channels, length), dtype=dtype)
    delta = _normal(g, (batch, channels, length), 1.0, -1.0, dtype=dtype)
    A = -torch.exp(_normal(g, (channels, n), 0.8, 1.0))
    B = _normal(g, (batch, n, length), dtype=dtype)
    C = _normal(g, (batch, n, length), dtype=dtype)
    D = _normal(g, (channels,))
    z = _normal(g, (batch, channels, length), dtype=dtype)
    delta_bias = _normal(g, (channels,), 0.5, -1.0)
    return u, delta, A, B, C, D, z, delta_bias


def _skip_unless_lanes_apply(lanes, n):
    if lanes is not None and not 9 <= n <= 16:
        pytest.skip("lanes_per_channel applies to d_state 9..16")


@pytest.mark.parametrize("lanes", [None, 8, 16])
@pytest.mark.parametrize("length,batch,n", SCAN_CASES)
def test_selective_scan_sim_bit_identical(length, batch, n, lanes):
    from quamba_kernels.scan import selective_scan_sim
    from quamba_layers import reference_ops as ref

    _skip_unless_lanes_apply(lanes, n)
    channels = 37
    g = _gen("sim", length, batch, n)
    u, delta, A, B, C, D, z, delta_bias = _float_scan_inputs(g, batch, channels, length, n)
    init = _normal(g, (batch, channels, n)) if length == 7 else None
    if length == 128:  # the optional parts absent
        D = z = delta_bias = None
    out = _poisoned_float((batch, length, channels), torch.float32)
    h = _poisoned_float((batch, channels, n), torch.float32)
    selective_scan_sim(
        u, delta, A, B, C, D, z, delta_bias, initial_state=init, out=out, last_state=h,
        lanes_per_channel=lanes,
    )  # fmt: skip
    torch.cuda.synchronize()
    _assert_written(out, "sim y")
    _assert_written(h, "sim h")
    y_ref, h_ref = ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state=init)
    _assert_equal(out, y_ref, f"sim y L={length} N={n}")
    _assert_equal(h, h_ref, f"sim h L={length} N={n}")


def _int8_scan_inputs(g, batch, channels, length, n, float_u=False):
    u_q = (
        _normal(g, (batch, channels, length), 2.0)
        if float_u
        else _int8(g, (batch, channels, length))
    )
    dt_q = _int8(g, (batch, channels, length))
    A_log_q = _int8(g, (channels, n), 0, 128)
    B_q = _int8(g, (batch, n, length))
    C_q = _int8(g, (batch, n, length))
    D_q = _int8(g, (channels,))
    z_q = _int8(g, (batch, channels, length))
    dtb_q = _int8(g, (channels,))
    scales = {
        "s_u": 0.02, "s_dt": 0.02, "s_A": math.log(16.0) / 127, "s_B": 0.02, "s_C": 0.02,
        "s_D": 0.01, "s_z": 0.03, "s_dtb": 0.04,
    }  # fmt: skip
    return (u_q, dt_q, A_log_q, B_q, C_q, D_q, z_q, dtb_q), scales


def _int8_args(t, s, s_h):
    u_q, dt_q, A_log_q, B_q, C_q, D_q, z_q, dtb_q = t
    return (
        u_q, s["s_u"], dt_q, s["s_dt"], A_log_q, s["s_A"], B_q, s["s_B"], C_q, s["s_C"],
        D_q, s["s_D"], z_q, s["s_z"], dtb_q, s["s_dtb"], s_h,
    )  # fmt: skip


def _dequant(args):
    """The reference's dequantization (public reference_ops.dequantize), for the tie analysis."""
    from quamba_layers import reference_ops as ref

    u_q, s_u, dt_q, s_dt, a_q, s_a, b_q, s_b, c_q, s_c, d_q, s_d, z_q, s_z, dtb_q, s_dtb = args[:16]

    def dq(q, scale):
        return None if q is None else ref.dequantize(q, scale)

    u = dq(u_q, s_u) if u_q.dtype == torch.int8 else u_q
    return (
        u, dq(dt_q, s_dt), -torch.exp(dq(a_q, s_a)), dq(b_q, s_b), dq(c_q, s_c), dq(d_q, s_d),
        dq(z_q, s_z), dq(dtb_q, s_dtb),
    )  # fmt: skip


def _scan64(u, delta, A, B, C, D, z, delta_bias):
    """Float64 evaluation of the scan (sequential), the ground truth for the fast mode.

    Also returns the magnitude that bounds float32 evaluation errors: the same recurrence on
    absolute values (``|h| = dA |h| + |dBu|``, so cancellation inside the recurrence counts),
    summed as ``sum_n |h_n C_n| + |u D|`` and multiplied by ``|silu(z)|``.
    """
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    delta = torch.where(delta <= 20, torch.log1p(torch.exp(delta)), delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64, device=u.device)
    h_abs = torch.zeros_like(h)
    ys, mags = [], []
    for t in range(u.shape[2]):
        d = delta[:, :, t, None]
        decay = torch.exp(d * A)
        d_bu = d * B[:, None, :, t] * u[:, :, t, None]
        h = decay * h + d_bu
        h_abs = decay * h_abs + d_bu.abs()
        ys.append((h * C[:, None, :, t]).sum(-1))
        mags.append((h_abs * C[:, None, :, t].abs()).sum(-1))
    skip = u * D.double()[:, None] if D is not None else torch.zeros_like(u)
    y = torch.stack(ys, -1) + skip
    mag = torch.stack(mags, -1) + skip.abs()
    gate = z.double() / (1 + torch.exp(-z.double())) if z is not None else torch.ones_like(u)
    return (y * gate).transpose(1, 2), (mag * gate.abs()).transpose(1, 2), h


def _check_fast(y, y64, mag64, dtype, name):
    """Fast mode tolerance: |y - y64| <= ulp(y64) in the output dtype + 1e-5 * magnitude.

    Output rounding contributes at most half an ulp; the float32 evaluation (fused multiply-adds,
    hardware exp2 with ~2 ulp error) a relative error of the order of 1e-6 of the magnitude that
    conditions the result (``_scan64``: absolute values carried through the recurrence), so 1e-5
    leaves a 10x margin.
    """
    err = (y.double() - y64).abs()
    bound = _ulp(y64, dtype) + 1e-5 * mag64
    worst = float((err / bound).max()) if err.numel() else 0.0
    rel = float((err / (mag64 + 1e-30)).max()) if err.numel() else 0.0
    STATS["fast_scan"].append((name, worst, rel))
    assert worst <= 1.0, f"{name}: error {worst:.3g} x the tolerance (max err/magnitude {rel:.3g})"


@pytest.mark.parametrize("lanes", [None, 8, 16])
@pytest.mark.parametrize("length,batch,n", SCAN_CASES)
@pytest.mark.parametrize("float_u", [False, True])
def test_selective_scan_int8(length, batch, n, float_u, lanes):
    from quamba_kernels.scan import selective_scan_int8
    from quamba_layers import reference_ops as ref

    _skip_unless_lanes_apply(lanes, n)
    channels = 37
    g = _gen("scan8", length, batch, n, float_u)
    tensors, s = _int8_scan_inputs(g, batch, channels, length, n, float_u)
    s_h = 0.1
    args = _int8_args(tensors, s, s_h)
    y_ref, hq_ref = ref.selective_scan_int8(*args)

    # Exact mode: the reference's bits.
    y = _poisoned_float((batch, length, channels), torch.float16)
    hq = _run_int8_twice(
        lambda out: selective_scan_int8(
            *args, exact=True, out=y, state_q=out, lanes_per_channel=lanes
        ),
        (batch, channels, n),
    )
    _assert_written(y, "int8 scan y")
    _assert_equal(y, y_ref, f"int8 scan exact y L={length} N={n}")
    # The state snapshot: h_last (float32) of the reference, divided by s_h, for tie analysis.
    u, delta_raw, A, B, C, D, z, delta_bias = _dequant(args)
    _, h_last = ref.selective_scan(u, delta_raw, A, B, C, D, z, delta_bias)
    _assert_codes(hq, hq_ref, h_last.double() / _f32(s_h), f"int8 scan exact state L={length}")

    # Fast mode: tolerance against float64.
    y_fast = _poisoned_float((batch, length, channels), torch.float16)
    _, hq_fast, h_fast = selective_scan_int8(
        *args, out=y_fast, return_last_state=True, lanes_per_channel=lanes
    )
    torch.cuda.synchronize()
    _assert_written(y_fast, "int8 scan fast y")
    y64, mag64, h64 = _scan64(u, delta_raw, A, B, C, D, z, delta_bias)
    _check_fast(y_fast, y64, mag64, torch.float16, f"int8 fast L={length} N={n} u32={float_u}")
    # State: float32 h close to float64; codes at most one step from the reference's.
    h_err = (h_fast.double() - h64).abs().max().item()
    assert h_err <= 1e-4 * (h64.abs().max().item() + 1e-3)
    assert int((hq_fast.int() - hq_ref.int()).abs().max()) <= 1


@pytest.mark.parametrize("absent", ["z", "z D delta_bias"])
@pytest.mark.parametrize("lanes", [None, 8, 16])
@pytest.mark.parametrize("length,batch", [(7, 3), (130, 2), (2047, 1)])
def test_selective_scan_int8_optional_parts_absent(length, batch, lanes, absent):
    """Without z (the gate, whose codes the table layouts stage and look up in the output step)
    and without D and delta_bias, the exact INT8 scan gives the reference's bits and its state
    codes; the fast scan stays within its tolerance of float64."""
    from quamba_kernels.scan import selective_scan_int8
    from quamba_layers import reference_ops as ref

    channels = 37
    g = _gen("scan8 absent", length, batch, lanes, absent)
    tensors, s = _int8_scan_inputs(g, batch, channels, length, 16)
    u_q, dt_q, A_log_q, B_q, C_q, D_q, z_q, dtb_q = tensors
    z_q = None
    if absent != "z":
        D_q = dtb_q = None
    args = _int8_args((u_q, dt_q, A_log_q, B_q, C_q, D_q, z_q, dtb_q), s, 0.1)
    y_ref, hq_ref = ref.selective_scan_int8(*args)
    y = _poisoned_float((batch, length, channels), torch.float16)
    hq = _run_int8_twice(
        lambda out: selective_scan_int8(
            *args, exact=True, out=y, state_q=out, lanes_per_channel=lanes
        ),
        (batch, channels, 16),
    )
    _assert_written(y, "int8 scan y without z")
    _assert_equal(y, y_ref, f"int8 scan exact y without {absent} L={length}")
    assert torch.equal(hq, hq_ref), f"int8 scan exact state without {absent} L={length}"
    y_fast = _poisoned_float((batch, length, channels), torch.float16)
    selective_scan_int8(*args, out=y_fast, lanes_per_channel=lanes)
    torch.cuda.synchronize()
    _assert_written(y_fast, "int8 fast scan y without z")
    y64, mag64, _ = _scan64(*_dequant(args))
    _check_fast(y_fast, y64, mag64, torch.float16, f"int8 fast without {absent} L={length}")


@pytest.mark.parametrize("length,batch", [(7, 3), (2047, 2), (130, 5)])
@pytest.mark.parametrize("kind", ["int8", "int8 u32", "float16", "bfloat16", "sim"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("n", [16, 13])
def test_selective_scan_lanes_per_channel_same_bits(length, batch, kind, exact, n):
    """8 lanes with two states each and 16 lanes with one run the same operations in the same
    order: fast and exact outputs and states are bit-identical."""
    from quamba_kernels.scan import selective_scan, selective_scan_int8, selective_scan_sim

    if kind == "sim" and not exact:
        pytest.skip("the simulation scan is exact only")
    channels = 83
    g = _gen("lanes", length, batch, kind, exact, n)
    if kind.startswith("int8"):
        tensors, s = _int8_scan_inputs(g, batch, channels, length, n, kind == "int8 u32")
        args = _int8_args(tensors, s, 0.1)

        def run(lanes):
            return selective_scan_int8(
                *args, exact=exact, return_last_state=True, lanes_per_channel=lanes
            )
    else:
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(kind, torch.float32)
        inputs = _float_scan_inputs(g, batch, channels, length, n, dtype)

        def run(lanes):
            if kind == "sim":
                return selective_scan_sim(*inputs, lanes_per_channel=lanes)
            return selective_scan(
                *inputs, return_last_state=True, exact=exact, lanes_per_channel=lanes
            )

    for a, b in zip(run(8), run(16)):
        _assert_equal(a, b, f"{kind} exact={exact} N={n} L={length}: 8 vs 16 lanes")


@pytest.mark.parametrize("length,batch", [(7, 3), (2047, 2), (130, 5), (1, 1), (4100, 1)])
@pytest.mark.parametrize("float_u", [False, True])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("n", [16, 13])
def test_selective_scan_int8_block_threads_same_bits(length, batch, float_u, exact, n):
    """The 8-lane INT8 layout in blocks of 64 and of 128 threads (8 or 16 channels each; the
    kernel takes 64 where a batch-1 grid spreads better): every channel's operations are its own,
    so outputs and states are bit-identical, and the kernel's own choice gives them too."""
    from quamba_kernels.scan import selective_scan_int8

    channels = 83  # a partial block at both sizes
    g = _gen("block_threads", length, batch, float_u, exact, n)
    tensors, s = _int8_scan_inputs(g, batch, channels, length, n, float_u)
    args = _int8_args(tensors, s, 0.1)

    def run(**kw):
        out = _poisoned_float((batch, length, channels), torch.float16)
        result = selective_scan_int8(
            *args, exact=exact, return_last_state=True, out=out, lanes_per_channel=8, **kw
        )
        torch.cuda.synchronize()
        _assert_written(out, f"y, block_threads={kw.get('block_threads')}")
        return result

    small = run(block_threads=64)
    for kw in ({"block_threads": 128}, {}):
        for a, b in zip(small, run(**kw)):
            _assert_equal(a, b, f"exact={exact} N={n} L={length} B={batch}: 64 vs {kw}")


FP_SCAN_CASES = [
    (length, batch, n, dtype)
    for ((length, batch), n), dtype in zip(
        zip(_cases(), SCAN_STATES),
        (torch.float16, torch.bfloat16, torch.float16, torch.bfloat16, torch.float16,
         torch.bfloat16, torch.float16),
    )
]  # fmt: skip


@pytest.mark.parametrize("length,batch,n,dtype", FP_SCAN_CASES)
def test_selective_scan_float(length, batch, n, dtype):
    from quamba_kernels.scan import selective_scan
    from quamba_layers import fp_ops

    channels = 29
    g = _gen("scanfp", length, batch, n, dtype)
    u, delta, A, B, C, D, z, delta_bias = _float_scan_inputs(g, batch, channels, length, n, dtype)
    y_ref, h_ref = fp_ops.selective_scan_ref(
        u, delta, A, B, C, D, z, delta_bias, return_last_state=True
    )
    out = _poisoned_float((batch, length, channels), dtype)
    y, h = selective_scan(
        u, delta, A, B, C, D, z, delta_bias, return_last_state=True, exact=True, out=out
    )
    _assert_written(out, "fp scan")
    _assert_equal(y, y_ref.to(dtype), f"fp scan exact y {dtype} L={length}")
    _assert_equal(h, h_ref, f"fp scan exact h {dtype} L={length}")
    y_fast = selective_scan(u, delta, A, B, C, D, z, delta_bias)
    y64, mag64, _ = _scan64(u, delta, A, B, C, D, z, delta_bias)
    _check_fast(y_fast, y64, mag64, dtype, f"{dtype} fast L={length} N={n}")


def test_selective_scan_float_without_softplus_and_initial_state():
    from quamba_kernels.scan import selective_scan
    from quamba_layers import fp_ops

    g = _gen("scanfp-nosoftplus")
    u, delta, A, B, C, _, z, _ = _float_scan_inputs(g, 2, 21, 300, 16, torch.float16)
    delta = torch.nn.functional.softplus(delta.float()).half()  # positive deltas
    init = _normal(g, (2, 21, 16))
    y = selective_scan(u, delta, A, B, C, None, z, None, False, initial_state=init, exact=True)
    want = fp_ops.selective_scan_ref(
        u, delta, A, B, C, None, z, None, delta_softplus=False, initial_state=init
    )
    _assert_equal(y, want.half(), "fp scan without softplus")


@pytest.mark.parametrize("n", [16, 64])
def test_selective_scan_large_grid(n):
    """A grid of hundreds of blocks (Mamba-like channel counts; the last block partial)."""
    from quamba_kernels.scan import selective_scan_int8, selective_scan_sim
    from quamba_layers import reference_ops as ref

    batch, channels, length = 3, 3001, 300
    g = _gen("scan-large", n)
    tensors, s = _int8_scan_inputs(g, batch, channels, length, n)
    args = _int8_args(tensors, s, 0.1)
    y_ref, hq_ref = ref.selective_scan_int8(*args)
    y, hq = selective_scan_int8(*args, exact=True)
    _assert_equal(y, y_ref, f"large-grid int8 scan N={n}")
    u, dr, A, B, C, D, z, db = _dequant(args)
    y32, h32 = ref.selective_scan(u, dr, A, B, C, D, z, db)
    _assert_codes(hq, hq_ref, h32.double() / _f32(0.1), f"large-grid state N={n}")
    y_sim, h_sim = selective_scan_sim(u, dr, A, B, C, D, z, db)
    _assert_equal(y_sim, y32, f"large-grid sim y N={n}")
    _assert_equal(h_sim, h32, f"large-grid sim h N={n}")


# ------------------------------------------------------------------------------------------------
# Decode step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch,n", [(1, 16), (5, 16), (8, 5), (3, 64), (2, 1), (4, 33), (13, 16), (11, 7), (16, 16)]
)
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_selective_scan_step_int8(batch, n, rounding):
    from quamba_kernels.scan_step import selective_scan_step_int8
    from quamba_layers import reference_ops as ref

    channels = 45
    g = _gen("step8", batch, n, rounding)
    state = _int8(g, (batch, channels, n))
    ref_state = state.clone()
    s_h = 0.05
    for step in range(6):
        tensors, s = _int8_scan_inputs(g, batch, channels, 1, n, float_u=step % 2 == 1)
        t2 = tuple(t[..., 0].contiguous() if t.dim() == 3 else t for t in tensors)
        args = _int8_args(t2, s, s_h)
        y_ref, new_ref = ref.selective_scan_step(ref_state, *args, state_rounding=rounding)
        y = _poisoned_float((batch, channels), torch.float16)
        selective_scan_step_int8(state, *args, state_rounding=rounding, out=y)
        torch.cuda.synchronize()
        _assert_written(y, "step y")
        _assert_equal(y, y_ref, f"int8 step y {step}")
        # Tie analysis of the requantized state: the float32 h of the reference step.
        u, dr, A, B, C, D, z, db = _dequant(args)
        u, dr, B, C, z = (t[..., None] for t in (u, dr, B, C, z))
        _, h = ref.selective_scan(
            u, dr, A, B, C, D, z, db, initial_state=ref.dequantize(ref_state, s_h)
        )
        _assert_codes(state, new_ref, h.double() / _f32(s_h), f"int8 step state {step}")
        ref_state = new_ref


@pytest.mark.parametrize(
    "batch,rank,extra,ties",
    [(1, 160, 32, False), (3, 48, 32, False), (16, 96, 32, False), (2, 17, 5, False),
     (5, 160, 0, False), (4, 64, 32, True), (13, 160, 32, False), (9, 64, 32, True)],
)  # fmt: skip
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_selective_scan_step_with_fused_dt_proj(batch, rank, extra, ties, rounding):
    """dt_proj's GEMM inside the step writes int8_linear's dt codes, and the step's y and state
    equal the unfused step's, bit for bit: dp4a and byte paths (rank 17), x rows wider than the
    rank (x_proj's whole output), batch 1..16, and exact ties where the two rules differ."""
    from quamba_kernels import int8_linear
    from quamba_kernels.scan_step import selective_scan_step_int8

    channels, n = 200, 16
    g = _gen("step-dt-proj", batch, rank, extra, ties, rounding)
    tensors, s = _int8_scan_inputs(g, batch, channels, 1, n)
    args = list(_int8_args(tuple(t[..., 0].contiguous() if t.dim() == 3 else t for t in tensors),
                           s, 0.05))  # fmt: skip
    if ties:  # v = acc / 2 on the grid s_dt = 1: every odd accumulator is a tie
        x = torch.randint(-3, 4, (batch, rank + extra), generator=g, dtype=torch.int8).to(DEVICE)
        w = torch.randint(-3, 4, (channels, rank), generator=g, dtype=torch.int8).to(DEVICE)
        s_x, s_w, args[3] = 0.5, 1.0, 1.0
    else:  # codes spread over the INT8 range, some saturated
        x, w = _int8(g, (batch, rank + extra)), _int8(g, (channels, rank))
        s_x, s_w = 0.03, 40.0 * args[3] / (0.03 * rank**0.5 * 5500.0)
    dt_want = int8_linear(x[:, :rank].contiguous(), w, s_x, s_w, args[3], rounding)
    if ties:
        other = "half_even" if rounding == "half_away" else "half_away"
        assert not torch.equal(dt_want, int8_linear(x[:, :rank].contiguous(), w, s_x, s_w, 1.0,
                                                    other))  # fmt: skip
    else:
        assert dt_want.float().std() > 10 and (dt_want.abs() < 127).float().mean() > 0.5
    state = _int8(g, (batch, channels, n))
    fused_state = state.clone()
    args[2] = dt_want
    y_want, _ = selective_scan_step_int8(state, *args)
    args[2] = torch.full((batch, channels), 127, dtype=torch.int8, device=DEVICE)  # poisoned
    y, _, dt = selective_scan_step_int8(fused_state, *args, dt_from=(x, w, s_x, s_w, rounding))
    assert dt.data_ptr() == args[2].data_ptr()
    _assert_equal(dt, dt_want, "fused dt codes")
    _assert_equal(y, y_want, "fused step y")
    _assert_equal(fused_state, state, "fused step state")


def test_selective_scan_step_int8_from_zero_equals_prefill_of_one_token():
    from quamba_kernels.scan import selective_scan_int8
    from quamba_kernels.scan_step import selective_scan_step_int8

    g = _gen("step-vs-prefill")
    tensors, s = _int8_scan_inputs(g, 3, 40, 1, 16)
    y_prefill, hq_prefill = selective_scan_int8(*_int8_args(tensors, s, 0.05), exact=True)
    t2 = tuple(t[..., 0].contiguous() if t.dim() == 3 else t for t in tensors)
    state = torch.zeros(3, 40, 16, dtype=torch.int8, device=DEVICE)
    y_step, _ = selective_scan_step_int8(state, *_int8_args(t2, s, 0.05))
    _assert_equal(y_step, y_prefill[:, 0, :], "step vs prefill y")
    _assert_equal(state, hq_prefill, "step vs prefill state")


@pytest.mark.parametrize(
    "dtype,state_dtype",
    [
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
@pytest.mark.parametrize("n", [16, 7, 64])
def test_selective_state_update_float(dtype, state_dtype, n):
    from quamba_kernels.scan_step import selective_state_update
    from quamba_layers import fp_ops

    batch, channels = 4, 51
    g = _gen("stepfp", dtype, state_dtype, n)
    state = _normal(g, (batch, channels, n), dtype=state_dtype)
    for step in range(4):
        u, delta, A, B, C, D, z, delta_bias = _float_scan_inputs(g, batch, channels, 1, n, dtype)
        x, dt, zz = (t[..., 0].contiguous() for t in (u, delta, z))
        b, c = B[..., 0].contiguous(), C[..., 0].contiguous()
        y_ref, h_ref = fp_ops.selective_state_update_ref(state, x, dt, A, b, c, D, zz, delta_bias)
        out = _poisoned_float((batch, channels), dtype)
        selective_state_update(state, x, dt, A, b, c, D, zz, delta_bias, out=out)
        torch.cuda.synchronize()
        _assert_written(out, "fp step")
        _assert_equal(out, y_ref.to(dtype), f"fp step y {step}")
        _assert_equal(state, h_ref.to(state_dtype), f"fp step state {step}")


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_decode_steps_read_column_ranges_in_place(batch):
    """The decode step takes x, z of in_proj's (B, 2E) output and B, C of x_proj's (B, R + 2N)
    output as column ranges (rows apart in memory, no copies): the same outputs and states as
    from contiguous copies, for the conv update, the INT8 step (plain and with dt_proj fused)
    and the float step."""
    from quamba_kernels.conv1d import conv1d_int8_update
    from quamba_kernels.scan_step import selective_scan_step_int8, selective_state_update

    e, n, r = 70, 16, 12
    g = _gen("column-ranges", batch)
    xz = _int8(g, (batch, 2 * e))
    xdbl = _int8(g, (batch, r + 2 * n))
    x_t, z_t = xz[:, :e], xz[:, e:]
    b_q, c_q = xdbl[:, r : r + n], xdbl[:, r + n :]
    assert batch == 1 or not (x_t.is_contiguous() or b_q.is_contiguous())

    w_q, b_conv = _int8(g, (e, 4)), _int8(g, (e,))
    state = _int8(g, (batch, e, 3))
    state_copy = state.clone()
    out, _ = conv1d_int8_update(x_t, state, 0.02, w_q, 0.01, b_conv, 0.02, 0.05)
    want, _ = conv1d_int8_update(x_t.contiguous(), state_copy, 0.02, w_q, 0.01, b_conv, 0.02, 0.05)
    _assert_equal(out, want, "conv update from a column range")
    _assert_equal(state, state_copy, "conv state from a column range")

    tensors, sc = _int8_scan_inputs(g, batch, e, 1, n)
    u_q, dt_q, a_q, _, _, d_q, _, dtb_q = (t[..., 0].contiguous() if t.dim() == 3 else t
                                           for t in tensors)  # fmt: skip
    for fused in (False, True):
        h = _int8(g, (batch, e, n))
        h_copy = h.clone()
        kwargs = {}
        if fused:
            dt_w = _int8(g, (e, r))
            kwargs = {"dt_from": (xdbl, dt_w, 0.03, 0.004, "half_away")}
        views = _int8_args((u_q, None if fused else dt_q, a_q, b_q, c_q, d_q, z_t, dtb_q), sc, 0.05)
        copies = _int8_args((u_q, None if fused else dt_q, a_q, b_q.contiguous(), c_q.contiguous(),
                             d_q, z_t.contiguous(), dtb_q), sc, 0.05)  # fmt: skip
        y = selective_scan_step_int8(h, *views, **kwargs)[0]
        y_want = selective_scan_step_int8(h_copy, *copies, **kwargs)[0]
        _assert_equal(y, y_want, f"int8 step from column ranges (dt_proj fused: {fused})")
        _assert_equal(h, h_copy, f"int8 step state from column ranges (dt_proj fused: {fused})")

    u, delta, a, _, _, d, _, delta_bias = _float_scan_inputs(g, batch, e, 1, n, torch.float16)
    wide_z = _normal(g, (batch, 3 * e), dtype=torch.float16)
    wide_bc = _normal(g, (batch, 5 + 2 * n), dtype=torch.float16)
    zv, bv, cv = wide_z[:, e : 2 * e], wide_bc[:, 5 : 5 + n], wide_bc[:, 5 + n :]
    x, dt = u[..., 0].contiguous(), delta[..., 0].contiguous()
    hf = _normal(g, (batch, e, n), dtype=torch.float32)
    hf_copy = hf.clone()
    yf, _ = selective_state_update(hf, x, dt, a, bv, cv, d, zv, delta_bias)
    yf_want, _ = selective_state_update(
        hf_copy, x, dt, a, bv.contiguous(), cv.contiguous(), d, zv.contiguous(), delta_bias
    )
    _assert_equal(yf, yf_want, "float step from column ranges")
    _assert_equal(hf, hf_copy, "float step state from column ranges")


def test_decode_steps_refuse_rows_that_are_not_contiguous():
    from quamba_kernels.conv1d import conv1d_int8_update

    x = torch.zeros(6, 4, dtype=torch.int8, device=DEVICE).t()  # (4, 6), columns contiguous
    with pytest.raises(ValueError, match="contiguous rows"):
        conv1d_int8_update(x, torch.zeros(4, 6, 3, dtype=torch.int8, device=DEVICE), 0.1,
                           torch.zeros(6, 4, dtype=torch.int8, device=DEVICE), 0.1, None, 1.0,
                           0.1)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Misuse on the GPU machine: clear exceptions, never a crash
# ------------------------------------------------------------------------------------------------


def test_cpu_tensors_are_refused_with_a_clear_error():
    from quamba_kernels.conv1d import conv1d_int8
    from quamba_kernels.hadamard import hadamard

    x = torch.zeros(2, 8, 16, dtype=torch.int8)
    w = torch.zeros(8, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="CUDA tensor"):
        conv1d_int8(x, 0.1, w, 0.1, None, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"same CUDA device|CUDA tensor"):
        conv1d_int8(x.to(DEVICE), 0.1, w, 0.1, None, 1.0, 0.1)
    with pytest.raises(ValueError, match="CUDA tensor"):
        hadamard(torch.zeros(4, 64), 0.125)


def test_non_contiguous_and_bad_shapes_are_refused():
    from quamba_kernels.conv1d import conv1d_int8
    from quamba_kernels.scan import selective_scan_sim

    x = torch.zeros(2, 16, 8, dtype=torch.int8, device=DEVICE).transpose(1, 2)
    w = torch.zeros(8, 4, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        conv1d_int8(x, 0.1, w, 0.1, None, 1.0, 0.1)
    u = torch.zeros(1, 4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="d_state"):
        A = torch.zeros(4, 65, device=DEVICE)
        B = torch.zeros(1, 65, 10, device=DEVICE)
        selective_scan_sim(u, u, A, B, B, None, None, None)
    with pytest.raises(ValueError, match="shape"):
        selective_scan_sim(u, u[:, :, :5].contiguous(), torch.zeros(4, 16, device=DEVICE),
                           torch.zeros(1, 16, 10, device=DEVICE),
                           torch.zeros(1, 16, 10, device=DEVICE), None, None, None)  # fmt: skip


def test_binding_checks_shapes_itself():
    """A direct call of the compiled module with inconsistent shapes raises, never reads OOB."""
    from quamba_kernels import require

    module = require()
    x = torch.zeros(2, 8, 16, dtype=torch.int8, device=DEVICE)
    w = torch.zeros(9, 4, dtype=torch.int8, device=DEVICE)
    out = torch.zeros(2, 8, 16, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        module.conv1d_fwd(x, w, None, out, 0.1, None, 0.1, 1.0, 0.1, 0, True, 0)
    with pytest.raises(ValueError, match=r"width|K"):
        module.conv1d_fwd(x, torch.zeros(8, 5, dtype=torch.int8, device=DEVICE), None, out,
                          0.1, None, 0.1, 1.0, 0.1, 0, True, 0)  # fmt: skip
    good_w = torch.zeros(8, 4, dtype=torch.int8, device=DEVICE)
    with pytest.raises(TypeError):
        module.conv1d_fwd(x.float(), good_w, None, out, 0.1, None, 0.1, 1.0, 0.1, 0, True, 0)
    short = torch.zeros(2, 8, 8, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="out must have the shape"):
        module.conv1d_fwd(x, good_w, None, short, 0.1, None, 0.1, 1.0, 0.1, 0, True, 0)
    with pytest.raises(TypeError):  # a non-contiguous view is refused, never copied
        module.conv1d_fwd(x, good_w, None, out[:, :, :8], 0.1, None, 0.1, 1.0, 0.1, 0, True, 0)
    with pytest.raises(ValueError, match=r"n = x\.shape"):
        module.hadamard(torch.zeros(3, 24, device=DEVICE), torch.zeros(3, 24, device=DEVICE),
                        None, 1, 0.2, 1.0, 0, 0)  # fmt: skip


@pytest.mark.parametrize("n", [5120, 1536, 20 * 16, 12 * 64, 1024, 2048, 4096, 8192, 96])
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_hadamard_int8_rounding_at_exact_ties(n, rounding):
    """Small integer inputs and scale 1/2 make every odd sum of the transform an exact tie (all
    sums are exact in float32): about half of the codes follow the rounding rule, and every
    thread of the Paley kernel (m = 12, 20; 16 <= P <= 256) and of the power-of-two kernel
    (m = 1, 1024 <= n <= 8192) goes down its redo path."""
    from quamba_kernels.hadamard import hadamard
    from quamba_layers import reference_ops as ref

    g = _gen("hadamard-ties", n, rounding)
    x = torch.randint(-3, 4, (3, 41, n), generator=g).to(torch.float16).to(DEVICE)
    got = _run_int8_twice(lambda out: hadamard(x, 0.5, 1.0, rounding, out=out), tuple(x.shape))
    want = ref.hadamard(x, 0.5, 1.0, rounding)
    y = ref.hadamard(x, 0.5)
    assert float(((y - torch.floor(y)) == 0.5).float().mean()) > 0.3  # the test has ties
    _assert_equal(got, want, f"hadamard ties n={n} {rounding}")


@pytest.mark.parametrize(
    "n,dtype,out_kind", [(5120, torch.float16, "int8"), (768, torch.float32, "float32")]
)
def test_hadamard_with_another_pm1_matrix(monkeypatch, n, dtype, out_kind):
    """A +-1 matrix other than Paley's takes the kernel's shared-memory matrix path (the Paley
    entries are compile-time constants otherwise); the result stays bit-identical."""
    import importlib

    from quamba_kernels.hadamard import hadamard

    # The modules themselves (the packages export functions of the same name).
    kernel_hadamard = importlib.import_module("quamba_kernels.hadamard")
    layer_hadamard = importlib.import_module("quamba_layers.hadamard")
    from quamba_layers import reference_ops as ref

    m, _ = kernel_hadamard.hadamard_factors(n)
    other = torch.tensor(kernel_hadamard.base_matrix(m), dtype=torch.float64)
    other[1] = -other[1]
    other[:, [2, 5]] = other[:, [5, 2]]
    monkeypatch.setattr(layer_hadamard, "_base_matrix", lambda size: other)
    monkeypatch.setattr(
        kernel_hadamard, "_matrix_on", lambda size, device: other.float().to(device)
    )

    g = _gen("hadamard-other", n, out_kind)
    x = _normal(g, (2, 33, n), 1.0, dtype=dtype)
    scale = 1.0 / math.sqrt(n)
    if out_kind == "int8":
        s_out = 4.0 / 127
        got = _run_int8_twice(lambda out: hadamard(x, scale, s_out, out=out), tuple(x.shape))
        want = ref.hadamard(x, scale, s_out)
        _assert_codes(got, want, ref.hadamard(x, scale).double() / _f32(s_out), "hadamard other")
        # The patched matrix really changes the result (the test reaches the other path).
        monkeypatch.undo()
        assert not torch.equal(got, ref.hadamard(x, scale, s_out))
    else:
        got = hadamard(x, scale, out_dtype=torch.float32)
        want = ref.hadamard(x, scale)
        _assert_equal(got, want, "hadamard other float")
        monkeypatch.undo()
        assert not torch.equal(got, ref.hadamard(x, scale))


def test_print_statistics():
    """Not a check: prints (and writes to $OUT when set) the statistics collected above."""
    import json
    import os

    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernel_test_stats.json"), "w") as f:
            json.dump(STATS, f, indent=1)
    total_bad = sum(bad for _, bad, _ in STATS["ties"])
    total = sum(n for _, _, n in STATS["ties"])
    print(f"\nINT8 code comparisons: {len(STATS['ties'])} tensors, {total} codes, "
          f"{total_bad} tie differences (rate {total_bad / max(total, 1):.2e})")  # fmt: skip
    for name, worst, rel in STATS["fast_scan"]:
        print(f"fast scan {name}: max err/tol {worst:.3f}, max err/magnitude {rel:.2e}")


# ------------------------------------------------------------------------------------------------
# programmatic dependent launch
# ------------------------------------------------------------------------------------------------


def _decode_like_chain(batch, iterations, synchronize_each):
    """Residual add + norm -> GEMV -> GEMV -> Hadamard -> GEMV, repeated: every kernel reads what
    the kernel just before it wrote, the pattern programmatic dependent launch must keep ordered."""
    from quamba_kernels import hadamard, int8_linear, rmsnorm

    g = _gen("pdl-chain", batch)
    d, up = 1024, 2560
    h = _normal(g, (batch, d), dtype=torch.float16)
    w_norm = _normal(g, (d,), std=0.1, mean=1.0)
    w_up, w_down, w_mix = _int8(g, (up, d)), _int8(g, (d, up)), _int8(g, (d, d))
    residual = None
    outputs = []

    def keep(value):
        outputs.append(value)
        if synchronize_each:
            torch.cuda.synchronize()
        return value

    for _ in range(iterations):
        q, residual = rmsnorm(h, residual, w_norm, 1e-5, 0.03, "half_away")
        keep(q), keep(residual)
        y = keep(int8_linear(q, w_up, 0.03, 0.004, 0.9, "half_away"))
        y = keep(int8_linear(y, w_down, 0.9, 0.002, out_dtype=torch.float16))
        y = keep(hadamard(y, 1.0 / 32.0, 4.0, "half_even"))  # codes ~ 17 std: few saturate
        h = keep(int8_linear(y, w_mix, 4.0, 0.003, out_dtype=torch.float16))
    torch.cuda.synchronize()
    return outputs


@pytest.mark.parametrize("batch", [1, 3])
def test_programmatic_launch_keeps_dependent_kernels_ordered(batch):
    """The same chain with PDL on, with PDL off, and with the host waiting after every kernel
    (nothing can overlap) gives identical bits at every step; the outputs are not degenerate."""
    from quamba_kernels import programmatic_launch_enabled, set_programmatic_launch

    before = programmatic_launch_enabled()
    try:
        set_programmatic_launch(True)
        overlapped = _decode_like_chain(batch, 30, synchronize_each=False)
        serialized = _decode_like_chain(batch, 30, synchronize_each=True)
        set_programmatic_launch(False)
        ordinary = _decode_like_chain(batch, 30, synchronize_each=False)
    finally:
        set_programmatic_launch(before)
    for i, (a, b, c) in enumerate(zip(overlapped, serialized, ordinary)):
        assert torch.equal(a, b) and torch.equal(a, c), f"step {i} differs"
    for value in overlapped[-6:]:
        assert value.float().std() > 0, "degenerate chain: constant outputs"
        if value.dtype == torch.int8:
            assert (value.abs() < 127).float().mean() > 0.5, "mostly saturated codes"


# ------------------------------------------------------------------------------------------------
# int8 transpose
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, 5120, 1024), (2, 1536, 48), (3, 17, 33), (2, 64, 64), (1, 1, 1), (4, 100, 48),
     (65, 130), (1, 7, 2048), (2, 2048, 7)],
)  # fmt: skip
@pytest.mark.parametrize("offset", [0, 1])
def test_transpose_int8_equals_torch(shape, offset):
    """Aligned and 1-byte-offset (unaligned) buffers, tile edges, odd sizes; poisoned output."""
    from quamba_kernels import transpose_int8

    g = _gen("transpose", shape, offset)
    numel = math.prod(shape)
    storage = _int8(g, (numel + offset,))
    x = storage[offset:].view(shape)
    want = x.transpose(-1, -2).contiguous()
    for sentinel in (127, -128):  # an unwritten element keeps one of them
        out_storage = torch.full((numel + offset,), sentinel, dtype=torch.int8, device=DEVICE)
        out = out_storage[offset:].view(*shape[:-2], shape[-1], shape[-2])
        got = transpose_int8(x, out=out)
        assert got.data_ptr() == out.data_ptr()
        _assert_equal(got, want, f"transpose {shape} offset {offset} poison {sentinel}")
    _assert_equal(transpose_int8(x), want, "transpose with an allocated output")
