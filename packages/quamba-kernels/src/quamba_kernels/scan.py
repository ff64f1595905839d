"""Selective scan (Mamba-1) prefill: the simulation scan, the INT8 scan and the float scan.

- ``selective_scan_sim``: float32 in and out, bit-identical to
  ``quamba_layers.reference_ops.selective_scan`` run by PyTorch on the GPU (sequential recurrence,
  pairwise-halving sum over the state, every operation rounded on its own, accurate exp/log1p).
- ``selective_scan_int8``: ``reference_ops.selective_scan_int8`` (INT8 u/dt/B/C/z with per-tensor
  scales, or a float32 u; INT8 A_log, D, dt_bias): float16 y (B, L, E) and the INT8 state snapshot
  ``Q8(h_last, s_h)``. ``exact=True`` gives the reference's bits; the default fast mode contracts
  the recurrence into fused multiply-adds and uses the hardware exp2 for exp(delta * A).
- ``selective_scan``: the plain Mamba scan on float16/bfloat16 (or float32, exact only) tensors,
  ``quamba_layers.fp_ops.selective_scan_ref`` semantics with y returned in u's dtype.

Any L (time is processed in chunks), any batch up to 65535, d_state N up to 64.

``lanes_per_channel`` (keyword of every function): for 9 <= N <= 16 the kernel gives each
channel 16 lanes (one state each) or 8 (two states each); ``None`` lets it choose from the grid
size and the input type (the faster one at Mamba-2.8B shapes, benchmarks/README.md). The results
do not depend on it: the exact scans give the same bits and the fast scans the same sums in the
same order. ``block_threads`` (``selective_scan_int8`` with ``lanes_per_channel=8``): that layout's
block of 64 or 128 threads, likewise free (the kernel takes 64 where a grid of one wave then
leaves fewer channels on the busiest SM: Mamba-2.8B at batch 1; and in fast mode for grids of
at least 8 blocks of 128 per SM, where it measured faster).
"""

from __future__ import annotations

from quamba_kernels._loader import require
from quamba_kernels._torch import (
    check_cuda,
    check_optional,
    check_shape,
    check_tensor,
    current_stream,
    rounding_code,
    scale32,
)

__all__ = ["MAX_STATE", "selective_scan", "selective_scan_int8", "selective_scan_sim"]

MAX_STATE = 64


def _check_state_size(name: str, n: int) -> None:
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"d_state N = {name}.shape[1] = {n} is not supported (1..{MAX_STATE})")


def _check_activations(names, u, delta, B, C, z, dtypes, u_dtypes, n):
    """u, delta, z (B, E, L); B, C (B, N, L). Returns (batch, E, L)."""
    u_name, delta_name, b_name, c_name, z_name = names
    check_tensor(u_name, u, u_dtypes, ndim=3)
    batch, e, length = u.shape
    check_tensor(delta_name, delta, dtypes)
    check_shape(delta_name, delta, (batch, e, length), f"(B, E, L) like {u_name}")
    for name, t in ((b_name, B), (c_name, C)):
        check_tensor(name, t, dtypes)
        check_shape(name, t, (batch, n, length), "(B, N, L)")
    check_optional(z_name, z, dtypes)
    check_shape(z_name, z, (batch, e, length), f"(B, E, L) like {u_name}")
    if batch > 65535:
        raise ValueError(f"batch = {batch} is larger than the kernel's limit 65535")
    return batch, e, length


def _check_params(names, A, D, delta_bias, dtype, channels):
    """A (E, N), D (E,), delta_bias (E,) of one dtype. Returns N."""
    a_name, d_name, bias_name = names
    check_tensor(a_name, A, dtype, ndim=2)
    if A.shape[0] != channels:
        raise ValueError(
            f"{a_name} must have shape (E, N) with E = {channels}, got {tuple(A.shape)}"
        )
    _check_state_size(a_name, A.shape[1])
    for name, t in ((d_name, D), (bias_name, delta_bias)):
        check_optional(name, t, dtype, ndim=1)
        check_shape(name, t, (channels,), "(E,)")
    return A.shape[1]


def _lanes_code(lanes_per_channel, n: int) -> int:
    """The kernel's lanes_per_channel argument: 0 (its choice), 8 or 16 (9 <= N <= 16 only)."""
    if lanes_per_channel is None:
        return 0
    if lanes_per_channel not in (8, 16):
        raise ValueError(f"lanes_per_channel must be None, 8 or 16, got {lanes_per_channel!r}")
    if not 9 <= n <= 16:
        raise ValueError(
            f"lanes_per_channel applies to d_state N = 9..16 only (N = {n}); pass None"
        )
    return int(lanes_per_channel)


