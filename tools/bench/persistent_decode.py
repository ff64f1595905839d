"""The persistent W8A8 decode kernel against the per-op decode step (GPU machine, batch 1).

For each size (random weights in the real layouts, as tools/bench/e2e.py builds them; a prompt of
--prompt tokens), side by side in one run: the graph-replayed decode step with
``decode_kernel = "per_op"`` and with ``"auto"`` (quamba_kernels.W8A8DecodeKernel), whether they
give the same logits token after token, the step's floor (e2e.decode_floor_ms), and where the
persistent kernel spends a layer: each phase's share of its first consumer thread's cycles
(W8A8DecodeKernel(timing=True), a second kernel: the step itself is timed without the
instrumentation), scaled to that kernel's time per layer. Writes
$OUT/persistent_decode.json (or --json).

Usage: python3 tools/bench/persistent_decode.py [--sizes 2.8b,1.4b,130m] [--prompt 1024]
       [--inflight 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # beside this file; it puts the packages on sys.path
from bench_kernels import copy_bandwidth, write_result

from quamba_kernels.decode import INFLIGHT_DEFAULT, PHASES
from quamba_layers.config import MambaConfig
from quamba_layers.cuda_graph import GraphedStep


def _events_ms(fn, reps: int, inner: int) -> float:
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / inner)
    return statistics.median(times)


@torch.no_grad()
def measure(size: str, prompt: int, inflight: int, bandwidth: float, gen) -> dict:
    cfg = MambaConfig.from_preset(size)
    model = e2e.w8a8_model(cfg, gen)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device="cuda", generator=gen)
    logits, state = model.prefill(ids, last_only=True)
    first = logits[:, -1, : cfg.vocab_size].argmax(-1)
    floor = e2e.decode_floor_ms(e2e.weight_bytes(model), e2e.state_bytes(state), bandwidth)
    result = {"model": size, "batch": 1, "prompt": prompt, "inflight": inflight, "floor_ms": floor}
    tokens = {}
    for kind in ("per_op", "auto"):
        model.decode_kernel = kind
        # The step is timed without the phase instrumentation (a clock read and a shared-memory
        # update by thread 0 in every phase); the phases come from a second, timed kernel.
        model.decode_kernel_options = {"inflight": inflight}
        graphed = GraphedStep(model.step, first, [tuple(t.clone() for t in s) for s in state])
        nxt, seq = first, []
        for _ in range(8):
            out = graphed(nxt)
            seq.append(out.clone())
            nxt = out[:, : cfg.vocab_size].argmax(-1)
        tokens[kind] = seq
        name = "persistent" if kind == "auto" else "per_op"
        result[f"{name}_step_ms"] = _events_ms(functools.partial(graphed, nxt), reps=5, inner=32)
        graphed = None  # free its buffers before the next capture
        if kind == "auto":
            model.decode_kernel_options = {"inflight": inflight, "timing": True}
            timed_state = [tuple(t.clone() for t in s) for s in state]
            model.step(first, timed_state)  # builds the timed kernel on these tensors
            kernel = timed_state[0][0]._quamba_decode_kernel
            hidden = model.backbone.embed(nxt).half()
            kernel_ms = _events_ms(functools.partial(kernel, hidden), reps=5, inner=8)
            cycles = kernel.phase_cycles().double()  # (blocks, phases), the last call
            share = cycles.mean(0) / cycles.mean(0).sum()
            per_layer_us = 1e3 * kernel_ms / cfg.n_layer
            result["timed_kernel_ms"] = kernel_ms
            result["phases_us_per_layer"] = {
                phase: float(s * per_layer_us) for phase, s in zip(PHASES, share.tolist())
            }
            kernel = timed_state = None
    result["same_logits"] = all(torch.equal(a, b) for a, b in zip(tokens["per_op"], tokens["auto"]))
    del model
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2.8b,1.4b,130m")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--inflight", type=int, default=INFLIGHT_DEFAULT)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    bandwidth = copy_bandwidth(10) * 1e9
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for size in args.sizes.split(","):
        row = measure(size, args.prompt, args.inflight, bandwidth, gen)
        rows.append(row)
        print(f"{size}: per-op {row['per_op_step_ms']:.3f} ms, persistent "
              f"{row['persistent_step_ms']:.3f} ms per token (floor {row['floor_ms']:.3f}), "
              f"same logits: {row['same_logits']}", flush=True)  # fmt: skip
        print("  µs per layer: " + ", ".join(
            f"{p} {v:.2f}" for p, v in row["phases_us_per_layer"].items()), flush=True)  # fmt: skip
    payload = {"kind": "persistent_decode", "device": torch.cuda.get_device_name(),
               "copy_GBps": bandwidth / 1e9, "torch": torch.__version__,
               "phase_order": list(PHASES), "rows": rows}  # fmt: skip
    write_result(payload, "persistent_decode.json", args.json)
    return 0 if all(r["same_logits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
