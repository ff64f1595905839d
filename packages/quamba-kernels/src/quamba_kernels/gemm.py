"""W8A8 linear layers on the GPU: INT8 x INT8 -> exact INT32 -> fused epilogue.

Reference: ``quamba_layers.reference_ops.w8a8_linear``. Implementations, same bits:

- ``"stream"``: our dp4a GEMV (kernels-cpp/csrc/gemm_int8.cu) for M <= 4 rows: each warp streams
  whole weight rows (long sequential reads), x from L1. Decode at small batch.
- ``"skinny"``: our tensor-core kernel (mma.sync m16n8k32 s8) over tiles of 16 rows x 8 columns
  (1, 2 or 4 such column tiles per block on wider layers, so x is read once per 8-32 weight
  rows), the warps splitting K: reads the weights once per 16 rows of x. Decode at batch 5..16.
- ``"tiled"``: our tensor-core kernel with 128 x 128 block tiles, a cp.async pipeline and a
  coalesced epilogue through shared memory: prefill with small K where short_k does not apply
  (row-major outputs, odd L) and shapes cuBLASLt does not take.
- ``"short_k"``: our tensor-core kernel for K <= 256 (kernels-cpp/csrc/gemm_short_k.cu; any sm_80+
  GPU): dt_proj, whose K is dt_rank and whose output is the work. Operands swapped (a warp's rows
  are 16 output channels with their slice of w in registers, its columns 128 tokens), persistent
  blocks with the next x tile copied in while the current one is multiplied, and each warp
  converting its own accumulators in registers and writing a channel's tokens as contiguous
  16-byte pieces of the sequence-last output (the 128 x 128 kernels stage 64 KB of int32 per tile
  behind a block barrier instead).
- ``"cublaslt"``: cuBLASLt's INT8 GEMM (through ``torch._int_mm``, so this package still links
  nothing but the CUDA runtime) writing int32, then our epilogue kernel (16-byte accesses in
  64 x 64 tiles). Needs M > 16 and K, N multiples of 8: prefill with K >= 512.
- ``"wgmma"``: our Hopper kernels (kernels-cpp/csrc/sm90a/gemm_int8_wgmma.cu): TMA loads, warpgroup
  MMA (wgmma, sm_90a only), the epilogue fused. Needs a build whose architectures include sm_90, a
  device of compute capability 9.0 (H100, H200), K % 16 == 0 and 16-byte aligned tensors
  (``wgmma_applies``). cuBLASLt's INT8 GEMM runs an sm80 kernel on these GPUs, no faster than
  FP16; wgmma is what reaches Hopper's INT8 rate. Two kernels, picked by shape in C++: 128 x 128
  tiles, two blocks per SM (one's epilogue overlaps the other's MMA); and, for row-major INT8 /
  FP16 outputs with K > 2048 and at least half a 128 x 256 tile per SM, a persistent kernel with
  128 x 256 tiles (less shared-memory and L2 traffic per operation; its epilogue is not
  overlapped, so it needs a long K loop: out_proj of 1.4B / 2.8B, x_proj at long prompts), which
  also takes sequence-last INT8 outputs whose sequences are whole 128-row tiles (L % 128 == 0:
  in_proj, at any K given a full wave of tiles), converting the codes in registers and storing
  them with TMA under the next tile's main loop. Same bits either way.

The epilogue is fused into our kernels. They need sm_80+, K % 16 == 0 and 16-byte aligned
tensors for the vectorised paths; otherwise a byte-wise kernel computes the same result.
``"auto"`` = stream for M <= 4 (skinny when K < 512), skinny for M <= 16, short_k for the
sequence-last layout with K <= 256, K % 16 == 0 and L % 16 == 0 (dt_proj; with odd L its rows
are not 16-byte aligned and the 128 x 128 kernels' element-wise path measured faster) except
INT8 outputs with K >= 128, L % 128 == 0 and 128 x 256 tiles filling a Hopper GPU (wgmma's
TMA-stored codes: dt_proj of 1.4B and 2.8B), then wgmma
where it applies and its 128 x 128 tiles are at least one per SM, else cuBLASLt where it applies
and K >= 512, else tiled: the fastest of each on the H100 (tools/bench/bench_gemm.py,
benchmarks/README.md; with fewer tiles than SMs, e.g. x_proj's N = 192 at M = 2048, cuBLASLt's
split of K wins).
``gemm_implementation`` says which one a shape gets (recorded by the layers).

x_proj of a prefill has its own kernel on Hopper, ``x_proj_seq_last`` (kernels-cpp/csrc/x_proj.cu):
it reads the conv's sequence-last codes in place (no transpose), splits E over the blocks of a
thread-block cluster, and writes dt_low, B and C in the layouts dt_proj and the scan read (no
int32 round trip, no copies). The layers take it where ``x_proj_preferred`` says it measured
faster (short K loops per block: one sequence of a few thousand tokens, or 130m-sized models).

Every path is exact: accumulation in int32 (K < 2^17), ``v = float32(acc) * float32(s_x * s_w)``,
then Q8 with the site's rounding (IEEE division at near-ties) or one rounding to the float dtype.
"""

