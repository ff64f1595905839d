"""INT8 CUDA kernels for quantized Mamba.

The compiled module ``quamba_kernels._C`` is built with nanobind and takes tensors through DLPack
(it is not linked against torch). It may be missing (built without a CUDA toolkit, or with
``QUAMBA_KERNELS_BUILD=0``) or present but unusable (no GPU or driver). :func:`available` says which,
and every wrapper raises :class:`KernelsUnavailable` with that reason instead of crashing.

Every wrapper takes torch CUDA tensors, allocates nothing the caller passed in, launches on the
current torch stream and has a pure-PyTorch reference in ``quamba_layers.reference_ops``.
"""

from __future__ import annotations

from quamba_kernels._loader import KernelsUnavailable, available, build_info, require
from quamba_kernels.quantize import quantize_int8

__version__ = "0.1.0"

__all__ = [
    "KernelsUnavailable",
    "__version__",
    "available",
    "build_info",
    "quantize_int8",
    "require",
]
