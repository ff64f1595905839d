"""Load and save FP Mamba-1 checkpoints in the mamba_ssm and the transformers ("hf") layouts.

mamba_ssm layout (state-spaces/mamba-130m): `config.json` with d_model, n_layer, vocab_size,
ssm_cfg, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple, tie_embeddings;
weights keyed exactly like `MambaLM.state_dict()`.

transformers layout (state-spaces/mamba-130m-hf): `config.json` with model_type "mamba",
hidden_size, num_hidden_layers, state_size, ...; the embedding is `backbone.embeddings.weight`,
every other key is as in mamba_ssm.

Weights: `model.safetensors`, `pytorch_model.bin` (read with `torch.load(weights_only=True)`), or
their sharded forms with an `*.index.json`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import MambaConfig
from .io_utils import atomic_write, atomic_write_text
from .model import MambaLM

__all__ = [
    "LAYOUTS",
    "config_from_dict",
    "config_to_dict",
    "download_from_hub",
    "is_hub_id",
    "load_config",
    "load_model",
    "resolve_model_dir",
    "save_model",
]

LAYOUTS = ("mamba_ssm", "hf")

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
_WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME, BIN_INDEX_NAME)

_EMBEDDING_KEY = "backbone.embedding.weight"
_HF_EMBEDDING_KEY = "backbone.embeddings.weight"
_LM_HEAD_KEY = "lm_head.weight"

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# ssm_cfg entries that only matter for initialisation or for mamba_ssm's fast path.
_SSM_CFG_IGNORED = {
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "use_fast_path",
    "layer_idx",
}
_SSM_CFG_FIELDS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias"}


# --- configs ----------------------------------------------------------------------------------


def _require(data: dict[str, Any], key: str, layout: str) -> Any:
    if key not in data:
        raise ValueError(f"{layout} config.json is missing the required key {key!r}")
    return data[key]


def detect_layout(data: dict[str, Any]) -> str:
    """'mamba_ssm' or 'hf' from the keys of a config.json; ValueError for anything else."""
    model_type = data.get("model_type")
    if model_type is not None:
        if model_type == "mamba":
            return "hf"
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json: only Mamba-1 checkpoints "
            "(model_type 'mamba', or the mamba_ssm layout with d_model/n_layer) are supported"
        )
    if "d_model" in data and "n_layer" in data:
        return "mamba_ssm"
    if "hidden_size" in data and "num_hidden_layers" in data:
        return "hf"
    raise ValueError(
        "unknown checkpoint layout: config.json has neither d_model/n_layer (mamba_ssm layout) "
        "nor model_type 'mamba' with hidden_size/num_hidden_layers (transformers layout)"
    )


def _config_from_mamba_ssm(data: dict[str, Any]) -> MambaConfig:
    layout = "mamba_ssm"
    if not data.get("rms_norm", True):
        raise ValueError(
            "mamba_ssm config has rms_norm=false (LayerNorm); only RMSNorm is supported"
        )
    if data.get("d_intermediate", 0):
        raise ValueError("mamba_ssm config has d_intermediate > 0 (MLP blocks); not supported")
    if data.get("attn_layer_idx"):
        raise ValueError("mamba_ssm config has attention layers (attn_layer_idx); not supported")
    ssm_cfg = dict(data.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ValueError(f"mamba_ssm ssm_cfg.layer is {layer!r}; only 'Mamba1' is supported")
    unknown = sorted(set(ssm_cfg) - _SSM_CFG_FIELDS - _SSM_CFG_IGNORED)
    if unknown:
        raise ValueError(f"unsupported ssm_cfg keys {unknown} in mamba_ssm config.json")
    fields = {key: ssm_cfg[key] for key in _SSM_CFG_FIELDS if key in ssm_cfg}
    return MambaConfig(
        d_model=_require(data, "d_model", layout),
        n_layer=_require(data, "n_layer", layout),
        vocab_size=_require(data, "vocab_size", layout),
        rms_norm_eps=data.get("norm_epsilon", 1e-5),
        pad_vocab_size_multiple=data.get("pad_vocab_size_multiple", 8),
        tie_embeddings=data.get("tie_embeddings", True),
        residual_in_fp32=data.get("residual_in_fp32", True),
        **fields,
    )


def _config_from_hf(data: dict[str, Any]) -> MambaConfig:
    layout = "transformers (hf)"
    hidden_act = data.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hf config has hidden_act {hidden_act!r}; only 'silu' is supported")
    hidden_size = _require(data, "hidden_size", layout)
    expand = data.get("expand", 2)
    intermediate_size = data.get("intermediate_size")
    if intermediate_size is not None and intermediate_size != expand * hidden_size:
        raise ValueError(
            f"hf config has intermediate_size {intermediate_size}, but expand * hidden_size is "
            f"{expand} * {hidden_size}; they must agree"
        )
    config = MambaConfig(
        d_model=hidden_size,
        n_layer=_require(data, "num_hidden_layers", layout),
        vocab_size=_require(data, "vocab_size", layout),
        d_state=data.get("state_size", 16),
        d_conv=data.get("conv_kernel", 4),
        expand=expand,
        dt_rank=data.get("time_step_rank", "auto"),
        rms_norm_eps=data.get("layer_norm_epsilon", 1e-5),
        # transformers stores the already padded vocabulary size.
        pad_vocab_size_multiple=1,
        tie_embeddings=data.get("tie_word_embeddings", True),
        residual_in_fp32=data.get("residual_in_fp32", True),
        conv_bias=data.get("use_conv_bias", True),
        bias=data.get("use_bias", False),
    )
    return config


def config_from_dict(data: dict[str, Any]) -> tuple[MambaConfig, str]:
    """Parse a config.json dict of either layout; returns (config, layout)."""
    if not isinstance(data, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(data).__name__}")
    layout = detect_layout(data)
    try:
        if layout == "hf":
            return _config_from_hf(data), layout
        return _config_from_mamba_ssm(data), layout
    except TypeError as error:
        raise ValueError(f"invalid {layout} config.json: {error}") from error


def config_to_dict(config: MambaConfig, layout: str, dtype: torch.dtype | None = None) -> dict:
    """The config.json dict of `config` in `layout` ('mamba_ssm' or 'hf')."""
    _check_layout(layout)
    if layout == "hf":
        data: dict[str, Any] = {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": config.d_model,
            "num_hidden_layers": config.n_layer,
            "vocab_size": config.padded_vocab_size,
            "state_size": config.d_state,
            "conv_kernel": config.d_conv,
            "expand": config.expand,
            "intermediate_size": config.d_inner,
            "time_step_rank": config.resolved_dt_rank,
            "layer_norm_epsilon": config.rms_norm_eps,
            "use_bias": config.bias,
            "use_conv_bias": config.conv_bias,
            "residual_in_fp32": config.residual_in_fp32,
            "tie_word_embeddings": config.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }
        if dtype is not None:
            data["dtype"] = str(dtype).removeprefix("torch.")
        return data
    data = {
        "d_model": config.d_model,
        "n_layer": config.n_layer,
        "vocab_size": config.vocab_size,
        "ssm_cfg": {
            "d_state": config.d_state,
            "d_conv": config.d_conv,
            "expand": config.expand,
            "dt_rank": config.dt_rank,
            "conv_bias": config.conv_bias,
            "bias": config.bias,
        },
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }
    if config.rms_norm_eps != 1e-5:
        # Not a mamba_ssm field (it always uses 1e-5); written only when it differs.
        data["norm_epsilon"] = config.rms_norm_eps
    return data


def load_config(path: str | os.PathLike) -> tuple[MambaConfig, str]:
    """Read `config.json` of a checkpoint directory; returns (config, layout)."""
    directory = Path(path)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {directory}: a checkpoint directory needs {CONFIG_NAME} and "
            f"weights ({', '.join(_WEIGHT_NAMES)})"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    return config_from_dict(data)


# --- weights ----------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"could not read safetensors weights {path}: {error}") from error


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read {path} with torch.load(weights_only=True): {error}"
        ) from error
    if not isinstance(data, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in data.items()
    ):
        raise ValueError(f"{path} does not hold a state dict (a dict of name -> tensor)")
    return data


def _read_sharded(index_path: Path, reader: Callable[[Path], dict]) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index_path} is not a valid weight index: {error}") from error
    tensors: dict[str, torch.Tensor] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard_name
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names the shard {shard_name}, which is missing")
        tensors.update(reader(shard_path))
    return tensors


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / SAFETENSORS_NAME).is_file():
        return _read_safetensors(directory / SAFETENSORS_NAME)
    if (directory / SAFETENSORS_INDEX_NAME).is_file():
        return _read_sharded(directory / SAFETENSORS_INDEX_NAME, _read_safetensors)
    if (directory / BIN_NAME).is_file():
        return _read_bin(directory / BIN_NAME)
    if (directory / BIN_INDEX_NAME).is_file():
        return _read_sharded(directory / BIN_INDEX_NAME, _read_bin)
    raise FileNotFoundError(
        f"no weights in {directory}: expected one of {', '.join(_WEIGHT_NAMES)}"
    )


def _format_names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def _prepare_state_dict(
    tensors: dict[str, torch.Tensor], config: MambaConfig, layout: str
) -> dict[str, torch.Tensor]:
    """Map checkpoint keys to MambaLM's, resolve tying, and check names and shapes."""
    if layout == "hf":
        tensors = {
            (_EMBEDDING_KEY if key == _HF_EMBEDDING_KEY else key): value
            for key, value in tensors.items()
        }
    tensors = dict(tensors)
    expected = {
        key: tuple(value.shape)
        for key, value in MambaLM(config, device="meta").state_dict().items()
    }
    if config.tie_embeddings:
        expected.pop(_LM_HEAD_KEY)
        head = tensors.pop(_LM_HEAD_KEY, None)
        embedding = tensors.get(_EMBEDDING_KEY)
        if (
            head is not None
            and embedding is not None
            and (head.shape != embedding.shape or not torch.equal(head, embedding))
        ):
            raise ValueError(
                "the config ties lm_head to the embedding, but the checkpoint's "
                f"{_LM_HEAD_KEY} differs from {_EMBEDDING_KEY}; set tie_embeddings "
                "(tie_word_embeddings) to false to load an untied head"
            )

    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint ({layout} layout) is missing keys: {_format_names(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(
            f"checkpoint ({layout} layout) has unexpected keys: {_format_names(unexpected)}"
        )
    mismatched = [
        f"{key}: expected {expected[key]}, found {tuple(tensors[key].shape)}"
        for key in sorted(expected)
        if tuple(tensors[key].shape) != expected[key]
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint ({layout} layout) does not match its config.json, shape mismatch: "
            + "; ".join(mismatched)
        )
    return tensors


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}"
        )
    return dtype


