"""Markdown tables from the JSON that tools/bench/bench_gemm.py, tools/bench/e2e.py,
tools/bench/model_costs.py, tools/bench/eval_speed.py, tools/bench/persistent_decode.py and
tools/bench/persistent_decode_probe.py write (the tables in benchmarks/README.md are made with it).

Usage: python tools/bench/tables.py benchmarks/bench_gemm_h100.json benchmarks/e2e_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def provenance_line(data: dict) -> str:
    """Where the result came from (tools/bench/provenance.py); files from before it say so."""
    p = data.get("provenance")
    if not p:
        return "Sources: not recorded (a file from before tools/bench/provenance.py)."
    commit = p.get("git_commit")
    where = (
        f"commit {commit[:10]}{' with changes' if p.get('git_dirty') else ''}, " if commit else ""
    )
    return f"Sources: {where}digest {p['source_digest'][:16]}; measured {p['created_utc']}."


def _head(device_line: str, data: dict, columns: list[str]) -> list[str]:
    """A table's first lines: the device, the provenance, a blank line, the header row."""
    return [
        device_line,
        provenance_line(data),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def gemm_table(data: dict) -> str:
    lines = _head(
        f"Device: {data['device']}, copy bandwidth {data['copy_GBps']:.0f} GB/s.",
        data,
        ["layer", "M", "N", "K", "implementation", "µs", "TOPS", "% of floor", "vs cuBLAS FP16"],
    )
    for r in data["results"]:
        lines.append(
            f"| {r['layer']} | {r['M']} | {r['N']} | {r['K']} | {r['impl']} | {r['us']:.1f} | "
            f"{r['TOPS']:.1f} | {100 * r['floor_us'] / r['us']:.0f}% | {r['vs_fp16']:.2f}x |"
        )
    return "\n".join(lines)


def _pdl(row: dict) -> str:
    """Programmatic dependent launch of the row's measurement: "on", "off" or "-" (not recorded)."""
    value = row.get("programmatic_launch")
    return "-" if value is None else ("on" if value else "off")


def e2e_table(data: dict) -> str:
    lines = _head(
        f"Device: {data['device']}, copy bandwidth {data['copy_GBps']:.0f} GB/s, torch "
        f"{data.get('torch', '?')}, {data['new_tokens']} new tokens.",
        data,
        ["model", "batch", "prompt", "kind", "decode", "PDL", "TTFT ms", "TTFT graphed ms",
         "TPOT ms", "floor ms", "TPOT / floor", "peak GiB"],
    )  # fmt: skip
    # Rows of full measurements (e2e.py --l2-prefetch rows carry a TPOT only; older files have
    # no programmatic_launch field: their launches were ordinary; none before session 23 has a
    # decode field: the W8A8 step was the per-op one).
    rows = [r for r in data["rows"] if "ttft_ms" in r]
    for r in rows:
        pdl = _pdl(r)
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['kind']} | "
            f"{r.get('decode', '-')} | {pdl} | "
            f"{r['ttft_ms']:.2f} | "
            f"{r.get('ttft_graph_ms', float('nan')):.2f} | {r['tpot_ms']:.3f} | "
            f"{r['floor_ms']:.3f} | {r['tpot_ms'] / r['floor_ms']:.2f} | {r['peak_GiB']:.2f} |"
        )
    lines += [
        "",
        "| model | batch | prompt | W8A8 decode | PDL | prefill speed-up | (graphed) | "
        "decode speed-up | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp16 = {(r["model"], r["batch"], r["prompt"], _pdl(r)): r for r in rows if r["kind"] == "fp16"}
    for q in rows:
        model, batch, prompt, pdl = q["model"], q["batch"], q["prompt"], _pdl(q)
        f = fp16.get((model, batch, prompt, pdl))
        if q["kind"] != "w8a8" or f is None:
            continue
        graphed = f.get("ttft_graph_ms", float("nan")) / q.get("ttft_graph_ms", float("nan"))
        lines.append(
            f"| {model} | {batch} | {prompt} | {q.get('decode', '-')} | {pdl} | "
            f"{f['ttft_ms'] / q['ttft_ms']:.2f}x | "
            f"{graphed:.2f}x | {f['tpot_ms'] / q['tpot_ms']:.2f}x | "
            f"{q['peak_GiB'] / f['peak_GiB']:.2f}x |"
        )
    return "\n".join(lines)


def probe_table(data: dict) -> str:
    """persistent_decode_probe.py: µs per layer of each structure against the weight floor."""
    lines = _head(
        f"Device: {data['device']} ({data['sms']} SMs), read bandwidth {data['read_gbs']:.0f} GB/s, "
        f"copy {data['copy_gbs']:.0f} GB/s.",
        data,
        ["model", "mode", "sync", "chain", "in flight", "µs per layer", "floor µs", "/ floor",
         "consumers waiting for stages", "in boundaries"],
    )  # fmt: skip
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['sync']} | {r['chain']} | {r['inflight']} | "
            f"{r['us_per_layer']:.2f} | {r['floor_us']:.2f} | "
            f"{r['us_per_layer'] / r['floor_us']:.2f} | {100 * r['wait_fraction']:.0f}% | "
            f"{100 * r['boundary_fraction']:.0f}% |"
        )
    return "\n".join(lines)


