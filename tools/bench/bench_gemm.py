"""W8A8 GEMM benchmark at Mamba shapes: our stream GEMV, skinny and tiled tensor-core kernels,
the Hopper wgmma kernel, the short-K kernel (K <= 256), cuBLASLt INT8 + our epilogue, and the cuBLAS FP16 GEMM of the same shape, side by side in one
run (GPU machine).

For each linear layer of Mamba-2.8B (in_proj, x_proj, dt_proj, out_proj) and the rows M of decode
(1, 16) and prefill (2048, 8 x 2048), every applicable implementation is timed through CUDA-graph
replays with inputs rotated past the L2 cache (tools/bench/bench_kernels.py's method). The floor
is max(bytes / copy bandwidth, ops / peak): weights + activations read once, outputs written once.
This is the evidence behind ``quamba_kernels.gemm``'s "auto" choice.

Usage: python3 tools/bench/bench_gemm.py [--quick] [--json PATH]   (writes $OUT/bench_gemm.json)
       python3 tools/bench/bench_gemm.py --dt-proj  (dt_proj's kernels at each model's shapes)
       python3 tools/bench/bench_gemm.py --x-proj   (x_proj: generic path vs the x_proj kernel)
       python3 tools/bench/bench_gemm.py --sweep    (the compute-sanitizer workload)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import copy_bandwidth, time_kernel, write_result

D_MODEL, D_INNER, D_STATE, DT_RANK = 2560, 5120, 16, 160
LAYERS = {  # name: (N, K, epilogue output)
    "in_proj": (2 * D_INNER, D_MODEL, "int8 seq_last"),
    "x_proj": (DT_RANK + 2 * D_STATE, D_INNER, "int8"),
    "dt_proj": (D_INNER, DT_RANK, "int8 seq_last"),
    "out_proj": (D_MODEL, D_INNER, "fp16"),
}
ROWS = (1, 16, 2048, 16384)
# H100 SXM dense tensor-core peaks (ops/s): the compute half of the floor.
PEAK_INT8 = 1979e12
PEAK_FP16 = 989e12


def _int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device="cuda")


def _fp16_linear_call(m, n, k):
    def make(_):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        return lambda: torch.nn.functional.linear(x, w)

    return make


def bench_layer(name, m, n, k, output, bandwidth, reps):
    import quamba_kernels as qk

    seq_last = output.endswith("seq_last")
    out_int8 = output.startswith("int8")
    batch = 1 if m <= 16 else m // 2048
    length = m // batch
    x_shape = (batch, length, k) if seq_last else (m, k)
    out_bytes = m * n * (1 if out_int8 else 2)
    int8_bytes = m * k + n * k + out_bytes
    fp16_bytes = 2 * (m * k + n * k) + 2 * m * n
    ops = 2 * m * n * k
    rows = []

    def int8_call(impl):
        def make(_):
            x, w = _int8(*x_shape), _int8(n, k)
            kw = {"layout": "seq_last" if seq_last else "row", "impl": impl}
            out_scale = 0.05 if out_int8 else None

            return lambda: qk.int8_linear(x, w, 0.02, 0.003, out_scale, "half_away", **kw)

        return make

    impls = (["stream"] if m <= 4 else []) + (["skinny"] if m <= 16 else ["tiled"])
    if m > 16 and m <= 2048:
        impls.append("skinny")  # for the record: it re-reads the weights per 16 rows
    if qk.gemm.cublaslt_applies(m, n, k):
        impls.append("cublaslt")
    if qk.gemm.wgmma_applies(m, n, k):
        impls.append("wgmma")
    if k <= qk.gemm.SHORT_K_MAX:
        impls.append("short_k")
    for impl in impls:
        ms = time_kernel(int8_call(impl), int8_bytes, reps)
        floor = max(int8_bytes / bandwidth, ops / PEAK_INT8) * 1e3
        rows.append((name, m, n, k, f"int8 {impl}", ms, int8_bytes, ops, floor))

    ms = time_kernel(_fp16_linear_call(m, n, k), fp16_bytes, reps)
    floor = max(fp16_bytes / bandwidth, ops / PEAK_FP16) * 1e3
    rows.append((name, m, n, k, "fp16 cuBLAS", ms, fp16_bytes, ops, floor))
    return rows


def sweep() -> None:
    """One call of every implementation, layout and output on small odd shapes: the
    compute-sanitizer workload (no timing)."""
    import quamba_kernels as qk

    for m, n, k in ((1, 37, 48), (3, 200, 160), (16, 40, 96), (33, 136, 64), (130, 257, 272),
                    (5, 11, 17), (48, 136, 64), (64, 200, 512),
                    (9, 2200, 2128), (7, 1100, 4112),  # skinny ring wrapping, 4 / 2 tiles
                    (1, 300, 5120), (3, 600, 1536),  # stream GEMV, rows split 8 / 2 ways
                    (140, 17000, 2064)):  # wgmma wide kernel (row layout), two tiles per block  # fmt: skip
        x, w = _int8(m, k), _int8(n, k)
        x3 = x.view(1, m, k)
        impls = ["stream"] if m <= 4 else []
        impls += ["skinny", "tiled"] + (["cublaslt"] if qk.gemm.cublaslt_applies(m, n, k) else [])
        if qk.gemm.wgmma_applies(m, n, k):
            impls.append("wgmma")
        if k <= qk.gemm.SHORT_K_MAX and k % 16 == 0:
            impls.append("short_k")
        for impl in impls:
            for out_scale, out_dtype in ((0.3, None), (None, torch.float16), (None, torch.int32)):
                qk.int8_linear(x, w, 0.02, 0.01, out_scale, out_dtype=out_dtype, impl=impl)
                qk.int8_linear(x3, w, 0.02, 0.01, out_scale, out_dtype=out_dtype, impl=impl,
                               layout="seq_last")  # fmt: skip
                if impl == "stream":  # the shared-memory preload of a constant weight
                    qk.int8_linear(x, w, 0.02, 0.01, out_scale, out_dtype=out_dtype, impl=impl,
                                   constant_weight=True)  # fmt: skip
    # The wide kernel's sequence-last INT8 codes stored by TMA (sequences of whole 128-row tiles),
    # two or three tiles per block (the code tile reused while the previous store may read it).
    x, w = _int8(2, 256, 2064), _int8(17000, 2064)
    qk.int8_linear(x, w, 0.02, 0.01, 0.3, impl="wgmma", layout="seq_last")
    # The short-K kernel's persistent blocks over several tiles (double-buffered x, a new channel
    # tile mid-range) with sequences that end inside a tile.
    x, w = _int8(3, 5000, 48), _int8(300, 48)
    for out_scale, out_dtype in ((0.3, None), (None, torch.float32)):
        qk.int8_linear(x, w, 0.02, 0.01, out_scale, out_dtype=out_dtype, impl="short_k")
        qk.int8_linear(x, w, 0.02, 0.01, out_scale, out_dtype=out_dtype, impl="short_k",
                       layout="seq_last")  # fmt: skip
    # x_proj from sequence-last codes (Hopper): every split, a partial 64-token tile, R + 2N = 256.
    if qk.x_proj_applies(1, 256, 80, 48):
        for b, e, length, rank, n in (
            (2, 256, 80, 16, 16),
            (1, 1024, 48, 224, 16),
            (3, 640, 16, 1, 8),
        ):
            u, w = _int8(b, e, length), _int8(rank + 2 * n, e)
            for split in [s for s in qk.gemm.X_PROJ_SPLITS if s <= e // qk.gemm.X_PROJ_STAGE_K]:
                qk.x_proj_seq_last(u, w, 0.02, 0.01, 0.3, dt_rank=rank, split_k=split)
    torch.cuda.synchronize()
    print("sweep done")


def _print_row(row: dict) -> None:
    """One table row as "key value" pairs (floats to 0.1)."""
    print("  ".join(f"{key} {value:.1f}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in row.items()), flush=True)  # fmt: skip


# x_proj of each model size (B, L, E = d_inner, R = dt_rank; N = 16) for --x-proj.
X_PROJ_SHAPES = [
    (1, 1024, 1536, 48),
    (1, 2048, 1536, 48),
    (16, 1024, 1536, 48),
    (1, 1024, 4096, 128),
    (1, 2048, 4096, 128),
    (16, 1024, 4096, 128),
    (1, 1024, 5120, 160),
    (1, 2048, 5120, 160),
    (16, 1024, 5120, 160),
]


def _x_proj_call(b, length, e, rank, use_kernel):
    import quamba_kernels as qk
    from quamba_layers.quant.backends import Backend
    from quamba_layers.quant.kernel_backend import KernelBackend

    def make(_):
        u, w = _int8(b, e, length), _int8(rank + 32, e)
        args = (u, w, 0.0173, 0.0031, 0.9, "half_even")
        if use_kernel:
            return lambda: qk.x_proj_seq_last(*args, dt_rank=rank)
        # The generic path as the layers ran it (dt_proj then copied the strided dt_low).
        backend = KernelBackend()
        return lambda: Backend.x_proj(backend, *args, rank)[0].contiguous()

    return make


def x_proj_table(reps: int) -> list[dict]:
    """A prefill's x_proj from the conv's sequence-last codes to dt_low, B and C as the layers
    consume them: the generic path (transpose, int8_linear, slices and copies) against the x_proj
    kernel at its default split, and what the layers pick (x_proj_preferred)."""
    import quamba_kernels as qk

    results = []
    for b, length, e, rank in X_PROJ_SHAPES:
        n_out = rank + 32
        nbytes = b * length * (e + n_out) + n_out * e
        row = {"B": b, "L": length, "E": e, "R": rank}
        row["generic"] = 1e3 * time_kernel(_x_proj_call(b, length, e, rank, False), nbytes, reps)
        if qk.x_proj_applies(b, e, length, n_out):
            row["split"] = qk.gemm.x_proj_split(b, e, length)
            row["kernel"] = 1e3 * time_kernel(_x_proj_call(b, length, e, rank, True), nbytes, reps)
        row["layers_use_kernel"] = qk.x_proj_preferred(b, e, length, n_out)
        _print_row(row)
        results.append(row)
    return results


# dt_proj of each model size (B, L, N = d_inner, K = dt_rank) for --dt-proj; the last has odd L.
DT_PROJ_SHAPES = [
    (1, 1024, 5120, 160),
    (1, 2048, 5120, 160),
    (16, 1024, 5120, 160),
    (8, 2048, 5120, 160),
    (16, 1024, 4096, 128),
    (64, 90, 1536, 48),
]


def _dt_proj_call(b, length, n, k, impl):
    import quamba_kernels as qk

    def make(_):
        x, w = _int8(b, length, k), _int8(n, k)
        return lambda: qk.int8_linear(x, w, 0.0173, 0.0031, 0.04, "half_away", layout="seq_last",
                                      impl=impl)  # fmt: skip

    return make


def dt_proj_table(reps: int) -> list[dict]:
    """dt_proj (sequence-last INT8 output) on the tiled, wgmma and short-K kernels beside cuBLAS
    FP16, with scales whose combined factor has no small-denominator structure (a factor like
    0.02 * 0.003 / 0.05 = 3 / 2500 makes exact ties, ~4e-4 of the codes, which the epilogues hand
    to the exact conversion)."""
    import quamba_kernels as qk

    results = []
    for b, length, n, k in DT_PROJ_SHAPES:
        m = b * length
        nbytes = m * k + n * k + m * n
        row = {"B": b, "L": length, "N": n, "K": k}
        for impl in ("tiled", "wgmma", "short_k"):
            if impl != "wgmma" or qk.gemm.wgmma_applies(m, n, k):
                row[impl] = 1e3 * time_kernel(_dt_proj_call(b, length, n, k, impl), nbytes, reps)
        row["fp16 cuBLAS"] = 1e3 * time_kernel(_fp16_linear_call(m, n, k), 2 * nbytes, reps)
        _print_row(row)
        results.append(row)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="sanitizer workload, no timing")
    parser.add_argument("--dt-proj", action="store_true", help="dt_proj kernels side by side")
    parser.add_argument("--x-proj", action="store_true", help="x_proj: generic path vs kernel")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.sweep:
        sweep()
        return 0
    reps = 10 if args.quick else 30
    if args.dt_proj:
        device = torch.cuda.get_device_name()
        payload = {"device": device, "dt_proj": dt_proj_table(reps)}
        write_result(payload, "bench_gemm_dt_proj.json", args.json)
        return 0
    if args.x_proj:
        payload = {"device": torch.cuda.get_device_name(), "x_proj": x_proj_table(reps)}
        write_result(payload, "bench_gemm_x_proj.json", args.json)
        return 0
    bandwidth = copy_bandwidth(reps) * 1e9
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {bandwidth / 1e9:.0f} GB/s")
    print(f"{'layer':9} {'M':>6} {'N':>6} {'K':>5} {'impl':16} {'µs':>9} {'GB/s':>7} "
          f"{'TOPS':>7} {'% floor':>8} {'vs fp16':>8}")  # fmt: skip
    results = []
    for name, (n, k, output) in LAYERS.items():
        for m in ROWS:
            rows = bench_layer(name, m, n, k, output, bandwidth, reps)
            fp16_ms = rows[-1][5]
            for layer, mm, nn, kk, impl, ms, nbytes, ops, floor in rows:
                gbs = nbytes / (ms * 1e-3) / 1e9
                tops = ops / (ms * 1e-3) / 1e12
                print(f"{layer:9} {mm:6d} {nn:6d} {kk:5d} {impl:16} {ms * 1e3:9.1f} {gbs:7.0f} "
                      f"{tops:7.1f} {100 * floor / ms:7.0f}% {fp16_ms / ms:7.2f}x")  # fmt: skip
                results.append(
                    {"layer": layer, "M": mm, "N": nn, "K": kk, "impl": impl, "us": ms * 1e3,
                     "GBps": gbs, "TOPS": tops, "floor_us": floor * 1e3, "vs_fp16": fp16_ms / ms}
                )  # fmt: skip
    payload = {"device": device, "copy_GBps": bandwidth / 1e9, "results": results}
    write_result(payload, "bench_gemm.json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
