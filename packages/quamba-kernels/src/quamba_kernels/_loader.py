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


class CapsuleCalls:
    """The compiled module, with torch tensors handed to it as DLPack capsules made in C++
    (``torch.utils.dlpack.to_dlpack``, ~0.5 µs) instead of through ``Tensor.__dlpack__``, a
    Python method that nanobind would call for each array (~5-10 µs: most of the host time of an
    eager forward pass). Non-callable attributes pass through."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return attr(*[_capsule(a) for a in args], **{k: _capsule(v) for k, v in kwargs.items()})

        self.__dict__[name] = call  # later lookups skip __getattr__
        return call


_tensor_type = _to_dlpack = None  # torch.Tensor and to_dlpack, bound at the first call


def _capsule(value):
    # Runs for every argument of every launch: the imports happen once, not per call.
    global _tensor_type, _to_dlpack
    if _tensor_type is None:
        import torch
        from torch.utils.dlpack import to_dlpack

        _tensor_type, _to_dlpack = torch.Tensor, to_dlpack
    if isinstance(value, _tensor_type):
        # Parameters export like their data (the kernels never take part in autograd).
        return _to_dlpack(value.detach() if value.requires_grad else value)
    return value


@functools.cache
def _usable_module() -> CapsuleCalls:
    module, reason = _import()
    if module is None:
        raise KernelsUnavailable(reason)
    reason = _device_reason(module)
    if reason:
        raise KernelsUnavailable(reason)
    return CapsuleCalls(module)


def require() -> CapsuleCalls:
    """The compiled module (its functions take torch tensors), or KernelsUnavailable with the
    reason it cannot run. A success is remembered: devices do not come and go in a process."""
    return _usable_module()


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
        "programmatic_launch": module.programmatic_launch_enabled(),
        "wgmma_gemm": module.wgmma_gemm_built(),
    }


def set_programmatic_launch(enabled: bool) -> None:
    """Turn programmatic dependent launch (PDL) on or off for the kernels launched afterwards.

    With PDL (sm_90 and newer; on by default) the next kernel in a stream is scheduled while the
    current one runs and waits on the GPU for it to finish, which hides most of the launch gap
    between the small kernels of a decode step. Every kernel waits for its predecessor before it
    touches memory, so the results are bit-identical either way; the switch exists for timing
    comparisons and as an escape hatch. Older GPUs always get ordinary launches.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    module, reason = _import()
    if module is None:
        raise KernelsUnavailable(reason)
    module.set_programmatic_launch(enabled)


def programmatic_launch_enabled() -> bool:
    """Whether kernels are launched with programmatic dependent launch where supported."""
    module, reason = _import()
    if module is None:
        raise KernelsUnavailable(reason)
    return bool(module.programmatic_launch_enabled())
