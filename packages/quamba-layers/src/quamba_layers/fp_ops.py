"""Floating-point reference ops of the FP Mamba-1 model (pure PyTorch, any device).

These follow the algebra of `selective_scan` in docs/design.md: separate float32 operations, a
sequential loop over time, a pairwise sum over the state dimension. Inputs may be float32, float16
or bfloat16; all arithmetic is float32. Layouts (docs/design.md notation): x, u, delta, z are
(B, E, L); B and C are (B, N, L); the scan output y is (B, L, E).

The quantized semantics live in `quamba_layers.reference_ops`, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quamba_layers import reference_ops

__all__ = [
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "pairwise_sum_last",
    "selective_scan_ref",
    "selective_state_update_ref",
    "silu_ref",
    "softplus_ref",
]

_ACTIVATIONS = (None, "silu")


def softplus_ref(v: torch.Tensor) -> torch.Tensor:
    """softplus with torch's threshold 20: log1p(exp(v)) where v <= 20, else v itself."""
    return torch.where(v <= 20.0, torch.log1p(torch.exp(v)), v)


def silu_ref(v: torch.Tensor) -> torch.Tensor:
    """SiLU written as v / (1 + exp(-v)), the form every reference and kernel uses."""
    return v / (1.0 + torch.exp(-v))


def pairwise_sum_last(p: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by pairwise halving (zero padded to a power of two), a fixed order."""
    n = p.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        p = F.pad(p, (0, width - n))
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        p = p[..., :half] + p[..., half:]
    return p[..., 0]


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def _check_shape(name: str, tensor: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def _conv_window_sum(
    window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int
) -> torch.Tensor:
    """sum_k weight[:, k] * window[..., k : k + length] in increasing k, then + bias (float32)."""
    w = weight.float()
    kernel = w.shape[-1]
    acc = w[:, 0, None] * window[..., 0:length]
    for k in range(1, kernel):
        acc = acc + w[:, k, None] * window[..., k : k + length]
    if bias is not None:
        acc = acc + bias.float()[:, None]
    return acc


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    conv_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d: x (B, E, L), weight (E, K), bias (E,) -> (B, E, L) in x's dtype.

    `out[:, e, t] = act(sum_k weight[e, k] * x[:, e, t - K + 1 + k] + bias[e])`, in float32, with
    the K - 1 inputs before t = 0 taken from `conv_state` (B, E, K - 1) or zero. With
    `return_final_state` also returns the last K - 1 inputs (the decode state), in x's dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, d_inner, seqlen), got shape {tuple(x.shape)}")
    _check_activation(activation)
    batch, channels, length = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must have shape ({channels}, K), got {tuple(weight.shape)}")
    kernel = weight.shape[1]
    _check_shape("bias", bias, (channels,))
    _check_shape("conv_state", conv_state, (batch, channels, kernel - 1))

    if conv_state is None:
        conv_state = x.new_zeros(batch, channels, kernel - 1)
    window = torch.cat([conv_state.to(x.dtype), x], dim=-1)
    acc = _conv_window_sum(window.float(), weight, bias, length)
    if activation == "silu":
        acc = silu_ref(acc)
    out = acc.to(x.dtype)
    if not return_final_state:
        return out
    final_state = window[..., window.shape[-1] - (kernel - 1) :]
    return out, final_state.contiguous()


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of `causal_conv1d_ref`: x (B, E), conv_state (B, E, K - 1).

    Returns (out (B, E) in x's dtype, new conv_state). Same formula and order as the prefill, so a
    step equals the prefill at that position exactly. The input state is not modified.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, d_inner), got shape {tuple(x.shape)}")
    _check_activation(activation)
    batch, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must have shape ({channels}, K), got {tuple(weight.shape)}")
    kernel = weight.shape[1]
    _check_shape("conv_state", conv_state, (batch, channels, kernel - 1))
    _check_shape("bias", bias, (channels,))

    window = torch.cat([conv_state.to(x.dtype), x[..., None]], dim=-1)
    acc = _conv_window_sum(window.float(), weight, bias, 1)
    if activation == "silu":
        acc = silu_ref(acc)
    return acc[..., 0].to(x.dtype), window[..., 1:].contiguous()


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan in float32, sequential over time.

    u, delta, z: (B, E, L); A: (E, N) (already negative, `-exp(A_log)`); B, C: (B, N, L);
    D, delta_bias: (E,); initial_state: (B, E, N) or None (zeros).
    Per t: `dA = exp(delta_t * A)`, `h = dA * h + (delta_t * B_t) * u_t`, `y_t = sum_N(h * C_t)`;
    then `y += u * D` and `y *= silu(z)`. Returns y (B, L, E) float32, and with
    `return_last_state` the state after the last step (B, E, N) float32.
    """
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, seqlen), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must have shape ({channels}, d_state), got {tuple(A.shape)}")
    n_state = A.shape[1]
    _check_shape("delta", delta, (batch, channels, length))
    _check_shape("B", B, (batch, n_state, length))
    _check_shape("C", C, (batch, n_state, length))
    _check_shape("D", D, (channels,))
    _check_shape("z", z, (batch, channels, length))
    _check_shape("delta_bias", delta_bias, (channels,))
    _check_shape("initial_state", initial_state, (batch, channels, n_state))

    # The same sequential algorithm as the quantized reference (one implementation of the scan).
    y, h = reference_ops.selective_scan(
        u.float().contiguous(),
        delta.float().contiguous(),
        A.float(),
        B.float().contiguous(),
        C.float().contiguous(),
        None if D is None else D.float(),
        None if z is None else z.float().contiguous(),
        None if delta_bias is None else delta_bias.float(),
        initial_state=None if initial_state is None else initial_state.float(),
        delta_softplus=delta_softplus,
    )
    if return_last_state:
        return y, h
    return y


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of `selective_scan_ref`: state (B, E, N), x, dt, z (B, E), B, C (B, N).

    Returns (y (B, E) float32, new state (B, E, N) float32) with exactly the scan's per-step
    algebra. The input state is not modified.
    """
    if state.dim() != 3:
        raise ValueError(f"state must be (batch, d_inner, d_state), got shape {tuple(state.shape)}")
    batch, channels, n_state = state.shape
    _check_shape("x", x, (batch, channels))
    _check_shape("dt", dt, (batch, channels))
    _check_shape("A", A, (channels, n_state))
    _check_shape("B", B, (batch, n_state))
    _check_shape("C", C, (batch, n_state))
    _check_shape("D", D, (channels,))
    _check_shape("z", z, (batch, channels))
    _check_shape("dt_bias", dt_bias, (channels,))

    x32 = x.float()
    delta = dt.float()
    if dt_bias is not None:
        delta = delta + dt_bias.float()
    if dt_softplus:
        delta = softplus_ref(delta)
    delta = delta[..., None]  # (B, E, 1)
    dA = torch.exp(delta * A.float())
    dBu = (delta * B.float()[:, None, :]) * x32[..., None]
    h = dA * state.float() + dBu
    y = pairwise_sum_last(h * C.float()[:, None, :])
    if D is not None:
        y = y + x32 * D.float()
    if z is not None:
        y = y * silu_ref(z.float())
    return y, h
