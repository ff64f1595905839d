"""INT8 CUDA kernels for quantized Mamba.

The compiled module ``quamba_kernels._C`` is built with nanobind and takes tensors through DLPack
(it is not linked against torch). It may be missing (built without a CUDA toolkit, or with
``QUAMBA_KERNELS_BUILD=0``) or present but unusable (no GPU or driver). :func:`available` says which,
and every wrapper raises :class:`KernelsUnavailable` with that reason instead of crashing.

Every wrapper takes torch CUDA tensors, checks them, allocates outputs with torch (or takes them
preallocated), launches on the current torch stream, and has a pure-PyTorch reference in
``quamba_layers.reference_ops`` / ``quamba_layers.fp_ops``.
"""

from __future__ import annotations

from quamba_kernels._loader import (
    KernelsUnavailable,
    available,
    build_info,
    programmatic_launch_enabled,
    require,
    set_programmatic_launch,
)
from quamba_kernels.conv1d import (
    causal_conv1d,
    causal_conv1d_update,
    conv1d_int8,
    conv1d_int8_update,
)
from quamba_kernels.decode import W8A8DecodeKernel, decode_w8a8_supported
from quamba_kernels.gemm import (
    gemm_implementation,
    int8_linear,
    x_proj_applies,
    x_proj_preferred,
    x_proj_seq_last,
)
from quamba_kernels.hadamard import hadamard
from quamba_kernels.quantize import quantize_int8, quantize_int8_per_sequence
from quamba_kernels.rmsnorm import rmsnorm
from quamba_kernels.scan import selective_scan, selective_scan_int8, selective_scan_sim
from quamba_kernels.scan_step import selective_scan_step_int8, selective_state_update
from quamba_kernels.transpose import transpose_int8

__version__ = "0.1.0"

__all__ = [
    "KernelsUnavailable",
    "W8A8DecodeKernel",
    "__version__",
    "available",
    "build_info",
    "causal_conv1d",
    "causal_conv1d_update",
    "conv1d_int8",
    "conv1d_int8_update",
    "decode_w8a8_supported",
    "gemm_implementation",
    "hadamard",
    "int8_linear",
    "programmatic_launch_enabled",
    "quantize_int8",
    "quantize_int8_per_sequence",
    "require",
    "rmsnorm",
    "selective_scan",
    "selective_scan_int8",
    "selective_scan_sim",
    "selective_scan_step_int8",
    "selective_state_update",
    "set_programmatic_launch",
    "transpose_int8",
    "x_proj_applies",
    "x_proj_preferred",
    "x_proj_seq_last",
]
