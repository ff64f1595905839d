"""W8A8 checkpoints: ``model.safetensors`` + ``config.json`` (atomic writes; loading needs no GPU).

config.json: {"format": "quamba-w8a8", "format_version": 1, "config": QuantizedConfig,
"provenance": {source model identity and hash, recipe, calibration identity and hash, versions}}.
Loading checks every tensor's name, shape and dtype against the config and every scale's value,
and refuses mismatches with a message naming them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quamba_layers.io_utils import atomic_write, atomic_write_json
from quamba_layers.quant.modules import QuantizedConfig, QuantizedMambaLM

FORMAT = "quamba-w8a8"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_quantized(model: QuantizedMambaLM, directory: str | Path) -> Path:
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(
        directory / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT})
    )
    atomic_write_json(
        directory / CONFIG,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.cfg.to_dict(),
            "provenance": model.provenance,
        },
    )
    return directory


def is_quantized_checkpoint(directory: str | Path) -> bool:
    config = Path(directory) / CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def load_quantized(directory: str | Path, device: torch.device | str = "cpu") -> QuantizedMambaLM:
    """Load a W8A8 checkpoint written by :func:`save_quantized` (CPU is enough)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a W8A8 checkpoint holds {CONFIG} and {WEIGHTS}"
            )
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{config_path} is not a {FORMAT} checkpoint (format={meta.get('format')!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version {meta.get('format_version')} is not supported "
            f"(this quamba-layers reads version {FORMAT_VERSION})"
        )
    cfg = QuantizedConfig.from_dict(meta["config"])
    model = QuantizedMambaLM(cfg)
    tensors = load_file(str(weights_path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(
            f"missing tensors: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}")
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if want.shape != got.shape or want.dtype != got.dtype:
            problems.append(
                f"{name}: expected {tuple(want.shape)} {want.dtype}, found {tuple(got.shape)} {got.dtype}"
            )
    if problems:
        raise ValueError(
            f"checkpoint {directory} does not match its config.json: " + "; ".join(problems)
        )
    bad_scales = [
        f"{name}={float(t)}"
        for name, t in tensors.items()
        if name.rsplit(".", 1)[-1].startswith("s_")
        and not (float(t) > 0 and math.isfinite(float(t)))
    ]
    if bad_scales:
        raise ValueError(
            f"checkpoint {directory} has invalid scales (must be finite and > 0): {bad_scales}"
        )
    model.load_state_dict(tensors, strict=True)
    for mixer in model.mixers:
        mixer.invalidate_scales()
    model.provenance = meta.get("provenance", {})
    return model.to(device)
