"""Import of the compiled module, and the reason it cannot be used when it cannot."""

from __future__ import annotations

import functools
from types import ModuleType


class KernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot run here; the message says why and what to do."""


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    try:
        from quamba_kernels import _C
    except ImportError as exc:
        return None, (
            "quamba-kernels was installed without its compiled CUDA module "
            f"({exc}). Reinstall it on a machine with the CUDA toolkit (nvcc) and without "
            "QUAMBA_KERNELS_BUILD=0, or install a prebuilt wheel (quamba-kernels-cu12 / -cu13)."
        )
    return _C, ""


def _device_reason(module: ModuleType) -> str:
    reason = module.device_error()
    if reason:
        return f"quamba-kernels is built but no CUDA device can be used: {reason}"
    return ""


def available() -> tuple[bool, str]:
    """(True, "") when the kernels can run on a GPU here, else (False, reason)."""
    module, reason = _import()
    if module is None:
        return False, reason
    reason = _device_reason(module)
    return (not reason), reason


def require() -> ModuleType:
    """The compiled module, or KernelsUnavailable with the reason it cannot run."""
    module, reason = _import()
    if module is None:
        raise KernelsUnavailable(reason)
    reason = _device_reason(module)
    if reason:
        raise KernelsUnavailable(reason)
    return module


def build_info() -> dict:
    """What was built: whether the module exists, its CUDA runtime version, devices seen."""
    module, reason = _import()
    if module is None:
        return {"compiled": False, "reason": reason}
    return {
        "compiled": True,
        "version": module.__version__,
        "cuda_runtime_version": module.cuda_runtime_version,
        "device_count": module.device_count(),
        "device_error": module.device_error(),
    }
