"""Layer comparison: every layer's output (and, with ``stages``, every stage of the block) of each
mode against a reference, in one pass per mode, streaming the metrics (no tensor is kept).

Values are compared in the float model's basis: INT8 codes are dequantized with their scale; a
quantized model's residual stream is rotated by Q (its Hadamard), so its layer outputs are rotated
back with Q^T; its out_proj input is H·y (the online Hadamard), so the float reference's y is
rotated forward with the same H. This needs the rotation of *this package's* pipeline: compare
legacy checkpoints against quantized modes, not against the float model.

Stages: ``layer`` (mixer output), ``conv_out``, ``ssm_in``, ``ssm_out`` (after the gate),
``out_proj_in``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quamba_eval.layer_metrics import StreamingErrorStats, rate
from quamba_layers.io_utils import atomic_write, atomic_write_json, atomic_write_text

STAGE_NAMES = ("conv_out", "ssm_in", "ssm_out", "out_proj_in")

Capture = dict[tuple[int, str], torch.Tensor]


def _residual_rotation(cfg) -> torch.Tensor | None:
    if not cfg.online_hadamard:
        return None
    from quamba_layers.hadamard import hadamard_matrix

    return (hadamard_matrix(cfg.d_model, dtype=torch.float64) / math.sqrt(cfg.d_model)).float()


def _online_rotation(d_inner: int) -> torch.Tensor:
    from quamba_layers.hadamard import hadamard_matrix

    return (hadamard_matrix(d_inner, dtype=torch.float64) / math.sqrt(d_inner)).float()


@torch.no_grad()
def capture_float(model, tokens: torch.Tensor, stages: bool, online_hadamard: bool) -> Capture:
    """Layer outputs (and stages) of the float MambaLM, as float32 (B, L, ·) tensors."""
    out: Capture = {}
    patched = []
    for index, block in enumerate(model.backbone.layers):
        mixer = block.mixer

        def conv(x, conv_state=None, _i=index, _m=mixer):
            u, state = type(_m).conv(_m, x, conv_state)
            if stages:
                out[(_i, "conv_out")] = u.float().transpose(1, 2)
                out[(_i, "ssm_in")] = u.float().transpose(1, 2)
            return u, state

        def gate(y, z, _i=index, _m=mixer):
            gated = type(_m).gate(_m, y, z)
            if stages:
                out[(_i, "ssm_out")] = gated.float()
                rot = _online_rotation(gated.shape[-1]) if online_hadamard else None
                out[(_i, "out_proj_in")] = (
                    gated.float() @ rot.t() if rot is not None else gated.float()
                )
            return gated

        def project_out(y, _i=index, _m=mixer):
            result = type(_m).project_out(_m, y)
            out[(_i, "layer")] = result.float()
            return result

        mixer.conv, mixer.gate, mixer.project_out = conv, gate, project_out
        patched.append(mixer)
    try:
        model(tokens)
    finally:
        for mixer in patched:
            for name in ("conv", "gate", "project_out"):
                delattr(mixer, name)
    return out


@torch.no_grad()
def capture_quantized(qmodel, tokens: torch.Tensor, stages: bool) -> Capture:
    """Layer outputs (and stages) of a quantized model in the float model's basis."""
    from quamba_modes.probes import StageProbe

    out: Capture = {}
    rotation = _residual_rotation(qmodel.cfg)

    def record(layer: int, stage: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            return
        s = qmodel.mixers[layer].scales()
        if stage == "out_proj_out":
            v = value.float()
            out[(layer, "layer")] = v @ rotation.t() if rotation is not None else v
        elif stages and stage in ("conv_out", "ssm_in"):
            v = value.float() * s["s_u"] if value.dtype == torch.int8 else value.float()
            out[(layer, stage)] = v.transpose(1, 2)
        elif stages and stage == "ssm_out":
            out[(layer, stage)] = value.float()
        elif stages and stage == "out_proj_in":
            out[(layer, stage)] = value.float() * s["s_had"]

    wanted = ["out_proj_out"] + (["conv_out", "ssm_in", "ssm_out", "out_proj_in"] if stages else [])
    with StageProbe(qmodel, stages=wanted, on_record=record):
        qmodel(tokens)
    return out


@dataclass
class ComparisonResult:
    reference: str
    stats: dict[str, dict[tuple[int, str], StreamingErrorStats]] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        report = {}
        for mode, per_site in self.stats.items():
            entries = {}
            for (layer, stage), st in sorted(per_site.items()):
                result = st.to_dict()
                values = st.result()
                entries[f"layer_{layer}.{stage}"] = {
                    "metrics": _json_safe(values),
                    "rating": rate(values),
                    "state": result,
                }
            report[mode] = entries
        return report

    def to_json(self) -> dict:
        return {"reference": self.reference, "modes": self.metrics(), "provenance": self.provenance}


def _json_safe(values: dict) -> dict:
    safe = {}
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            safe[key] = str(value)
        elif isinstance(value, dict):
            safe[key] = _json_safe(value)
        else:
            safe[key] = value
    return safe


def compare_layers(
    reference: Callable[[torch.Tensor], Capture],
    modes: dict[str, Callable[[torch.Tensor], Capture]],
    windows: Iterable[torch.Tensor],
    reference_name: str,
    save: Callable[[str, Capture], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ComparisonResult:
    """For each window: one reference pass and one pass per mode, folded into streaming stats."""
    result = ComparisonResult(reference=reference_name)
    for mode in modes:
        result.stats[mode] = {}
    for index, tokens in enumerate(windows):
        ref = reference(tokens)
        if save is not None:
            save(reference_name, ref)
        for mode, capture in modes.items():
            got = capture(tokens)
            if save is not None:
                save(mode, got)
            per_site = result.stats[mode]
            for key, value in got.items():
                if key not in ref:
                    continue
                per_site.setdefault(key, StreamingErrorStats()).update(ref[key], value)
        if progress is not None:
            progress(f"window {index + 1} done")
    return result


class CaptureWriter:
    """``--save``: tensors of every pass, per mode, as safetensors (windows stacked on dim 0)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.buffers: dict[str, dict[str, list[torch.Tensor]]] = {}

    def __call__(self, name: str, capture: Capture) -> None:
        bucket = self.buffers.setdefault(name, {})
        for (layer, stage), tensor in capture.items():
            bucket.setdefault(f"layer_{layer}.{stage}", []).append(tensor.detach().cpu())

    def close(self, metadata: dict) -> list[Path]:
        from safetensors.torch import save_file

        written = []
        for name, bucket in self.buffers.items():
            tensors = {key: torch.cat(parts).contiguous() for key, parts in bucket.items()}
            path = self.directory / f"{_safe_name(name)}.safetensors"
            meta = {"run": name, "metadata": json.dumps(metadata, sort_keys=True)}
            atomic_write(path, lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
            written.append(path)
        return written


def _safe_name(name: str) -> str:
    return "mode_" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def compare_saved(reference_path: Path, other_path: Path) -> ComparisonResult:
    """Compare two ``--save`` files tensor by tensor (same keys and shapes required)."""
    from safetensors import safe_open

    with (
        safe_open(str(reference_path), "pt") as ref_file,
        safe_open(str(other_path), "pt") as other,
    ):
        ref_keys, other_keys = set(ref_file.keys()), set(other.keys())
        if ref_keys != other_keys:
            raise ValueError(
                f"{reference_path} and {other_path} hold different tensors: only in the first "
                f"{sorted(ref_keys - other_keys)[:5]}, only in the second {sorted(other_keys - ref_keys)[:5]}"
            )
        name_ref = ref_file.metadata().get("run", str(reference_path))
        name_other = other.metadata().get("run", str(other_path))
        result = ComparisonResult(reference=name_ref)
        stats: dict[tuple[int, str], StreamingErrorStats] = {}
        for key in sorted(ref_keys):
            a, b = ref_file.get_tensor(key), other.get_tensor(key)
            if a.shape != b.shape:
                raise ValueError(f"{key}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
            layer_text, stage = key.split(".", 1)
            stats[(int(layer_text.removeprefix("layer_")), stage)] = StreamingErrorStats().update(
                a, b
            )
        result.stats[name_other] = stats
    return result


def markdown_table(result: ComparisonResult) -> str:
    lines = [
        f"Reference: `{result.reference}`",
        "",
        "| mode | site | MSE | rel. MAE | Pearson | SQNR (dB) | max abs diff | identical | rating |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, per_site in result.stats.items():
        for (layer, stage), st in sorted(per_site.items()):
            m = st.result()
            lines.append(
                f"| {mode} | layer {layer} {stage} | {m['mse']:.3e} | {100 * m['relative_mae']:.3f}% | "
                f"{m['pearson']:.6f} | {m['sqnr_db']:.1f} | {m['max_abs_diff']:.3e} | "
                f"{100 * m['fraction_identical']:.2f}% | {rate(m)['overall']} |"
            )
    return "\n".join(lines) + "\n"


def plot_depth(result: ComparisonResult, path: Path, stage: str = "layer") -> Path:
    """PNG: SQNR (dB) of ``stage`` against layer depth, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, per_site in result.stats.items():
        points = sorted(
            (layer, st.result()["sqnr_db"]) for (layer, s), st in per_site.items() if s == stage
        )
        if points:
            xs, ys = zip(*points)
            ys = [min(y, 200.0) for y in ys]  # identical layers (inf dB) drawn at the top
            ax.plot(xs, ys, marker="o", label=f"mode {mode}")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"SQNR of {stage} vs {result.reference} (dB)")
    ax.set_title("Error against depth")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def write_outputs(result: ComparisonResult, directory: Path) -> dict[str, Path]:
    directory = Path(directory)
    paths = {
        "json": directory / "compare.json",
        "markdown": directory / "compare.md",
        "plot": directory / "compare_depth.png",
    }
    atomic_write_json(paths["json"], result.to_json())
    atomic_write_text(paths["markdown"], markdown_table(result))
    plot_depth(result, paths["plot"])
    return paths
