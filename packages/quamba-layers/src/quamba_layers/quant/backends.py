"""Which implementation runs each quantized op: the PyTorch reference or the CUDA kernel.

The choice is made once, up front, for a whole model (``select_backend``), recorded, and printed by
the tools. A kernel backend is only created when quamba-kernels can run; asking for it otherwise
raises. Ops without a kernel yet (the INT8 GEMMs) run their exact reference on the same device and
say so in ``implementations()``.
"""

from __future__ import annotations

import torch

from quamba_layers import reference_ops as ops


class Backend:
    """The reference backend: every op is its ``reference_ops`` definition."""

    name = "reference"

    def implementations(self) -> dict[str, str]:
        ref = "reference (PyTorch)"
        return {
            "rmsnorm": ref,
            "gemm": ref,
            "conv1d": ref,
            "ssm_int8": ref,
            "ssm_sim": ref,
            "hadamard": ref,
            "quantize": ref,
        }

    def rmsnorm(self, x, residual, weight, eps, out_scale, rounding):
        return ops.rmsnorm(x, residual, weight, eps, out_scale, rounding)

    def w8a8_linear(
        self, x_q, w_q, s_x, s_w, s_out, rounding, out_dtype=torch.float16, layout="row"
    ):
        """INT8 GEMM + epilogue; layout "seq_last" turns (B, L, K) inputs into (B, N, L)."""
        out = ops.w8a8_linear(x_q, w_q, s_x, s_w, s_out, rounding, out_dtype)
        return out.transpose(1, 2).contiguous() if layout == "seq_last" else out

    def x_proj(self, u_q, w_q, s_u, s_w, s_out, rounding, dt_rank):
        """x_proj of a prefill: u_q (B, E, L) INT8 codes, sequence-last as the conv writes them,
        and w_q (R + 2N, E) -> INT8 codes dt_low (B, L, R), B and C (B, N, L)."""
        xdbl = self.w8a8_linear(u_q.transpose(1, 2), w_q, s_u, s_w, s_out, rounding)
        n = (w_q.shape[0] - dt_rank) // 2
        b_q = xdbl[..., dt_rank : dt_rank + n].transpose(1, 2).contiguous()
        c_q = xdbl[..., dt_rank + n :].transpose(1, 2).contiguous()
        return xdbl[..., :dt_rank], b_q, c_q

    def lm_head_fp16(self, normed, weight):
        """FP16 lm_head: float16 operands, float32 accumulation, float32 logits."""
        return normed.to(torch.float16).float() @ weight.float().t()

    def conv1d_int8(self, x_q, s_x, w_q, s_w, b_q, s_b, s_out, rounding, state_out=None):
        """The INT8 conv; ``state_out`` (B, E, K-1) int8, when given, also receives each row's
        last K-1 input codes (zeros before the row): the decode state after this prompt."""
        if state_out is not None:
            keep = state_out.shape[-1]
            tail = x_q[..., max(x_q.shape[-1] - keep, 0) :]
            state_out.copy_(torch.nn.functional.pad(tail, (keep - tail.shape[-1], 0)))
        return ops.conv1d_int8(x_q, s_x, w_q, s_w, b_q, s_b, s_out, rounding)

    def quantize_int8(self, v, scale, rounding):
        """Q8(v, s) of a float tensor (NaN raises here, at once)."""
        return ops.quantize_int8(v, scale, rounding)

    def quantize_per_sequence_dynamic(self, x, seq_lens, rounding):
        """Mode 3's conv input: (codes, scales) of x (B, E, L) with one dynamic scale per
        sequence (max |x| over its real positions / 127). NaN raises here, at once."""
        from quamba_layers.quant.modules import (
            dynamic_scale_per_sequence,
            quantize_per_sequence,
        )

        if bool(torch.isnan(x).any()):
            raise ValueError(
                "cannot quantize NaN values to int8 (Q8 is defined for non-NaN values): a NaN "
                "reached mode 3's per-sequence conv input"
            )
        scales = dynamic_scale_per_sequence(x, seq_lens)
        return quantize_per_sequence(x, scales, rounding), scales

    def check_deferred(self) -> None:
        """Raise what the backend detected without synchronising (nothing for the reference)."""

    def conv1d_int8_update(self, x_q_t, conv_state, s_x, w_q, s_w, b_q, s_b, s_out, rounding):
        """One conv decode step; ``conv_state`` is updated in place. Returns (out, conv_state)."""
        out, new_state = ops.conv1d_int8_update(
            x_q_t, conv_state, s_x, w_q, s_w, b_q, s_b, s_out, rounding
        )
        conv_state.copy_(new_state)
        return out, conv_state

    def selective_scan_step(self, state_q, *args, state_rounding="half_away"):
        """One INT8-state scan decode step; ``state_q`` is updated in place. Returns (y, state_q)."""
        y, new_state = ops.selective_scan_step(state_q, *args, state_rounding=state_rounding)
        state_q.copy_(new_state)
        return y, state_q

    def selective_scan_step_dt_proj(
        self, state_q, u, s_u, dt_from, s_dt, *rest, state_rounding="half_away"
    ):
        """The decode step with dt_proj's W8A8 GEMM folded in: ``dt_from = (x, w, s_x, s_w,
        rounding)`` with x (B, >= R) (x_proj's output; its first R columns are dt_proj's input)
        and w (E, R). Here: the GEMM, then the step (a kernel backend fuses them)."""
        x, w, s_x, s_w, rounding = dt_from
        dt_q = self.w8a8_linear(x[:, : w.shape[1]], w, s_x, s_w, s_dt, rounding)
        return self.selective_scan_step(
            state_q, u, s_u, dt_q, s_dt, *rest, state_rounding=state_rounding
        )

    def selective_scan_int8(self, *args, state_rounding="half_away"):
        """INT8 inputs -> (y float16 (B, L, E), INT8 state snapshot (B, E, N))."""
        return ops.selective_scan_int8(*args, state_rounding=state_rounding)

    def selective_scan_sim(self, *args):
        return ops.selective_scan(*args)

    def selective_scan_int8_exact(self, *args):
        """``selective_scan_int8``'s inputs without ``s_h`` -> (y float16 (B, L, E), the float32
        final state h (B, E, N)): ``selective_scan`` (the simulation scan) on the dequantized
        inputs."""
        y, h_last = ops.selective_scan(*ops.dequantize_scan_inputs(*args))
        return y.half(), h_last

    def hadamard(self, x, scale, out_scale, rounding):
        return ops.hadamard(x, scale, out_scale, rounding)


