"""The W8A8 linear (quamba_kernels.int8_linear) against reference_ops.w8a8_linear.

Accumulation is exact and the epilogue is the reference's arithmetic, so every output (INT8 codes,
float16/bfloat16/float32 values, raw int32 accumulators) must equal the reference bit for bit, for
every implementation (our stream, skinny, tiled, short-K and Hopper wgmma kernels, cuBLASLt + our epilogue), both
layouts and both rounding rules. Outputs are poisoned before each launch (two runs with different sentinels for integer
outputs, NaN for floats), so an element a kernel leaves unwritten fails the test.

The tests without the gpu mark check argument handling and run anywhere.
"""

from __future__ import annotations

import pytest
import torch

from quamba_kernels import KernelsUnavailable, available
from quamba_kernels import gemm as gemm_module
from quamba_kernels.gemm import cublaslt_applies, gemm_implementation, int8_linear, wgmma_applies

DEVICE = "cuda"
I8 = torch.int8

# (M, N, K): decode rows (M = 1..16), K not a multiple of 16 (byte path), odd N, the cuBLASLt
# threshold (M = 17), Mamba shapes (130m in_proj / x_proj / dt_proj / out_proj, 2.8B in_proj).
SHAPES = [
    (1, 3072, 768),
    (1, 80, 1536),
    (1, 1536, 48),
    (1, 768, 1536),
    (2, 9000, 1024),  # stream: one warp per row (132-SM H100/H200), like (1, 3072, 768)
    (1, 300, 2048),  # stream: four warps per row; (1, 80, 1536) two, (4, 192, 5120) eight
    (2, 37, 100),
    (3, 1000, 160),
    (4, 192, 5120),
    (1, 40, 40960),  # stream: 10 chunks per warp, over one round (no shared-memory preload)
    (5, 61, 33),
    (8, 10240, 2560),
    (16, 5120, 160),
    (13, 9000, 320),  # skinny: 4 column tiles per block on an H100, the last group partial
    (11, 1100, 96),  # skinny: 2 column tiles per block on an H100, the last group partial
    (7, 300, 4112),  # skinny: 1 column tile, 9 chunks per warp (> the ring's 4), a partial chunk
    (16, 129, 17),
    (17, 64, 64),
    (31, 24, 40),
    (130, 200, 512),
    (257, 3072, 768),
    (2048, 96, 1536),
]


def _gen(*key) -> torch.Generator:
    seed = 0
    for part in key:
        seed = (seed * 1000003 + hash(str(part))) % (2**62)
    return torch.Generator().manual_seed(seed)


def _skip_unless_impl_applies(impl, m, n, k):
    if impl == "wgmma" and not wgmma_applies(m, n, k, DEVICE):
        pytest.skip("the wgmma GEMM needs compute capability 9.0, M > 16 and K % 16 == 0")
    if impl == "short_k" and k > gemm_module.SHORT_K_MAX:
        pytest.skip("the short-K GEMM takes K <= 256")


def _int8(g, shape):
    return torch.randint(-128, 128, shape, generator=g, dtype=I8).to(DEVICE)


def _run_poisoned(launch, shape, dtype):
    """launch(out) into poisoned outputs; integers: two sentinels that must give one result."""
    if dtype.is_floating_point:
        out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        launch(out)
        torch.cuda.synchronize()
        assert not torch.isnan(out.float()).any(), "some outputs were never written (NaN poison)"
        return out
    info = torch.iinfo(dtype)
    outs = []
    for sentinel in (info.max, info.min):
        out = torch.full(shape, sentinel, dtype=dtype, device=DEVICE)
        launch(out)
        outs.append(out)
    torch.cuda.synchronize()
    assert torch.equal(outs[0], outs[1]), "output not fully written (sentinels survive)"
    return outs[0]