from __future__ import annotations

import functools

from quamba_kernels._loader import _import, require
from quamba_kernels._torch import (
    check_cuda,
    check_tensor,
    current_stream,
    float32_value,
    scale64,
    scale_product32,
)

IMPLEMENTATIONS = ("auto", "stream", "skinny", "tiled", "cublaslt", "wgmma", "short_k")
STREAM_MAX_ROWS = 4
SKINNY_MAX_ROWS = 16
STREAM_MIN_K = 512  # below it the skinny kernel beats the stream GEMV (bench_gemm.py, dt_proj)
CUBLASLT_MIN_K = 512  # below it the tiled kernel beats cuBLASLt + epilogue (dt_proj, K = 160)
SHORT_K_MAX = 256  # the short-K kernel keeps a warp's slice of w (16 rows x K) in registers
# From this K up (to SHORT_K_MAX), sequence-last INT8 outputs of whole 128-row sequences take the
# wgmma kernel's TMA-stored codes instead of short_k where its 128 x 256 tiles fill the GPU (H100,
# 16 x 1024 tokens: dt_proj of 2.8B, K = 160, 126 -> 103 us; 1.4B, K = 128, 93 -> 78 us, and
# the graphed prefill 1.6% / 0.6% faster; 130m's K = 48 was slower, 32 -> 39 us;
# benchmarks/README.md, session 15).
WIDE_SHORT_K_MIN = 128
_ALGO = {"skinny": 1, "tiled": 2, "stream": 3, "wgmma": 4, "short_k": 5}
MAX_K = 1 << 17  # |acc| <= K * 128 * 128 must fit int32

# cuBLASLt's INT8 GEMM (torch._int_mm) shape rules.
_CUBLASLT_MIN_M = 17
_CUBLASLT_MULTIPLE = 8


def cublaslt_applies(m: int, n: int, k: int) -> bool:
    """Whether cuBLASLt's INT8 GEMM takes an (M, K) x (K, N) product."""
    return m >= _CUBLASLT_MIN_M and k % _CUBLASLT_MULTIPLE == 0 and n % _CUBLASLT_MULTIPLE == 0


