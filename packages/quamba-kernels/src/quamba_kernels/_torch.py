"""Argument checks shared by the wrappers: clear Python errors before anything reaches the kernel.

Order of the checks in every wrapper: types, dtypes, shapes, scales and options first (they need
no GPU, so they are testable anywhere), then ``require()`` (KernelsUnavailable where the kernels
cannot run), then the devices (every tensor on one CUDA device), then the launch.

Scales follow ``quamba_layers.reference_ops``: a Python float (or a 1-element tensor), finite and
> 0, rounded to float32 once; a product of two scales is formed in float64 and rounded once.
"""

from __future__ import annotations

import math
import numbers
import struct

ROUNDING_CODES = {"half_away": 0, "half_even": 1}


def rounding_code(rounding: str) -> int:
    """0 for "half_away", 1 for "half_even"; ValueError for anything else."""
    try:
        return ROUNDING_CODES[rounding]
    except (KeyError, TypeError):
        raise ValueError(
            f"rounding must be one of {sorted(ROUNDING_CODES)}, got {rounding!r}"
        ) from None


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(
    name: str, t, dtypes, *, ndim: int | None = None, strided_rows: bool = False
) -> None:
    """Type, dtype (one dtype or a tuple), contiguity and rank; the device is checked later.
    ``strided_rows``: a 2-D tensor may also have its rows apart in memory (contiguous within each
    row, e.g. a column range of a wider matrix); see ``row_span``."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    accepted = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if t.dtype not in accepted:
        names = " or ".join(dtype_name(d) for d in accepted)
        raise TypeError(f"{name} must have dtype {names}, got {dtype_name(t.dtype)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.is_contiguous():
        return
    if strided_rows and _rows_are_contiguous(t):
        return
    what = "contiguous, or 2-D with contiguous rows," if strided_rows else "contiguous"
    raise ValueError(f"{name} must be {what} (call .contiguous() first)")


def _rows_are_contiguous(t) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.shape[0] >= 1


def row_span(t):
    """``(array, row_stride)`` for a kernel argument checked with ``strided_rows``: ``(t, 0)`` when
    ``t`` is contiguous, else the 1-D span of its rows (from its first element to its last) and
    the elements between rows. No copy either way."""
    if t is None or t.is_contiguous():
        return t, 0
    rows, width = t.shape
    return t.as_strided(((rows - 1) * t.stride(0) + width,), (1,)), t.stride(0)


def check_optional(
    name: str, t, dtypes, *, ndim: int | None = None, strided_rows: bool = False
) -> None:
    if t is not None:
        check_tensor(name, t, dtypes, ndim=ndim, strided_rows=strided_rows)


def check_shape(name: str, t, shape: tuple[int, ...], meaning: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(shape)}, got {tuple(t.shape)}")


def check_cuda(**tensors) -> None:
    """Every given tensor (None skipped) is a CUDA tensor, all on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if t.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor, got one on {t.device}")
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on the same CUDA device, got {where}")


def float32_value(value: float) -> float:
    """The float32 nearest to ``value`` (round to nearest even), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


# A Python float in (2^-150, FLT_MAX] is a valid scale: float32 rounds it to a positive finite
# value. Wrappers check several scales per launch, so this common case skips the general path.
_FLOAT32_TINY = 2.0**-150
_FLOAT32_MAX = 3.4028234663852886e38


def scale64(name: str, value) -> float:
    """A checked scale as float64: finite, > 0 and representable as a positive float32."""
    if type(value) is float and _FLOAT32_TINY < value <= _FLOAT32_MAX:
        return value
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a single per-tensor scale (a float), "
                f"got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite float > 0, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite float > 0 (a per-tensor scale), got {value}")
    value32 = float32_value(value)
    if not (math.isfinite(value32) and value32 > 0.0):
        raise ValueError(f"{name}={value} is not representable as a positive finite float32")
    return value


def scale32(name: str, value) -> float:
    """A checked scale rounded to float32 (returned as the Python float of that float32)."""
    return float32_value(scale64(name, value))


def scale_product32(name_a: str, a, name_b: str, b) -> float:
    """float32(a * b) of two checked scales, the product formed in float64 and rounded once (the
    W8A8 epilogue's ``s_x * s_w``)."""
    product = float32_value(scale64(name_a, a) * scale64(name_b, b))
    if not (0.0 < product < math.inf):
        raise ValueError(f"{name_a} * {name_b} = {a} * {b} is not a positive finite float32")
    return product


def check_scale(name: str, value) -> float:
    """Alias of scale32 (kept for the first wrappers)."""
    return scale32(name, value)


def current_stream(device) -> int:
    """The raw handle of torch's current CUDA stream on ``device`` (an int for the binding)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:  # 0.1 µs instead of 4 µs for the public path
        return raw(index)
    return torch.cuda.current_stream(device).cuda_stream


def output_spec(x, out_scale, out_dtype, out):
    """(out_scale, out_dtype) of an op that writes INT8 codes with ``out_scale`` or a float tensor
    otherwise (float32 by default), and the check of a preallocated ``out`` of x's shape."""
    import torch

    if out_scale is not None:
        out_scale = scale32("out_scale", out_scale)
        if out_dtype not in (None, torch.int8):
            raise ValueError("out_dtype must be None or torch.int8 when out_scale is given")
        out_dtype = torch.int8
    else:
        out_dtype = torch.float32 if out_dtype is None else out_dtype
        if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(
                f"out_dtype must be float32, float16 or bfloat16 without out_scale, got {out_dtype}"
            )
    if out is not None:
        check_tensor("out", out, out_dtype)
        if out.shape != x.shape:
            raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    return out_scale, out_dtype
