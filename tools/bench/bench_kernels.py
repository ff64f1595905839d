"""Benchmark of the quamba-kernels CUDA kernels at Mamba-2.8B shapes (runs on a GPU machine).

Shapes: d_model 2560, d_inner E = 5120, d_state N = 16, conv width 4, L = 2048, batch 1 and 8;
plus the decode step (one token per sequence, batch 1 and 16): rows named "decode ...".
Each kernel is captured in a CUDA graph (``--calls`` launches per graph, several input sets
rotated so that the working set exceeds the L2 cache) and the graph replays are timed with CUDA
events; the median over ``--reps`` replays after warm-up is reported. Achieved bandwidth counts
the fewest bytes the op must move (each input read once, each output written once) and is
compared with a device-to-device copy measured in the same run.

Usage: python3 tools/bench/bench_kernels.py [--quick] [--json PATH] [--only conv,hadamard]
       python3 tools/bench/bench_kernels.py --sweep   (one call of every kernel on small odd
                                                      shapes: the compute-sanitizer workload)
Writes $OUT/bench_kernels.json when OUT is set.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import provenance  # beside this file (the scripts here run with their folder on sys.path)
import torch

D_MODEL, D_INNER, D_STATE, WIDTH, SEQLEN = 2560, 5120, 16, 4, 2048
L2_BYTES = 50 * 2**20


def write_result(payload, default_name: str, path: str | None) -> None:
    """JSON to ``path``, or to $OUT/default_name when OUT is set (the GPU check's folder), with
    the provenance of the run (tools/bench/provenance.py), written atomically."""
    if path is None and "OUT" in os.environ:
        path = os.path.join(os.environ["OUT"], default_name)
    if path:
        provenance.write_result(payload, path)


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    n = 2**28  # 1 GiB of float32
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def time_kernel(make_call, set_bytes: int, reps: int, calls: int = 10) -> float:
    """Median milliseconds of one kernel call, timed through graph replays.

    ``make_call(i)`` returns a zero-argument launch on input set i (inputs and outputs allocated
    up front). Enough sets are built that one pass over them exceeds twice the L2 cache.
    """
    sets = max(2, min(8, math.ceil(2 * L2_BYTES / max(set_bytes, 1))))
    launches = [make_call(i) for i in range(sets)]
    for launch in launches:  # warm-up outside the graph (module load, first-touch)
        launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(calls):
            launches[k % sets]()
    ms = _median_ms(graph.replay, reps)
    return ms / calls


def _int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device="cuda")


def _randn(*shape, dtype=torch.float32, std=1.0, mean=0.0):
    return (torch.randn(shape, device="cuda") * std + mean).to(dtype)


def bench(batch: int, reps: int, only: list[str] | None = None):
    from quamba_kernels.conv1d import causal_conv1d, conv1d_int8
    from quamba_kernels.hadamard import hadamard
    from quamba_kernels.rmsnorm import rmsnorm
    from quamba_kernels.scan import selective_scan, selective_scan_int8, selective_scan_sim

    b, e, n, length, d = batch, D_INNER, D_STATE, SEQLEN, D_MODEL
    bel = b * e * length
    rows = []

    def add(name, make_call, moved_bytes, **extra):
        if only and not any(part in name for part in only):
            return None
        ms = time_kernel(make_call, moved_bytes, reps)
        rows.append({"kernel": name, "batch": b, "ms": ms, "bytes": moved_bytes, **extra})
        return ms

    # conv1d
    w_q, b_q = _int8(e, WIDTH), _int8(e)

    def conv_i8(i, out_dtype):
        x = _int8(b, e, length)
        out = torch.empty(b, e, length, dtype=out_dtype, device="cuda")
        s_out = 0.05 if out_dtype == torch.int8 else None
        return lambda: conv1d_int8(x, 0.02, w_q, 0.01, b_q, 0.02, s_out, out=out)

    add("conv1d int8->int8", lambda i: conv_i8(i, torch.int8), 2 * bel)
    add("conv1d int8->fp32", lambda i: conv_i8(i, torch.float32), 5 * bel)
    w16, b16 = _randn(e, WIDTH, dtype=torch.float16), _randn(e, dtype=torch.float16)

    def conv_f16(i):
        x = _randn(b, e, length, dtype=torch.float16)
        out = torch.empty_like(x)
        return lambda: causal_conv1d(x, w16, b16, out=out)

    add("conv1d fp16", conv_f16, 4 * bel)

    # rmsnorm: fp16 x + fp32 residual -> int8 y + fp32 residual
    tokens = b * length
    weight = _randn(d, std=0.1, mean=1.0)

    def norm(i):
        x = _randn(b, length, d, dtype=torch.float16)
        res = _randn(b, length, d)
        out = torch.empty(b, length, d, dtype=torch.int8, device="cuda")
        r_out = torch.empty(b, length, d, device="cuda")
        return lambda: rmsnorm(x, res, weight, 1e-5, 0.03, out=out, residual_out=r_out)

    add("rmsnorm fp16+res->int8", norm, 11 * tokens * d)

    # hadamard over d_inner (5120 = 20 * 256): fp16 -> int8
    def had(i):
        x = _randn(b, length, e, dtype=torch.float16)
        out = torch.empty(b, length, e, dtype=torch.int8, device="cuda")
        return lambda: hadamard(x, 1 / math.sqrt(e), 0.03, out=out)

    add("hadamard 5120 fp16->int8", had, 3 * bel)

    # and over 1.4B's d_inner (4096 = 2^12, the power-of-two kernel)
    def had_4096(i):
        x = _randn(b, length, 4096, dtype=torch.float16)
        out = torch.empty(b, length, 4096, dtype=torch.int8, device="cuda")
        return lambda: hadamard(x, 1 / 64, 0.03, out=out)

    add("hadamard 4096 fp16->int8", had_4096, 3 * b * length * 4096)

    # x_proj's token-major copy of the sequence-last conv output: (B, E, L) -> (B, L, E)
    from quamba_kernels.transpose import transpose_int8

    def transpose(i, use_kernel):
        x = _int8(b, e, length)
        out = torch.empty(b, length, e, dtype=torch.int8, device="cuda")
        if use_kernel:
            return lambda: transpose_int8(x, out=out)
        return lambda: out.copy_(x.transpose(1, 2))

    t_transpose = add("transpose int8 (E,L)->(L,E)", lambda i: transpose(i, True), 2 * bel)
    t_torch_copy = add("  torch copy_ of the view", lambda i: transpose(i, False), 2 * bel)

    # scans
    a_log_q, d_q, dtb_q = _int8(e, n).abs(), _int8(e), _int8(e)
    bnl = b * n * length

    def scan8(i, exact, float_u=False):
        u = _randn(b, e, length) if float_u else _int8(b, e, length)
        dt, z = _int8(b, e, length), _int8(b, e, length)
        bm, cm = _int8(b, n, length), _int8(b, n, length)
        out = torch.empty(b, length, e, dtype=torch.float16, device="cuda")
        hq = torch.empty(b, e, n, dtype=torch.int8, device="cuda")
        args = (u, 0.02, dt, 0.02, a_log_q, 0.02, bm, 0.02, cm, 0.02, d_q, 0.01, z, 0.03,
                dtb_q, 0.04, 0.1)  # fmt: skip
        return lambda: selective_scan_int8(*args, exact=exact, out=out, state_q=hq)

    int8_bytes = 3 * bel + 2 * bnl + 2 * bel
    t_int8 = add("scan int8 (fast)", lambda i: scan8(i, False), int8_bytes)
    t_int8_exact = add("scan int8 (exact)", lambda i: scan8(i, True), int8_bytes)
    add("scan fp32-u int8 (fast)", lambda i: scan8(i, False, True), int8_bytes + 3 * bel)

    A = -torch.exp(_randn(e, n, std=0.5, mean=1.0))
    D32, dtb32 = _randn(e), _randn(e, std=0.5, mean=-2.0)

    def scan_float(i, dtype, sim):
        u, dt, z = (_randn(b, e, length, dtype=dtype) for _ in range(3))
        bm, cm = _randn(b, n, length, dtype=dtype), _randn(b, n, length, dtype=dtype)
        out = torch.empty(b, length, e, dtype=dtype, device="cuda")
        if sim:
            h = torch.empty(b, e, n, device="cuda")
            return lambda: selective_scan_sim(
                u, dt, A, bm, cm, D32, z, dtb32, out=out, last_state=h
            )
        return lambda: selective_scan(u, dt, A, bm, cm, D32, z, dtb32, out=out)

    esize = 2
    t_fp16 = add("scan fp16 (fast)", lambda i: scan_float(i, torch.float16, False), 4 * esize * bel)
    t_sim = add("scan sim fp32 (exact)", lambda i: scan_float(i, torch.float32, True), 16 * bel)

    # decode step, INT8 state
    step = scan_step_launcher(b, e, n, a_log_q, d_q, dtb_q)

    add("scan step int8 state", step, 2 * b * e * n + 5 * b * e)

    pairs = {
        "int8_fast_vs_fp16_fast": (t_int8, t_fp16),
        "int8_exact_vs_int8_fast": (t_int8_exact, t_int8),
        "sim_vs_int8_fast": (t_sim, t_int8),
        "sim_vs_int8_exact": (t_sim, t_int8_exact),
        "torch_copy_vs_transpose_kernel": (t_torch_copy, t_transpose),
    }
    ratios = {k: a / b for k, (a, b) in pairs.items() if a is not None and b is not None}
    return rows, ratios


def scan_step_launcher(b, e, n, a_log_q, d_q, dtb_q):
    """make_call(i) for time_kernel: one INT8-state selective-scan decode step on fresh inputs."""
    from quamba_kernels.scan_step import selective_scan_step_int8

    def step(i):
        state = _int8(b, e, n)
        u, dt, z = _int8(b, e), _int8(b, e), _int8(b, e)
        bm, cm = _int8(b, n), _int8(b, n)
        out = torch.empty(b, e, dtype=torch.float16, device="cuda")
        args = (u, 0.02, dt, 0.02, a_log_q, 0.02, bm, 0.02, cm, 0.02, d_q, 0.01, z, 0.03,
                dtb_q, 0.04, 0.1)  # fmt: skip
        return lambda: selective_scan_step_int8(state, *args, out=out)

    return step


def bench_decode(batch: int, reps: int, only: list[str] | None = None):
    """One decode token per sequence: the per-layer norm, Hadamard, conv update and scan step."""
    from quamba_kernels.conv1d import conv1d_int8_update
    from quamba_kernels.hadamard import hadamard
    from quamba_kernels.rmsnorm import rmsnorm

    b, e, n, d = batch, D_INNER, D_STATE, D_MODEL
    rows = []

    def add(name, make_call, moved_bytes):
        if only and not any(part in name for part in only):
            return
        ms = time_kernel(make_call, moved_bytes, reps)
        rows.append({"kernel": name, "batch": b, "ms": ms, "bytes": moved_bytes})

    weight = _randn(d, std=0.1, mean=1.0)

    def norm(i):
        x, res = _randn(b, d, dtype=torch.float16), _randn(b, d)
        out = torch.empty(b, d, dtype=torch.int8, device="cuda")
        r_out = torch.empty(b, d, device="cuda")
        return lambda: rmsnorm(x, res, weight, 1e-5, 0.03, out=out, residual_out=r_out)

    add("decode rmsnorm fp16+res->int8", norm, 15 * b * d)

    def had(i):
        x = _randn(b, e, dtype=torch.float16)
        out = torch.empty(b, e, dtype=torch.int8, device="cuda")
        return lambda: hadamard(x, 1 / math.sqrt(e), 0.03, out=out)

    add("decode hadamard 5120 fp16->int8", had, 3 * b * e)

    w_q, b_q = _int8(e, WIDTH), _int8(e)

    def conv(i):
        x, state = _int8(b, e), _int8(b, e, WIDTH - 1)
        out = torch.empty(b, e, dtype=torch.int8, device="cuda")
        return lambda: conv1d_int8_update(x, state, 0.02, w_q, 0.01, b_q, 0.02, 0.05, out=out)

    add("decode conv1d update int8", conv, 2 * b * e * WIDTH)

    a_log_q, d_q, dtb_q = _int8(e, n).abs(), _int8(e), _int8(e)
    step = scan_step_launcher(b, e, n, a_log_q, d_q, dtb_q)

    add("decode scan step int8 state", step, 2 * b * e * n + 5 * b * e)
    return rows


def sweep() -> None:
    """Every kernel once on small, odd shapes (for compute-sanitizer memcheck / racecheck)."""
    from quamba_kernels.conv1d import (
        causal_conv1d,
        causal_conv1d_update,
        conv1d_int8,
        conv1d_int8_update,
    )
    from quamba_kernels.hadamard import hadamard
    from quamba_kernels.rmsnorm import rmsnorm
    from quamba_kernels.scan import selective_scan, selective_scan_int8, selective_scan_sim
    from quamba_kernels.scan_step import selective_scan_step_int8, selective_state_update

    b, e, length = 3, 37, 133
    for width in (2, 3, 4):
        x = _int8(b, e, length)
        w, bias = _int8(e, width), _int8(e)
        conv1d_int8(x, 0.02, w, 0.01, bias, 0.02, 0.05)
        conv1d_int8(x, _randn(b).abs() + 0.01, w, 0.01, bias, 0.02, None)
        conv1d_int8(x[:, :, 1:].contiguous(), 0.02, w, 0.01, None, 1.0, 0.05)  # odd length
        for length_state in (1, length):  # the prefill's state output, shorter than K - 1 too
            xs = _int8(b, e, length_state)
            state = _int8(b, e, width - 1)
            conv1d_int8(xs, 0.02, w, 0.01, bias, 0.02, 0.05, state_out=state)
            conv1d_int8(xs, 0.02, w, 0.01, bias, 0.02, None, state_out=state)
        conv1d_int8_update(
            x[:, :, 0].contiguous(), _int8(b, e, width - 1), 0.02, w, 0.01, bias, 0.02, 0.05
        )
        xf = _randn(b, e, length, dtype=torch.float16)
        wf = _randn(e, width, dtype=torch.float16)
        causal_conv1d(xf, wf, None)
        causal_conv1d_update(
            xf[:, :, 0].contiguous(), _randn(b, e, width - 1, dtype=torch.float16), wf
        )
    from quamba_kernels.quantize import quantize_int8_per_sequence

    for shape in ((3, 37, 133), (1, 5, 1)):
        xs = _randn(*shape)
        quantize_int8_per_sequence(xs)
        lens = torch.tensor([shape[2] + 1, 0, 5][: shape[0]], device="cuda")
        quantize_int8_per_sequence(xs, lens, "half_even")
    for dim in (64, 1001, 2560, 16384):
        x = _randn(5, dim, dtype=torch.float16)
        rmsnorm(x, _randn(5, dim), _randn(dim), 1e-5, 0.05)
        rmsnorm(x, None, None, 1e-5, out_dtype=torch.float32)
    for size in (1, 2, 8, 96, 256, 512, 768, 1024, 2048, 4096, 5120, 6144, 8192):
        hadamard(_randn(3, size, dtype=torch.float16), 1 / math.sqrt(size), 0.05)
        hadamard(_randn(2, size), 1 / math.sqrt(size))
    for n in (1, 16, 33, 64):
        u, dt, z = _int8(b, e, length), _int8(b, e, length), _int8(b, e, length)
        bm, cm = _int8(b, n, length), _int8(b, n, length)
        a_log, d_q, dtb = _int8(e, n).abs(), _int8(e), _int8(e)
        args = (u, 0.02, dt, 0.02, a_log, 0.02, bm, 0.02, cm, 0.02, d_q, 0.01, z, 0.03,
                dtb, 0.04, 0.1)  # fmt: skip
        selective_scan_int8(*args)
        selective_scan_int8(*args, exact=True, return_last_state=True)
        A = -torch.exp(_randn(e, n))
        uf, dtf, zf = (_randn(b, e, length) for _ in range(3))
        bf, cf = _randn(b, n, length), _randn(b, n, length)
        selective_scan_sim(uf, dtf, A, bf, cf, _randn(e), zf, _randn(e))
        selective_scan(uf.half(), dtf.half(), A, bf.half(), cf.half(), None, None, None)
        if n == 16:  # both layouts of N = 9..16, whatever the size picks
            for lanes in (8, 16):
                selective_scan_int8(*args, lanes_per_channel=lanes)
                selective_scan_int8(*args, exact=True, lanes_per_channel=lanes)
            for block in (64, 128):  # the 8-lane INT8 layout's two block sizes
                selective_scan_int8(*args, lanes_per_channel=8, block_threads=block)
                selective_scan_int8(*args, exact=True, lanes_per_channel=8, block_threads=block)
                selective_scan(uf.half(), dtf.half(), A, bf.half(), cf.half(), _randn(e),
                               zf.half(), _randn(e), lanes_per_channel=lanes)  # fmt: skip
        step = (u[..., 0].contiguous(), 0.02, dt[..., 0].contiguous(), 0.02, a_log, 0.02,
                bm[..., 0].contiguous(), 0.02, cm[..., 0].contiguous(), 0.02, d_q, 0.01,
                z[..., 0].contiguous(), 0.03, dtb, 0.04, 0.1)  # fmt: skip
        selective_scan_step_int8(_int8(b, e, n), *step)
        for rank, row in ((48, 80), (17, 19)):  # fused dt_proj: dp4a and byte paths
            fused = (_int8(b, row), _int8(e, rank), 0.03, 0.002, "half_even")
            selective_scan_step_int8(_int8(b, e, n), *step, dt_from=fused)
        selective_state_update(_randn(b, e, n), uf[..., 0].contiguous(), dtf[..., 0].contiguous(),
                               A, bf[..., 0].contiguous(), cf[..., 0].contiguous())  # fmt: skip
    from quamba_kernels.transpose import transpose_int8

    for shape in ((3, 37, 133), (2, 128, 64), (1, 5120, 48)):
        transpose_int8(_int8(*shape))
        transpose_int8(_int8(shape[0] * shape[1] * shape[2] + 1)[1:].view(shape))  # unaligned
    # A grid large enough for the 256-thread scan blocks.
    e_big, l_big = 3001, 70
    u, dt, z = _int8(3, e_big, l_big), _int8(3, e_big, l_big), _int8(3, e_big, l_big)
    bm, cm = _int8(3, 16, l_big), _int8(3, 16, l_big)
    args = (u, 0.02, dt, 0.02, _int8(e_big, 16).abs(), 0.02, bm, 0.02, cm, 0.02, _int8(e_big),
            0.01, z, 0.03, _int8(e_big), 0.04, 0.1)  # fmt: skip
    selective_scan_int8(*args)
    selective_scan_int8(*args, exact=True)
    sweep_decode()
    torch.cuda.synchronize()
    print("sweep done")


def sweep_decode() -> None:
    """The persistent W8A8 decode kernel, two launches of two layers at two small shapes (a
    power-of-two Hadamard with a shared-memory stage, and 12 * 128), where the device runs it."""
    from quamba_kernels.decode import W8A8DecodeKernel, decode_w8a8_supported

    if not decode_w8a8_supported("cuda")[0]:
        return
    scales = dict(eps=1e-5, s_in=0.05, s_w_in=0.002, s_xz=0.04, s_w_conv=0.01, s_b_conv=0.01,
                  s_u=0.03, s_w_x=0.002, s_xo=0.05, s_w_dt=0.002, s_dt=0.01, s_A=0.02,
                  s_D=0.01, s_dtb=0.04, s_h=0.05, s_had=0.06, s_w_out=0.002)  # fmt: skip
    roundings = {"norm": "half_even", "gemm": "half_even", "conv": "half_away",
                 "ssm_state": "half_away", "hadamard": "half_away"}  # fmt: skip
    for d, r in ((256, 16), (768, 48)):
        e, n = 2 * d, 16
        layers = [{"norm_w": _randn(d), "w_in": _int8(2 * e, d), "conv_w": _int8(e, 4),
                   "conv_b": _int8(e), "w_x": _int8(r + 2 * n, e), "w_dt": _int8(e, r),
                   "A_log": _int8(e, n).abs(), "D": _int8(e), "dt_bias": _int8(e),
                   "w_out": _int8(d, e), "roundings": roundings, **scales}
                  for _ in range(2)]  # fmt: skip
        states = [(_int8(1, e, 3), _int8(1, e, n)) for _ in range(2)]
        kernel = W8A8DecodeKernel(layers, states, timing=True)
        hidden = _randn(1, d, dtype=torch.float16)
        for _ in range(2):
            kernel(hidden)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sweep", action="store_true", help="sanitizer workload, no timing")
    parser.add_argument(
        "--sweep-decode", action="store_true", help="the persistent decode kernel's part only"
    )
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument(
        "--only", default=None, help="comma-separated substrings of the kernel names to run"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    if args.sweep or args.sweep_decode:
        if args.sweep:
            sweep()
        else:
            sweep_decode()
        torch.cuda.synchronize()
        return 0
    reps = 10 if args.quick else 30
    copy_gbs = copy_bandwidth(reps)
    results = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_gbs, "runs": []}
    for batch in (1, 8):
        only = [part.strip() for part in args.only.split(",")] if args.only else None
        rows, ratios = bench(batch, reps, only)
        for row in rows:
            row["GBps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
            row["pct_copy"] = 100 * row["GBps"] / copy_gbs
        results["runs"].append({"batch": batch, "rows": rows, "ratios": ratios})
    for batch in (1, 16):
        only = [part.strip() for part in args.only.split(",")] if args.only else None
        rows = bench_decode(batch, reps, only)
        for row in rows:
            row["GBps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
            row["pct_copy"] = 100 * row["GBps"] / copy_gbs
        results["runs"].append({"batch": batch, "rows": rows, "ratios": {}})

    print(f"\n{results['device']}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'kernel':<34}{'B':>3}{'time us':>11}{'MB moved':>10}{'GB/s':>8}{'% copy':>8}")
    for run in results["runs"]:
        for row in run["rows"]:
            print(
                f"{row['kernel']:<34}{row['batch']:>3}{row['ms'] * 1e3:>11.1f}"
                f"{row['bytes'] / 1e6:>10.1f}{row['GBps']:>8.0f}{row['pct_copy']:>7.1f}%"
            )
        if run["ratios"]:
            ratio_text = ", ".join(f"{k} {v:.2f}" for k, v in run["ratios"].items())
            print(f"  batch {run['batch']} ratios: {ratio_text}")
    write_result(results, "bench_kernels.json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
