"""Argument checks shared by the wrappers: clear Python errors before anything reaches the kernel."""

from __future__ import annotations

ROUNDING_CODES = {"half_away": 0, "half_even": 1}


def rounding_code(rounding: str) -> int:
    try:
        return ROUNDING_CODES[rounding]
    except KeyError:
        raise ValueError(
            f"rounding must be one of {sorted(ROUNDING_CODES)}, got {rounding!r}"
        ) from None


def check_tensor(name: str, t, dtype, *, ndim: int | None = None) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got one on {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_scale(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def current_stream(device) -> int:
    import torch

    return torch.cuda.current_stream(device).cuda_stream