# --- locating a checkpoint --------------------------------------------------------------------


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def download_from_hub(repo_id: str, pattern_sets: list[list[str]], wanted: list[str]) -> Path:
    """snapshot_download `repo_id` with each pattern set in turn until a file in `wanted` exists.

    Offline (HF_HUB_OFFLINE) only the local cache is used. Any failure becomes a
    FileNotFoundError that says how to use a local copy instead.
    """
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    local = None
    for patterns in pattern_sets:
        try:
            local = Path(
                snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
            )
        except Exception as error:
            reason = "offline mode (HF_HUB_OFFLINE) and not in the cache" if offline else "failed"
            raise FileNotFoundError(
                f"{repo_id!r} is not a local directory and getting it from the Hugging Face hub "
                f"{reason}: {type(error).__name__}: {error}. To use a local copy, download it "
                f"where there is network access (`hf download {repo_id}` or "
                "huggingface_hub.snapshot_download) and pass that directory's path instead."
            ) from error
        if any((local / name).is_file() for name in wanted):
            return local
    assert local is not None
    return local


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a hub repository id, 'owner/name'."""
    return _HUB_ID.fullmatch(text) is not None


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, or the snapshot directory of a hub id ('owner/name')."""
    if isinstance(path_or_hub_id, os.PathLike):
        path = Path(path_or_hub_id).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"no such checkpoint directory: {path}")
        return path
    if not isinstance(path_or_hub_id, str):
        raise TypeError(
            "path_or_hub_id must be a directory path or a hub id 'owner/name', "
            f"got {type(path_or_hub_id).__name__}"
        )
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"{path} is a file; pass the checkpoint directory (holding {CONFIG_NAME} and weights)"
        )
    if not is_hub_id(path_or_hub_id):
        raise FileNotFoundError(
            f"no such checkpoint directory: {path_or_hub_id} (and it is not a hub id 'owner/name')"
        )
    return download_from_hub(
        path_or_hub_id,
        pattern_sets=[
            [CONFIG_NAME, SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, "*.safetensors"],
            [CONFIG_NAME, BIN_NAME, BIN_INDEX_NAME, "pytorch_model*.bin"],
        ],
        wanted=list(_WEIGHT_NAMES),
    )


