"""What ``--model`` names, turned into models: the float model (the fp32/fp16 references), the W8A8
model (the quantized modes), the tokenizer, and a record of where each came from.

Accepted:
- nothing: the bundled tiny byte-level model (package data), quantized on the fly with the stated
  recipe on project-generated text;
- a W8A8 checkpoint written by this package (config.json with format "quamba-w8a8");
- a legacy Quamba1 checkpoint (config.json with ssm_cfg.layer), through quamba-compat;
- a float Mamba-1 checkpoint (mamba_ssm or transformers layout, directory or hub id), quantized
  on the fly with ``--recipe`` on ``--calib-data``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from quamba_eval import builtin_task

BUNDLED_NAME = "tiny-mamba-bytes"
GPT_NEOX_TOKENIZER = "tokenizers/gpt-neox-20b/tokenizer.json"
DEFAULT_TOKENIZER_HUB_ID = "EleutherAI/gpt-neox-20b"


def bundled_model_dir() -> Path:
    return Path(str(resources.files("quamba_eval") / "data" / BUNDLED_NAME))


def directory_sha256(directory: Path, patterns=("*.safetensors", "*.bin", "config.json")) -> str:
    """One hash over the weight and config files of a checkpoint directory (sorted by name)."""
    h = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in Path(directory).glob(pattern)})
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class CalibrationChoice:
    source: str = "builtin"  # "builtin" | path | "hf:<dataset>"
    num_samples: int = 32
    seq_len: int = 256
    recipe: str = "quamba"
    alpha: float | None = None


@dataclass
class ModelBundle:
    tokenizer: object
    float_model: object | None = None
    quantized: object | None = None
    identity: dict = field(default_factory=dict)

    def float_in(self, dtype: torch.dtype, device: torch.device):
        if self.float_model is None:
            raise ValueError(
                "this model has no float weights, so the fp32/fp16 reference modes cannot run: "
                "give the float checkpoint with --float-model, or compare against a quantized "
                "mode with --reference (e.g. --reference 0)"
            )
        return self.float_model.to(device=device, dtype=dtype)


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory holds config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def load_tokenizer_for(directory: Path | None, tokenizer_arg: str | None, data_dir: Path | None):
    from quamba_layers.tokenizer import load_tokenizer

    if tokenizer_arg:
        return load_tokenizer(tokenizer_arg)
    if directory is not None and (
        (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()
    ):
        return load_tokenizer(directory)
    if data_dir is not None and (data_dir / GPT_NEOX_TOKENIZER).is_file():
        return load_tokenizer(data_dir / GPT_NEOX_TOKENIZER)
    return load_tokenizer(DEFAULT_TOKENIZER_HUB_ID)


def calibration_for(choice: CalibrationChoice, tokenizer, data_dir: Path | None):
    from quamba_layers.quant import calibration_set, calibration_set_from_texts

    if choice.source == "builtin":
        docs = builtin_task.training_documents(4 * choice.num_samples, seed=0)
        return calibration_set_from_texts(
            docs,
            tokenizer,
            choice.num_samples,
            choice.seq_len,
            {"kind": "builtin", "generator": "quamba_eval.builtin_task.training_documents(seed=0)"},
        )
    source = choice.source
    if data_dir is not None and not source.startswith("hf:") and not Path(source).exists():
        candidate = data_dir / source
        if candidate.exists():
            source = str(candidate)
    return calibration_set(source, tokenizer, choice.num_samples, choice.seq_len)


def _recipe(choice: CalibrationChoice):
    from dataclasses import replace

    from quamba_layers.quant import get_recipe

    recipe = get_recipe(choice.recipe).with_calibration(choice.num_samples, choice.seq_len)
    if choice.alpha is not None:
        recipe = replace(recipe, percentile_alpha=choice.alpha)
    return recipe


def load_models(
    model_arg: str | None,
    *,
    calibration: CalibrationChoice,
    data_dir: Path | None = None,
    tokenizer_arg: str | None = None,
    float_model_arg: str | None = None,
    need_quantized: bool = True,
    progress: bool = False,
) -> ModelBundle:
    """Resolve ``--model`` (see the module docstring); models are on CPU in float32 / W8A8."""
    from quamba_layers.loading import load_model, resolve_model_dir
    from quamba_layers.quant import is_quantized_checkpoint, load_quantized, quantize

    if model_arg is None:
        directory = bundled_model_dir()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"the bundled tiny model is missing from {directory}; reinstall quamba-eval or "
                "pass --model"
            )
        identity = {"model": f"bundled:{BUNDLED_NAME}", "kind": "float (bundled)"}
    else:
        local = Path(model_arg).expanduser()
        directory = local if local.is_dir() else resolve_model_dir(model_arg)
        identity = {"model": model_arg}
    identity["sha256"] = directory_sha256(directory)
    config = _read_config(directory)

    if is_quantized_checkpoint(directory):
        quantized = load_quantized(directory)
        tokenizer = load_tokenizer_for(directory, tokenizer_arg, data_dir)
        float_model = _float_model(float_model_arg, quantized.provenance)
        identity.update(kind="W8A8 checkpoint", provenance=quantized.provenance)
        return ModelBundle(tokenizer, float_model, quantized, identity)

    if "ssm_cfg" in config and isinstance(config["ssm_cfg"], dict) and "layer" in config["ssm_cfg"]:
        from quamba_compat import load_legacy

        quantized = load_legacy(directory)
        tokenizer = load_tokenizer_for(directory, tokenizer_arg, data_dir)
        float_model = _float_model(float_model_arg, {})
        identity.update(
            kind="legacy Quamba1 W8A8", legacy_rules=quantized.provenance["legacy_rules"]
        )
        return ModelBundle(tokenizer, float_model, quantized, identity)

    float_model = load_model(directory, dtype=torch.float32)
    tokenizer = load_tokenizer_for(directory, tokenizer_arg, data_dir)
    identity.setdefault("kind", "float")
    quantized = None
    if need_quantized:
        recipe = _recipe(calibration)
        calib = calibration_for(calibration, tokenizer, data_dir)
        quantized = quantize(
            float_model,
            calib,
            recipe,
            source={"model": identity["model"], "sha256": identity["sha256"]},
            progress=progress,
        )
        identity["quantized_on_the_fly"] = {
            "recipe": recipe.to_dict(),
            "calibration": calib.describe(),
        }
    return ModelBundle(tokenizer, float_model, quantized, identity)


def _float_model(float_model_arg: str | None, provenance: dict):
    from quamba_layers.loading import load_model

    if float_model_arg:
        return load_model(float_model_arg, dtype=torch.float32)
    source = (provenance.get("source_model") or {}).get("model")
    if source and source.startswith("bundled:"):
        return load_model(bundled_model_dir(), dtype=torch.float32)
    if source and os.path.isdir(source):
        return load_model(source, dtype=torch.float32)
    return None
