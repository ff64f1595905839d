"""Pure-PyTorch references that define the exact semantics of every quantized op.

This module is the specification the CUDA kernels are tested against (docs/design.md, sections
"Rounding", "No hidden FMA, fixed orders" and "Ops"). Rules that hold for every function:

- Scales are per-tensor, symmetric, finite and > 0 (Python floats; a 1-element tensor is accepted).
  Every scale is rounded to float32 once; products of two scales (``float32(s_x * s_w)``) are
  formed in float64 and rounded to float32 once.
- Arithmetic is float32 with every operation rounded separately (no fused multiply-add, no fast
  math). All scale operands are float32 tensors on the data's device, so that ``v / s`` is an IEEE
  division on every device (PyTorch replaces division by a CPU scalar with a reciprocal multiply
  on CUDA).
- ``Q8(v, s, rule) = clamp(round_rule(v / s), -128, 127)`` as int8, ``v / s`` in float32.
- Integer accumulations are exact (float64 accumulation of int8 products).
- The functions run on any device. Every float32 operation is correctly rounded except the
  exponentials (``torch.exp``/``log1p``; CUDA ``expf``/``log1pf``), so results on different
  devices may differ in the last bits only through those. (A square root is computed in float64
  and rounded once: PyTorch's float32 ``sqrt`` on CPU is not correctly rounded.)

Layouts follow docs/design.md: activations between in_proj and the scan are (B, E, L); B and C are
(B, N, L); the scan output is (B, L, E).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from quamba_layers.hadamard import hadamard_transform_ref

ROUNDING_RULES = ("half_away", "half_even")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOFTPLUS_THRESHOLD = 20.0

__all__ = [
    "ROUNDING_RULES",
    "conv1d_int8",
    "conv1d_int8_update",
    "dequantize",
    "hadamard",
    "pairwise_sum",
    "quantize_int8",
    "rmsnorm",
    "round_half_away",
    "round_half_even",
    "round_with",
    "selective_scan",
    "selective_scan_int8",
    "selective_scan_step",
    "w8a8_linear",
]


# --------------------------------------------------------------------------------------------
# Argument checks (clear errors before anything reaches torch)
# --------------------------------------------------------------------------------------------


def _check_rule(rounding) -> str:
    if rounding not in ROUNDING_RULES:
        raise ValueError(f"rounding must be one of {list(ROUNDING_RULES)}, got {rounding!r}")
    return rounding


def _scale_value(name: str, value) -> float:
    """The float64 value of a scale after checking it is a finite number > 0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a single per-tensor scale (a float), "
                f"got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite float > 0, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite float > 0 (a per-tensor scale), got {value}")
    return value


def _to_float32(name: str, value: float) -> float:
    """Round a positive finite float64 to float32, refusing underflow to 0 and overflow to inf."""
    value32 = float(torch.tensor(value, dtype=torch.float32))
    if not (math.isfinite(value32) and value32 > 0.0):
        raise ValueError(f"{name}={value} is not representable as a positive finite float32")
    return value32


def _scale32(name: str, value) -> float:
    """A checked scale, rounded to float32 (returned as the Python float of that float32)."""
    return _to_float32(name, _scale_value(name, value))


def _scale64(name: str, value) -> float:
    """A checked scale kept in float64 (for products), also required to fit float32."""
    value = _scale_value(name, value)
    _to_float32(name, value)
    return value


def _scale_product32(name: str, *values) -> float:
    """float32(a * b * ...) of checked scales: the product in float64, rounded to float32 once."""
    product = 1.0
    for value in values:
        product *= value
    return _to_float32(name, product)