# --- public entry points ----------------------------------------------------------------------


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> MambaLM:
    """Load an FP Mamba-1 checkpoint of either layout (local directory or hub id) as `MambaLM`.

    The layout is detected from config.json; keys and shapes are checked strictly (missing,
    unexpected and mismatched keys are each a ValueError naming them). Returns the model in
    eval mode, on `device`, with parameters in `dtype`.
    """
    dtype = _resolve_dtype(dtype)
    device = torch.device(device)
    directory = resolve_model_dir(path_or_hub_id)
    config, layout = load_config(directory)
    tensors = _prepare_state_dict(_read_weights(directory), config, layout)
    tensors = {key: value.to(device=device, dtype=dtype) for key, value in tensors.items()}
    if config.tie_embeddings:
        tensors[_LM_HEAD_KEY] = tensors[_EMBEDDING_KEY]
    model = MambaLM(config, device="meta", dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; accepted layouts: {LAYOUTS}")


def save_model(
    model: MambaLM,
    directory: str | os.PathLike,
    layout: str = "mamba_ssm",
    safetensors: bool = True,
) -> Path:
    """Write `model` as a checkpoint directory in `layout` ('mamba_ssm' or 'hf').

    Writes the weights (`model.safetensors`, or `pytorch_model.bin` with `safetensors=False`) and
    then `config.json`, each atomically. A tied lm_head is left out of safetensors files (it is
    the embedding). Weight files of the other format left from an earlier save are removed, so
    the directory always loads what was saved last. Returns the directory.
    """
    if not isinstance(model, MambaLM):
        raise TypeError(f"model must be a MambaLM, got {type(model).__name__}")
    _check_layout(layout)
    if not isinstance(safetensors, bool):
        raise TypeError(f"safetensors must be a bool, got {safetensors!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    config = model.config
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if config.tie_embeddings:
        if safetensors:
            del tensors[_LM_HEAD_KEY]
        else:
            tensors[_LM_HEAD_KEY] = tensors[_EMBEDDING_KEY]  # one storage in the pickle
    if layout == "hf":
        tensors[_HF_EMBEDDING_KEY] = tensors.pop(_EMBEDDING_KEY)

    if safetensors:
        from safetensors.torch import save_file

        weights_name = SAFETENSORS_NAME
        atomic_write(
            directory / weights_name,
            lambda name: save_file(tensors, name, metadata={"format": "pt"}),
        )
    else:
        weights_name = BIN_NAME
        atomic_write(directory / weights_name, lambda name: torch.save(tensors, name))
    for stale in _WEIGHT_NAMES:
        if stale != weights_name:
            (directory / stale).unlink(missing_ok=True)

    config_text = json.dumps(config_to_dict(config, layout, dtype=model.dtype), indent=2) + "\n"
    atomic_write_text(directory / CONFIG_NAME, config_text)
    return directory
