"""The prefill x_proj kernel (quamba_kernels.x_proj_seq_last) against the reference.

The reference is ``reference_ops.w8a8_linear`` of the token-major view of u, sliced into dt_low,
B and C as the layers did before the kernel: accumulation is exact, so every code must be equal,
for every split of K, both rounding rules, odd token counts and Mamba's shapes. Outputs are
poisoned (two sentinels that must give one result).

The tests without the gpu mark check argument handling and run anywhere.
"""

from __future__ import annotations

import pytest
import torch

from quamba_kernels import KernelsUnavailable, available
from quamba_kernels.gemm import X_PROJ_SPLITS, x_proj_applies, x_proj_seq_last

DEVICE = "cuda"
I8 = torch.int8

# (batch, E, L, R, N): Mamba's x_proj (130m: E 1536, R 48; 370m: 2048, 64; 1.4B: 4096, 128;
# 2.8B: 5120, 160; N = 16), a single K stage (E = 128), odd numbers of 64-token tiles, L = 16
# (one partial tile), R = 0 and R + 2N = 256 (the largest), N = 8, K stages not a multiple of
# the split (E = 640: 5 stages).
SHAPES = [
    (1, 1536, 1024, 48, 16),
    (2, 2048, 48, 64, 16),
    (1, 4096, 208, 128, 16),
    (1, 5120, 1024, 160, 16),
    (3, 5120, 16, 160, 16),
    (1, 128, 80, 16, 16),
    (2, 256, 144, 1, 8),
    (1, 384, 64, 0, 16),
    (2, 256, 96, 224, 16),
    (1, 640, 2064, 40, 8),
]


def _gen(*key) -> torch.Generator:
    seed = 0
    for part in key:
        seed = (seed * 1000003 + hash(str(part))) % (2**62)
    return torch.Generator().manual_seed(seed)


def _reference(u, w, s_u, s_w, s_out, rounding, dt_rank):
    from quamba_layers import reference_ops as ref

    xdbl = ref.w8a8_linear(u.transpose(1, 2).cpu(), w.cpu(), s_u, s_w, s_out, rounding)
    n = (w.shape[0] - dt_rank) // 2
    return (
        xdbl[..., :dt_rank].contiguous(),
        xdbl[..., dt_rank : dt_rank + n].transpose(1, 2).contiguous(),
        xdbl[..., dt_rank + n :].transpose(1, 2).contiguous(),
    )


def _run_poisoned(u, w, s_u, s_w, s_out, rounding, dt_rank, split_k):
    batch, _, length = u.shape
    n = (w.shape[0] - dt_rank) // 2
    shapes = [(batch, length, dt_rank), (batch, n, length), (batch, n, length)]
    results = []
    for sentinel in (127, -128):
        out = tuple(torch.full(s, sentinel, dtype=I8, device=DEVICE) for s in shapes)
        x_proj_seq_last(u, w, s_u, s_w, s_out, rounding, dt_rank=dt_rank, split_k=split_k, out=out)
        results.append(out)
    torch.cuda.synchronize()
    for name, first, second in zip(("dt_low", "B", "C"), *results):
        assert torch.equal(first, second), f"{name} not fully written (sentinels survive)"
    return results[0]


