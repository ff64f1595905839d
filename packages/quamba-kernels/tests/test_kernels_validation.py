"""Argument validation of the kernel wrappers; runs anywhere (no GPU needed).

Every wrapper checks types, dtypes, shapes, scales and options before it asks for the compiled
module, so misuse raises TypeError/ValueError with a message naming the argument on any machine.
A well-formed call on CPU tensors raises KernelsUnavailable where the kernels cannot run, and a
ValueError asking for CUDA tensors where they can.
"""

from __future__ import annotations

import itertools
import math
import struct

import pytest
import torch

from quamba_kernels import KernelsUnavailable, available
from quamba_kernels._torch import float32_value, rounding_code, scale32, scale64
from quamba_kernels.conv1d import (
    causal_conv1d,
    causal_conv1d_update,
    conv1d_int8,
    conv1d_int8_update,
)
from quamba_kernels.hadamard import base_matrix, hadamard, hadamard_factors
from quamba_kernels.quantize import quantize_int8
from quamba_kernels.rmsnorm import rmsnorm
from quamba_kernels.scan import selective_scan, selective_scan_int8, selective_scan_sim
from quamba_kernels.scan_step import selective_scan_step_int8, selective_state_update

I8 = torch.int8
F16 = torch.float16
F32 = torch.float32


