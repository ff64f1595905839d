"""Causal depthwise conv1d (width 2-4) + bias + SiLU: INT8 and float, prefill and decode update.

References (bit-exact): ``quamba_layers.reference_ops.conv1d_int8`` / ``conv1d_int8_update`` and
``quamba_layers.fp_ops.causal_conv1d_ref`` / ``causal_conv1d_update_ref``. The kernels evaluate the
same float32 operations in the same order (accurate ``expf``, IEEE division), so INT8 codes equal
the reference's and float outputs are bit-identical to the reference run on the GPU.

Difference from the references: the decode updates shift ``conv_state`` in place (the references
return a new state tensor).
"""

from __future__ import annotations

from quamba_kernels._loader import require
from quamba_kernels._torch import (
    check_cuda,
    check_optional,
    check_shape,
    check_tensor,
    current_stream,
    dtype_name,
    float32_value,
    rounding_code,
    row_span,
    scale32,
    scale64,
)

__all__ = ["causal_conv1d", "causal_conv1d_update", "conv1d_int8", "conv1d_int8_update"]

_ACTIVATIONS = (None, "silu")


def _float_dtypes():
    import torch

    return (torch.float16, torch.bfloat16, torch.float32)


def _weights(name: str, w, channels: int, dtypes):
    """(E, K) or (E, 1, K) -> (E, K) with K in 2..4."""
    check_tensor(name, w, dtypes)
    if w.dim() == 3 and w.shape[1] == 1:
        w = w.reshape(w.shape[0], w.shape[2])
    if w.dim() != 2 or w.shape[0] != channels:
        raise ValueError(
            f"{name} must have shape (E, K) or (E, 1, K) with E = {channels}, got {tuple(w.shape)}"
        )
    if not 2 <= w.shape[1] <= 4:
        raise ValueError(f"conv width K = {w.shape[1]} is not supported (the kernels take 2, 3, 4)")
    return w


def _input_scale(s_x, s_w: float, batch: int):
    """(s_x as float64, per-sequence tensor or None) and a representability check of s_w * s_x."""
    import torch

    if isinstance(s_x, torch.Tensor) and s_x.dim() == 1:
        check_tensor("s_x", s_x, torch.float32, ndim=1)
        check_shape("s_x", s_x, (batch,), "(B,) per-sequence scales")
        # The values are not inspected here: that would synchronize with the GPU on every call.
        return 1.0, s_x
    s_x = scale64("s_x", s_x)
    product = float32_value(s_w * s_x)
    if not (0.0 < product < float("inf")):
        raise ValueError(f"s_w * s_x = {s_w * s_x} is not representable as a positive float32")
    return s_x, None


def _int8_common(x, w_q, b_q, s_x, s_w, s_b, s_out, rounding, out, out_shape):
    """Checks shared by the INT8 prefill and update; returns the binding's scalar arguments."""
    import torch

    batch, channels = x.shape[0], x.shape[1]
    w_q = _weights("w_q", w_q, channels, torch.int8)
    check_optional("b_q", b_q, torch.int8, ndim=1)
    check_shape("b_q", b_q, (channels,), "(E,)")
    s_w = scale64("s_w", s_w)
    s_x_value, s_x_seq = _input_scale(s_x, s_w, batch)
    s_b = scale64("s_b", s_b) if b_q is not None else 1.0
    code = rounding_code(rounding)
    out_dtype = torch.int8 if s_out is not None else torch.float32
    out_scale = scale32("s_out", s_out) if s_out is not None else 1.0
    if out is not None:
        check_tensor("out", out, out_dtype)
        check_shape("out", out, out_shape, "x's shape")
    return w_q, s_w, s_x_value, s_x_seq, s_b, code, out_dtype, out_scale


def conv1d_int8(
    x_q,
    s_x,
    w_q,
    s_w,
    b_q,
    s_b,
    s_out=None,
    rounding: str = "half_away",
    *,
    silu: bool = True,
    out=None,
    state_out=None,
):
    """Causal depthwise conv1d + bias + SiLU on INT8 codes, on the GPU.

    ``x_q`` (B, E, L) int8; ``w_q`` (E, K) or (E, 1, K) int8 with K in 2..4; ``b_q`` (E,) int8 or
    None; scales are floats (``s_x`` may be a float32 CUDA tensor (B,) of per-sequence scales).
    ``v = float32(s_w*s_x) * acc + float32(s_b*b_q)``, SiLU, then ``Q8(v, s_out, rounding)`` int8
    or, with ``s_out=None``, the true float32 ``v``. Returns ``out`` (B, E, L).
    ``state_out`` (B, E, K-1) int8: also written with each row's last K-1 codes of ``x_q`` (zeros
    before the row), the conv state ``conv1d_int8_update`` continues from after this prompt.
    """
    import torch

    check_tensor("x_q", x_q, torch.int8, ndim=3)
    w_q, s_w, s_x_value, s_x_seq, s_b, code, out_dtype, out_scale = _int8_common(
        x_q, w_q, b_q, s_x, s_w, s_b, s_out, rounding, out, tuple(x_q.shape)
    )
    if state_out is not None:
        check_tensor("state_out", state_out, torch.int8, ndim=3)
        batch, channels, _ = x_q.shape
        check_shape("state_out", state_out, (batch, channels, w_q.shape[1] - 1), "(B, E, K-1)")
    module = require()
    check_cuda(x_q=x_q, w_q=w_q, b_q=b_q, s_x=s_x_seq, out=out, state_out=state_out)
    if out is None:
        out = torch.empty(x_q.shape, dtype=out_dtype, device=x_q.device)
    module.conv1d_fwd(
        x_q, w_q, b_q, out, s_x_value, s_x_seq, s_w, s_b, out_scale, code, bool(silu),
        current_stream(x_q.device), state_out,
    )  # fmt: skip
    return out


