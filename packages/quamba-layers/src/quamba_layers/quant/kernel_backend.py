"""The CUDA kernel backend: the quantized ops run as quamba-kernels, same semantics as the
references (bit-exact for conv, norm, Hadamard and the simulation scan; the fast INT8 scan within
the tolerance documented in quamba_kernels.scan). The INT8 GEMMs run their exact reference
(integer-valued matmul) on the device until the GEMM kernels land; ``implementations()`` says so.
"""

from __future__ import annotations

from quamba_layers.quant.backends import Backend

KERNEL = "kernel (quamba_kernels)"


class KernelBackend(Backend):
    name = "kernel"

    def __init__(self) -> None:
        import quamba_kernels

        quamba_kernels.require()  # raises KernelsUnavailable with the reason
        self._k = quamba_kernels

    def implementations(self) -> dict[str, str]:
        return {
            "rmsnorm": KERNEL,
            "gemm": "reference (PyTorch, exact integer matmul on the device)",
            "conv1d": KERNEL,
            "ssm_int8": KERNEL,
            "ssm_sim": KERNEL,
            "hadamard": KERNEL,
        }

    def rmsnorm(self, x, residual, weight, eps, out_scale, rounding):
        return self._k.rmsnorm(x.contiguous(), residual, weight, eps, out_scale, rounding)

    def conv1d_int8(self, x_q, s_x, w_q, s_w, b_q, s_b, s_out, rounding):
        return self._k.conv1d_int8(x_q.contiguous(), s_x, w_q, s_w, b_q, s_b, s_out, rounding)

    def selective_scan_int8(self, *args, state_rounding="half_away"):
        args = tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)
        return self._k.selective_scan_int8(*args, state_rounding=state_rounding)

    def selective_scan_sim(self, *args):
        args = tuple(a.contiguous() if hasattr(a, "contiguous") else a for a in args)
        return self._k.selective_scan_sim(*args)

    def hadamard(self, x, scale, out_scale, rounding):
        return self._k.hadamard(x.contiguous(), scale, out_scale, rounding)