def _i8(*shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randint(-128, 128, shape, generator=g, dtype=I8)


def _f(*shape, dtype=F32):
    g = torch.Generator().manual_seed(sum(shape) + 7 * len(shape))
    return torch.randn(shape, generator=g).to(dtype)


def _expect_unavailable_or_cuda_error(call):
    """A well-formed call on CPU tensors: KernelsUnavailable here, or a CUDA-tensor ValueError."""
    ok, reason = available()
    if ok:
        with pytest.raises(ValueError, match="CUDA tensor"):
            call()
    else:
        assert reason
        with pytest.raises(KernelsUnavailable, match=r"\w"):
            call()


# ------------------------------------------------------------------------------------------------
# helpers of _torch.py
# ------------------------------------------------------------------------------------------------


def test_rounding_codes():
    assert rounding_code("half_away") == 0
    assert rounding_code("half_even") == 1
    for bad in ("nearest", None, 0, "HALF_AWAY"):
        with pytest.raises(ValueError, match="rounding must be one of"):
            rounding_code(bad)


@pytest.mark.parametrize("seed", range(3))
def test_float32_value_matches_torch_rounding(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.exp(torch.randn(500, generator=g, dtype=torch.float64) * 20)
    for v in values.tolist():
        assert float32_value(v) == float(torch.tensor(v, dtype=F32))
        assert struct.pack("f", float32_value(v)) == struct.pack("f", float(torch.tensor(v)))


@pytest.mark.parametrize(
    "value,error",
    [
        (0.0, ValueError),
        (-0.5, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (1e-50, ValueError),  # underflows to 0 in float32
        (1e39, ValueError),  # overflows float32
        (True, TypeError),
        ("0.1", TypeError),
        (torch.tensor([0.1, 0.2]), ValueError),
    ],
)
def test_scale_checks(value, error):
    with pytest.raises(error, match="s_x"):
        scale64("s_x", value)


class _FloatSubclass(float):
    """A float that is not exactly ``float``: scale64 takes its general path for it."""


@pytest.mark.parametrize(
    "value",
    [
        2.0**-150,  # rounds to 0 in float32 (ties to even)
        math.nextafter(2.0**-150, 1.0),  # rounds up to the smallest subnormal
        2.0**-149,
        1e-45,
        1e-30,
        0.0173,
        1.0,
        3.4028234663852886e38,  # FLT_MAX
        math.nextafter(3.4028234663852886e38, math.inf),  # rounds down to FLT_MAX
        3.4028235677973366e38,  # FLT_MAX + half an ulp: rounds to inf
        1e39,
        -1e-30,
        0.0,
        math.inf,
        math.nan,
    ],
)
def test_scale64_fast_path_agrees_with_the_general_path(value):
    """Python floats take a shortcut; its accept/reject boundary must be the general check's."""

    def outcome(v):
        try:
            return ("ok", scale64("s", v))
        except (ValueError, TypeError) as error:
            return ("error", type(error))

    fast, general = outcome(value), outcome(_FloatSubclass(value))
    assert fast[0] == general[0]
    if fast[0] == "ok":
        assert fast[1] == general[1] == value
    else:
        assert fast[1] is general[1]


def test_scale32_rounds_once_and_accepts_one_element_tensors():
    assert scale32("s", 0.1) == float(torch.tensor(0.1, dtype=F32))
    assert scale64("s", 0.1) == 0.1
    assert scale32("s", torch.tensor([0.25])) == 0.25


# ------------------------------------------------------------------------------------------------
# Hadamard sizes and matrices
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,factors", [(1, (1, 1)), (64, (1, 64)), (768, (12, 64)), (5120, (20, 256)), (8192, (1, 8192))]
)
def test_hadamard_factors(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [0, 3, 24 * 3, 28, 40 * 3, 10240, 16384])
def test_hadamard_factors_refuses_unsupported_sizes(n):
    with pytest.raises(ValueError, match="unsupported Hadamard size"):
        hadamard_factors(n)


@pytest.mark.parametrize("m", [1, 12, 20])
def test_base_matrix_is_the_layers_matrix(m):
    from quamba_layers.hadamard import hadamard_matrix

    h = torch.tensor(base_matrix(m), dtype=torch.float64)
    assert torch.equal(h, hadamard_matrix(m))
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# conv1d
# ------------------------------------------------------------------------------------------------


def test_conv1d_int8_validation():
    x, w, b = _i8(2, 6, 9), _i8(6, 4), _i8(6)
    with pytest.raises(TypeError, match=r"x_q must be a torch\.Tensor"):
        conv1d_int8(x.numpy(), 0.1, w, 0.1, b, 0.1, 0.2)
    with pytest.raises(TypeError, match="x_q must have dtype int8"):
        conv1d_int8(x.float(), 0.1, w, 0.1, b, 0.1, 0.2)
    with pytest.raises(ValueError, match="x_q must have 3 dimensions"):
        conv1d_int8(x[0], 0.1, w, 0.1, b, 0.1, 0.2)
    with pytest.raises(ValueError, match="contiguous"):
        conv1d_int8(x.transpose(0, 1), 0.1, _i8(2, 4), 0.1, None, 0.1, 0.2)
    with pytest.raises(ValueError, match="w_q must have shape"):
        conv1d_int8(x, 0.1, _i8(5, 4), 0.1, b, 0.1, 0.2)
    with pytest.raises(ValueError, match=r"state_out must have shape \(B, E, K-1\) = \(2, 6, 3\)"):
        conv1d_int8(x, 0.1, w, 0.1, b, 0.1, 0.2, state_out=_i8(2, 6, 4))
    with pytest.raises(TypeError, match="state_out must have dtype int8"):
        conv1d_int8(x, 0.1, w, 0.1, b, 0.1, 0.2, state_out=_i8(2, 6, 3).float())
    with pytest.raises(ValueError, match="conv width K = 5"):
        conv1d_int8(x, 0.1, _i8(6, 5), 0.1, b, 0.1, 0.2)
    with pytest.raises(ValueError, match="conv width K = 1"):
        conv1d_int8(x, 0.1, _i8(6, 1), 0.1, b, 0.1, 0.2)
    with pytest.raises(ValueError, match="b_q must have shape"):
        conv1d_int8(x, 0.1, w, 0.1, _i8(7), 0.1, 0.2)
    with pytest.raises(ValueError, match="s_out"):
        conv1d_int8(x, 0.1, w, 0.1, b, 0.1, -1.0)
    with pytest.raises(ValueError, match="rounding"):
        conv1d_int8(x, 0.1, w, 0.1, b, 0.1, 0.2, "up")
    with pytest.raises(ValueError, match="s_x must have shape"):
        conv1d_int8(x, torch.ones(3), w, 0.1, b, 0.1, 0.2)
    with pytest.raises(TypeError, match="s_x must have dtype float32"):
        conv1d_int8(x, torch.ones(2, dtype=torch.float64), w, 0.1, b, 0.1, 0.2)
    with pytest.raises(TypeError, match="out must have dtype float32"):
        conv1d_int8(x, 0.1, w, 0.1, b, 0.1, None, out=torch.empty(2, 6, 9, dtype=I8))
    with pytest.raises(ValueError, match="out must have shape"):
        conv1d_int8(x, 0.1, w, 0.1, b, 0.1, 0.2, out=torch.empty(2, 6, 8, dtype=I8))
    _expect_unavailable_or_cuda_error(lambda: conv1d_int8(x, 0.1, w, 0.1, b, 0.1, 0.2))
    _expect_unavailable_or_cuda_error(lambda: conv1d_int8(x, torch.ones(2), w, 0.1, b, 0.1, None))


def test_conv1d_int8_update_validation():
    x, w = _i8(2, 6), _i8(6, 3)
    with pytest.raises(ValueError, match="conv_state must have shape"):
        conv1d_int8_update(x, _i8(2, 6, 3), 0.1, w, 0.1, None, 1.0, 0.2)
    with pytest.raises(TypeError, match="conv_state must have dtype int8"):
        conv1d_int8_update(x, _f(2, 6, 2), 0.1, w, 0.1, None, 1.0, 0.2)
    _expect_unavailable_or_cuda_error(
        lambda: conv1d_int8_update(x, _i8(2, 6, 2), 0.1, w, 0.1, None, 1.0, 0.2)
    )


def test_causal_conv1d_validation():
    x, w, b = _f(2, 6, 9, dtype=F16), _f(6, 4, dtype=F16), _f(6, dtype=F16)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, activation="relu")
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        causal_conv1d(x, w.bfloat16(), b)
    with pytest.raises(TypeError, match="bias must have dtype float16"):
        causal_conv1d(x, w, b.float())
    with pytest.raises(TypeError, match="x must have dtype"):
        causal_conv1d(x.double(), w, b)
    with pytest.raises(ValueError, match="conv_state must have shape"):
        causal_conv1d_update(x[:, :, 0].contiguous(), _f(2, 6, 4, dtype=F16), w, b)
    _expect_unavailable_or_cuda_error(lambda: causal_conv1d(x, w.float(), b.float()))
    _expect_unavailable_or_cuda_error(
        lambda: causal_conv1d_update(x[:, :, 0].contiguous(), _f(2, 6, 3, dtype=F16), w, b)
    )


# ------------------------------------------------------------------------------------------------
# rmsnorm, hadamard, quantize
# ------------------------------------------------------------------------------------------------


def test_rmsnorm_validation():
    x, res, w = _f(3, 8, 64, dtype=F16), _f(3, 8, 64), _f(64)
    with pytest.raises(TypeError, match="residual must have dtype float32"):
        rmsnorm(x, res.half(), w, 1e-5, 0.1)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        rmsnorm(x, _f(3, 8, 63), w, 1e-5, 0.1)
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm(x, res, _f(63), 1e-5, 0.1)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        rmsnorm(x, res, w.bfloat16(), 1e-5, 0.1)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm(x, res, w, -1.0, 0.1)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm(x, res, w, math.nan, 0.1)
    with pytest.raises(ValueError, match="larger than the kernel's limit"):
        rmsnorm(_f(1, 16392, dtype=F16), None, None, 1e-5, 0.1)
    with pytest.raises(TypeError, match="out_dtype"):
        rmsnorm(x, res, w, 1e-5, out_dtype=I8)
    with pytest.raises(TypeError, match="out must have dtype int8"):
        rmsnorm(x, res, w, 1e-5, 0.1, out=torch.empty(3, 8, 64))
    _expect_unavailable_or_cuda_error(lambda: rmsnorm(x, res, w, 1e-5, 0.1))
    _expect_unavailable_or_cuda_error(lambda: rmsnorm(x, None, None, 1e-5, out_dtype=F16))


def test_hadamard_validation():
    x = _f(4, 768, dtype=F16)
    with pytest.raises(ValueError, match="unsupported Hadamard size 28"):
        hadamard(_f(4, 28), 0.2)
    with pytest.raises(TypeError, match="x must have dtype"):
        hadamard(_i8(4, 64), 0.125)
    with pytest.raises(ValueError, match="scale"):
        hadamard(x, 0.0)
    with pytest.raises(ValueError, match="out_scale"):
        hadamard(x, 0.03, math.inf)
    with pytest.raises(ValueError, match="out must have x's shape"):
        hadamard(x, 0.03, 0.1, out=torch.empty(4, 767, dtype=I8))
    _expect_unavailable_or_cuda_error(lambda: hadamard(x, 1 / math.sqrt(768), 0.03))


def test_quantize_validation():
    with pytest.raises(TypeError, match="x must have dtype float32"):
        quantize_int8(_f(5, dtype=F16), 0.1)
    with pytest.raises(ValueError, match="out must have shape"):
        quantize_int8(_f(5), 0.1, out=torch.empty(4, dtype=I8))
    _expect_unavailable_or_cuda_error(lambda: quantize_int8(_f(5), 0.1))


# ------------------------------------------------------------------------------------------------
# scans
# ------------------------------------------------------------------------------------------------


def _int8_scan_args(batch=2, e=6, length=5, n=16, s_h=0.1):
    return (
        _i8(batch, e, length), 0.02, _i8(batch, e, length), 0.02, _i8(e, n), 0.02,
        _i8(batch, n, length), 0.02, _i8(batch, n, length), 0.02, _i8(e), 0.01,
        _i8(batch, e, length), 0.03, _i8(e), 0.04, s_h,
    )  # fmt: skip


def test_selective_scan_int8_validation():
    args = list(_int8_scan_args())
    bad = list(args)
    bad[2] = _i8(2, 6, 4)
    with pytest.raises(ValueError, match="dt_q must have shape"):
        selective_scan_int8(*bad)
    bad = list(args)
    bad[6] = _i8(2, 17, 5)
    with pytest.raises(ValueError, match="B_q must have shape"):
        selective_scan_int8(*bad)
    too_big = list(_int8_scan_args(n=65))
    with pytest.raises(ValueError, match="d_state N"):
        selective_scan_int8(*too_big)
    bad = list(args)
    bad[0] = _f(2, 6, 5, dtype=F16)
    with pytest.raises(TypeError, match="u_q must have dtype"):
        selective_scan_int8(*bad)
    bad = list(args)
    bad[16] = 0.0
    with pytest.raises(ValueError, match="s_h"):
        selective_scan_int8(*bad)
    with pytest.raises(ValueError, match="rounding"):
        selective_scan_int8(*args, state_rounding="floor")
    with pytest.raises(ValueError, match="lanes_per_channel must be None, 8 or 16"):
        selective_scan_int8(*args, lanes_per_channel=4)
    with pytest.raises(ValueError, match="lanes_per_channel must be None, 8 or 16"):
        selective_scan_int8(*args, lanes_per_channel=True)
    with pytest.raises(ValueError, match=r"d_state N = 9\.\.16 only \(N = 5\)"):
        selective_scan_int8(*_int8_scan_args(n=5), lanes_per_channel=8)
    _expect_unavailable_or_cuda_error(lambda: selective_scan_int8(*args))
    _expect_unavailable_or_cuda_error(lambda: selective_scan_int8(*args, lanes_per_channel=8))
    with pytest.raises(ValueError, match="block_threads must be None, 64 or 128"):
        selective_scan_int8(*args, lanes_per_channel=8, block_threads=256)
    with pytest.raises(ValueError, match="block_threads must be None, 64 or 128"):
        selective_scan_int8(*args, lanes_per_channel=8, block_threads=True)
    for lanes in (None, 16):
        with pytest.raises(ValueError, match="pass lanes_per_channel=8 with it"):
            selective_scan_int8(*args, lanes_per_channel=lanes, block_threads=64)
    _expect_unavailable_or_cuda_error(
        lambda: selective_scan_int8(*args, lanes_per_channel=8, block_threads=64)
    )
    # Optional parts may be None, their scales are then not inspected.
    optional = list(args)
    optional[10], optional[11], optional[12], optional[13] = None, None, None, None
    optional[0] = _f(2, 6, 5)  # float32 u: s_u ignored
    optional[1] = "ignored"
    _expect_unavailable_or_cuda_error(lambda: selective_scan_int8(*optional))


def test_selective_scan_sim_and_float_validation():
    u, A, B = _f(2, 6, 5), -_f(6, 16).abs(), _f(2, 16, 5)
    with pytest.raises(TypeError, match="u must have dtype float32"):
        selective_scan_sim(u.half(), u, A, B, B, None, None, None)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        selective_scan_sim(u, u, A, B, B, None, None, None, initial_state=_f(2, 6, 15))
    with pytest.raises(ValueError, match="D must have shape"):
        selective_scan_sim(u, u, A, B, B, _f(5), None, None)
    _expect_unavailable_or_cuda_error(lambda: selective_scan_sim(u, u, A, B, B, None, None, None))
    h = u.half()
    with pytest.raises(TypeError, match="A must have dtype float32"):
        selective_scan(h, h, A.half(), B.half(), B.half())
    with pytest.raises(TypeError, match="delta must have dtype float16"):
        selective_scan(h, u, A, B.half(), B.half())
    with pytest.raises(ValueError, match="exact"):
        selective_scan(u, u, A, B, B)
    with pytest.raises(ValueError, match=r"d_state N = 9\.\.16 only"):
        selective_scan(h, h, -_f(6, 32).abs(), _f(2, 32, 5, dtype=F16), _f(2, 32, 5, dtype=F16),
                       lanes_per_channel=16)  # fmt: skip
    with pytest.raises(ValueError, match="lanes_per_channel must be None, 8 or 16"):
        selective_scan_sim(u, u, A, B, B, None, None, None, lanes_per_channel=32)
    _expect_unavailable_or_cuda_error(lambda: selective_scan(h, h, A, B.half(), B.half()))


def test_selective_scan_step_validation():
    args = _int8_scan_args(length=1)
    step = [
        t[..., 0].contiguous() if isinstance(t, torch.Tensor) and t.dim() == 3 else t for t in args
    ]
    state = _i8(2, 6, 16)
    with pytest.raises(ValueError, match="state_q must have shape"):
        selective_scan_step_int8(_i8(2, 6, 8), *step)
    with pytest.raises(TypeError, match="state_q must have dtype int8"):
        selective_scan_step_int8(state.float(), *step)
    _expect_unavailable_or_cuda_error(lambda: selective_scan_step_int8(state, *step))
    # The fused dt_proj: (x (B, >= R), w (E, R), s_x, s_w, rounding).
    fused = (_i8(2, 40), _i8(6, 32), 0.1, 0.01, "half_away")
    with pytest.raises(TypeError, match="dt_from must be a tuple"):
        selective_scan_step_int8(state, *step, dt_from=list(fused))
    with pytest.raises(ValueError, match=r"dt_from w must have shape \(E, R\)"):
        selective_scan_step_int8(state, *step, dt_from=(fused[0], _i8(5, 32), *fused[2:]))
    with pytest.raises(ValueError, match=r"dt_from x must have shape \(B, >= R\)"):
        selective_scan_step_int8(state, *step, dt_from=(_i8(2, 31), *fused[1:]))
    with pytest.raises(ValueError, match="s_w must be a finite float > 0"):
        selective_scan_step_int8(state, *step, dt_from=(*fused[:3], -1.0, "half_away"))
    with pytest.raises(ValueError, match="rounding must be one of"):
        selective_scan_step_int8(state, *step, dt_from=(*fused[:4], "up"))
    _expect_unavailable_or_cuda_error(lambda: selective_scan_step_int8(state, *step, dt_from=fused))
    x, A, b = _f(2, 6, dtype=F16), -_f(6, 16).abs(), _f(2, 16, dtype=F16)
    with pytest.raises(TypeError, match="state must have x's dtype"):
        selective_state_update(_f(2, 6, 16, dtype=torch.bfloat16), x, x, A, b, b)
    with pytest.raises(ValueError, match="state must have shape"):
        selective_state_update(_f(2, 6, 17, dtype=F16), x, x, A, b, b)
    _expect_unavailable_or_cuda_error(
        lambda: selective_state_update(_f(2, 6, 16, dtype=F16), x, x, A, b, b)
    )


def test_compiled_calls_receive_tensors_as_dlpack_capsules():
    """require() hands tensors to the compiled module as DLPack capsules (C++-made, no
    Tensor.__dlpack__ round trip); other arguments pass unchanged; parameters export detached."""
    from quamba_kernels._loader import CapsuleCalls

    seen = []

    class FakeModule:
        answer = 42

        @staticmethod
        def launch(*args, **kwargs):
            seen.append((args, kwargs))
            return "done"

    calls = CapsuleCalls(FakeModule)
    weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    x = torch.arange(4, dtype=torch.int8)
    assert calls.answer == 42
    assert calls.launch(x, None, 0.5, out=weight) == "done"
    ((args, kwargs),) = seen
    assert type(args[0]).__name__ == "PyCapsule" and type(kwargs["out"]).__name__ == "PyCapsule"
    assert args[1] is None and args[2] == 0.5
    # The capsules carry the tensors' memory: importing them back gives the same values.
    assert torch.equal(torch.utils.dlpack.from_dlpack(args[0]), x)
    assert torch.equal(torch.utils.dlpack.from_dlpack(kwargs["out"]), weight.detach())


def test_programmatic_launch_switch():
    """set_programmatic_launch takes a bool only, round-trips, and is reported by build_info;
    without the compiled module both calls say why instead of failing obscurely."""
    from quamba_kernels import build_info, programmatic_launch_enabled, set_programmatic_launch

    with pytest.raises(TypeError, match="True or False"):
        set_programmatic_launch(1)
    if not build_info()["compiled"]:
        with pytest.raises(KernelsUnavailable, match=r"\w"):
            set_programmatic_launch(False)
        with pytest.raises(KernelsUnavailable, match=r"\w"):
            programmatic_launch_enabled()
        return
    before = programmatic_launch_enabled()
    assert before is True  # the default
    try:
        set_programmatic_launch(False)
        assert programmatic_launch_enabled() is False
        assert build_info()["programmatic_launch"] is False
        set_programmatic_launch(True)
        assert programmatic_launch_enabled() is True
    finally:
        set_programmatic_launch(before)


def test_transpose_int8_validation():
    from quamba_kernels import transpose_int8

    with pytest.raises(TypeError, match="int8"):
        transpose_int8(_f(3, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        transpose_int8(_i8(5))
    with pytest.raises(ValueError, match="contiguous"):
        transpose_int8(_i8(4, 6).t())
    with pytest.raises(ValueError, match="last two axes swapped"):
        transpose_int8(_i8(2, 3, 4), out=_i8(2, 3, 4))
    _expect_unavailable_or_cuda_error(lambda: transpose_int8(_i8(2, 3, 4)))


# ------------------------------------------------------------------------------------------------
# the persistent W8A8 decode kernel (decode.py)
# ------------------------------------------------------------------------------------------------

DECODE_SCALES = dict(eps=1e-5, s_in=0.05, s_w_in=0.002, s_xz=0.04, s_w_conv=0.01, s_b_conv=0.01,
                     s_u=0.03, s_w_x=0.002, s_xo=0.05, s_w_dt=0.002, s_dt=0.01, s_A=0.02,
                     s_D=0.01, s_dtb=0.04, s_h=0.05, s_had=0.06, s_w_out=0.002)  # fmt: skip
DECODE_ROUNDINGS = {"norm": "half_even", "gemm": "half_even", "conv": "half_away",
                    "ssm_state": "half_away", "hadamard": "half_away"}  # fmt: skip


def _decode_layer(d=256, e=512, r=16, n=16):
    return {"norm_w": _f(d), "w_in": _i8(2 * e, d), "conv_w": _i8(e, 4), "conv_b": _i8(e),
            "w_x": _i8(r + 2 * n, e), "w_dt": _i8(e, r), "A_log": _i8(e, n), "D": _i8(e),
            "dt_bias": _i8(e), "w_out": _i8(d, e), **DECODE_SCALES,
            "roundings": dict(DECODE_ROUNDINGS)}  # fmt: skip


def _decode_state(e=512, n=16):
    return (_i8(1, e, 3), _i8(1, e, n))


def test_decode_kernel_well_formed_cpu_call():
    from quamba_kernels.decode import W8A8DecodeKernel

    layers = [_decode_layer(), _decode_layer()]
    _expect_unavailable_or_cuda_error(
        lambda: W8A8DecodeKernel(layers, [_decode_state(), _decode_state()])
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda L, s: L.update(w_x=_i8(40, 512)), ValueError, r"layer 0: w_x must have shape"),
        (lambda L, s: L.update(norm_w=_f(256, dtype=F16)), TypeError, r"norm_w must have dtype"),
        (lambda L, s: L.update(conv_w=_i8(512, 3)), ValueError, r"conv_w must be \(E, 4\)"),
        (lambda L, s: L.update(A_log=_i8(512, 8), w_x=_i8(32, 512)), ValueError,
         r"d_state must be 16"),
        (lambda L, s: L.update(s_h=-1.0), ValueError, r"s_h must be a finite float > 0"),
        (lambda L, s: L.update(eps=0.0), ValueError, r"eps must be a finite float > 0"),
        (lambda L, s: L["roundings"].update(conv="up"), ValueError, r"rounding must be one of"),
        (lambda L, s: s.__setitem__(0, (_i8(1, 512, 3),)), ValueError, r"conv_state, ssm_state"),
        (lambda L, s: s.__setitem__(0, (_i8(1, 512, 2), _i8(1, 512, 16))), ValueError,
         r"conv_state must have shape \(1, E, 3\)"),
    ],
)  # fmt: skip
def test_decode_kernel_names_what_is_wrong(change, error, match):
    from quamba_kernels.decode import W8A8DecodeKernel

    layer, states = _decode_layer(), [_decode_state()]
    change(layer, states)
    with pytest.raises(error, match=match):
        W8A8DecodeKernel([layer], states)


def test_decode_kernel_counts_and_options():
    from quamba_kernels.decode import W8A8DecodeKernel

    with pytest.raises(ValueError, match="one state per layer"):
        W8A8DecodeKernel([_decode_layer()], [])
    with pytest.raises(ValueError, match=r"inflight must be an int in 1\.\.16"):
        W8A8DecodeKernel([_decode_layer()], [_decode_state()], inflight=0)
    with pytest.raises(TypeError, match="x_slab_cache must be a dict or None, got list"):
        W8A8DecodeKernel([_decode_layer()], [_decode_state()], x_slab_cache=[])
    # d_inner = 1000 is no m * 2^k: the Hadamard size is refused by name.
    with pytest.raises(ValueError, match="unsupported Hadamard size 1000"):
        W8A8DecodeKernel([_decode_layer(e=1000)], [_decode_state(e=1000)])


@pytest.mark.parametrize(("d_inner", "rows", "blocks"), [(5120, 192, 132), (1536, 80, 132),
                                                         (512, 48, 7), (64, 48, 132)])  # fmt: skip
def test_decode_x_slabs_sum_to_x_proj(d_inner, rows, blocks):
    """The persistent kernel's x_proj: each block dots its slab with its channels' codes; the
    parts must add up to the whole product (integers: exactly), and every channel belongs to
    exactly one block (also with more blocks than channel groups, where some own none)."""
    from quamba_kernels.decode import block_channels, x_slabs

    ranges = block_channels(d_inner, blocks)
    assert ranges[0][0] == 0 and ranges[-1][1] == d_inner
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    columns = 16 * -(-max(c1 - c0 for c0, c1 in ranges) // 16)
    w_x, u = _i8(rows, d_inner), _i8(d_inner)
    slabs = x_slabs(w_x, blocks, columns)
    assert slabs.shape == (blocks, rows, columns) and slabs.is_contiguous()
    total = torch.zeros(rows, dtype=torch.int64)
    for b, (c0, c1) in enumerate(ranges):
        assert torch.equal(slabs[b, :, : c1 - c0], w_x[:, c0:c1])
        assert not slabs[b, :, c1 - c0 :].any()
        # The kernel reads `columns` codes from the block's first channel; those past c1 - c0
        # meet zeros in the slab.
        codes = torch.randint(-128, 128, (columns,), dtype=torch.int8)
        codes[: c1 - c0] = u[c0:c1]
        total += slabs[b].long() @ codes.long()
    assert torch.equal(total, w_x.long() @ u.long())


def test_cached_x_slabs_share_one_copy_until_the_weight_changes():
    """Kernel objects built for one model share its x slabs; an in-place write to w_x, another
    tensor (even an equal one) or another block count gets a new slab, built from what w_x holds."""
    from quamba_kernels.decode import cached_x_slabs, x_slabs

    cache, w_x = {}, _i8(48, 512)
    first = cached_x_slabs(cache, w_x, 7, 80)
    assert torch.equal(first, x_slabs(w_x, 7, 80))
    assert cached_x_slabs(cache, w_x, 7, 80) is first
    twin = w_x.clone()
    assert cached_x_slabs(cache, twin, 7, 80) is not first and len(cache) == 2
    assert cached_x_slabs(cache, w_x, 5, 112).shape == (5, 48, 112)
    w_x[3, 100] = -w_x[3, 100] - 1  # an in-place write: the slab must follow it
    changed = cached_x_slabs(cache, w_x, 7, 80)
    assert torch.equal(changed, x_slabs(w_x, 7, 80)) and not torch.equal(changed, first)
    assert cached_x_slabs(cache, w_x, 7, 80) is changed
    with torch.inference_mode():  # no version counter: built every time, never kept
        frozen = w_x.clone()
    entries = len(cache)
    assert torch.equal(cached_x_slabs(cache, frozen, 7, 80), x_slabs(w_x, 7, 80))
    assert len(cache) == entries


def test_quantize_int8_per_sequence_checks():
    from quamba_kernels.quantize import quantize_int8_per_sequence

    with pytest.raises(TypeError, match="x must have dtype float32"):
        quantize_int8_per_sequence(_f(2, 3, 4, dtype=F16))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        quantize_int8_per_sequence(_f(3, 4))
    with pytest.raises(TypeError, match="seq_lens must have dtype int64"):
        quantize_int8_per_sequence(_f(2, 3, 4), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_lens must have shape \(B,\)"):
        quantize_int8_per_sequence(_f(2, 3, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantize_int8_per_sequence(_f(2, 3, 4), None, "up")
    _expect_unavailable_or_cuda_error(lambda: quantize_int8_per_sequence(_f(2, 3, 4)))