def _splits(dim):
    return [None] + [s for s in X_PROJ_SPLITS if s <= dim // 128]


def _skip_unless_hopper():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the x_proj kernel needs compute capability 9.0 (bulk copies, clusters)")


@pytest.mark.gpu
@pytest.mark.parametrize("batch,dim,length,rank,n", SHAPES)
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_x_proj_matches_reference(batch, dim, length, rank, n, rounding):
    _skip_unless_hopper()
    g = _gen("x_proj", batch, dim, length, rank, n, rounding)
    u = torch.randint(-128, 128, (batch, dim, length), generator=g, dtype=I8).to(DEVICE)
    w = torch.randint(-128, 128, (rank + 2 * n, dim), generator=g, dtype=I8).to(DEVICE)
    s_u, s_w = 0.01 + 0.05 * torch.rand((), generator=g).item(), 0.002
    # s_out near the typical |v|: codes spread over the INT8 range, some saturate.
    s_out = s_u * s_w * dim**0.5 * 91.0
    want = _reference(u, w, s_u, s_w, s_out, rounding, rank)
    assert x_proj_applies(batch, dim, length, rank + 2 * n, DEVICE)
    for split_k in _splits(dim):
        got = _run_poisoned(u, w, s_u, s_w, s_out, rounding, rank, split_k)
        for name, x, y in zip(("dt_low", "B", "C"), got, want):
            assert x.shape == y.shape, name
            bad = x.cpu() != y
            assert not bad.any(), (
                f"{name} split_k={split_k}: {int(bad.sum())} of {x.numel()} codes differ, "
                f"first at {bad.nonzero()[:5].tolist()}"
            )
    codes = torch.cat([t.flatten().float() for t in want])
    assert codes.std() > 10 and int((codes.abs() >= 127).sum()) > 0  # spread, some saturated


@pytest.mark.gpu
@pytest.mark.parametrize("rounding", ["half_away", "half_even"])
def test_x_proj_rounding_rule_at_exact_ties(rounding):
    """s_u * s_w = 0.5 and s_out = 1: v = acc / 2, so every odd accumulator is a tie."""
    _skip_unless_hopper()
    g = _gen("x_proj-ties", rounding)
    u = torch.randint(-3, 4, (2, 256, 64), generator=g, dtype=I8).to(DEVICE)  # 2 K stages
    w = torch.randint(-3, 4, (48, 256), generator=g, dtype=I8).to(DEVICE)
    want = _reference(u, w, 0.5, 1.0, 1.0, rounding, 16)
    got = _run_poisoned(u, w, 0.5, 1.0, 1.0, rounding, 16, None)
    for x, y in zip(got, want):
        assert torch.equal(x.cpu(), y)
    odd = torch.cat([t.flatten() for t in want])
    assert int((odd % 2 != 0).sum()) > 0  # ties resolved both ways exist


@pytest.mark.gpu
def test_x_proj_layer_backend_matches_reference_backend():
    """The kernel backend's x_proj (this kernel) equals the reference backend's (GEMM + slices)."""
    from quamba_layers.quant.backends import Backend
    from quamba_layers.quant.kernel_backend import KernelBackend

    g = _gen("x_proj-backend")
    u = torch.randint(-128, 128, (2, 1536, 128), generator=g, dtype=I8).to(DEVICE)
    w = torch.randint(-128, 128, (80, 1536), generator=g, dtype=I8).to(DEVICE)
    args = (u, w, 0.03, 0.002, 0.6, "half_even", 48)
    for x, y in zip(KernelBackend().x_proj(*args), Backend().x_proj(*args)):
        assert torch.equal(x.contiguous(), y.contiguous())


@pytest.mark.gpu
def test_x_proj_rejects_shapes_it_does_not_take():
    _skip_unless_hopper()
    u = torch.zeros(1, 192, 64, dtype=I8, device=DEVICE)  # E % 128 != 0
    with pytest.raises(ValueError, match="E % 128 == 0"):
        x_proj_seq_last(u, torch.zeros(48, 192, dtype=I8, device=DEVICE), 1.0, 1.0, 1.0, dt_rank=16)
    u = torch.zeros(1, 128, 40, dtype=I8, device=DEVICE)  # L % 16 != 0
    with pytest.raises(ValueError, match="L % 16 == 0"):
        x_proj_seq_last(u, torch.zeros(48, 128, dtype=I8, device=DEVICE), 1.0, 1.0, 1.0, dt_rank=16)
    assert not x_proj_applies(1, 128, 40, 48, DEVICE)
    assert not x_proj_applies(1, 128, 64, 258, DEVICE)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"w_shape": (48, 65)}, ValueError, "shape \\(R \\+ 2N, E\\)"),
        ({"dt_rank": 17}, ValueError, "R \\+ 2N - dt_rank even"),
        ({"dt_rank": 49}, ValueError, "dt_rank must be in"),
        ({"split_k": 3}, ValueError, "split_k must be"),
        ({"u_dtype": torch.float16}, TypeError, "u must have dtype int8"),
        ({"rounding": "up"}, ValueError, "rounding"),
    ],
)
def test_x_proj_rejects_bad_arguments(kwargs, error, match):
    u = torch.zeros(1, 64, 16, dtype=kwargs.get("u_dtype", I8))
    w = torch.zeros(kwargs.get("w_shape", (48, 64)), dtype=I8)
    with pytest.raises(error, match=match):
        x_proj_seq_last(
            u, w, 0.1, 0.1, 1.0, kwargs.get("rounding", "half_even"),
            dt_rank=kwargs.get("dt_rank", 16), split_k=kwargs.get("split_k"),
        )  # fmt: skip


def test_x_proj_on_cpu_tensors_says_why():
    u, w = torch.zeros(1, 64, 16, dtype=I8), torch.zeros(48, 64, dtype=I8)
    usable, _ = available()
    with pytest.raises(ValueError if usable else KernelsUnavailable):
        x_proj_seq_last(u, w, 0.1, 0.1, 1.0, dt_rank=16)
    assert not x_proj_applies(1, 64, 16, 48, "cpu")


def test_x_proj_split_and_preference_rules(monkeypatch):
    """The default split (about 64 blocks on a 132-SM GPU, at most 4, two K stages per block) and
    where the layers take the kernel (at most 12 K stages per block), without a GPU."""
    from quamba_kernels import gemm

    monkeypatch.setattr(gemm, "_device_index", lambda device: 0)
    monkeypatch.setattr(gemm, "_multiprocessors", lambda index: 132)
    assert gemm.x_proj_split(1, 5120, 1024) == 4  # 16 tiles
    assert gemm.x_proj_split(1, 5120, 2048) == 2  # 32 tiles
    assert gemm.x_proj_split(16, 5120, 1024) == 1
    assert gemm.x_proj_split(1, 256, 1024) == 1  # 2 K stages: no split
    assert gemm.x_proj_split(1, 512, 1024) == 2  # 4 K stages: two per block
    monkeypatch.setattr(gemm, "x_proj_applies", lambda *args: True)
    assert gemm.x_proj_preferred(1, 1536, 1024, 80)  # 12 stages over 4 blocks
    assert gemm.x_proj_preferred(16, 1536, 1024, 80)  # 12 stages, one block
    assert gemm.x_proj_preferred(1, 5120, 1024, 192)  # 40 stages over 4 blocks
    assert not gemm.x_proj_preferred(1, 5120, 2048, 192)  # 40 over 2
    assert not gemm.x_proj_preferred(16, 4096, 1024, 160)  # 32 in one block