def _f32(value: float, device) -> torch.Tensor:
    """A 0-dim float32 tensor on ``device`` (keeps divisions IEEE on CUDA, see module doc).

    On a GPU the tensor is made once per (value, device) and reused: creating it is a copy from
    pageable host memory, which waits for everything queued on the stream (a full
    synchronisation per op otherwise). Callers never modify it in place.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor(value, dtype=torch.float32)
    return _device_scalar(float(value), device)


@functools.lru_cache(maxsize=8192)
def _device_scalar(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def _check_tensor(name: str, t, dtypes, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"{name} must have dtype {accepted}, got {str(t.dtype).replace('torch.', '')}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(shape)}, got {tuple(t.shape)}")


def _check_devices(**tensors) -> None:
    present = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


# --------------------------------------------------------------------------------------------
# Rounding and (de)quantization
# --------------------------------------------------------------------------------------------


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (C ``roundf``); same dtype as ``v``.

    ``t = trunc(v); t + sign(v) * (|v - t| >= 0.5)``. ``v - trunc(v)`` is exact in floating
    point, so 0.49999997 rounds to 0 (``floor(v + 0.5)`` would give 1).
    """
    _check_tensor("v", v, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    truncated = torch.trunc(v)
    away = torch.abs(v - truncated) >= 0.5
    return truncated + torch.where(away, torch.sign(v), torch.zeros_like(v))


def round_half_even(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even (``torch.round``, CUDA ``rintf``); same dtype as ``v``."""
    _check_tensor("v", v, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    return torch.round(v)


def round_with(v: torch.Tensor, rule: str) -> torch.Tensor:
    """Round with the named rule: ``"half_away"`` or ``"half_even"`` (they differ only at .5)."""
    rule = _check_rule(rule)
    return round_half_away(v) if rule == "half_away" else round_half_even(v)


def _q8(v: torch.Tensor, scale: torch.Tensor, rule: str) -> torch.Tensor:
    """Q8 on a float32 tensor with a float32 tensor scale (broadcast); no argument checks."""
    quotient = v / scale
    if torch.isnan(quotient).any():
        raise ValueError("cannot quantize NaN values to int8 (Q8 is defined for non-NaN values)")
    return torch.clamp(round_with(quotient, rule), -128.0, 127.0).to(torch.int8)


def quantize_int8(v: torch.Tensor, scale, rounding: str) -> torch.Tensor:
    """``Q8(v, s, rule) = clamp(round_rule(v / s), -128, 127)`` as int8.

    ``v``: float32 (float16/bfloat16 are converted to float32 first, exactly). ``v / s`` is an
    IEEE float32 division by ``float32(scale)``; ±inf saturate to 127/-128; NaN raises.
    ``rounding``: ``"half_away"`` or ``"half_even"``.
    """
    _check_tensor("v", v, FLOAT_DTYPES)
    rule = _check_rule(rounding)
    scale = _scale32("scale", scale)
    return _q8(v.float(), _f32(scale, v.device), rule)


def dequantize(q: torch.Tensor, scale) -> torch.Tensor:
    """``q.float() * float32(scale)`` as float32 (one correctly rounded product per element)."""
    _check_tensor("q", q, (torch.int8,))
    scale = _scale32("scale", scale)
    return q.float() * _f32(scale, q.device)


def pairwise_sum(p: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in the fixed pairwise-halving order (float32 in, float32 out).

    The last axis is padded with zeros to a power of two n, then
    ``p = p[..., :n/2] + p[..., n/2:]`` until one element is left. For n = 4:
    ``(p0 + p2) + (p1 + p3)``.
    """
    _check_tensor("p", p, (torch.float32,))
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError(f"p must have a non-empty last axis, got shape {tuple(p.shape)}")
    n = p.shape[-1]
    padded = 1 << (n - 1).bit_length()
    if padded != n:
        p = torch.nn.functional.pad(p, (0, padded - n))
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        p = p[..., :half] + p[..., half:]
    return p[..., 0]


# --------------------------------------------------------------------------------------------
# RMSNorm and the INT8 GEMM
# --------------------------------------------------------------------------------------------


def rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    out_scale=None,
    rounding: str = "half_even",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm over the last axis (size D); returns ``(y, r)``.

    - ``r = x.float() + residual`` (``residual`` float32 of x's shape, or None: ``r = x.float()``);
    - ``ms = float32(sum_f64(r^2) / D)``: squares and sum in float64, one rounding to float32;
    - ``inv = 1 / sqrt(ms + float32(eps))``: float32 add, correctly rounded float32 sqrt,
      IEEE division (no rsqrt);
    - ``y = (r * inv) * weight.float()`` (``weight`` (D,) or None, meaning ones);
    - ``y`` is returned as ``Q8(y, out_scale, rounding)`` int8 when ``out_scale`` is given, else
      float32. ``r`` (float32) is the new residual stream.
    """
    _check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis (D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if residual is not None:
        _check_tensor("residual", residual, (torch.float32,))
        _check_shape("residual", residual, tuple(x.shape), "x.shape")
    if weight is not None:
        _check_tensor("weight", weight, FLOAT_DTYPES, ndim=1)
        _check_shape("weight", weight, (d,), "(D,)")
    _check_devices(x=x, residual=residual, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    rule = _check_rule(rounding)
    out_scale = None if out_scale is None else _scale32("out_scale", out_scale)

    r = x.float() + residual if residual is not None else x.float()
    mean_square = ((r.double() * r.double()).sum(dim=-1, keepdim=True) / d).float()
    # Correctly rounded float32 sqrt (CUDA __fsqrt_rn): sqrt in float64, rounded once. PyTorch's
    # float32 sqrt on CPU is not correctly rounded (vectorized approximation on AVX-512).
    root = torch.sqrt((mean_square + _f32(float(eps), x.device)).double()).float()
    inv = _f32(1.0, x.device) / root
    y = r * inv
    if weight is not None:
        y = y * weight.float()
    if out_scale is not None:
        y = _q8(y, _f32(out_scale, x.device), rule)
    return y, r


# |partial sums| <= K * 128 * 128; float32 holds every integer below 2^24 exactly.
_FLOAT32_EXACT_K = (1 << 24) // (128 * 128)


def _exact_dtype(k: int) -> torch.dtype:
    """float32 when sums of k int8 x int8 products stay below 2^24 (every partial sum is then an
    exactly representable integer, whatever the summation order), else float64."""
    return torch.float32 if k <= _FLOAT32_EXACT_K else torch.float64


def exact_int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``x_q @ w_q^T`` of int8 operands, exactly (see ``_exact_dtype``)."""
    exact = _exact_dtype(w_q.shape[1])
    return torch.matmul(x_q.to(exact), w_q.to(exact).t())


def w8a8_linear(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    s_x,
    s_w,
    s_out=None,
    rounding: str = "half_even",
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """INT8 x INT8 linear layer: ``x_q (..., K)`` int8 times ``w_q (N, K)`` int8 (out, in).

    - ``acc = x_q @ w_q^T`` exactly (accumulated in float64, exact for K < 2^37);
    - ``scale = float32(s_x * s_w)``; ``v = float32(acc) * scale`` (``float32(acc)`` rounds to
      nearest even like the kernel's int32 -> float conversion);
    - with ``s_out``: ``Q8(v, s_out, rounding)`` int8 (..., N); otherwise ``v`` cast to
      ``out_dtype`` (float16 for out_proj, or float32).
    """
    _check_tensor("x_q", x_q, (torch.int8,))
    _check_tensor("w_q", w_q, (torch.int8,), ndim=2)
    if x_q.dim() == 0:
        raise ValueError("x_q must have at least one dimension (K)")
    if x_q.shape[-1] != w_q.shape[1]:
        raise ValueError(
            f"x_q's last axis (K = {x_q.shape[-1]}) must equal w_q's in_features "
            f"(w_q has shape (N, K) = {tuple(w_q.shape)})"
        )
    if w_q.shape[1] >= 2**37:
        raise ValueError(f"K = {w_q.shape[1]} is too large for an exact accumulation (K < 2^37)")
    _check_devices(x_q=x_q, w_q=w_q)
    rule = _check_rule(rounding)
    scale = _scale_product32("s_x * s_w", _scale64("s_x", s_x), _scale64("s_w", s_w))
    s_out = None if s_out is None else _scale32("s_out", s_out)
    if s_out is None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, float32 or bfloat16, got {out_dtype}")

    acc = exact_int8_matmul(x_q, w_q)
    v = acc.float() * _f32(scale, x_q.device)
    if s_out is not None:
        return _q8(v, _f32(s_out, x_q.device), rule)
    return v.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Causal depthwise conv1d + SiLU
# --------------------------------------------------------------------------------------------


def _conv_weights(w_q: torch.Tensor, e: int) -> torch.Tensor:
    _check_tensor("w_q", w_q, (torch.int8,))
    if w_q.dim() == 3 and w_q.shape[1] == 1:
        w_q = w_q[:, 0, :]
    if w_q.dim() != 2 or w_q.shape[0] != e or w_q.shape[1] < 1:
        raise ValueError(
            f"w_q must have shape (E, K) or (E, 1, K) with E = {e}, got {tuple(w_q.shape)}"
        )
    return w_q


def _conv_input_scale(s_x, s_w: float, batch: int, device) -> torch.Tensor:
    """float32(s_w * s_x) as a float32 tensor broadcastable to (B, E, ...)."""
    if isinstance(s_x, torch.Tensor) and s_x.dim() == 1:
        _check_tensor("s_x", s_x, (torch.float32,))
        _check_shape("s_x", s_x, (batch,), "(B,) per-sequence scales")
        if s_x.device != device:
            raise ValueError(f"s_x must be on {device} like x_q, got {s_x.device}")
        if not bool(torch.all(torch.isfinite(s_x) & (s_x > 0))):
            raise ValueError(f"s_x must hold finite per-sequence scales > 0, got {s_x.tolist()}")
        product = (s_x.double() * s_w).float()
        if not bool(torch.all(torch.isfinite(product) & (product > 0))):
            raise ValueError("s_w * s_x is not representable as a positive finite float32")
        return product[:, None, None]
    return _f32(_scale_product32("s_w * s_x", s_w, _scale64("s_x", s_x)), device)


def _conv_epilogue(
    acc: torch.Tensor, in_scale: torch.Tensor, bias: torch.Tensor | None, s_out, rule: str
) -> torch.Tensor:
    """``v = in_scale * acc + bias``, SiLU ``v / (1 + exp(-v))``, then Q8 or float32."""
    v = acc.float() * in_scale
    if bias is not None:
        v = v + bias
    v = v / (_f32(1.0, v.device) + torch.exp(-v))
    if s_out is None:
        return v
    return _q8(v, _f32(s_out, acc.device), rule)


def _conv_bias(b_q, s_b, e: int, device) -> torch.Tensor | None:
    """float32(s_b * b_q) of shape (E, 1), or None without bias."""
    if b_q is None:
        return None
    _check_tensor("b_q", b_q, (torch.int8,), ndim=1)
    _check_shape("b_q", b_q, (e,), "(E,)")
    if b_q.device != device:
        raise ValueError(f"b_q must be on {device} like x_q, got {b_q.device}")
    s_b = _scale64("s_b", s_b)
    # Exact float64 product of an int8 and a scale, rounded to float32 once.
    return (b_q.double() * s_b).float()[:, None]


def conv1d_int8(
    x_q: torch.Tensor,
    s_x,
    w_q: torch.Tensor,
    s_w,
    b_q: torch.Tensor | None,
    s_b,
    s_out=None,
    rounding: str = "half_away",
) -> torch.Tensor:
    """Causal depthwise conv1d + bias + SiLU on INT8 codes ``x_q`` (B, E, L).

    - ``acc_t = sum_k w_q[e, k] * x_q[b, e, t - K + 1 + k]`` exactly, zero left padding
      (``w_q`` (E, K) or (E, 1, K) int8);
    - ``v = float32(s_w * s_x) * float32(acc) + float32(s_b * b_q)`` (two float32 operations;
      ``b_q`` (E,) int8, or None for no bias);
    - SiLU ``v = v / (1 + exp(-v))`` in float32;
    - returns ``Q8(v, s_out, rounding)`` int8 (B, E, L), or the true float32 ``v`` when ``s_out``
      is None (no rounding, no clamp).

    ``s_x`` is a float, or a float32 tensor of shape (B,) holding one scale per sequence
    (dynamic per-sequence input quantization); then ``float32(s_w * s_x[b])`` per sequence.
    """
    _check_tensor("x_q", x_q, (torch.int8,), ndim=3)
    batch, e, length = x_q.shape
    w_q = _conv_weights(w_q, e)
    _check_devices(x_q=x_q, w_q=w_q)
    rule = _check_rule(rounding)
    s_w = _scale64("s_w", s_w)
    in_scale = _conv_input_scale(s_x, s_w, batch, x_q.device)
    bias = _conv_bias(b_q, s_b, e, x_q.device)
    s_out = None if s_out is None else _scale32("s_out", s_out)

    k = w_q.shape[1]
    exact = _exact_dtype(k)  # integer products and sums are exact in this dtype
    x_padded = torch.nn.functional.pad(x_q.to(exact), (k - 1, 0))
    w = w_q.to(exact)
    acc = torch.zeros(batch, e, length, dtype=exact, device=x_q.device)
    for tap in range(k):
        acc = acc + w[None, :, tap, None] * x_padded[:, :, tap : tap + length]
    return _conv_epilogue(acc, in_scale, bias, s_out, rule)


def conv1d_int8_update(
    x_q_t: torch.Tensor,
    conv_state: torch.Tensor,
    s_x,
    w_q: torch.Tensor,
    s_w,
    b_q: torch.Tensor | None,
    s_b,
    s_out=None,
    rounding: str = "half_away",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of ``conv1d_int8``; returns ``(out (B, E), new_state (B, E, K-1))``.

    ``conv_state`` (B, E, K-1) int8 holds the previous K-1 input codes, oldest first (zeros at
    the start of a sequence). The window ``cat(conv_state, x_q_t)`` goes through exactly the
    ``conv1d_int8`` formula, so stepping through a sequence reproduces the prefill output
    bit-exactly. ``new_state`` is the window without its oldest element.
    """
    _check_tensor("x_q_t", x_q_t, (torch.int8,), ndim=2)
    batch, e = x_q_t.shape
    w_q = _conv_weights(w_q, e)
    k = w_q.shape[1]
    _check_tensor("conv_state", conv_state, (torch.int8,), ndim=3)
    _check_shape("conv_state", conv_state, (batch, e, k - 1), "(B, E, K-1)")
    _check_devices(x_q_t=x_q_t, conv_state=conv_state, w_q=w_q)
    rule = _check_rule(rounding)
    s_w = _scale64("s_w", s_w)
    in_scale = _conv_input_scale(s_x, s_w, batch, x_q_t.device)
    if in_scale.dim() == 3:
        in_scale = in_scale[:, :, 0]
    bias = _conv_bias(b_q, s_b, e, x_q_t.device)
    if bias is not None:
        bias = bias[:, 0]
    s_out = None if s_out is None else _scale32("s_out", s_out)

    window = torch.cat((conv_state, x_q_t[:, :, None]), dim=2)
    exact = _exact_dtype(k)
    acc = (window.to(exact) * w_q.to(exact)[None]).sum(dim=-1)  # exact: small integers
    out = _conv_epilogue(acc, in_scale, bias, s_out, rule)
    return out, window[:, :, 1:].contiguous()


# --------------------------------------------------------------------------------------------
# Selective scan
# --------------------------------------------------------------------------------------------


# Time steps per chunk of the scan: a chunk's (T, B, E, N) buffers stay ~16 MiB (cache-sized).
_SCAN_CHUNK_ELEMENTS = 1 << 22


def _softplus(delta: torch.Tensor) -> torch.Tensor:
    """``log1p(exp(delta))`` where ``delta <= 20``, else ``delta`` (float32)."""
    # exp overflows to inf only where the branch is not taken; where() discards those values.
    return torch.where(delta <= SOFTPLUS_THRESHOLD, torch.log1p(torch.exp(delta)), delta)


def _check_scan_shapes(u, delta_raw, A, B, C, D, z, delta_bias, initial_state) -> None:
    _check_tensor("u", u, (torch.float32,), ndim=3)
    batch, e, length = u.shape
    _check_tensor("delta_raw", delta_raw, (torch.float32,))
    _check_shape("delta_raw", delta_raw, (batch, e, length), "(B, E, L) like u")
    _check_tensor("A", A, (torch.float32,), ndim=2)
    if A.shape[0] != e or A.shape[1] < 1:
        raise ValueError(f"A must have shape (E, N) with E = {e}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        _check_tensor(name, t, (torch.float32,))
        _check_shape(name, t, (batch, n, length), "(B, N, L)")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check_tensor(name, t, (torch.float32,))
            _check_shape(name, t, (e,), "(E,)")
    if z is not None:
        _check_tensor("z", z, (torch.float32,))
        _check_shape("z", z, (batch, e, length), "(B, E, L) like u")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, (torch.float32,))
        _check_shape("initial_state", initial_state, (batch, e, n), "(B, E, N)")
    _check_devices(
        u=u, delta_raw=delta_raw, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        initial_state=initial_state,
    )  # fmt: skip


def selective_scan(
    u: torch.Tensor,
    delta_raw: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    *,
    initial_state: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 selective scan, sequential in t; returns ``(y (B, L, E), h_last (B, E, N))``.

    Inputs (all float32): ``u``, ``delta_raw``, ``z`` (B, E, L); ``A`` (E, N); ``B``, ``C``
    (B, N, L); ``D``, ``delta_bias`` (E,). ``D``, ``z`` and ``delta_bias`` may be None (the
    corresponding step is skipped). Every operation is a separate float32 operation:

    - ``delta = delta_raw + delta_bias[:, None]``;
      ``delta = where(delta <= 20, log1p(exp(delta)), delta)``;
    - ``h = initial_state`` (default zeros (B, E, N)); for t = 0 .. L-1 in order:
      ``dA = exp(delta_t[..., None] * A)``,
      ``dBu = (delta_t[..., None] * B_t[:, None, :]) * u_t[..., None]``,
      ``h = dA * h + dBu`` (product rounded, then sum: no FMA),
      ``y_t = pairwise_sum_N(h * C_t[:, None, :])`` (see ``pairwise_sum``);
    - ``y = y + u * D[:, None]``; ``y = y * (z / (1 + exp(-z)))``.
    """
    _check_scan_shapes(u, delta_raw, A, B, C, D, z, delta_bias, initial_state)
    batch, e, length = u.shape
    n = A.shape[1]

    delta = delta_raw + delta_bias[:, None] if delta_bias is not None else delta_raw
    if delta_softplus:  # False only for the plain (non-Mamba) scan semantics of fp_ops
        delta = _softplus(delta)
    # Time-major copies so that every step reads contiguous (B, E) / (B, N) slices.
    delta_tm = delta.permute(2, 0, 1).contiguous()
    u_tm = u.permute(2, 0, 1).contiguous()
    b_tm = B.permute(2, 0, 1).contiguous()
    c_tm = C.permute(2, 0, 1).contiguous()

    if initial_state is None:
        h = torch.zeros(batch, e, n, dtype=torch.float32, device=u.device)
    else:
        h = initial_state.clone()
    # Elementwise work is done for a chunk of time steps at once (the same float32 operations on
    # the same values, so the same bits); only the recurrence itself runs step by step.
    chunk = max(1, min(length, _SCAN_CHUNK_ELEMENTS // max(1, batch * e * n)))
    ys = []
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        delta_c = delta_tm[start:stop][..., None]  # (T, B, E, 1)
        d_a = torch.exp(delta_c * A)
        d_bu = (delta_c * b_tm[start:stop][:, :, None, :]) * u_tm[start:stop][..., None]
        if torch.is_grad_enabled() and (d_a.requires_grad or h.requires_grad):
            # Differentiable path (same operations, same bits): no writes into a buffer.
            steps = []
            for i in range(stop - start):
                h = d_a[i] * h + d_bu[i]
                steps.append(h)
            states = torch.stack(steps)
        else:
            states = torch.empty_like(d_a)
            for i in range(stop - start):
                # h = dA * h + dBu, written in place: the product is rounded, then the sum.
                torch.mul(d_a[i], h, out=states[i])
                h = states[i].add_(d_bu[i])
        ys.append(pairwise_sum(states * c_tm[start:stop][:, :, None, :]))  # (T, B, E)
    y = torch.cat(ys).permute(1, 0, 2) if ys else u.new_zeros(batch, 0, e)  # (B, L, E)

    u_le = u.transpose(1, 2)
    if D is not None:
        y = y + u_le * D
    if z is not None:
        z_le = z.transpose(1, 2)
        y = y * (z_le / (_f32(1.0, z_le.device) + torch.exp(-z_le)))
    return y.contiguous(), h


def dequantize_scan_inputs(
    u_q, s_u, dt_q, s_dt, A_log_q, s_A, B_q, s_B, C_q, s_C, D_q, s_D, z_q, s_z, dtb_q, s_dtb
):
    """Check the INT8 scan inputs (names as the caller sees them) and dequantize them:
    ``(u, delta_raw, A, B, C, D, z, delta_bias)`` as ``selective_scan`` takes them."""
    _check_tensor("u_q", u_q, (torch.int8, torch.float32), ndim=3)
    batch, e, length = u_q.shape
    _check_tensor("dt_q", dt_q, (torch.int8,))
    _check_shape("dt_q", dt_q, (batch, e, length), "(B, E, L) like u_q")
    _check_tensor("A_log_q", A_log_q, (torch.int8,), ndim=2)
    if A_log_q.shape[0] != e or A_log_q.shape[1] < 1:
        raise ValueError(f"A_log_q must have shape (E, N) with E = {e}, got {tuple(A_log_q.shape)}")
    n = A_log_q.shape[1]
    for name, t in (("B_q", B_q), ("C_q", C_q)):
        _check_tensor(name, t, (torch.int8,))
        _check_shape(name, t, (batch, n, length), "(B, N, L)")
    for name, t in (("D_q", D_q), ("dtb_q", dtb_q)):
        if t is not None:
            _check_tensor(name, t, (torch.int8,))
            _check_shape(name, t, (e,), "(E,)")
    if z_q is not None:
        _check_tensor("z_q", z_q, (torch.int8,))
        _check_shape("z_q", z_q, (batch, e, length), "(B, E, L) like u_q")
    _check_devices(
        u_q=u_q, dt_q=dt_q, A_log_q=A_log_q, B_q=B_q, C_q=C_q, D_q=D_q, z_q=z_q, dtb_q=dtb_q
    )

    u = dequantize(u_q, _scale32("s_u", s_u)) if u_q.dtype == torch.int8 else u_q
    delta_raw = dequantize(dt_q, _scale32("s_dt", s_dt))
    A = -torch.exp(dequantize(A_log_q, _scale32("s_A", s_A)))
    B = dequantize(B_q, _scale32("s_B", s_B))
    C = dequantize(C_q, _scale32("s_C", s_C))
    D = None if D_q is None else dequantize(D_q, _scale32("s_D", s_D))
    z = None if z_q is None else dequantize(z_q, _scale32("s_z", s_z))
    delta_bias = None if dtb_q is None else dequantize(dtb_q, _scale32("s_dtb", s_dtb))
    return u, delta_raw, A, B, C, D, z, delta_bias


def selective_scan_int8(
    u_q: torch.Tensor,
    s_u,
    dt_q: torch.Tensor,
    s_dt,
    A_log_q: torch.Tensor,
    s_A,
    B_q: torch.Tensor,
    s_B,
    C_q: torch.Tensor,
    s_C,
    D_q: torch.Tensor | None,
    s_D,
    z_q: torch.Tensor | None,
    s_z,
    dtb_q: torch.Tensor | None,
    s_dtb,
    s_h,
    *,
    state_rounding: str = "half_away",
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 selective scan: dequantize, run ``selective_scan``, cast y to float16.

    Returns ``(y (B, L, E) float16, h_q (B, E, N) int8)``. Dequantization (``dequantize``):
    ``u = u_q * s_u``, ``delta_raw = dt_q * s_dt``, ``A = -exp(A_log_q * s_A)``,
    ``B = B_q * s_B``, ``C = C_q * s_C``, ``D = D_q * s_D``, ``z = z_q * s_z``,
    ``delta_bias = dtb_q * s_dtb`` (``D_q``, ``z_q``, ``dtb_q`` may be None). ``u_q`` may be a
    float32 tensor instead (the FP32-input variant: used as ``u`` as is, ``s_u`` ignored).
    y is cast to float16 with round-to-nearest-even. ``h_q = Q8(h_last, s_h, state_rounding)``
    is the INT8 state snapshot for decoding; it never feeds back into this prefill.
    """
    u, delta_raw, A, B, C, D, z, delta_bias = dequantize_scan_inputs(
        u_q, s_u, dt_q, s_dt, A_log_q, s_A, B_q, s_B, C_q, s_C, D_q, s_D, z_q, s_z, dtb_q,
        s_dtb,
    )  # fmt: skip
    rule = _check_rule(state_rounding)
    s_h = _scale32("s_h", s_h)
    y, h_last = selective_scan(u, delta_raw, A, B, C, D, z, delta_bias)
    return y.half(), _q8(h_last, _f32(s_h, h_last.device), rule)


def selective_scan_step(
    state_q: torch.Tensor,
    u_q: torch.Tensor,
    s_u,
    dt_q: torch.Tensor,
    s_dt,
    A_log_q: torch.Tensor,
    s_A,
    B_q: torch.Tensor,
    s_B,
    C_q: torch.Tensor,
    s_C,
    D_q: torch.Tensor | None,
    s_D,
    z_q: torch.Tensor | None,
    s_z,
    dtb_q: torch.Tensor | None,
    s_dtb,
    s_h,
    *,
    state_rounding: str = "half_away",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with an INT8 state; returns ``(y (B, E) float16, new_state_q (B, E, N))``.

    ``state_q`` (B, E, N) int8 on grid ``s_h``; ``u_q``, ``dt_q``, ``z_q`` (B, E) int8 (``u_q``
    may be float32, ``s_u`` then ignored); ``B_q``, ``C_q`` (B, N) int8; ``A_log_q`` (E, N);
    ``D_q``, ``dtb_q`` (E,). The step is exactly ``selective_scan_int8`` with L = 1 started from
    ``h = dequantize(state_q, s_h)`` (same dequantization, same float32 operations), and the
    new state is requantized: ``new_state_q = Q8(h, s_h, state_rounding)`` (half away from zero
    by default). From a zero state the step equals ``selective_scan_int8`` on one token.
    """
    _check_tensor("state_q", state_q, (torch.int8,), ndim=3)
    _check_tensor("u_q", u_q, (torch.int8, torch.float32), ndim=2)
    for name, t in (("dt_q", dt_q), ("B_q", B_q), ("C_q", C_q)):
        _check_tensor(name, t, (torch.int8,), ndim=2)
    if z_q is not None:
        _check_tensor("z_q", z_q, (torch.int8,), ndim=2)
    rule = _check_rule(state_rounding)
    s_h = _scale32("s_h", s_h)
    _check_devices(state_q=state_q, u_q=u_q)

    # One time step: the (B, E) / (B, N) inputs become L = 1 sequences.
    u, delta_raw, A, B, C, D, z, delta_bias = dequantize_scan_inputs(
        u_q[..., None], s_u, dt_q[..., None], s_dt, A_log_q, s_A, B_q[..., None], s_B,
        C_q[..., None], s_C, D_q, s_D, None if z_q is None else z_q[..., None], s_z, dtb_q, s_dtb,
    )  # fmt: skip
    batch, e = u_q.shape
    _check_shape("state_q", state_q, (batch, e, A.shape[1]), "(B, E, N)")
    h0 = dequantize(state_q, s_h)
    y, h = selective_scan(u, delta_raw, A, B, C, D, z, delta_bias, initial_state=h0)
    return y[:, 0, :].half(), _q8(h, _f32(s_h, h.device), rule)


# --------------------------------------------------------------------------------------------
# Hadamard
# --------------------------------------------------------------------------------------------


def hadamard(x: torch.Tensor, scale, out_scale=None, rounding: str = "half_away") -> torch.Tensor:
    """Hadamard transform of the last axis (n = m·2^k, m in {1, 12, 20}), float32 arithmetic.

    Butterfly stages (a + b, a - b) over the 2^k axis with increasing stride, then the m×m ±1
    matrix with a sequential sum over its columns, then ``* float32(scale)`` (usually
    1/sqrt(n)); see ``quamba_layers.hadamard.hadamard_transform_ref``. ``x`` float16/float32.
    Returns ``Q8(., out_scale, rounding)`` int8 when ``out_scale`` is given, else float32.
    """
    _check_tensor("x", x, FLOAT_DTYPES)
    rule = _check_rule(rounding)
    out_scale = None if out_scale is None else _scale32("out_scale", out_scale)
    scale = _scale32("scale", scale)
    y = hadamard_transform_ref(x, scale)
    if out_scale is None:
        return y
    return _q8(y, _f32(out_scale, y.device), rule)