def _assert_equal(got, want, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if not torch.equal(got, want):
        bad = got != want
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {got.numel()} differ, first at {idx}")


def _reference(x, w, s_x, s_w, out_scale, rounding, out_dtype, layout):
    from quamba_layers import reference_ops as ref

    if out_dtype == torch.int32:
        want = ref.exact_int8_matmul(x, w).to(torch.int32)
    else:
        want = ref.w8a8_linear(x, w, s_x, s_w, out_scale, rounding, out_dtype or torch.float16)
    return want.transpose(1, 2).contiguous() if layout == "seq_last" else want


OUTPUTS = [
    ("int8", "half_away"),
    ("int8", "half_even"),
    ("float16", "half_even"),
    ("bfloat16", "half_even"),
    ("float32", "half_even"),
    ("int32", "half_even"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize(
    "impl", ["stream", "stream-constant-w", "skinny", "tiled", "cublaslt", "wgmma", "short_k"]
)
@pytest.mark.parametrize("output,rounding", OUTPUTS)
def test_int8_linear_matches_reference(m, n, k, impl, output, rounding):
    """Every kernel against the reference; "stream-constant-w": the stream GEMV told that w is
    constant (its shared-memory preload before the programmatic-launch wait)."""
    g = _gen("gemm", m, n, k, impl, output, rounding)
    constant_weight = impl == "stream-constant-w"
    impl = "stream" if constant_weight else impl
    if impl == "cublaslt" and not cublaslt_applies(m, n, k):
        pytest.skip("shape outside cuBLASLt's INT8 rules (covered by our kernels)")
    _skip_unless_impl_applies(impl, m, n, k)
    if impl == "stream" and m > 4:
        pytest.skip("the stream GEMV takes M <= 4")
    x, w = _int8(g, (m, k)), _int8(g, (n, k))
    s_x, s_w = 0.01 + 0.05 * torch.rand((), generator=g).item(), 0.002
    out_dtype = None if output == "int8" else getattr(torch, output)
    # s_out near the typical |v| so that codes spread over the INT8 range (and some saturate).
    out_scale = s_x * s_w * k**0.5 * 91.0 if output == "int8" else None

    def launch(out):
        int8_linear(x, w, s_x, s_w, out_scale, rounding, out_dtype=out_dtype, impl=impl, out=out,
                    constant_weight=constant_weight)  # fmt: skip

    dtype = torch.int8 if output == "int8" else out_dtype
    got = _run_poisoned(launch, (m, n), dtype)
    want = _reference(x, w, s_x, s_w, out_scale, rounding, out_dtype, "row")
    _assert_equal(got, want, f"{impl} {output} {rounding} M={m} N={n} K={k}")
    if output == "int8":
        assert int((got == 127).sum() + (got == -128).sum()) > 0 or m * n < 500  # saturation seen
        assert got.float().std() > 10  # real spread, not a constant


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch,length,n,k",
    [
        (1, 1, 3072, 768),
        (2, 7, 40, 64),
        (3, 33, 1536, 96),
        (2, 100, 200, 48),
        (1, 2048, 64, 768),
        (2, 256, 1000, 160),
        (2, 48, 1000, 512),  # cuBLASLt + the 16-byte epilogue (L % 16 == 0)
        (3, 40, 96, 512),  # cuBLASLt + the element-wise epilogue (L % 16 != 0)
    ],
)
@pytest.mark.parametrize("impl", ["auto", "skinny", "tiled", "cublaslt", "wgmma", "short_k"])
@pytest.mark.parametrize("output", ["int8", "float16"])
def test_int8_linear_seq_last_layout(batch, length, n, k, impl, output):
    if impl == "cublaslt" and not cublaslt_applies(batch * length, n, k):
        pytest.skip("shape outside cuBLASLt's INT8 rules (covered by our kernels)")
    _skip_unless_impl_applies(impl, batch * length, n, k)
    g = _gen("seq-last", batch, length, n, k, impl, output)
    x, w = _int8(g, (batch, length, k)), _int8(g, (n, k))
    s_x, s_w = 0.03, 0.004
    out_scale = 0.02 * k**0.5 if output == "int8" else None
    out_dtype = None if output == "int8" else torch.float16

    def launch(out):
        int8_linear(x, w, s_x, s_w, out_scale, "half_away", out_dtype=out_dtype,
                    layout="seq_last", impl=impl, out=out)  # fmt: skip

    dtype = torch.int8 if output == "int8" else torch.float16
    got = _run_poisoned(launch, (batch, n, length), dtype)
    want = _reference(x, w, s_x, s_w, out_scale, "half_away", out_dtype, "seq_last")
    _assert_equal(got, want, f"seq_last {impl} {output} B={batch} L={length}")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["skinny", "tiled", "cublaslt", "wgmma", "short_k"])
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_int8_linear_rounding_rule_at_exact_ties(impl, rounding):
    """s_x * s_w = 0.5 and s_out = 1: v = acc / 2, so every odd accumulator is a tie."""
    g = _gen("gemm-ties", impl, rounding)
    m, n, k = 64, 128, 32
    _skip_unless_impl_applies(impl, m, n, k)
    x = torch.randint(-3, 4, (m, k), generator=g, dtype=I8).to(DEVICE)
    w = torch.randint(-3, 4, (n, k), generator=g, dtype=I8).to(DEVICE)
    got = int8_linear(x, w, 0.5, 1.0, 1.0, rounding, impl=impl)
    want = _reference(x, w, 0.5, 1.0, 1.0, rounding, None, "row")
    acc = x.double() @ w.double().t()
    assert int((acc.remainder(2) == 1).sum()) > 1000  # the test really has ties
    _assert_equal(got, want, f"ties {impl} {rounding}")
    other = "half_even" if rounding == "half_away" else "half_away"
    assert not torch.equal(got, int8_linear(x, w, 0.5, 1.0, 1.0, other, impl=impl))


# (s_x, s_w, s_out): v / s_out = acc / 2 * (1 + d) puts the odd accumulators' quotients a
# relative d past a rounding boundary (around and inside the epilogue's fast-path margin, on both
# sides of it); then scales whose combined factor is outside the fast path's range (a subnormal
# s_x * s_w, a huge one) so that every code comes from the exact conversion.
NEAR_BOUNDARY_SCALES = [
    (0.5, 1.0, 1.0 / (1.0 + d)) for d in (-3e-6, -6e-7, -2e-7, -4e-8, 4e-8, 2e-7, 6e-7, 3e-6)
] + [(2e-20, 3e-20, 1.3e-38), (3e20, 4e9, 5e30)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["stream", "skinny", "tiled", "cublaslt", "wgmma", "short_k"])
@pytest.mark.parametrize("layout", ["row", "seq_last"])
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_int8_codes_near_rounding_boundaries(impl, layout, rounding):
    """INT8 codes where the quotient lies within a few ulps of k + 0.5 (the staged epilogues
    decide most codes from one product with a combined factor and must hand exactly these to the
    exact conversion), and with scales outside that shortcut's range."""
    m = 4 if impl == "stream" else 160  # the stream GEMV takes M <= 4
    n, k = 384, 48  # |acc| up to ~250: quotients up to ~125, all codes in range
    _skip_unless_impl_applies(impl, m, n, k)
    g = _gen("gemm-near-boundary", impl, layout, rounding)
    x = torch.randint(-3, 4, (2, m // 2, k), generator=g, dtype=I8).to(DEVICE)
    w = torch.randint(-3, 4, (n, k), generator=g, dtype=I8).to(DEVICE)
    x_in = x if layout == "seq_last" else x.reshape(m, k)
    acc = x_in.double() @ w.double().t()
    assert int((acc.remainder(2) == 1).sum()) > 0.3 * m * n and float(acc.abs().max()) > 60
    for s_x, s_w, s_out in NEAR_BOUNDARY_SCALES:
        got = int8_linear(x_in, w, s_x, s_w, s_out, rounding, layout=layout, impl=impl)
        want = _reference(x_in, w, s_x, s_w, s_out, rounding, None, layout)
        _assert_equal(got, want, f"{impl} {layout} {rounding} scales {(s_x, s_w, s_out)}")


@pytest.mark.gpu
def test_int8_linear_extreme_accumulators():
    """All -128 x -128 products at K = 5120: acc = 83,886,080 (float32 rounds it)."""
    x = torch.full((3, 5120), -128, dtype=I8, device=DEVICE)
    w = torch.full((24, 5120), -128, dtype=I8, device=DEVICE)
    w[1::2] = 127
    for impl in ("stream", "skinny", "tiled", "cublaslt", "wgmma"):
        if impl == "cublaslt":
            x = x.repeat(8, 1)
        if impl == "wgmma" and not wgmma_applies(*x.shape, 5120, DEVICE):
            continue
        got = int8_linear(x, w, 1.0, 1.0, out_dtype=torch.int32, impl=impl)
        _assert_equal(got, _reference(x, w, 1, 1, None, "half_even", torch.int32, "row"), impl)
        got = int8_linear(x, w, 0.37, 0.011, out_dtype=torch.float32, impl=impl)
        _assert_equal(got, _reference(x, w, 0.37, 0.011, None, "half_even", torch.float32, "row"),
                      impl)  # fmt: skip


# Shapes for the wgmma GEMMs: M, N and K off the 128 x 128 x 128-byte tiles, one partial tile only,
# K = 16 (one zero-filled k tile), more than one band of 16 row tiles (M > 2048, a partial band),
# Mamba's in_proj / x_proj / dt_proj / out_proj. K > 2048 with row-major INT8 / FP16 outputs and at
# least 66 tiles of 128 x 256 take the persistent wide kernel (use_wide_kernel in
# gemm_int8_wgmma.cu): partial tiles in both directions, blocks that loop over several tiles, a
# partial band; so do sequence-last INT8 outputs whose sequences are whole 128-row tiles (two
# sequences of 1024, 1152 and 2048 below; codes stored by TMA: use_wide_codes_by_tma), with a
# partial column tile and a partial K tile; everything else the 128 x 128 kernel.
WGMMA_SHAPES = [
    (17, 24, 16),
    (100, 300, 48),
    (129, 257, 144),
    (383, 129, 1040),
    (640, 192, 1536),
    (1000, 5120, 160),
    (2048, 1536, 3072),
    (513, 10240, 2560),
    (4100, 136, 64),
    (2500, 2600, 2080),
    (1100, 4100, 2176),
    (4098, 520, 4112),
    (9000, 136, 2064),
    (2304, 2600, 2176),
    (4096, 520, 2064),
    (2048, 3072, 768),  # sequence-last INT8 on the wide kernel at K <= 2048 (130m's in_proj)
    (4096, 1100, 2048),
    (2560, 4096, 48),
    (2048, 5120, 160),  # dt_proj of 2.8B (auto takes wgmma for it on Hopper)
    (4096, 4000, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", WGMMA_SHAPES)
@pytest.mark.parametrize("output", ["int8", "bfloat16", "float16", "float32", "int32"])
@pytest.mark.parametrize("layout", ["row", "seq_last"])
def test_wgmma_tiles_match_reference(m, n, k, output, layout):
    if not wgmma_applies(m, n, k, DEVICE):
        pytest.skip("the wgmma GEMM needs compute capability 9.0")
    g = _gen("wgmma", m, n, k, output, layout)
    batch = 1 if m % 2 else 2  # seq_last: two sequences where M is even
    x, w = _int8(g, (batch, m // batch, k)), _int8(g, (n, k))
    s_x, s_w = 0.01 + 0.05 * torch.rand((), generator=g).item(), 0.002
    out_dtype = None if output == "int8" else getattr(torch, output)
    out_scale = s_x * s_w * k**0.5 * 91.0 if output == "int8" else None
    x_in = x if layout == "seq_last" else x.reshape(m, k)

    def launch(out):
        int8_linear(x_in, w, s_x, s_w, out_scale, "half_away", out_dtype=out_dtype, layout=layout,
                    impl="wgmma", out=out)  # fmt: skip

    shape = (batch, n, m // batch) if layout == "seq_last" else (m, n)
    got = _run_poisoned(launch, shape, torch.int8 if output == "int8" else out_dtype)
    want = _reference(x_in, w, s_x, s_w, out_scale, "half_away", out_dtype, layout)
    _assert_equal(got, want, f"wgmma {output} {layout} M={m} N={n} K={k}")


# Shapes for the short-K kernel (K <= 256; tiles of 128 channels x 128 tokens, persistent blocks
# over a contiguous range of tiles): one token, partial tiles both ways, sequences shorter than a
# tile (tiles straddle sequence boundaries), odd L (pieces not 16-byte aligned), K from one k
# chunk to four, partial chunks (K % 64 != 0), blocks that take several tiles and move to the next
# channel tile (2.8B's dt_proj at batch 2), Mamba's dt_proj shapes.
SHORT_K_SHAPES = [
    (1, 1, 200, 160),
    (1, 17, 129, 16),
    (2, 100, 300, 48),
    (3, 7, 1000, 64),
    (1, 128, 128, 256),
    (2, 129, 257, 80),
    (2, 1024, 5120, 160),
    (4, 2047, 1536, 48),
    (1, 4100, 520, 176),
    (8, 256, 2048, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,length,n,k", SHORT_K_SHAPES)
@pytest.mark.parametrize("output", ["int8", "bfloat16", "float16", "float32", "int32"])
@pytest.mark.parametrize("layout", ["row", "seq_last"])
def test_short_k_matches_reference(batch, length, n, k, output, layout):
    g = _gen("short_k", batch, length, n, k, output, layout)
    x, w = _int8(g, (batch, length, k)), _int8(g, (n, k))
    s_x, s_w = 0.01 + 0.05 * torch.rand((), generator=g).item(), 0.002
    out_dtype = None if output == "int8" else getattr(torch, output)
    out_scale = s_x * s_w * k**0.5 * 91.0 if output == "int8" else None
    m = batch * length
    x_in = x if layout == "seq_last" else x.reshape(m, k)

    def launch(out):
        int8_linear(x_in, w, s_x, s_w, out_scale, "half_away", out_dtype=out_dtype, layout=layout,
                    impl="short_k", out=out)  # fmt: skip

    shape = (batch, n, length) if layout == "seq_last" else (m, n)
    got = _run_poisoned(launch, shape, torch.int8 if output == "int8" else out_dtype)
    want = _reference(x_in, w, s_x, s_w, out_scale, "half_away", out_dtype, layout)
    _assert_equal(got, want, f"short_k {output} {layout} B={batch} L={length} N={n} K={k}")


@pytest.mark.gpu
def test_wgmma_rejects_unaligned_operands():
    x = _int8(_gen("unaligned"), (64 * 48 + 1,))[1:].view(64, 48)  # 1 byte off 16-byte alignment
    w = _int8(_gen("w-unaligned"), (32, 48))
    if not wgmma_applies(64, 32, 48, DEVICE):
        pytest.skip("the wgmma GEMM needs compute capability 9.0")
    with pytest.raises(ValueError, match="16-byte aligned"):
        int8_linear(x, w, 0.1, 0.01, 0.5, impl="wgmma")
    # auto takes a kernel without the alignment rule: same codes as from an aligned copy
    _assert_equal(int8_linear(x, w, 0.1, 0.01, 0.5), int8_linear(x.clone(), w, 0.1, 0.01, 0.5),
                  "auto on an unaligned x")  # fmt: skip


@pytest.mark.gpu
def test_poison_check_catches_an_unwritten_output():
    """The helper every test uses fails when one element is left as it was."""
    x, w = _int8(_gen("u"), (4, 64)), _int8(_gen("w"), (32, 64))

    def skip_last(out):
        full = int8_linear(x, w, 0.1, 0.01, 0.5, "half_away", impl="skinny")
        out.view(-1)[:-1] = full.view(-1)[:-1]

    with pytest.raises(AssertionError, match="not fully written"):
        _run_poisoned(skip_last, (4, 32), torch.int8)


@pytest.mark.gpu
def test_int8_linear_default_picks_by_shape():
    x1, x64 = _int8(_gen("a"), (1, 256)), _int8(_gen("b"), (64, 256))
    w = _int8(_gen("c"), (128, 256))
    for x in (x1, x64):
        _assert_equal(
            int8_linear(x, w, 0.1, 0.01, 0.7, "half_away"),
            int8_linear(x, w, 0.1, 0.01, 0.7, "half_away", impl="skinny"),
            "auto vs gemv",
        )
    # dt_proj's sequence-last codes: wgmma (Hopper) or short_k under auto, the same bits.
    x, w = _int8(_gen("d"), (2, 1024, 160)), _int8(_gen("e"), (5120, 160))
    _assert_equal(
        int8_linear(x, w, 0.0173, 0.0031, 0.04, "half_away", layout="seq_last"),
        int8_linear(x, w, 0.0173, 0.0031, 0.04, "half_away", layout="seq_last", impl="short_k"),
        "auto vs short_k",
    )


# ---- argument handling (any machine) -----------------------------------------------------------


def test_gemm_implementation_choice():
    def pick(m, n, k, impl="auto", seq_len=0, int8_out=False):  # a device without wgmma
        return gemm_implementation(m, n, k, impl, device="cpu", seq_len=seq_len, int8_out=int8_out)

    assert pick(1, 3072, 768) == "stream"
    assert pick(4, 3072, 768) == "stream"
    assert pick(1, 5120, 160) == "skinny"  # dt_proj: small K
    assert pick(5, 3072, 768) == "skinny"
    assert pick(16, 10240, 2560) == "skinny"
    assert pick(17, 10240, 2560) == "cublaslt"
    assert pick(2048, 5120, 160) == "tiled"  # row-major output: short_k only sequence-last
    assert pick(2048, 5120, 160, seq_len=1024) == "short_k"  # dt_proj (bench_gemm.py)
    assert pick(2048, 5120, 160, seq_len=1024, int8_out=True) == "short_k"  # no wgmma here
    assert pick(17, 5120, 256, seq_len=16) == "short_k"
    assert pick(2048, 5120, 160, seq_len=90) == "tiled"  # unaligned rows: measured slower
    assert pick(2048, 5120, 168, seq_len=1024) == "tiled"  # K % 16 != 0: byte path either way
    assert pick(2048, 5120, 272) == "tiled"  # K > 256, below cuBLASLt's K threshold
    assert pick(2048, 5120, 160, "short_k") == "short_k"
    assert pick(3, 5120, 160, "short_k") == "short_k"
    assert pick(2048, 10240, 2552) == "cublaslt"
    assert pick(2048, 10239, 2560) == "tiled"  # N not a multiple of 8
    assert pick(2048, 3072, 768, "skinny") == "skinny"
    assert pick(2048, 3072, 768, "cublaslt") == "cublaslt"
    with pytest.raises(ValueError, match="M > 16"):
        pick(4, 3072, 768, "cublaslt")
    with pytest.raises(ValueError, match="M <= 4"):
        pick(5, 3072, 768, "stream")
    with pytest.raises(ValueError, match="impl must be one of"):
        pick(4, 8, 8, "cutlass")
    with pytest.raises(ValueError, match=r"compute capability 9\.0"):
        pick(2048, 3072, 768, "wgmma")
    with pytest.raises(ValueError, match="K <= 256"):
        pick(2048, 3072, 272, "short_k")


def test_gemm_implementation_choice_on_hopper(monkeypatch):
    """Where the wgmma GEMM runs (a build with it, compute capability 9.0), auto takes it for
    M > 16 and K % 16 == 0 with at least one 128 x 128 tile per SM; decode shapes, short K
    (short_k, but for dt_proj's INT8 codes at K >= 128), other K and narrow outputs keep their
    kernels."""
    monkeypatch.setattr(gemm_module, "_device_index", lambda device: 0)
    monkeypatch.setattr(gemm_module, "_wgmma_device", lambda index: (True, 132))
    assert gemm_implementation(1, 3072, 768) == "stream"
    assert gemm_implementation(16, 10240, 2560) == "skinny"
    assert gemm_implementation(17, 10240, 2560) == "cublaslt"  # 80 tiles < 132 SMs
    assert gemm_implementation(17, 10240, 2560, "wgmma") == "wgmma"
    assert gemm_implementation(2048, 10240, 2560) == "wgmma"  # in_proj
    assert gemm_implementation(2048, 5120, 160, seq_len=2048) == "short_k"  # dt_proj, float out
    # dt_proj's INT8 codes: wgmma's TMA-stored codes from K = 128 with a full wave of 128 x 256
    # tiles and whole 128-row sequences, else short_k.
    assert gemm_implementation(16384, 5120, 160, seq_len=1024, int8_out=True) == "wgmma"
    assert gemm_implementation(2048, 4096, 128, seq_len=2048, int8_out=True) == "wgmma"
    assert gemm_implementation(16384, 1536, 48, seq_len=1024, int8_out=True) == "short_k"
    assert gemm_implementation(1024, 1536, 160, seq_len=1024, int8_out=True) == "short_k"
    assert gemm_implementation(2016, 5120, 160, seq_len=1008, int8_out=True) == "short_k"
    assert gemm_implementation(2048, 5120, 160) == "wgmma"  # row-major
    assert gemm_implementation(2048, 5120, 160, seq_len=90) == "wgmma"
    assert gemm_implementation(2048, 5120, 160, "wgmma") == "wgmma"
    assert gemm_implementation(2048, 192, 5120) == "cublaslt"  # x_proj: 32 tiles
    assert gemm_implementation(16384, 192, 5120) == "wgmma"  # 256 tiles
    assert gemm_implementation(2048, 10240, 2552) == "cublaslt"  # K % 16 != 0
    assert gemm_implementation(2048, 10240, 2560, "cublaslt") == "cublaslt"


def _cpu(*shape):
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(1), dtype=I8)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": torch.zeros(2, 8)}, TypeError, "x must have dtype int8"),
        ({"w": _cpu(4, 8, 1)}, ValueError, "w must have 2 dimensions"),
        ({"w": _cpu(4, 9)}, ValueError, "must equal w's in_features"),
        ({"x": _cpu(8, 2).t()}, ValueError, "contiguous"),
        ({"s_x": 0.0}, ValueError, "s_x must be a finite float > 0"),
        ({"s_w": float("nan")}, ValueError, "s_w must be a finite float > 0"),
        ({"out_scale": -1.0}, ValueError, "out_scale must be a finite float > 0"),
        ({"rounding": "up"}, ValueError, "rounding"),
        ({"out_scale": 0.5, "out_dtype": torch.float16}, ValueError, "out_dtype must be None"),
        ({"out_dtype": torch.int16}, TypeError, "out_dtype must be float16"),
        ({"layout": "col"}, ValueError, "layout must be"),
        ({"layout": "seq_last"}, ValueError, r"needs x of shape \(B, L, K\)"),
        ({"impl": "cublaslt"}, ValueError, "M > 16"),
        ({"out": torch.empty(2, 5, dtype=torch.float16)}, ValueError, "out must have shape"),
    ],
)
def test_int8_linear_rejects_bad_arguments(kwargs, error, match):
    args = {"x": _cpu(2, 8), "w": _cpu(4, 8), "s_x": 0.1, "s_w": 0.01, "out_scale": None,
            "rounding": "half_even"}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(error, match=match):
        int8_linear(**args)


def test_int8_linear_on_cpu_tensors_says_why():
    usable, _ = available()
    expected = ValueError if usable else KernelsUnavailable
    with pytest.raises(expected):
        int8_linear(_cpu(2, 8), _cpu(4, 8), 0.1, 0.01)