def conv1d_int8_update(
    x_q_t,
    conv_state,
    s_x,
    w_q,
    s_w,
    b_q,
    s_b,
    s_out=None,
    rounding: str = "half_away",
    *,
    silu: bool = True,
    out=None,
):
    """One decode step of ``conv1d_int8``; returns ``(out (B, E), conv_state)``.

    ``x_q_t`` (B, E) int8, possibly a column range of a wider matrix (in_proj's output: read in
    place); ``conv_state`` (B, E, K-1) int8, the previous K-1 codes oldest first, is shifted in
    place (the new code enters at the end). Same formula as the prefill, so stepping through a
    sequence reproduces ``conv1d_int8`` exactly.
    """
    import torch

    check_tensor("x_q_t", x_q_t, torch.int8, ndim=2, strided_rows=True)
    w_q, s_w, s_x_value, s_x_seq, s_b, code, out_dtype, out_scale = _int8_common(
        x_q_t, w_q, b_q, s_x, s_w, s_b, s_out, rounding, out, tuple(x_q_t.shape)
    )
    batch, channels = x_q_t.shape
    check_tensor("conv_state", conv_state, torch.int8, ndim=3)
    check_shape("conv_state", conv_state, (batch, channels, w_q.shape[1] - 1), "(B, E, K-1)")
    module = require()
    check_cuda(x_q_t=x_q_t, conv_state=conv_state, w_q=w_q, b_q=b_q, s_x=s_x_seq, out=out)
    if out is None:
        out = torch.empty(x_q_t.shape, dtype=out_dtype, device=x_q_t.device)
    x_arg, x_row = row_span(x_q_t)
    module.conv1d_update(
        x_arg, conv_state, w_q, b_q, out, s_x_value, s_x_seq, s_w, s_b, out_scale, code,
        bool(silu), current_stream(x_q_t.device), x_row,
    )  # fmt: skip
    return out, conv_state


def _float_common(x, weight, bias, activation, out):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    import torch

    weight = _weights("weight", weight, x.shape[1], _float_dtypes())
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"weight must have x's dtype ({dtype_name(x.dtype)}) or float32, "
            f"got {dtype_name(weight.dtype)}"
        )
    check_optional("bias", bias, weight.dtype, ndim=1)
    check_shape("bias", bias, (x.shape[1],), "(E,)")
    if out is not None:
        check_tensor("out", out, x.dtype)
        check_shape("out", out, tuple(x.shape), "x's shape")
    return weight


def causal_conv1d(x, weight, bias=None, activation: str | None = "silu", *, out=None):
    """Float causal depthwise conv1d (+ SiLU): ``x`` (B, E, L) float16/bfloat16/float32.

    ``weight`` (E, K) or (E, 1, K) and ``bias`` (E,) of x's dtype or float32. Float32 arithmetic
    ``((w0*x0 + w1*x1) + ...) + bias``, SiLU, one rounding to x's dtype (fp_ops.causal_conv1d_ref).
    """
    check_tensor("x", x, _float_dtypes(), ndim=3)
    weight = _float_common(x, weight, bias, activation, out)
    module = require()
    check_cuda(x=x, weight=weight, bias=bias, out=out)
    import torch

    if out is None:
        out = torch.empty_like(x)
    module.conv1d_fwd(
        x, weight, bias, out, 1.0, None, 1.0, 1.0, 1.0, 0, activation == "silu",
        current_stream(x.device),
    )  # fmt: skip
    return out


def causal_conv1d_update(
    x, conv_state, weight, bias=None, activation: str | None = "silu", *, out=None
):
    """One decode step of ``causal_conv1d``: ``x`` (B, E), ``conv_state`` (B, E, K-1) of x's dtype,
    shifted in place. Returns ``(out (B, E), conv_state)``.
    """
    check_tensor("x", x, _float_dtypes(), ndim=2)
    weight = _float_common(x, weight, bias, activation, out)
    check_tensor("conv_state", conv_state, x.dtype, ndim=3)
    check_shape(
        "conv_state", conv_state, (x.shape[0], x.shape[1], weight.shape[1] - 1), "(B, E, K-1)"
    )
    module = require()
    check_cuda(x=x, conv_state=conv_state, weight=weight, bias=bias, out=out)
    import torch

    if out is None:
        out = torch.empty_like(x)
    module.conv1d_update(
        x, conv_state, weight, bias, out, 1.0, None, 1.0, 1.0, 1.0, 0, activation == "silu",
        current_stream(x.device),
    )  # fmt: skip
    return out, conv_state