@functools.cache
def _compute_capability(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _wgmma_device(index: int) -> tuple[bool, int]:
    """(whether the wgmma GEMM runs on CUDA device `index`, its number of SMs)."""
    import torch

    module, _ = _import()
    if module is None or not module.wgmma_gemm_built() or not torch.cuda.is_available():
        return False, 0
    return _compute_capability(index) == (9, 0), _multiprocessors(index)


def _device_index(device) -> int | None:
    import torch

    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def wgmma_applies(m: int, n: int, k: int, device=None) -> bool:
    """Whether the Hopper wgmma GEMM takes an (M, K) x (K, N) product on `device` (default: the
    current CUDA device): a build with it, compute capability 9.0, M > 16 and K % 16 == 0."""
    index = _device_index(device)
    if index is None or m <= SKINNY_MAX_ROWS or k % 16 != 0:
        return False
    return _wgmma_device(index)[0]


def _wgmma_fills_gpu(m: int, n: int, index: int) -> bool:
    """Whether the wgmma GEMM's 128 x 128 output tiles number at least one per SM."""
    return -(-m // 128) * -(-n // 128) >= _wgmma_device(index)[1]


def _wide_tiles_fill_gpu(m: int, n: int, index: int) -> bool:
    """Whether the wgmma GEMM's 128 x 256 output tiles number at least one per SM."""
    return -(-m // 128) * -(-n // 256) >= _wgmma_device(index)[1]


def gemm_implementation(
    m: int,
    n: int,
    k: int,
    impl: str = "auto",
    device=None,
    *,
    seq_len: int = 0,
    int8_out: bool = False,
) -> str:
    """What ``int8_linear`` runs for rows M, outputs N, inputs K on `device` (default: the current
    CUDA device): one of IMPLEMENTATIONS other than "auto". ``seq_len``: L of the sequence-last
    layout, 0 for row-major outputs; ``int8_out``: INT8 codes (out_scale given)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {list(IMPLEMENTATIONS)}, got {impl!r}")
    if impl == "wgmma" and not wgmma_applies(m, n, k, device):
        raise ValueError(
            "the wgmma GEMM needs a build for sm_90, a device of compute capability 9.0, M > 16 and "
            f"K % 16 == 0, got M={m}, N={n}, K={k} on device {device!r} (use impl='auto')"
        )
    if impl == "cublaslt" and not cublaslt_applies(m, n, k):
        raise ValueError(
            f"cuBLASLt's INT8 GEMM needs M > 16 and K, N multiples of 8, got M={m}, N={n}, K={k} "
            "(use impl='skinny' or 'auto')"
        )
    if impl == "stream" and m > STREAM_MAX_ROWS:
        raise ValueError(f"the stream GEMV takes M <= {STREAM_MAX_ROWS} rows, got M={m}")
    if impl == "short_k" and k > SHORT_K_MAX:
        raise ValueError(f"the short-K GEMM takes K <= {SHORT_K_MAX}, got K={k} (use impl='auto')")
    if impl == "auto":
        if m <= STREAM_MAX_ROWS:
            return "stream" if k >= STREAM_MIN_K else "skinny"  # small K: skinny measured faster
        if m <= SKINNY_MAX_ROWS:
            return "skinny"
        if seq_len > 0 and seq_len % 16 == 0 and k <= SHORT_K_MAX and k % 16 == 0:
            wide_codes = int8_out and seq_len % 128 == 0 and k >= WIDE_SHORT_K_MIN
            if (
                wide_codes
                and wgmma_applies(m, n, k, device)
                and _wide_tiles_fill_gpu(m, n, _device_index(device))
            ):
                return "wgmma"
            return "short_k"
        if wgmma_applies(m, n, k, device) and _wgmma_fills_gpu(m, n, _device_index(device)):
            return "wgmma"
        return "cublaslt" if cublaslt_applies(m, n, k) and k >= CUBLASLT_MIN_K else "tiled"
    return impl


def _epilogue_scales(s_x, s_w, out_scale, out_dtype):
    import torch

    scale = scale_product32("s_x", s_x, "s_w", s_w)
    if out_scale is not None:
        if out_dtype not in (None, torch.int8):
            raise ValueError("out_dtype must be None or torch.int8 when out_scale is given")
        return scale, float32_value(scale64("out_scale", out_scale)), torch.int8
    out_dtype = torch.float16 if out_dtype is None else out_dtype
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.int32):
        raise TypeError(
            "out_dtype must be float16, bfloat16, float32 or int32 (raw accumulators) without "
            f"out_scale, got {out_dtype}"
        )
    return scale, 1.0, out_dtype


def int8_linear(
    x,
    w,
    s_x,
    s_w,
    out_scale=None,
    rounding: str = "half_even",
    *,
    out_dtype=None,
    layout: str = "row",
    impl: str = "auto",
    out=None,
    constant_weight: bool = False,
):
    """``x_q (..., K) int8 @ w_q (N, K)^T`` with the W8A8 epilogue, on the GPU.

    - ``out_scale`` given: INT8 codes ``Q8(float32(acc) * float32(s_x * s_w), out_scale)`` with
      ``rounding`` ("half_away" / "half_even");
    - otherwise ``out_dtype`` (float16 by default, bfloat16, float32; int32 returns ``acc``).
    - ``layout="row"``: output (..., N); ``"seq_last"``: x is (B, L, K), output (B, N, L) (the
      layout the conv and scan read, written by the epilogue without a separate transpose).
    - ``impl``: "auto", "stream", "skinny", "tiled", "wgmma" (our kernels) or "cublaslt" (module
      doc).
    - ``constant_weight=True``: a promise that the kernel launched just before this call on the
      stream does not write ``w`` (true of model weights). The decode GEMV (M <= 4, "stream")
      then copies its weights in while that kernel is still running (programmatic dependent
      launch, sm_90); the results are the same. Leave it False when ``w`` was just computed.
    x and w must be contiguous CUDA int8 tensors on one device.
    """
    import torch

    from quamba_kernels._torch import rounding_code

    check_tensor("x", x, torch.int8)
    check_tensor("w", w, torch.int8, ndim=2)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (K)")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x's last axis (K = {x.shape[-1]}) must equal w's in_features "
            f"(w has shape (N, K) = {tuple(w.shape)})"
        )
    if not 1 <= k < MAX_K:
        raise ValueError(f"K must be in [1, {MAX_K}) for an exact int32 accumulation, got {k}")
    if layout not in ("row", "seq_last"):
        raise ValueError(f"layout must be 'row' or 'seq_last', got {layout!r}")
    if layout == "seq_last" and x.dim() != 3:
        raise ValueError(f"layout='seq_last' needs x of shape (B, L, K), got {tuple(x.shape)}")
    code = rounding_code(rounding)
    scale, out_scale_32, out_dtype = _epilogue_scales(s_x, s_w, out_scale, out_dtype)
    m = x.numel() // k
    seq_len = x.shape[1] if layout == "seq_last" else 0
    int8_out = out_scale is not None
    which = gemm_implementation(m, n, k, impl, x.device, seq_len=seq_len, int8_out=int8_out)
    if which == "wgmma" and (x.data_ptr() % 16 or w.data_ptr() % 16):
        if impl == "wgmma":
            raise ValueError("the wgmma GEMM needs 16-byte aligned x and w (use impl='auto')")
        which = gemm_implementation(m, n, k, "tiled", x.device)  # same bits, any alignment
    out_shape = (x.shape[0], n, seq_len) if layout == "seq_last" else (*x.shape[:-1], n)
    if out is not None:
        check_tensor("out", out, out_dtype)
        if tuple(out.shape) != out_shape:
            raise ValueError(f"out must have shape {out_shape}, got {tuple(out.shape)}")
    module = require()
    check_cuda(x=x, w=w, out=out)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    stream = current_stream(x.device)
    x2 = x.reshape(m, k)
    out_view = out.view(m, n) if seq_len == 0 else out
    if seq_len == 1:  # (B, N, 1) is (B, N) in memory
        out_view, seq_len = out.view(m, n), 0
    if which in _ALGO:
        module.int8_gemm(
            x2, w, out_view, scale, out_scale_32, code, seq_len, _ALGO[which], stream,
            bool(constant_weight),
        )  # fmt: skip
    else:
        acc = torch._int_mm(x2, w.t())
        if out_dtype == torch.int32 and seq_len == 0:
            out_view.copy_(acc)
        else:
            module.int32_epilogue(acc, out_view, scale, out_scale_32, code, seq_len, stream)
    return out


X_PROJ_MAX_OUT = 256  # R + 2N: the x_proj kernel's accumulator tiles (kXProjMaxOut)
X_PROJ_SPLITS = (1, 2, 4, 8)
X_PROJ_TOKENS = 64  # tokens per block
X_PROJ_STAGE_K = 128  # E per pipeline stage
# Where the kernel beats the generic path (transpose, cuBLASLt's split-K GEMM, epilogue, copies):
# at most this many K stages per block. A stage takes ~1.5 us of one block (H100: the TMA rows of
# w and u and the transpose of u's bytes), so long K loops lose to cuBLASLt's: measured at
# prompt 1024 / 2048 (us, generic -> kernel; benchmarks/README.md, session 16): 130m batch 1
# 17.0 -> 9.7 / 17.7 -> 13.8 (6 / 6 stages), batch 16 44.8 -> 31.3 (12); 1.4B batch 1 23.9 ->
# 19.3 (8) but 25.7 -> 30.3 (16), batch 16 97 -> 106 (32); 2.8B batch 1 26.0 -> 22.0 (10) but
# 29.7 -> 36.6 (20), batch 16 115 -> 125 (40).
X_PROJ_MAX_STAGES_PER_BLOCK = 12


def x_proj_applies(batch: int, dim: int, seq_len: int, n_out: int, device=None) -> bool:
    """Whether ``x_proj_seq_last`` takes u (B, E, L) and w (R + 2N, E) on `device` (default: the
    current CUDA device): E a multiple of 128 (below 2^17), L a multiple of 16, at most 65535
    64-token tiles (B * ceil(L / 64)) and B * E < 2^31, R + 2N <= 256 and a
    device of compute capability 9.0 or newer (the kernel's bulk copies and thread-block
    clusters; 16-byte aligned tensors are checked at the call)."""
    index = _device_index(device)
    if index is None or _import()[0] is None:
        return False
    return (
        dim >= X_PROJ_STAGE_K
        and dim % X_PROJ_STAGE_K == 0
        and dim < MAX_K
        and seq_len % 16 == 0
        and batch * -(-seq_len // X_PROJ_TOKENS) <= 65535
        and batch * dim < 2**31
        and 1 <= n_out <= X_PROJ_MAX_OUT
        and _compute_capability(index) >= (9, 0)
    )


def x_proj_split(batch: int, dim: int, seq_len: int, device=None) -> int:
    """Blocks per 64 tokens (a thread-block cluster, each taking E / split of the sum) that
    ``x_proj_seq_last`` uses by default: the largest of 1, 2, 4 keeping the blocks within half the
    SMs (H100: about 64 blocks ran fastest at every shape; a full wave of 4-block clusters and any
    8-block split measured slower) and two K stages per block."""
    index = _device_index(device)
    sms = _multiprocessors(index) if index is not None else 2
    tiles = batch * -(-seq_len // X_PROJ_TOKENS)
    stages = dim // X_PROJ_STAGE_K
    split = 1
    while split < 4 and tiles * split * 2 <= sms // 2 and stages >= 4 * split:
        split *= 2
    return split


def x_proj_preferred(batch: int, dim: int, seq_len: int, n_out: int, device=None) -> bool:
    """Whether the layers' x_proj runs ``x_proj_seq_last``: where it applies and its blocks' K loops
    are short enough to beat the generic path (X_PROJ_MAX_STAGES_PER_BLOCK)."""
    if not x_proj_applies(batch, dim, seq_len, n_out, device):
        return False
    split = x_proj_split(batch, dim, seq_len, device)
    return dim // X_PROJ_STAGE_K <= X_PROJ_MAX_STAGES_PER_BLOCK * split


def x_proj_seq_last(
    u,
    w,
    s_u,
    s_w,
    out_scale,
    rounding: str = "half_even",
    *,
    dt_rank: int,
    split_k: int | None = None,
    out=None,
):
    """x_proj of a prefill from the conv's sequence-last codes, on the GPU.

    ``u`` (B, E, L) int8 (the conv output as it is stored) and ``w`` (R + 2N, E) int8 give
    ``acc[b, l, :] = w @ u[b, :, l]`` (exact int32) and the INT8 codes
    ``Q8(float32(acc) * float32(s_u * s_w), out_scale)`` with ``rounding``, returned as
    ``(dt_low (B, L, R), B (B, N, L), C (B, N, L))``: dt_proj's input and the scan's B and C,
    contiguous. The same codes as ``int8_linear(u.transpose(1, 2), w, ...)`` sliced, without the
    transpose, the int32 round trip or the copies. ``split_k`` (1, 2, 4, 8, at most E / 128): the
    blocks of a cluster per 64 tokens, each taking a slice of E (None: ``x_proj_split``'s choice;
    the codes are the same for every split). ``out``: preallocated ``(dt_low, B, C)``, contiguous int8 on u's device.
    Needs ``x_proj_applies`` and 16-byte aligned u and w.
    """
    import torch

    from quamba_kernels._torch import rounding_code

    check_tensor("u", u, torch.int8, ndim=3)
    check_tensor("w", w, torch.int8, ndim=2)
    batch, dim, seq_len = u.shape
    n_out = w.shape[0]
    if w.shape[1] != dim:
        raise ValueError(
            f"w must have shape (R + 2N, E) with E = {dim} (u's axis 1), got {tuple(w.shape)}"
        )
    if not 0 <= dt_rank <= n_out or (n_out - dt_rank) % 2:
        raise ValueError(
            f"dt_rank must be in [0, R + 2N] with R + 2N - dt_rank even (B and C have N rows "
            f"each), got dt_rank={dt_rank} for R + 2N = {n_out}"
        )
    if split_k is not None and (split_k not in X_PROJ_SPLITS or split_k > dim // X_PROJ_STAGE_K):
        raise ValueError(
            f"split_k must be None or one of {X_PROJ_SPLITS} and at most E / {X_PROJ_STAGE_K} "
            f"(E = {dim}), got {split_k!r}"
        )
    code = rounding_code(rounding)
    scale, out_scale_32, _ = _epilogue_scales(s_u, s_w, out_scale, None)
    n = (n_out - dt_rank) // 2
    shapes = {
        "dt_low": (batch, seq_len, dt_rank),
        "B": (batch, n, seq_len),
        "C": (batch, n, seq_len),
    }
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise ValueError("out must be None or a tuple (dt_low, B, C) of int8 tensors")
        for (name, shape), t in zip(shapes.items(), out):
            check_tensor(name, t, torch.int8)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    module = require()
    check_cuda(u=u, w=w, **dict(zip(shapes, out or (None, None, None))))
    if not x_proj_applies(batch, dim, seq_len, n_out, u.device):
        raise ValueError(
            f"x_proj_seq_last needs E % 128 == 0 (E < {MAX_K}), L % 16 == 0, at most 65535 "
            "64-token tiles, B * E < 2^31, "
            f"1 <= R + 2N <= {X_PROJ_MAX_OUT} and compute capability 9.0+, got E={dim}, "
            f"L={seq_len}, R + 2N={n_out} (use int8_linear)"
        )
    if u.data_ptr() % 16 or w.data_ptr() % 16:
        raise ValueError("x_proj_seq_last needs 16-byte aligned u and w (use int8_linear)")
    if out is None:
        out = tuple(torch.empty(s, dtype=torch.int8, device=u.device) for s in shapes.values())
    dt_low, b_out, c_out = out
    if batch and seq_len:
        module.x_proj_seq_last(
            u, w, dt_low, b_out, c_out, scale, out_scale_32, code,
            split_k or x_proj_split(batch, dim, seq_len, u.device), current_stream(u.device),
        )  # fmt: skip
    return dt_low, b_out, c_out
