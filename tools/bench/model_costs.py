"""What each kind of kernel costs inside a graphed W8A8 prefill or decode step (GPU machine,
timing only).

The random-weight W8A8 model of tools/bench/e2e.py (Mode 0, calibrated-looking scales) runs one
prefill (or, with --phase decode, one decode step after a prefill) eagerly while every call of
the kernel backend's ops is recorded; then the same is captured in a CUDA graph and replayed,
once whole and once per kind of call with that kind replaced by its recorded outputs (the
kernels are not launched; everything else is). The difference is the kind's cost in the model:
with programmatic dependent launch a kernel's blocks wait for their predecessor, so a profiler's
span overstates it, and a kernel timed alone misses what its neighbours do to it. The outputs of
a run with replaced calls are not meaningful (nor are the decode states it leaves); only the
times are. Every call's output is kept for the replays: tens of GB at 2.8B batch-16 prefill.

Kinds: each KernelBackend op (prefill: scan, Hadamard, norm, conv, x_proj; decode: norm, conv
update, scan step with dt_proj, Hadamard; both: the FP16 lm_head), with the W8A8 GEMMs told apart
by shape: in_proj (or its two halves for more than one sequence in a prefill), dt_proj, out_proj,
x_proj's GEMM (decode, and the generic prefill path). Decode rows also carry the step's floor:
the bytes it must move (e2e.py's: weights but the embedding, the state read and written) over
the copy bandwidth measured in the run.

Usage: python3 tools/bench/model_costs.py [--sizes 2.8b] [--batches 1] [--prompt 1024]
       [--phase prefill|decode|both] [--reps 7] [--json PATH]   (writes $OUT/model_costs.json
       with OUT)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import copy_bandwidth, write_result
from e2e import decode_floor_ms, state_bytes, w8a8_model, weight_bytes  # first: sets sys.path

import quamba_kernels
from quamba_layers.config import MambaConfig
from quamba_layers.quant.kernel_backend import KernelBackend

OPS = (
    "selective_scan_int8",
    "hadamard",
    "rmsnorm",
    "conv1d_int8",
    "x_proj",
    "w8a8_linear",
    "conv1d_int8_update",
    "selective_scan_step",
    "selective_scan_step_dt_proj",
    "lm_head_fp16",
)


def gemm_kind(cfg: MambaConfig, w_q) -> str:
    """Which projection a W8A8 GEMM of `cfg` is, from its weight's shape (N, K). x_proj's GEMM
    runs here only on the generic x_proj path (its time is also inside "x_proj")."""
    n, k = w_q.shape
    d_inner = cfg.expand * cfg.d_model
    if k == d_inner:
        return "out_proj" if n == cfg.d_model else "x_proj's GEMM"
    if k == cfg.d_model:
        return "in_proj" if n == 2 * d_inner else "in_proj half"
    return "dt_proj"


class Recorder:
    """Wraps KernelBackend's ops: records every call's output by kind, or replays them for the
    kind being left out (outputs handed back in the recorded order)."""

    def __init__(self, cfg: MambaConfig):
        self.cfg, self.recording, self.left_out = cfg, False, None
        self.outputs: dict[str, list] = {}
        self.next: dict[str, int] = {}
        self.originals = {name: getattr(KernelBackend, name) for name in OPS}

    def install(self) -> None:
        for name in OPS:
            setattr(KernelBackend, name, self._wrap(name))

    def uninstall(self) -> None:
        for name, op in self.originals.items():
            setattr(KernelBackend, name, op)

    def _wrap(self, name: str):
        op = self.originals[name]

        def call(backend, *args, **kwargs):
            kind = gemm_kind(self.cfg, args[1]) if name == "w8a8_linear" else name
            if kind == self.left_out:
                outputs = self.outputs[kind]
                out = outputs[self.next[kind] % len(outputs)]
                self.next[kind] += 1
                return out
            out = op(backend, *args, **kwargs)
            if self.recording:
                self.outputs.setdefault(kind, []).append(out)
            return out

        return call


@torch.no_grad()
def measure(
    size: str,
    batch: int,
    prompt: int,
    reps: int,
    gen: torch.Generator,
    phase: str = "prefill",
    bandwidth: float | None = None,
) -> list[dict]:
    """Rows of one model, batch and phase ("prefill": the prompt; "decode": one token after it).
    ``bandwidth`` (bytes/s, decode): the copy bandwidth the step's floor is computed with."""
    cfg = MambaConfig.from_preset(size)
    model = w8a8_model(cfg, gen)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda", generator=gen)
    repeat = 1  # runs per graph replay: ten decode steps, for the timer's resolution
    if phase == "decode":
        _, state = model.prefill(ids, last_only=True)
        token = torch.randint(0, cfg.vocab_size, (batch,), device="cuda", generator=gen)
        repeat = 10

        def run():
            model.step(token, state)  # the states are updated in place (graph capture)
    else:

        def run():
            model.prefill(ids, last_only=True)

    recorder = Recorder(cfg)
    recorder.install()
    try:
        recorder.recording = True
        run()
        recorder.recording = False

        def graphed_ms(left_out: str | None) -> float:
            recorder.left_out = left_out
            recorder.next = dict.fromkeys(recorder.outputs, 0)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(repeat):
                    run()
            recorder.left_out = None
            graph.replay()
            times = []
            for _ in range(reps):
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / repeat)
            return statistics.median(times)

        whole = graphed_ms(None)
        extra = {"prefill_ms": whole}
        if phase == "decode":
            floor = decode_floor_ms(weight_bytes(model), state_bytes(state), bandwidth)
            extra = {"step_ms": whole, "floor_ms": floor}
        rows = []
        for kind in sorted(recorder.outputs):
            cost = whole - graphed_ms(kind)
            calls = len(recorder.outputs[kind])
            rows.append({"model": size, "batch": batch, "prompt": prompt, "phase": phase,
                         "kind": kind, "calls": calls, "ms_in_model": cost,
                         "us_per_call": 1e3 * cost / calls, **extra})  # fmt: skip
        return rows
    finally:
        recorder.uninstall()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2.8b")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--phase", choices=("prefill", "decode", "both"), default="prefill")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    quamba_kernels.set_programmatic_launch(True)  # as the models run
    gen = torch.Generator(device="cuda").manual_seed(0)
    phases = ("prefill", "decode") if args.phase == "both" else (args.phase,)
    bandwidth = copy_bandwidth(10) * 1e9 if "decode" in phases else None
    rows = []
    for size in args.sizes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for phase in phases:
                got = measure(size, batch, args.prompt, args.reps, gen, phase, bandwidth)
                if phase == "decode":
                    print(f"{size} batch {batch}, decode after {args.prompt} tokens: graphed step "
                          f"{got[0]['step_ms']:.3f} ms, floor {got[0]['floor_ms']:.3f} ms")  # fmt: skip
                else:
                    print(f"{size} batch {batch} x {args.prompt}: graphed prefill "
                          f"{got[0]['prefill_ms']:.2f} ms")  # fmt: skip
                _print_rows(got)
                rows += got
    payload = {"kind": "model_costs", "device": torch.cuda.get_device_name(), "rows": rows}
    if bandwidth is not None:
        payload["copy_GBps"] = bandwidth / 1e9
    write_result(payload, "model_costs.json", args.json)
    return 0


def _print_rows(got: list[dict]) -> None:
    for r in got:
        print(f"  {r['kind']:<28}{r['ms_in_model']:8.3f} ms ({r['calls']} calls, "
              f"{r['us_per_call']:.1f} us each)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