def _block_threads_code(block_threads, lanes: int) -> int:
    """The kernel's block_threads argument: 0 (its choice), or 64 / 128 with 8 lanes."""
    if block_threads is None:
        return 0
    if block_threads not in (64, 128):
        raise ValueError(f"block_threads must be None, 64 or 128, got {block_threads!r}")
    if lanes != 8:
        raise ValueError(
            "block_threads applies to the 8-lane layout only: pass lanes_per_channel=8 with it"
        )
    return int(block_threads)


def _launch(
    module, u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state, state_q,
    scales, state_scale, state_rounding, softplus, exact, lanes, block_threads=0,
):  # fmt: skip
    s = {"u": 1.0, "delta": 1.0, "A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0, "z": 1.0, "bias": 1.0}
    s.update(scales)
    module.selective_scan(
        u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state, state_q,
        s["u"], s["delta"], s["A"], s["B"], s["C"], s["D"], s["z"], s["bias"],
        state_scale, state_rounding, softplus, exact, lanes, block_threads,
        current_stream(u.device),
    )  # fmt: skip


def selective_scan_sim(
    u,
    delta_raw,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    *,
    initial_state=None,
    out=None,
    last_state=None,
    lanes_per_channel: int | None = None,
):
    """The float32 simulation scan on the GPU; returns ``(y (B, L, E), h_last (B, E, N))``.

    Same arguments as ``reference_ops.selective_scan`` (all float32 CUDA tensors; ``D``, ``z``,
    ``delta_bias``, ``initial_state`` may be None) and the same bits as that reference run on
    the GPU.
    """
    import torch

    f32 = torch.float32
    check_tensor("A", A, f32, ndim=2)
    n = A.shape[1]
    batch, e, length = _check_activations(
        ("u", "delta_raw", "B", "C", "z"), u, delta_raw, B, C, z, f32, f32, n
    )
    _check_params(("A", "D", "delta_bias"), A, D, delta_bias, f32, e)
    lanes = _lanes_code(lanes_per_channel, n)
    check_optional("initial_state", initial_state, f32)
    check_shape("initial_state", initial_state, (batch, e, n), "(B, E, N)")
    check_optional("out", out, f32)
    check_shape("out", out, (batch, length, e), "(B, L, E)")
    check_optional("last_state", last_state, f32)
    check_shape("last_state", last_state, (batch, e, n), "(B, E, N)")

    module = require()
    check_cuda(
        u=u, delta_raw=delta_raw, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        initial_state=initial_state, out=out, last_state=last_state,
    )  # fmt: skip
    if out is None:
        out = torch.empty(batch, length, e, dtype=f32, device=u.device)
    if last_state is None:
        last_state = torch.empty(batch, e, n, dtype=f32, device=u.device)
    _launch(
        module, u, delta_raw, A, B, C, D, z, delta_bias, initial_state, out, last_state, None,
        {}, 1.0, 0, True, True, lanes,
    )  # fmt: skip
    return out, last_state


def selective_scan_int8(
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
    exact: bool = False,
    return_last_state: bool = False,
    out=None,
    state_q=None,
    lanes_per_channel: int | None = None,
    block_threads: int | None = None,
):
    """INT8 selective scan on the GPU; returns ``(y (B, L, E) float16, h_q (B, E, N) int8)``.

    Arguments as ``reference_ops.selective_scan_int8``: ``u_q``, ``dt_q``, ``z_q`` (B, E, L) int8
    (``u_q`` may be float32, then ``s_u`` is ignored); ``B_q``, ``C_q`` (B, N, L) int8; ``A_log_q``
    (E, N), ``D_q``, ``dtb_q`` (E,) int8 (``D_q``, ``z_q``, ``dtb_q`` may be None); scales are
    floats. ``h_q = Q8(h_last, s_h, state_rounding)``. ``exact=True``: bit-identical to the
    reference; default fast mode: see the module doc. With ``return_last_state`` the float32
    ``h_last`` (B, E, N) is returned third. ``block_threads`` (64 or 128, with
    ``lanes_per_channel=8``): the 8-lane layout's block size, which the kernel otherwise chooses
    from the grid (64 where a batch-1 grid then spreads more evenly over the SMs, and in fast mode
    for grids of at least 8 blocks of 128 per SM); the results do not depend on it.
    """
    import torch

    i8 = torch.int8
    check_tensor("A_log_q", A_log_q, i8, ndim=2)
    n = A_log_q.shape[1]
    batch, e, length = _check_activations(
        ("u_q", "dt_q", "B_q", "C_q", "z_q"), u_q, dt_q, B_q, C_q, z_q, i8,
        (i8, torch.float32), n,
    )  # fmt: skip
    _check_params(("A_log_q", "D_q", "dtb_q"), A_log_q, D_q, dtb_q, i8, e)
    lanes = _lanes_code(lanes_per_channel, n)
    block = _block_threads_code(block_threads, lanes)
    scales = {
        "u": scale32("s_u", s_u) if u_q.dtype == i8 else 1.0,
        "delta": scale32("s_dt", s_dt),
        "A": scale32("s_A", s_A),
        "B": scale32("s_B", s_B),
        "C": scale32("s_C", s_C),
        "D": scale32("s_D", s_D) if D_q is not None else 1.0,
        "z": scale32("s_z", s_z) if z_q is not None else 1.0,
        "bias": scale32("s_dtb", s_dtb) if dtb_q is not None else 1.0,
    }
    state_scale = scale32("s_h", s_h)
    code = rounding_code(state_rounding)
    check_optional("out", out, torch.float16)
    check_shape("out", out, (batch, length, e), "(B, L, E)")
    check_optional("state_q", state_q, i8)
    check_shape("state_q", state_q, (batch, e, n), "(B, E, N)")

    module = require()
    check_cuda(
        u_q=u_q, dt_q=dt_q, A_log_q=A_log_q, B_q=B_q, C_q=C_q, D_q=D_q, z_q=z_q, dtb_q=dtb_q,
        out=out, state_q=state_q,
    )  # fmt: skip
    if out is None:
        out = torch.empty(batch, length, e, dtype=torch.float16, device=u_q.device)
    if state_q is None:
        state_q = torch.empty(batch, e, n, dtype=i8, device=u_q.device)
    last_state = None
    if return_last_state:
        last_state = torch.empty(batch, e, n, dtype=torch.float32, device=u_q.device)
    _launch(
        module, u_q, dt_q, A_log_q, B_q, C_q, D_q, z_q, dtb_q, None, out, last_state, state_q,
        scales, state_scale, code, True, bool(exact), lanes, block,
    )  # fmt: skip
    if return_last_state:
        return out, state_q, last_state
    return out, state_q


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus: bool = True,
    return_last_state: bool = False,
    initial_state=None,
    *,
    exact: bool = False,
    out=None,
    lanes_per_channel: int | None = None,
):
    """Plain Mamba selective scan on the GPU (``fp_ops.selective_scan_ref`` semantics).

    ``u``, ``delta``, ``z`` (B, E, L) and ``B``, ``C`` (B, N, L) share one dtype: float16,
    bfloat16, or float32 (then ``exact=True`` is required); ``A`` (E, N), ``D``,
    ``delta_bias`` (E,) and ``initial_state`` (B, E, N) are float32. Arithmetic is float32; y
    (B, L, E) is returned in u's dtype (the reference returns float32: compare with its
    ``.to(u.dtype)``), with ``return_last_state`` also the float32 state after the last step.
    """
    import torch

    floats = (torch.float16, torch.bfloat16, torch.float32)
    f32 = torch.float32
    check_tensor("u", u, floats, ndim=3)
    check_tensor("A", A, f32, ndim=2)
    n = A.shape[1]
    batch, e, length = _check_activations(
        ("u", "delta", "B", "C", "z"), u, delta, B, C, z, u.dtype, u.dtype, n
    )
    _check_params(("A", "D", "delta_bias"), A, D, delta_bias, f32, e)
    lanes = _lanes_code(lanes_per_channel, n)
    if u.dtype == f32 and not exact:
        raise ValueError(
            "the float32 scan runs in exact mode only: pass exact=True (or use selective_scan_sim)"
        )
    check_optional("initial_state", initial_state, f32)
    check_shape("initial_state", initial_state, (batch, e, n), "(B, E, N)")
    if out is not None:
        check_tensor("out", out, u.dtype)
        check_shape("out", out, (batch, length, e), "(B, L, E)")

    module = require()
    check_cuda(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        initial_state=initial_state, out=out,
    )  # fmt: skip
    if out is None:
        out = torch.empty(batch, length, e, dtype=u.dtype, device=u.device)
    last_state = None
    if return_last_state:
        last_state = torch.empty(batch, e, n, dtype=f32, device=u.device)
    _launch(
        module, u, delta, A, B, C, D, z, delta_bias, initial_state, out, last_state, None, {},
        1.0, 0, bool(delta_softplus), bool(exact), lanes,
    )  # fmt: skip
    if return_last_state:
        return out, last_state
    return out
