"""Selective-scan decode step (one token) with an INT8 or a float state, updated in place.

- ``selective_scan_step_int8``: ``quamba_layers.reference_ops.selective_scan_step`` (upstream
  Quamba semantics: the INT8 state on grid ``s_h`` is dequantized, advanced one step and
  requantized with ``Q8(h, s_h, state_rounding)`` after every token).
- ``selective_state_update``: ``quamba_layers.fp_ops.selective_state_update_ref`` with the state in
  float16/bfloat16/float32 and y in x's dtype.

Both evaluate the reference's float32 operations in its order (bit-identical on the GPU); the
difference is that the state tensor is overwritten in place instead of returned as a new tensor.
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
    rounding_code,
    row_span,
    scale32,
    scale_product32,
)
from quamba_kernels.scan import MAX_STATE

__all__ = ["selective_scan_step_int8", "selective_state_update"]


def _check_step(names, state, u, dt, A, B, C, D, z, dt_bias, x_dtypes, u_dtypes, param_dtype):
    """state (B, E, N); u, dt, z (B, E); B, C (B, N); A (E, N); D, dt_bias (E,)."""
    s_name, u_name, dt_name, a_name, b_name, c_name, d_name, z_name, bias_name = names
    check_tensor(u_name, u, u_dtypes, ndim=2)
    batch, e = u.shape
    if batch > 65535:
        raise ValueError(f"batch = {batch} is larger than the kernel's limit 65535")
    check_tensor(a_name, A, param_dtype, ndim=2)
    if A.shape[0] != e:
        raise ValueError(f"{a_name} must have shape (E, N) with E = {e}, got {tuple(A.shape)}")
    n = A.shape[1]
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"d_state N = {a_name}.shape[1] = {n} is not supported (1..{MAX_STATE})")
    check_tensor(dt_name, dt, x_dtypes, ndim=2)
    check_shape(dt_name, dt, (batch, e), f"(B, E) like {u_name}")
    for name, t in ((b_name, B), (c_name, C)):
        check_tensor(name, t, dt.dtype, ndim=2, strided_rows=True)
        check_shape(name, t, (batch, n), "(B, N)")
    check_optional(z_name, z, dt.dtype, ndim=2, strided_rows=True)
    check_shape(z_name, z, (batch, e), f"(B, E) like {u_name}")
    for name, t in ((d_name, D), (bias_name, dt_bias)):
        check_optional(name, t, param_dtype, ndim=1)
        check_shape(name, t, (e,), "(E,)")
    check_shape(s_name, state, (batch, e, n), "(B, E, N)")
    return batch, e, n


def selective_scan_step_int8(
    state_q,
    u_q,
    s_u,
    dt_q,
    s_dt,
    A_log_q,
    s_A,
    B_q,
    s_B,
    C_q,
    s_C,
    D_q,
    s_D,
    z_q,
    s_z,
    dtb_q,
    s_dtb,
    s_h,
    *,
    state_rounding: str = "half_away",
    out=None,
    dt_from=None,
):
    """One INT8 decode step on the GPU; returns ``(y (B, E) float16, state_q)``.

    ``state_q`` (B, E, N) int8 on grid ``s_h`` is overwritten with ``Q8(h, s_h, state_rounding)``.
    ``u_q``, ``dt_q``, ``z_q`` (B, E) int8 (``u_q`` may be float32, ``s_u`` then ignored);
    ``B_q``, ``C_q`` (B, N) int8; ``A_log_q`` (E, N), ``D_q``, ``dtb_q`` (E,) int8. ``z_q``,
    ``B_q`` and ``C_q`` may be column ranges of wider matrices (rows apart in memory, e.g. slices
    of in_proj's and x_proj's outputs): the kernel reads them in place, no copy.

    ``dt_from = (x, w, s_x, s_w, rounding)`` fuses the dt_proj GEMM into the step: the kernel
    computes ``dt_q = int8_linear(x[:, :R], w, s_x, s_w, s_dt, rounding)`` itself (the same codes:
    exact int32 dot products, the same epilogue) for ``x`` (B, >= R) int8, e.g. x_proj's whole
    output, and ``w`` (E, R) int8. ``dt_q`` is then an output (an int8 (B, E) buffer to write, or
    None to allocate one) and is returned as a third value.
    """
    import torch

    i8 = torch.int8
    check_tensor("state_q", state_q, i8, ndim=3)
    if dt_from is not None:
        dt_x, dt_w, dt_gemm_scale, dt_code = _check_dt_from(dt_from, u_q)
        if dt_q is None and isinstance(u_q, torch.Tensor):
            dt_q = torch.empty(u_q.shape, dtype=i8, device=u_q.device)
    names = ("state_q", "u_q", "dt_q", "A_log_q", "B_q", "C_q", "D_q", "z_q", "dtb_q")
    _check_step(
        names, state_q, u_q, dt_q, A_log_q, B_q, C_q, D_q, z_q, dtb_q, i8, (i8, torch.float32), i8
    )
    s_u = scale32("s_u", s_u) if u_q.dtype == i8 else 1.0
    s_dt = scale32("s_dt", s_dt)
    s_A = scale32("s_A", s_A)
    s_B = scale32("s_B", s_B)
    s_C = scale32("s_C", s_C)
    s_D = scale32("s_D", s_D) if D_q is not None else 1.0
    s_z = scale32("s_z", s_z) if z_q is not None else 1.0
    s_dtb = scale32("s_dtb", s_dtb) if dtb_q is not None else 1.0
    s_h = scale32("s_h", s_h)
    code = rounding_code(state_rounding)
    check_optional("out", out, torch.float16)
    check_shape("out", out, tuple(u_q.shape), "(B, E)")

    module = require()
    check_cuda(
        state_q=state_q, u_q=u_q, dt_q=dt_q, A_log_q=A_log_q, B_q=B_q, C_q=C_q, D_q=D_q, z_q=z_q,
        dtb_q=dtb_q, out=out,
    )  # fmt: skip
    if out is None:
        out = torch.empty(u_q.shape, dtype=torch.float16, device=u_q.device)
    (z_arg, z_row), (b_arg, b_row), (c_arg, c_row) = map(row_span, (z_q, B_q, C_q))
    if dt_from is None:
        module.selective_scan_step(
            state_q, u_q, dt_q, A_log_q, b_arg, c_arg, D_q, z_arg, dtb_q, out,
            s_u, s_dt, s_A, s_B, s_C, s_D, s_z, s_dtb, s_h, code, True, current_stream(u_q.device),
            z_row=z_row, B_row=b_row, C_row=c_row,
        )  # fmt: skip
        return out, state_q
    check_cuda(state_q=state_q, dt_x=dt_x, dt_w=dt_w)
    module.selective_scan_step(
        state_q, u_q, dt_q, A_log_q, b_arg, c_arg, D_q, z_arg, dtb_q, out,
        s_u, s_dt, s_A, s_B, s_C, s_D, s_z, s_dtb, s_h, code, True, current_stream(u_q.device),
        dt_x, dt_w, dt_gemm_scale, dt_code, z_row, b_row, c_row,
    )  # fmt: skip
    return out, state_q, dt_q


def _check_dt_from(dt_from, u_q):
    """(x, w, float32(s_x * s_w), rounding code) of a fused dt_proj, checked against u_q (B, E)."""
    import torch

    if not isinstance(dt_from, tuple) or len(dt_from) != 5:
        raise TypeError("dt_from must be a tuple (x, w, s_x, s_w, rounding)")
    x, w, s_x, s_w, rounding = dt_from
    check_tensor("dt_from x", x, torch.int8, ndim=2)
    check_tensor("dt_from w", w, torch.int8, ndim=2)
    if isinstance(u_q, torch.Tensor) and u_q.dim() == 2:
        batch, e = u_q.shape
        if w.shape[0] != e or w.shape[1] < 1:
            raise ValueError(f"dt_from w must have shape (E, R) with E = {e}, got {tuple(w.shape)}")
        if x.shape[0] != batch or x.shape[1] < w.shape[1]:
            raise ValueError(
                f"dt_from x must have shape (B, >= R) = ({batch}, >= {w.shape[1]}), "
                f"got {tuple(x.shape)}"
            )
    return x, w, scale_product32("s_x", s_x, "s_w", s_w), rounding_code(rounding)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = True, *, out=None
):
    """One float decode step on the GPU; returns ``(y (B, E) in x's dtype, state)``.

    ``x``, ``dt``, ``z`` (B, E) and ``B``, ``C`` (B, N) share one dtype (float16, bfloat16 or
    float32); ``state`` (B, E, N) has that dtype or float32 and is overwritten with the new state;
    ``A`` (E, N), ``D``, ``dt_bias`` (E,) are float32. ``z``, ``B``, ``C`` may be column ranges of
    wider matrices (read in place).
    """
    import torch

    floats = (torch.float16, torch.bfloat16, torch.float32)
    check_tensor("x", x, floats, ndim=2)
    check_tensor("state", state, floats, ndim=3)
    if state.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"state must have x's dtype ({dtype_name(x.dtype)}) or float32, "
            f"got {dtype_name(state.dtype)}"
        )
    names = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    _check_step(names, state, x, dt, A, B, C, D, z, dt_bias, x.dtype, x.dtype, torch.float32)
    if out is not None:
        check_tensor("out", out, x.dtype)
        check_shape("out", out, tuple(x.shape), "(B, E)")

    module = require()
    check_cuda(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, out=out)
    if out is None:
        out = torch.empty_like(x)
    (z_arg, z_row), (b_arg, b_row), (c_arg, c_row) = map(row_span, (z, B, C))
    module.selective_scan_step(
        state, x, dt, A, b_arg, c_arg, D, z_arg, dt_bias, out,
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0, bool(dt_softplus),
        current_stream(x.device), z_row=z_row, B_row=b_row, C_row=c_row,
    )  # fmt: skip
    return out, state
