"""A whole W8A8 decode step (batch 1, Mode 0's datapath) in one persistent CUDA kernel.

The per-op decode step runs ~7 small dependent kernels per layer (norm, in_proj GEMV, conv update,
x_proj GEMV, scan step with dt_proj, Hadamard, out_proj GEMV). ``W8A8DecodeKernel`` runs all of
them for every layer in one launch: one block per SM, a producer warp streaming each layer's
weights into shared memory while the consumer warps compute, the blocks meeting between phases
through tagged words and, for x_proj, counted integer sums (kernels-cpp/csrc/decode_w8a8.cu).
Every element is computed with the arithmetic of the per-op kernels, so the results are the same
bits.

Needs a device of compute capability 9.0 or newer (bulk copies, mbarriers) and a build that
includes sm_90 code; :func:`decode_w8a8_supported` says whether this one can run it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

from quamba_kernels._loader import require
from quamba_kernels._torch import (
    check_cuda,
    check_optional,
    check_shape,
    check_tensor,
    current_stream,
    float32_value,
    rounding_code,
    scale32,
    scale64,
    scale_product32,
)

__all__ = ["LAYER_SCALES", "LAYER_TENSORS", "ROUNDING_SITES", "W8A8DecodeKernel", "block_channels",
           "cached_x_slabs", "decode_w8a8_supported", "x_slabs"]  # fmt: skip

# What each layer gives: tensors (conv_b, D and dt_bias may be None), scales (Python floats) and
# the rounding rule of each INT8 site.
LAYER_TENSORS = ("norm_w", "w_in", "conv_w", "conv_b", "w_x", "w_dt", "A_log", "D", "dt_bias",
                 "w_out")  # fmt: skip
LAYER_SCALES = ("eps", "s_in", "s_w_in", "s_xz", "s_w_conv", "s_b_conv", "s_u", "s_w_x", "s_xo",
                "s_w_dt", "s_dt", "s_A", "s_D", "s_dtb", "s_h", "s_had", "s_w_out")  # fmt: skip
ROUNDING_SITES = ("norm", "gemm", "conv", "ssm_state", "hadamard")
# Bulk weight copies in flight per SM (~20 KB): 2 measured 1-3% faster than 3 at every size
# (session 23, benchmarks/README.md "Persistent decode kernel").
INFLIGHT_DEFAULT = 2
# The phases DecodeArgs::timing reports, in the kernel's order (per layer).
PHASES = ("wait for the norm input", "norm", "in_proj", "conv", "x_proj parts",
          "wait for x_proj sums", "dt_proj", "scan step", "wait for y", "butterflies",
          "Hadamard matrix", "out_proj")  # fmt: skip


def decode_w8a8_supported(device) -> tuple[bool, str]:
    """(whether the persistent decode kernel can run on ``device``, why not)."""
    import torch

    try:
        module = require()
    except Exception as exc:  # KernelsUnavailable: the reason is in the message
        return False, str(exc)
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the persistent decode kernel runs on CUDA devices, not {device}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not module.decode_w8a8_supported(index):
        major, minor = torch.cuda.get_device_capability(index)
        return False, (
            f"the persistent decode kernel needs compute capability 9.0+ and sm_90 code in the "
            f"build; this device is {major}.{minor}"
        )
    return True, ""


def block_channels(d_inner: int, blocks: int) -> list[tuple[int, int]]:
    """The channels [c0, c1) of each of the kernel's ``blocks`` blocks (one per SM): groups of 4
    shared out as decode_w8a8.cu's share_of does."""
    groups = d_inner // 4
    return [(4 * (groups * b // blocks), 4 * (groups * (b + 1) // blocks)) for b in range(blocks)]


@functools.lru_cache(maxsize=8)
def _slab_columns_of(d_inner: int, blocks: int, columns: int):
    """(index, valid), CPU (blocks, columns): the w_x column each slab entry copies, and whether
    it is one of the block's channels. The same for every layer of a model: built once."""
    import torch

    index = torch.zeros(blocks, columns, dtype=torch.long)
    valid = torch.zeros(blocks, columns, dtype=torch.bool)
    for b, (c0, c1) in enumerate(block_channels(d_inner, blocks)):
        if c1 - c0 > columns:
            raise ValueError(f"block {b} has {c1 - c0} channels, more than a slab's {columns}")
        index[b, : c1 - c0] = torch.arange(c0, c1)
        valid[b, : c1 - c0] = True
    return index, valid


def x_slabs(w_x, blocks: int, columns: int):
    """x_proj's weight (R + 2N, E) as the kernel reads it: (blocks, R + 2N, columns), block b's
    slab holding the columns of its channels (:func:`block_channels`) and zeros after them."""
    rows, d_inner = w_x.shape
    index, valid = _slab_columns_of(d_inner, blocks, columns)
    index, valid = index.to(w_x.device), valid.to(w_x.device)
    gathered = w_x[:, index.view(-1)].view(rows, blocks, columns)
    return gathered.masked_fill(~valid.unsqueeze(0), 0).permute(1, 0, 2).contiguous()


def cached_x_slabs(cache: dict, w_x, blocks: int, columns: int):
    """:func:`x_slabs` of ``w_x``, kept in ``cache`` (a dict the caller owns, e.g. one per model)
    so that every kernel object built for the same weights shares one copy. An entry serves only
    the same tensor object with the same storage, unchanged since (``w_x._version`` counts
    in-place writes; writes through ``w_x.data`` bypass it), for the same ``blocks`` and
    ``columns``; anything else builds a new slab, and so does every call for an inference tensor
    (one made under ``torch.inference_mode`` has no version counter)."""
    if w_x.is_inference():  # no version counter (made under torch.inference_mode): no reuse
        return x_slabs(w_x, blocks, columns)
    signature = (w_x.data_ptr(), w_x._version, blocks, columns)
    entry = cache.get(id(w_x))
    if entry is not None and entry[0] is w_x and entry[1] == signature:
        return entry[2]
    slabs = x_slabs(w_x, blocks, columns)
    # The entry holds w_x itself, so that its id cannot pass to another tensor meanwhile.
    cache[id(w_x)] = (w_x, signature, slabs)
    return slabs


def _shape_reason(d_model: int, d_inner: int, dt_rank: int, d_state: int, m: int) -> str:
    if d_model % 16 or d_inner % 16 or dt_rank % 16:
        return "d_model, d_inner and dt_rank must be multiples of 16"
    if d_state != 16:
        return "d_state must be 16"
    if d_model > 10240 or d_inner > 10240:
        return "d_model and d_inner must be at most 10240 (a weight row per 10 KB ring slot)"
    p = d_inner // m
    if d_inner % m or p < 2 or p & (p - 1):
        return f"d_inner = {d_inner} must be {m}·2^k"
    return ""


class W8A8DecodeKernel:
    """One W8A8 decode step of every layer (batch 1) as one persistent kernel.

    ``layers``: per layer a mapping with the tensors of ``LAYER_TENSORS`` (norm_w (D,) float32;
    w_in (2E, D), conv_w (E, 4) or (E, 1, 4), conv_b (E,), w_x (R + 2N, E), w_dt (E, R), A_log
    (E, N), D (E,), dt_bias (E,), w_out (D, E): int8), the scales of ``LAYER_SCALES`` and
    ``roundings`` (a mapping site -> "half_away" / "half_even" for ``ROUNDING_SITES``).
    ``states``: per layer (conv_state (1, E, 3), ssm_state (1, E, N)) int8, updated in place by
    each call. The tensors are referenced, not copied, except w_x, which is copied into the
    kernel's layout (:func:`x_slabs`: the columns of each SM's channels, about w_x's size again;
    pass the same dict as ``x_slab_cache`` to every object built for one set of weights and they
    share those copies, see :func:`cached_x_slabs`): weights and scales must not change; build a
    new object after changing them.
    Calling it with the token's embedding (1, D) float16 returns (hidden (1, D) float16, the last
    layer's out_proj output; residual (1, D) float32), static buffers overwritten by the next call:
    the final norm's input is ``hidden.float() + residual``, as in the per-op step.
    """

    def __init__(self, layers: Sequence[Mapping], states: Sequence[Sequence], *,
                 inflight: int = INFLIGHT_DEFAULT, timing: bool = False,
                 x_slab_cache: dict | None = None) -> None:  # fmt: skip
        import torch

        from quamba_kernels.hadamard import hadamard_factors

        if not layers or len(layers) != len(states):
            raise ValueError(
                f"need one state per layer and at least one layer, got {len(layers)} layers and "
                f"{len(states)} states"
            )
        if isinstance(inflight, bool) or not isinstance(inflight, int) or not 1 <= inflight <= 16:
            raise ValueError(f"inflight must be an int in 1..16, got {inflight!r}")
        if x_slab_cache is not None and not isinstance(x_slab_cache, dict):
            raise TypeError(
                f"x_slab_cache must be a dict or None, got {type(x_slab_cache).__name__}"
            )
        first = layers[0]
        check_tensor("w_in", first["w_in"], torch.int8, ndim=2)
        check_tensor("A_log", first["A_log"], torch.int8, ndim=2)
        check_tensor("w_dt", first["w_dt"], torch.int8, ndim=2)
        two_e, d_model = first["w_in"].shape
        d_inner, d_state = first["A_log"].shape
        dt_rank = first["w_dt"].shape[1]
        if two_e != 2 * d_inner:
            raise ValueError(f"w_in must have 2 * d_inner = {2 * d_inner} rows, got {two_e}")
        had_m, _ = hadamard_factors(d_inner)
        reason = _shape_reason(d_model, d_inner, dt_rank, d_state, had_m)
        if reason:
            raise ValueError(f"the persistent decode kernel does not take these shapes: {reason}")
        self.d_model, self.d_inner, self.dt_rank, self.d_state = d_model, d_inner, dt_rank, d_state
        self.n_layers = len(layers)
        shapes = {
            "norm_w": ((d_model,), torch.float32, "(D,)"),
            "w_in": ((2 * d_inner, d_model), torch.int8, "(2E, D)"),
            "w_x": ((dt_rank + 2 * d_state, d_inner), torch.int8, "(R + 2N, E)"),
            "w_dt": ((d_inner, dt_rank), torch.int8, "(E, R)"),
            "A_log": ((d_inner, d_state), torch.int8, "(E, N)"),
            "conv_b": ((d_inner,), torch.int8, "(E,)"),
            "D": ((d_inner,), torch.int8, "(E,)"),
            "dt_bias": ((d_inner,), torch.int8, "(E,)"),
            "w_out": ((d_model, d_inner), torch.int8, "(D, E)"),
        }
        pointers, scalars, roundings, tensors = [], [], [], []
        for index, (layer, state) in enumerate(zip(layers, states)):
            where = f"layer {index}: "
            for name, (shape, dtype, meaning) in shapes.items():
                t = layer[name]
                if name in ("conv_b", "D", "dt_bias"):
                    check_optional(where + name, t, dtype)
                else:
                    check_tensor(where + name, t, dtype)
                check_shape(where + name, t, shape, meaning)
            conv_w = layer["conv_w"]
            check_tensor(where + "conv_w", conv_w, torch.int8)
            if conv_w.numel() != 4 * d_inner or conv_w.shape[0] != d_inner or conv_w.shape[-1] != 4:
                raise ValueError(
                    f"{where}conv_w must be (E, 4) or (E, 1, 4) with E = {d_inner} (d_conv 4), "
                    f"got {tuple(conv_w.shape)}"
                )
            if len(state) != 2:
                raise ValueError(f"{where}the state must be (conv_state, ssm_state)")
            conv_state, ssm_state = state
            check_tensor(where + "conv_state", conv_state, torch.int8)
            check_shape(where + "conv_state", conv_state, (1, d_inner, 3), "(1, E, 3)")
            check_tensor(where + "ssm_state", ssm_state, torch.int8)
            check_shape(where + "ssm_state", ssm_state, (1, d_inner, d_state), "(1, E, N)")
            used = [layer[name] for name in LAYER_TENSORS] + [conv_state, ssm_state]
            for name, t in zip((*LAYER_TENSORS, "conv_state", "ssm_state"), used):
                if t is not None and t.data_ptr() % 16:
                    raise ValueError(f"{where}{name} must start at a 16-byte aligned address")
            tensors.extend(t for t in used if t is not None)
            pointers.extend(0 if t is None else t.data_ptr() for t in used)
            s = {name: layer[name] for name in LAYER_SCALES}
            eps = float32_value(float(s["eps"]))
            if not (eps > 0.0 and math.isfinite(eps)):
                raise ValueError(f"{where}eps must be a finite float > 0, got {s['eps']}")
            scalars += [
                scale64("s_b_conv", s["s_b_conv"]), eps, scale32("s_in", s["s_in"]),
                scale_product32("s_in", s["s_in"], "s_w_in", s["s_w_in"]), scale32("s_xz", s["s_xz"]),
                scale_product32("s_xz", s["s_xz"], "s_w_conv", s["s_w_conv"]),
                scale32("s_u", s["s_u"]), scale_product32("s_u", s["s_u"], "s_w_x", s["s_w_x"]),
                scale32("s_xo", s["s_xo"]),
                scale_product32("s_xo", s["s_xo"], "s_w_dt", s["s_w_dt"]),
                scale32("s_dt", s["s_dt"]), scale32("s_A", s["s_A"]), scale32("s_D", s["s_D"]),
                scale32("s_dtb", s["s_dtb"]), scale32("s_h", s["s_h"]),
                scale32("1 / sqrt(d_inner)", 1.0 / math.sqrt(d_inner)), scale32("s_had", s["s_had"]),
                scale_product32("s_had", s["s_had"], "s_w_out", s["s_w_out"]),
            ]  # fmt: skip
            rules = layer["roundings"]
            roundings += [rounding_code(rules[site]) for site in ROUNDING_SITES]
        # Checks that need no GPU are done; then (as every wrapper) the kernels, then the devices.
        module = require()
        device = first["w_in"].device
        check_cuda(**{f"tensor {i}": t for i, t in enumerate(tensors)})
        ok, why = decode_w8a8_supported(device)
        if not ok:
            raise ValueError(why)
        # x_proj's weight in the kernel's layout: each block (one per SM) sums x_proj over its own
        # channels, so it reads the columns of those channels (decode_w8a8.h).
        blocks = torch.cuda.get_device_properties(device).multi_processor_count
        columns = module.decode_w8a8_x_slab_columns(d_inner, blocks)
        per_layer = len(pointers) // len(layers)
        w_x_pointer = (*LAYER_TENSORS, "conv_state", "ssm_state").index("w_x")
        cache = {} if x_slab_cache is None else x_slab_cache
        self.x_slabs = [cached_x_slabs(cache, layer["w_x"], blocks, columns) for layer in layers]
        for index, slabs in enumerate(self.x_slabs):
            pointers[index * per_layer + w_x_pointer] = slabs.data_ptr()
        packed = module.decode_w8a8_pack(pointers, scalars, roundings)
        # The kernel reads these and self.x_slabs through raw pointers: keep them alive.
        self._tensors = tensors
        self._layers = torch.frombuffer(bytearray(packed), dtype=torch.int8).to(device)
        words = module.decode_w8a8_exchange_words(d_model, d_inner, dt_rank, d_state, len(layers))
        self._exchange = torch.zeros(8 * words, dtype=torch.int8, device=device)
        self._blocks = blocks
        self._counters = torch.zeros(8, dtype=torch.int8, device=device)
        self._had_m = had_m
        self._hidden = torch.empty(1, d_model, dtype=torch.float16, device=device)
        self._residual = torch.empty(1, d_model, dtype=torch.float32, device=device)
        self.inflight = inflight
        self.device = device
        # timing=True: per SM (one block each) the cycles of each phase of PHASES, all layers.
        self._timing = (
            torch.zeros(8 * blocks * module.decode_w8a8_phases, dtype=torch.int8, device=device)
            if timing
            else None
        )

    def phase_cycles(self):
        """(blocks, len(PHASES)) int64 cycles of the last call (timing=True only)."""
        if self._timing is None:
            raise ValueError("built without timing=True")
        import torch

        return self._timing.view(torch.int64).view(-1, len(PHASES))

    def __call__(self, hidden_in):
        """hidden_in (1, D) float16 (the token's embedding) -> (hidden, residual), see the class."""
        import torch

        check_tensor("hidden_in", hidden_in, torch.float16)
        check_shape("hidden_in", hidden_in, (1, self.d_model), "(1, d_model)")
        check_cuda(hidden_in=hidden_in, hidden=self._hidden)
        module = require()
        module.decode_w8a8(
            self._layers, self.n_layers, self.d_model, self.d_inner, self.dt_rank, self.d_state,
            self._had_m, hidden_in.view(-1), self._hidden.view(-1),
            self._residual.view(-1), self._exchange, self._counters, self._blocks, self.inflight,
            current_stream(self.device), self._timing,
        )  # fmt: skip
        return self._hidden, self._residual
