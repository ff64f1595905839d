"""End-to-end generation speed: FP16 vs W8A8 Mode 0, side by side in one run (GPU machine).

Random weights in the real layouts and sizes (Mamba 130m / 1.4b / 2.8b), batch 1 and 16, prompts
of 1024 and 2048 tokens, 128 new tokens (greedy). Both models run their CUDA kernels
(FP16: quamba-kernels float kernels + cuBLAS FP16 GEMMs; W8A8: INT8 kernels, INT8 GEMMs) and
decode through a CUDA graph (quamba_layers.cuda_graph.GraphedStep).

- TTFT: prefill of the prompt + lm_head on the last position + argmax (median of --reps), run
  eagerly as generate() does, and replayed from a CUDA graph ("graphed": the GPU's own time).
- TPOT: mean time per token of 128 graph-replayed decode steps, argmax fed back on the GPU.
- peak: torch.cuda.max_memory_allocated over prefill + decode (weights included), less what was
  allocated before the model was built (whatever earlier sizes left behind is not counted).
- floor: bytes one decode step must move (weights once, except the embedding rows; the
  recurrent state read and written) / the device-to-device copy bandwidth measured in the run.

Models are built one at a time (peak memory is the model's own). --profile prints where a
prefill and a decode step of the last size spend their GPU time, per kernel.
--programmatic-launch both measures every configuration with programmatic dependent launch
(quamba_kernels.set_programmatic_launch) on and off, side by side. --decode-kernel picks the W8A8
decode step (QuantizedMambaLM.decode_kernel; "auto", the default, runs the persistent kernel at
batch 1 where the device takes it); both measures "auto" and "per_op" side by side wherever they
differ; each row records the step it ran ("decode": persistent / per_op). The W8A8 model's scales are
plausible calibrated values (w8a8_model); --round-scales gives the round ones used until session 15.

Usage: python3 tools/bench/e2e.py [--sizes 130m,1.4b,2.8b] [--batches 1,16] [--prompts 1024,2048]
       [--new-tokens 128] [--reps 3] [--profile] [--programmatic-launch on|off|both]
       [--decode-kernel auto|per_op|both] [--round-scales] [--json PATH]
       (writes $OUT/e2e.json with OUT)
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for package in ("quamba-layers", "quamba-modes", "quamba-kernels"):
    sys.path.append(str(ROOT / "packages" / package / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import copy_bandwidth, write_result  # noqa: E402

import quamba_kernels  # noqa: E402
from quamba_layers.config import MambaConfig  # noqa: E402
from quamba_layers.cuda_graph import GraphedStep  # noqa: E402
from quamba_layers.model import MambaLM  # noqa: E402
from quamba_layers.quant import QuantRecipe, select_backend  # noqa: E402
from quamba_layers.quant.modules import SCALE_NAMES, QuantizedMambaLM  # noqa: E402
from quamba_layers.quant.quantize import quantized_config_for  # noqa: E402
from quamba_modes import resolve_mode  # noqa: E402


def fp16_model(cfg: MambaConfig, gen: torch.Generator) -> MambaLM:
    """Random FP16 weights drawn on the GPU (mamba_ssm-like magnitudes), kernel path on."""
    model = MambaLM(cfg, seed=None, device="meta", dtype=torch.float16)
    model = model.to_empty(device="cuda").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(
                    torch.log(torch.arange(1, p.shape[1] + 1, device="cuda").float()).expand_as(p)
                )
            elif name.endswith(".D") or "norm" in name:
                p.fill_(1.0)
            elif name.endswith("dt_proj.bias"):
                p.fill_(math.log(math.expm1(0.01)))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.use_kernels("kernel")


def w8a8_model(
    cfg: MambaConfig, gen: torch.Generator, round_scales: bool = False
) -> QuantizedMambaLM:
    """Random INT8 weights and plausible per-tensor scales in the Quamba1 layout, Mode 0.

    Calibrated scales (max |x| / 127) are arbitrary floats, so each round value below is moved by
    a seeded random factor in [1, 1.25) (``round_scales=True`` keeps them round, as until session
    15). Round scales multiply to exact fractions (dt_proj's combined factor 0.02 * 0.002 / 0.01 =
    1/250: an accumulator that is an odd multiple of 125, about 1 in 250, is an exact rounding
    tie), which send many more codes down the epilogues' exact path than calibrated scales do
    (dt_proj at 1.4B, batch 16 x 1024: 125 against 92 us; benchmarks/README.md, session 15)."""
    # The Quamba1 recipe's structure for this config (a meta-device float model allocates nothing).
    qcfg = quantized_config_for(MambaLM(cfg, seed=None, device="meta"), QuantRecipe())
    with torch.device("meta"):
        model = QuantizedMambaLM(qcfg)
    model = model.to_empty(device="cuda").eval()
    scales = {name: 0.02 for name in SCALE_NAMES}
    scales.update(s_A=math.log(16.0) / 127, s_h=0.05, s_dt=0.01, s_dtb=0.05, s_w_in=0.002,
                  s_w_x=0.002, s_w_dt=0.002, s_w_out=0.002, s_w_conv=0.01, s_b_conv=0.01)  # fmt: skip
    if not round_scales:
        for name in sorted(scales):
            jitter = float(torch.rand((), device="cuda", generator=gen))
            scales[name] *= 1.0 + 0.25 * jitter
    with torch.no_grad():
        for name, buf in model.named_buffers():
            short = name.rsplit(".", 1)[-1]
            if short in scales:
                buf.fill_(scales[short])
            elif buf.dtype == torch.int8:
                low = 0 if short == "A_log" else -128
                buf.copy_(torch.randint(low, 128, buf.shape, device="cuda", generator=gen))
            elif "norm" in name:
                buf.fill_(1.0)
            else:
                buf.normal_(0.0, 0.02, generator=gen)
        for mixer in model.mixers:
            mixer.invalidate_scales()
    backend = select_backend("cuda", "kernel")
    resolved = resolve_mode("0", device="cuda", kernels_available=True,
                            backend_implementations=backend.implementations())  # fmt: skip
    model.set_datapath(resolved.datapath, backend)
    return model


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: all but the embedding table (B rows)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * t.element_size() for n, t in tensors if "embedding" not in n)


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for layer in state for t in layer)


def decode_floor_ms(weights: int, state: int, bandwidth: float) -> float:
    """The floor of one decode step: its weight bytes once and its state read and written, at
    ``bandwidth`` (bytes/s)."""
    return (weights + 2 * state) / bandwidth * 1e3


class Runner:
    """prefill(ids) -> (last logits (B, V), state); step(tokens, state) -> (logits, state)."""

    def __init__(self, kind: str, model):
        self.kind, self.model = kind, model

    def prefill(self, ids):
        if self.kind == "fp16":
            hidden, state = self.model.backbone(ids)
            return self.model.lm_head(hidden[:, -1]).float(), state
        logits, state = self.model.prefill(ids, last_only=True)
        return logits[:, -1], state

    @property
    def step(self):
        return self.model.step_unchecked if self.kind == "fp16" else self.model.step


def _time(fn) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


@torch.no_grad()
def measure(runner: Runner, batch: int, prompt: int, new_tokens: int, reps: int, vocab: int):
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    # Free what earlier measurements left (their graphs and states) before the peak is reset.
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = {}

    def first_token():
        logits, state = runner.prefill(ids)
        result["state"] = state
        result["next"] = logits[:, :vocab].argmax(-1)

    first_token()  # warm-up (cuBLAS heuristics, allocator)
    ttft = statistics.median(_time(first_token) for _ in range(reps))
    graphed = GraphedStep(runner.step, result["next"], result["state"])

    def decode():
        nxt = result["next"]
        for _ in range(new_tokens):
            nxt = graphed(nxt)[:, :vocab].argmax(-1)

    decode()  # warm-up
    graphed.set_state(result["state"])
    tpot = statistics.median(_time(decode) for _ in range(max(1, reps - 1))) / new_tokens
    peak = torch.cuda.max_memory_allocated()
    sbytes = state_bytes(result["state"])
    # The same prefill replayed from a CUDA graph: the GPU's own time, without the Python and
    # launch overhead of eager execution (which dominates small models and batch 1).
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            first_token()
        ttft_graph = statistics.median(_time(graph.replay) for _ in range(reps))
    except RuntimeError as error:
        print(f"  (prefill not capturable: {str(error).splitlines()[0]})")
        ttft_graph = float("nan")
    del graph

    torch.cuda.empty_cache()
    return ttft, ttft_graph, tpot, peak, sbytes


@torch.no_grad()
def profile_steps(runner: Runner, batch: int, prompt: int, vocab: int) -> None:
    """Where one prefill and one graph-less decode step spend their GPU time, per kernel."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    logits, state = runner.prefill(ids)
    nxt = logits[:, :vocab].argmax(-1)
    for _ in range(3):
        logits, state = runner.step(nxt, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.prefill(ids)
        torch.cuda.synchronize()
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    runner.prefill(ids)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\n{runner.kind} prefill, batch {batch}, prompt {prompt}: host (Python) time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    print(f"\n{runner.kind} prefill, batch {batch}, prompt {prompt}: GPU time per kernel")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
    )
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            logits, state = runner.step(nxt, state)
        torch.cuda.synchronize()
    print(f"\n{runner.kind} decode step, batch {batch}: GPU time per kernel over 20 steps")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="130m,1.4b,2.8b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompts", default="1024,2048")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="kernel time tables of a prefill and 20 decode steps (last size)",
    )
    parser.add_argument(
        "--round-scales",
        action="store_true",
        help="the W8A8 model's scales as round numbers (until session 15; see w8a8_model)",
    )
    parser.add_argument(
        "--programmatic-launch",
        choices=("on", "off", "both"),
        default="on",
        help="programmatic dependent launch of the quamba kernels (both: measure each way)",
    )
    parser.add_argument(
        "--decode-kernel",
        choices=("auto", "per_op", "both"),
        default="auto",
        help="the W8A8 model's decode_kernel (both: each, where they run different steps)",
    )
    args = parser.parse_args()
    launch_modes = {"on": [True], "off": [False], "both": [True, False]}[args.programmatic_launch]
    decode_kernels = ["auto", "per_op"] if args.decode_kernel == "both" else [args.decode_kernel]
    torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth = copy_bandwidth(10) * 1e9
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    header = (f"{'model':6} {'B':>3} {'prompt':>6} {'kind':5} {'decode':10} {'PDL':>3} {'TTFT ms':>9} "
              f"{'graphed':>9} {'TPOT ms':>8} "
              f"{'floor ms':>8} {'TPOT/floor':>10} {'peak GiB':>8}")  # fmt: skip
    rows, lines = [], []

    def report(line: str) -> None:  # printed now, and again in the summary at the end
        lines.append(line)
        print(line, flush=True)

    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = [int(p) for p in args.prompts.split(",")]
    for size in args.sizes.split(","):
        cfg = MambaConfig.from_preset(size)
        got = {}
        # One model on the GPU at a time, so that peak memory is that model's alone.
        w8a8 = functools.partial(w8a8_model, round_scales=args.round_scales)
        for kind, build in (("fp16", fp16_model), ("w8a8", w8a8)):
            gc.collect()
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated()  # not this model's: subtracted from peaks
            t0 = time.time()
            model = build(cfg, gen)
            weights = weight_bytes(model)
            print(f"built {size} {kind} in {time.time() - t0:.1f} s "
                  f"({baseline / 2**30:.2f} GiB allocated before it)", flush=True)  # fmt: skip
            runner = Runner(kind, model)
            for batch in batches:
                # The decode steps this batch runs under --decode-kernel (FP16: its per-op step).
                steps = {"per_op": "per_op"}
                if kind == "w8a8":
                    steps = {}
                    for setting in decode_kernels:
                        model.decode_kernel = setting
                        steps.setdefault(model.decode_implementation(batch), setting)
                for step_name, setting in steps.items():
                    if kind == "w8a8":
                        model.decode_kernel = setting
                    for prompt in prompts:
                        for pdl in launch_modes:
                            quamba_kernels.set_programmatic_launch(pdl)
                            ttft, ttft_graph, tpot, peak, sbytes = measure(
                                runner, batch, prompt, args.new_tokens, args.reps, cfg.vocab_size
                            )
                            peak -= baseline
                            floor = decode_floor_ms(weights, sbytes, bandwidth)
                            timed = (ttft, tpot, peak, ttft_graph)
                            got[kind, step_name, batch, prompt, pdl] = timed
                            rows.append({"model": size, "batch": batch, "prompt": prompt,
                                         "kind": kind, "decode": step_name,
                                         "programmatic_launch": pdl, "ttft_ms": ttft,
                                         "ttft_graph_ms": ttft_graph, "tpot_ms": tpot,
                                         "floor_ms": floor, "peak_GiB": peak / 2**30,
                                         "weight_bytes": weights, "state_bytes": sbytes})  # fmt: skip
                            line = (f"{size:6} {batch:3d} {prompt:6d} {kind:5} {step_name:10} "
                                    f"{'on' if pdl else 'off':>3} {ttft:9.2f} {ttft_graph:9.2f} "
                                    f"{tpot:8.3f} {floor:8.3f} {tpot / floor:10.2f} "
                                    f"{peak / 2**30:8.2f}")  # fmt: skip
                            report(line)
                        quamba_kernels.set_programmatic_launch(True)
            if args.profile and size == args.sizes.split(",")[-1]:
                profile_steps(runner, batches[0], prompts[0], cfg.vocab_size)
            del model, runner
            gc.collect()
            torch.cuda.empty_cache()
        for batch in batches:
            for prompt in prompts:
                for pdl in launch_modes:
                    f = got["fp16", "per_op", batch, prompt, pdl]
                    for step_name in ("persistent", "per_op"):
                        q = got.get(("w8a8", step_name, batch, prompt, pdl))
                        if q is None:
                            continue
                        ratio = (f"{size:6} {batch:3d} {prompt:6d} PDL {'on' if pdl else 'off':3} "
                                 f"W8A8 ({step_name} decode) vs FP16: prefill {f[0] / q[0]:.2f}x "
                                 f"(graphed {f[3] / q[3]:.2f}x), decode {f[1] / q[1]:.2f}x, "
                                 f"peak memory {q[2] / f[2]:.2f}x")  # fmt: skip
                        report(ratio)
                if len(launch_modes) == 2:
                    measured = dict.fromkeys(k[:2] for k in got if k[2:4] == (batch, prompt))
                    for kind, step_name in measured:
                        on = got[kind, step_name, batch, prompt, True]
                        off = got[kind, step_name, batch, prompt, False]
                        effect = (f"{size:6} {batch:3d} {prompt:6d} {kind} ({step_name} decode) "
                                  f"PDL on vs off: TPOT {off[1] / on[1]:.2f}x faster, graphed "
                                  f"prefill {off[3] / on[3]:.2f}x")  # fmt: skip
                        report(effect)
    print("\n" + header)
    print("\n".join(lines))
    payload = {"device": device, "copy_GBps": bandwidth / 1e9, "new_tokens": args.new_tokens,
               "w8a8_scales": "round" if args.round_scales else "jittered",
               "torch": torch.__version__, "build": quamba_kernels.build_info(), "rows": rows}  # fmt: skip
    write_result(payload, "e2e.json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
