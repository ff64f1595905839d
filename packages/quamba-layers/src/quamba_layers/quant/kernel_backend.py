"""The CUDA kernel backend: the quantized ops run as quamba-kernels, same semantics as the
references (bit-exact for the GEMMs, conv, norm, Hadamard and the simulation scan; the fast INT8
scan within the tolerance documented in quamba_kernels.scan).
"""

from __future__ import annotations

import torch

from quamba_layers.quant.backends import Backend

KERNEL = "kernel (quamba_kernels)"


def _rows_in_place(t: torch.Tensor) -> torch.Tensor:
    """t as the decode kernels take it: as it is when contiguous or a 2-D column range of a wider
    matrix (its rows are read in place), else a contiguous copy."""
    if t.is_contiguous() or (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]):
        return t
    return t.contiguous()


class KernelBackend(Backend):
    name = "kernel"

    def __init__(self) -> None:
        import quamba_kernels

        quamba_kernels.require()  # raises KernelsUnavailable with the reason
        self._k = quamba_kernels
        self._nan_seen: torch.Tensor | None = None  # device flag, read by check_deferred

    def quantize_int8(self, v, scale, rounding):
        # The reference raises on NaN right away, which synchronises with the GPU at every call
        # (a drained pipeline per layer). Here the NaN test stays on the device and is read once
        # per forward by check_deferred(); the codes are the reference's for every other value.
        v = v.float().contiguous()
        self._flag_nan(v)
        return self._k.quantize_int8(v, scale, rounding)

    def quantize_per_sequence_dynamic(self, x, seq_lens, rounding):
        # Two kernels instead of ~20 small torch ops per layer (mode 3 was host-bound: 1.6x
        # Mode 0's evaluation time); NaN is flagged on the device as in quantize_int8.
        x = x.float().contiguous()
        self._flag_nan(x)
        if seq_lens is not None:
            seq_lens = seq_lens.to(device=x.device, dtype=torch.int64)
        return self._k.quantize_int8_per_sequence(x, seq_lens, rounding)

    def _flag_nan(self, x) -> None:
        # On the device, no synchronisation: check_deferred() reads it once per forward.
        flag = torch.isnan(x).any()
        self._nan_seen = flag if self._nan_seen is None else self._nan_seen | flag

    def check_deferred(self) -> None:
        flag, self._nan_seen = self._nan_seen, None
        if flag is not None and bool(flag):
            raise ValueError(
                "cannot quantize NaN values to int8 (Q8 is defined for non-NaN values): a NaN "
                "reached a requantization site in this forward pass"
            )

    def implementations(self) -> dict[str, str]:
        return {
            "rmsnorm": KERNEL,
            "gemm": "kernel (quamba_kernels.int8_linear: dp4a GEMV for M <= 4, tensor-core "
            "kernel for M <= 16; more rows: on compute capability 9.0 the wgmma kernel where its "
            "128x128 tiles fill the GPU, else cuBLASLt INT8 + epilogue kernel for K >= 512, "
            "tensor-core tiles otherwise; prefill x_proj on compute capability 9.0: one kernel "
            "from the sequence-last conv output where it measured faster; all bit-identical)",
            "conv1d": KERNEL,
            "ssm_int8": KERNEL,
            "ssm_sim": KERNEL,
            "hadamard": KERNEL,
            "quantize": KERNEL,
        }

    def rmsnorm(self, x, residual, weight, eps, out_scale, rounding):
        return self._k.rmsnorm(x.contiguous(), residual, weight, eps, out_scale, rounding)

    def w8a8_linear(
        self, x_q, w_q, s_x, s_w, s_out, rounding, out_dtype=torch.float16, layout="row"
    ):
        # w_q is a model weight (written once, at load time): the decode GEMV may start reading
        # it before the previous kernel has finished.
        return self._k.int8_linear(
            self._token_major(x_q), w_q, s_x, s_w, s_out, rounding,
            out_dtype=None if s_out is not None else out_dtype, layout=layout,
            constant_weight=True,
        )  # fmt: skip

    def x_proj(self, u_q, w_q, s_u, s_w, s_out, rounding, dt_rank):
        # One kernel reading the conv's codes in place and writing dt_low, B and C where their
        # consumers read them, where it applies and measured faster (quamba_kernels.gemm:
        # x_proj_preferred); the generic path (transpose, GEMM, copies) elsewhere. Same codes.
        batch, dim, seq_len = u_q.shape
        if (
            u_q.is_contiguous()
            and u_q.data_ptr() % 16 == 0
            and w_q.data_ptr() % 16 == 0
            and self._k.x_proj_preferred(batch, dim, seq_len, w_q.shape[0], u_q.device)
        ):
            return self._k.x_proj_seq_last(u_q, w_q, s_u, s_w, s_out, rounding, dt_rank=dt_rank)
        return super().x_proj(u_q, w_q, s_u, s_w, s_out, rounding, dt_rank)

    def _token_major(self, x_q):
        """x_q as a contiguous tensor. A transposed view of a contiguous int8 tensor (x_proj reads
        the sequence-last conv output as (B, L, E)) goes through the transpose kernel instead of
        the byte-wise strided copy of ``.contiguous()``."""
        if x_q.is_contiguous():
            return x_q
        if x_q.dtype == torch.int8 and x_q.dim() >= 2 and x_q.transpose(-1, -2).is_contiguous():
            return self._k.transpose_int8(x_q.transpose(-1, -2))
        return x_q.contiguous()

    def conv1d_int8_update(self, x_q_t, conv_state, s_x, w_q, s_w, b_q, s_b, s_out, rounding):
        return self._k.conv1d_int8_update(
            _rows_in_place(x_q_t), conv_state, s_x, w_q, s_w, b_q, s_b, s_out, rounding
        )

    def selective_scan_step(self, state_q, *args, state_rounding="half_away"):
        args = tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)
        return self._k.selective_scan_step_int8(state_q, *args, state_rounding=state_rounding)

    def selective_scan_step_dt_proj(
        self, state_q, u, s_u, dt_from, s_dt, *rest, state_rounding="half_away"
    ):
        # One kernel instead of the dt_proj GEMV + the step: same dt codes, same bits.
        x, w, s_x, s_w, rounding = dt_from
        rest = tuple(_rows_in_place(a) if isinstance(a, torch.Tensor) else a for a in rest)
        y, state_q, _ = self._k.selective_scan_step_int8(
            state_q, u.contiguous(), s_u, None, s_dt, *rest, state_rounding=state_rounding,
            dt_from=(x.contiguous(), w, s_x, s_w, rounding),
        )  # fmt: skip
        return y, state_q

    def lm_head_fp16(self, normed, weight):
        # cuBLAS float16 GEMM with float32 accumulation and output (the reference's arithmetic up
        # to the summation order); the reference would convert the weight to float32 per call.
        x = normed.to(torch.float16).reshape(-1, normed.shape[-1])
        logits = torch.mm(x, weight.t(), out_dtype=torch.float32)
        return logits.reshape(*normed.shape[:-1], weight.shape[0])

    def conv1d_int8(self, x_q, s_x, w_q, s_w, b_q, s_b, s_out, rounding, state_out=None):
        # The conv kernel writes the state too: no copy kernel (and no break in the chain of
        # programmatic launches) per layer.
        return self._k.conv1d_int8(
            x_q.contiguous(), s_x, w_q, s_w, b_q, s_b, s_out, rounding, state_out=state_out
        )

    def selective_scan_int8(self, *args, state_rounding="half_away"):
        args = tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)
        return self._k.selective_scan_int8(*args, state_rounding=state_rounding)

    def selective_scan_sim(self, *args):
        args = tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)
        return self._k.selective_scan_sim(*args)

    def selective_scan_int8_exact(self, *args):
        # The INT8 scan kernel in exact mode: the reference's bits (quamba-kernels' GPU tests),
        # reading the codes instead of float32 copies. Its INT8 state snapshot (s_h = 1) is unused.
        args = tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)
        y, _, h_last = self._k.selective_scan_int8(*args, 1.0, exact=True, return_last_state=True)
        return y, h_last

    def hadamard(self, x, scale, out_scale, rounding):
        return self._k.hadamard(x.contiguous(), scale, out_scale, rounding)
