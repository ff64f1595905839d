"""Evaluate several precision modes of one model on lm-eval tasks, with paired statistics.

One run = a reference mode (fp32 by default) and the modes asked for, each evaluated through
``lm_eval.simple_evaluate`` on the same documents. Per-sample results are kept, so every mode is
compared with the reference sample by sample (accuracy: exact McNemar; log-likelihood: Wilcoxon),
and a plain-words verdict says whether a difference is detectable at this sample size.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quamba_eval import stats
from quamba_layers.io_utils import atomic_write_json, atomic_write_text
from quamba_layers.quant.provenance import package_versions

ACCURACY_METRICS = ("acc", "acc_norm")
LOGLIK_METRICS = ("perplexity",)


@dataclass
class ModeResult:
    name: str
    description: dict
    lm_eval: dict  # lm-eval's results structure (results, configs, versions, n-samples, ...)
    samples: dict[str, list[dict]]  # task -> per-sample records (doc_id order)
    seconds: float
    fidelity: dict | None = None


@dataclass
class Run:
    reference: str
    modes: list[ModeResult] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    limit: int | None = None
    warnings: list[str] = field(default_factory=list)


def set_determinism(seed: int) -> None:
    """Same command, same bits: fixed seeds and deterministic kernels (cuBLAS workspace pinned)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def prepare_lm_eval() -> None:
    """Quiet lm-eval's logging, and compile each of its Jinja prompt templates once.

    lm-eval renders every document's prompt with ``env.from_string(template)``, recompiling the
    same template thousands of times (~6 s for 500 documents on 2 cores). Compiled templates are
    stateless, so caching them by their source text changes nothing but the time.
    """
    for name in ("lm_eval", "lm-eval", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lm_eval.utils

    env = lm_eval.utils.env
    if not hasattr(env.from_string, "cache_info"):
        env.from_string = functools.lru_cache(maxsize=512)(env.from_string)


def _per_sample(samples: list[dict], metric: str) -> list[float] | None:
    values = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        value = sample.get(metric)
        if value is None:
            return None
        if isinstance(value, (list, tuple)):  # perplexity logs the loglikelihood
            value = value[0]
        values.append(float(value))
    return values


def evaluate_mode(
    name: str,
    description: dict,
    model,
    tokenizer,
    task_manager,
    tasks: list[str],
    *,
    limit: int | None,
    batch_size: int,
    seed: int,
    device: torch.device,
    max_length: int,
) -> ModeResult:
    import lm_eval

    from quamba_eval.lm import QuambaLM

    lm = QuambaLM(model, tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    started = time.perf_counter()
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,  # stderr comes from quamba_eval.stats (deterministic, no processes)
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        verbosity="ERROR",
    )
    seconds = time.perf_counter() - started
    samples = output.pop("samples", {}) if output is not None else {}
    records = {task: [_sample_record(s) for s in rows] for task, rows in samples.items()}
    return ModeResult(name, description, _json_ready(output), records, seconds)


def _sample_record(sample: dict) -> dict:
    keep = {"doc_id": sample["doc_id"], "target": sample.get("target")}
    for key, value in sample.items():
        if key in ACCURACY_METRICS or key in LOGLIK_METRICS or key == "word_perplexity":
            keep[key] = value
    responses = sample.get("filtered_resps") or sample.get("resps")
    keep["response"] = responses
    return _json_ready(keep)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _json_ready(value.item())
    return str(value)


def summarize(run: Run) -> dict:
    """Metric summaries per mode and task, and paired comparisons against the reference."""
    reference = next(m for m in run.modes if m.name == run.reference)
    summary: dict[str, Any] = {"metrics": {}, "comparisons": {}}
    for mode in run.modes:
        per_task = {}
        for task, rows in mode.samples.items():
            entry = {}
            for metric in ACCURACY_METRICS:
                values = _per_sample(rows, metric)
                if values is not None:
                    entry[metric] = stats.metric_summary(values, "accuracy").to_dict()
            for metric in LOGLIK_METRICS:
                values = _per_sample(rows, metric)
                if values is not None:
                    entry[metric] = stats.perplexity_summary(values).to_dict()
            per_task[task] = entry
        summary["metrics"][mode.name] = per_task
    for mode in run.modes:
        if mode.name == run.reference:
            continue
        per_task = {}
        for task, rows in mode.samples.items():
            ref_rows = reference.samples.get(task)
            if ref_rows is None:
                continue
            entry = {}
            for metric in ACCURACY_METRICS:
                a, b = _per_sample(ref_rows, metric), _per_sample(rows, metric)
                if a is not None and b is not None:
                    entry[metric] = stats.paired_comparison(
                        a, b, ref_name=run.reference, other_name=mode.name
                    ).to_dict()
            for metric in LOGLIK_METRICS:
                a, b = _per_sample(ref_rows, metric), _per_sample(rows, metric)
                if a is not None and b is not None:
                    entry["loglikelihood"] = stats.paired_loglik_comparison(
                        a, b, ref_name=run.reference, other_name=mode.name
                    ).to_dict()
            per_task[task] = entry
        summary["comparisons"][mode.name] = per_task
    return summary


def results_json(run: Run, summary: dict) -> dict:
    """lm-eval's results structure (per mode), our statistics, and the provenance of the run."""
    results, configs, versions, n_samples = {}, {}, {}, {}
    for mode in run.modes:
        lm = mode.lm_eval or {}
        for task, metrics in (lm.get("results") or {}).items():
            merged = dict(metrics)
            for metric, s in summary["metrics"][mode.name].get(task, {}).items():
                merged[f"{metric}_stderr,none"] = s["stderr"]
            results[f"{task}@{mode.name}"] = merged
        configs.update(lm.get("configs") or {})
        versions.update(lm.get("versions") or {})
        n_samples.update(lm.get("n-samples") or {})
    return {
        "results": results,
        "configs": configs,
        "versions": versions,
        "n-samples": n_samples,
        "quamba": {
            "reference": run.reference,
            "modes": {m.name: m.description for m in run.modes},
            "seconds": {m.name: round(m.seconds, 3) for m in run.modes},
            "fidelity": {m.name: m.fidelity for m in run.modes if m.fidelity is not None},
            "statistics": summary,
            "limit": run.limit,
            "warnings": run.warnings,
            "provenance": run.provenance,
        },
    }


def provenance(args_dict: dict, identity: dict, device: torch.device, seed: int) -> dict:
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "arguments": args_dict,
        "model": identity,
        "device": _device_name(device),
        "seed": seed,
        "versions": package_versions(),
        "platform": platform.platform(),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_for(mode, bundle, device: torch.device, resolved, backend):
    """The model object that runs ``mode`` (float copies for fp16, the routed W8A8 model)."""
    if mode.kind == "float":
        dtype = torch.float16 if mode.float_dtype == "float16" else torch.float32
        base = bundle.float_model
        if base is None:
            return bundle.float_in(dtype, device)
        model = copy.deepcopy(base) if dtype != torch.float32 else base
        model = model.to(device=device, dtype=dtype)
        # Where the quantized modes run kernels, the float references do too (norms, convs and
        # the exact scan, bit-identical to the PyTorch scan); model.implementations() is
        # recorded with the mode's results.
        return model.use_kernels(
            "auto" if backend.name == "kernel" else "reference", exact_scan=True
        )
    if bundle.quantized is None:
        raise ValueError(f"mode {mode.name} needs a quantized model")
    qmodel = bundle.quantized.to(device)
    qmodel.set_datapath(resolved.datapath, backend)
    return qmodel


def write_outputs(run: Run, summary: dict, report: str, directory: Path) -> list[Path]:
    directory = Path(directory)
    paths = [directory / "results.json", directory / "report.md"]
    atomic_write_json(paths[0], results_json(run, summary))
    atomic_write_text(paths[1], report)
    for mode in run.modes:
        for task, rows in mode.samples.items():
            path = directory / f"samples_{task}_{mode.name}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            paths.append(path)
    return paths