_REFERENCE = Backend()


def reference_backend() -> Backend:
    return _REFERENCE


def kernels_status() -> tuple[bool, str]:
    """(usable, reason) for quamba-kernels on this machine."""
    try:
        import quamba_kernels
    except ImportError:
        return False, "quamba-kernels is not installed (pip install 'quamba-layers[kernels]')"
    return quamba_kernels.available()


def select_backend(device: torch.device | str, prefer: str = "auto") -> Backend:
    """The backend for a model on ``device``.

    prefer: "auto" (kernels on CUDA when usable, else the reference), "reference", or "kernel"
    (fails with the reason when the kernels cannot run).
    """
    device = torch.device(device)
    if prefer not in {"auto", "reference", "kernel"}:
        raise ValueError(f"backend must be 'auto', 'reference' or 'kernel', got {prefer!r}")
    if prefer == "reference":
        return reference_backend()
    usable, reason = kernels_status()
    if device.type != "cuda":
        if prefer == "kernel":
            raise RuntimeError(
                f"kernel backend requested for a model on {device}: kernels need CUDA"
            )
        return reference_backend()
    if not usable:
        if prefer == "kernel":
            raise RuntimeError(f"kernel backend requested but unavailable: {reason}")
        return reference_backend()
    from quamba_layers.quant.kernel_backend import KernelBackend

    return KernelBackend()