def costs_table(data: dict) -> str:
    """model_costs.py: each kind of kernel's time inside the graphed W8A8 prefill or decode step
    (rows without a phase: prefill, as the script wrote them before it had one)."""
    lines = _head(
        f"Device: {data['device']}.",
        data,
        ["model", "batch", "prompt", "phase", "kernel", "calls", "ms in the model",
         "µs per call", "share"],
    )  # fmt: skip
    for r in data["rows"]:
        phase = r.get("phase", "prefill")
        if phase == "decode":
            whole = f"{r['step_ms']:.3f} ms step (floor {r['floor_ms']:.3f})"
            share = 100 * r["ms_in_model"] / r["step_ms"]
        else:
            whole = f"{r['prefill_ms']:.2f} ms"
            share = 100 * r["ms_in_model"] / r["prefill_ms"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt']} | {phase} | {r['kind']} | "
            f"{r['calls']} | {r['ms_in_model']:.3f} | {r['us_per_call']:.1f} | "
            f"{share:.0f}% of {whole} |"
        )
    return "\n".join(lines)


def eval_speed_table(data: dict | list) -> str:
    """eval_speed.py: seconds of a full lambada_openai run per mode, and each mode against Mode 0
    (a bare list of rows: a file from before the script recorded its settings)."""
    if isinstance(data, list):
        data = {"device": "not recorded", "rows": data}
    settings = ", ".join(
        f"{name} {data[key]}"
        for name, key in (("documents", "documents"), ("batch", "batch_size"),
                          ("layers", "n_layer"), ("passes per mode (median)", "repeats"),
                          ("torch", "torch"))
        if key in data
    )  # fmt: skip
    passes = any("runs" in r for r in data["rows"])
    lines = _head(
        f"Device: {data['device']}{'; ' + settings if settings else ''}.",
        data,
        ["mode", "seconds", "vs mode 0", *(["passes (s)"] if passes else []), "SSM implementation"],
    )
    base = next((r["seconds"] for r in data["rows"] if r["mode"] == "0"), None)
    for r in data["rows"]:
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        runs = [" / ".join(f"{t:.2f}" for t in r.get("runs", []))] if passes else []
        lines.append(
            " | ".join(["", r["mode"], f"{r['seconds']:.2f}", ratio, *runs, r["ssm"], ""]).strip()
        )
    return "\n".join(lines)


def persistent_decode_table(data: dict) -> str:
    """persistent_decode.py: the graphed decode step per-op and persistent, and the persistent
    kernel's phases (µs per layer)."""
    lines = _head(
        f"Device: {data['device']}, copy bandwidth {data['copy_GBps']:.0f} GB/s, torch "
        f"{data.get('torch', '?')}.",
        data,
        ["model", "batch", "prompt", "per-op ms", "persistent ms", "persistent / per-op",
         "floor ms", "persistent / floor", "same logits"],
    )  # fmt: skip
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['per_op_step_ms']:.3f} | "
            f"{r['persistent_step_ms']:.3f} | {r['persistent_step_ms'] / r['per_op_step_ms']:.2f} | "
            f"{r['floor_ms']:.3f} | {r['persistent_step_ms'] / r['floor_ms']:.2f} | "
            f"{'yes' if r['same_logits'] else 'NO'} |"
        )
    # In the kernel's order (the JSON's keys are sorted): as recorded, else the kernel's list.
    phases = data.get("phase_order")
    if phases is None:
        from quamba_kernels.decode import PHASES as phases
    if data["rows"]:
        phases = [p for p in phases if p in data["rows"][0]["phases_us_per_layer"]]
    lines += ["", "| model | " + " | ".join(phases) + " |", "|---|" + "---|" * len(phases)]
    for r in data["rows"]:
        values = " | ".join(f"{r['phases_us_per_layer'][p]:.2f}" for p in phases)
        lines.append(f"| {r['model']} | {values} |")
    return "\n".join(lines)


def table_for(data) -> str | None:
    """The table for one result file's JSON, or None when it is none of the known results."""
    if isinstance(data, list):  # eval_speed.py's rows, as it wrote them before session 20
        if data and all(isinstance(r, dict) and {"mode", "seconds"} <= r.keys() for r in data):
            return eval_speed_table(data)
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("kind")
    if kind == "persistent_decode_probe":
        return probe_table(data)
    if kind == "model_costs":
        return costs_table(data)
    if kind == "eval_speed":
        return eval_speed_table(data)
    if kind == "persistent_decode":
        return persistent_decode_table(data)
    if "results" in data:
        return gemm_table(data)
    if "rows" in data:
        return e2e_table(data)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.files:
        table = table_for(json.loads(path.read_text()))
        if table is None:
            print(
                f"{path}: not a result of bench_gemm.py, e2e.py, model_costs.py, eval_speed.py, "
                "persistent_decode.py or persistent_decode_probe.py",
                file=sys.stderr,
            )
            return 2
        print(table)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
