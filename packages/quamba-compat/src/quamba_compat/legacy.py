"""Load legacy Quamba1 W8A8 checkpoints (upstream enyac-group/Quamba and the Quamba-SE fork).

Layout (upstream-quamba.md §2.5, seed-system.md §5): ``config.json`` (MambaConfig fields plus
``ssm_cfg.layer``, ``norm_cfg``, ``embedding_cfg``, ``lm_head_cfg``) and ``pytorch_model.bin``
(a pickled state dict; INT8 linear weights stored transposed, (in, out) with out padded to a
multiple of 16; per-tensor scales as Python floats or small float32 tensors).

Every scale is read from the key of its site (``norm.output_scale`` = s_in,
``conv1d.input_scale`` = s_xz, ``conv1d.output_scale`` = s_u, ``selective_scan.B_scale`` = s_xo,
``dt_scale`` = s_dt, ``had.x_H_scale`` = s_had, ``ssm_state_scale`` = s_h, ``.b`` = weight scales);
the derived ratio buffers (``a``, ``alpha``) are cross-checked, not used. The model then runs with
this package's op semantics (docs/design.md).

Known breakages of checkpoints made as the upstream authors recommend for Quamba1 are handled by
explicit, logged rules (``LegacyLoadReport.rules``), never by a blanket ``strict=False``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quamba_layers.quant.modules import SCALE_NAMES, QuantizedConfig, QuantizedMambaLM

log = logging.getLogger("quamba_compat")

SUPPORTED_MIXER = "W8A8QMamba"
KNOWN_UNSUPPORTED = {
    "W4A8QMamba": "Mamba-1 W4A8",
    "W4A16QMamba": "Mamba-1 W4A16",
    "W8A8QMamba2": "Mamba-2 W8A8",
    "W4A8QMamba2": "Mamba-2 W4A8",
    "W4A16QMamba2": "Mamba-2 W4A16",
}
WEIGHTS_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"


class LegacyCheckpointError(ValueError):
    """A legacy checkpoint cannot be loaded; the message names what is wrong."""


@dataclass
class LegacyLoadReport:
    path: str
    rules: list[str] = field(default_factory=list)

    def apply(self, rule: str) -> None:
        self.rules.append(rule)
        log.warning("legacy checkpoint %s: %s", self.path, rule)


def resolve_legacy_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id (e.g. ut-enyac/quamba-130m-w8a8) fetched with huggingface_hub."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists() or text.startswith((".", "/")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"legacy checkpoint {text!r} not found: give a directory holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}, or a hub id such as ut-enyac/quamba-130m-w8a8"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "*.json"]))
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"cannot fetch {text!r} from the Hugging Face hub (offline?): download it elsewhere "
            f"with `huggingface-cli download {text} --local-dir DIR` and pass DIR ({exc})"
        ) from None


def read_legacy_config(directory: Path) -> dict:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a legacy Quamba checkpoint has {CONFIG_FILE}"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise LegacyCheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    check_supported(config, config_path)
    return config


def check_supported(config: dict, where: Path) -> None:
    layer = (config.get("ssm_cfg") or {}).get("layer")
    if config.get("is_hybrid") or isinstance(layer, (list, dict)):
        raise LegacyCheckpointError(
            f"{where}: hybrid W4AX checkpoints (per-layer mixer classes {layer!r}) are not supported "
            f"yet; only Quamba1 {SUPPORTED_MIXER} (Mamba-1 W8A8) checkpoints load"
        )
    if layer == SUPPORTED_MIXER:
        return
    if layer in KNOWN_UNSUPPORTED:
        raise LegacyCheckpointError(
            f"{where}: layer class {layer} ({KNOWN_UNSUPPORTED[layer]}) is not supported yet; "
            f"only Quamba1 {SUPPORTED_MIXER} (Mamba-1 W8A8) checkpoints load"
        )
    raise LegacyCheckpointError(
        f"{where}: ssm_cfg.layer is {layer!r}; expected {SUPPORTED_MIXER} (a Quamba1 W8A8 checkpoint)"
    )


def load_state_dict_safely(path: Path) -> dict:
    """torch.load with weights_only=True; anything but tensors and numbers is refused."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a legacy Quamba checkpoint has {WEIGHTS_FILE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LegacyCheckpointError(
            f"{path} holds objects other than tensors and numbers and was refused "
            f"(loaded with weights_only=True): {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict):
        raise LegacyCheckpointError(
            f"{path} does not hold a state dict (found {type(state).__name__})"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, (torch.Tensor, float, int)):
            raise LegacyCheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}; only tensors and numbers are accepted"
            )
    return state


class _Reader:
    """Pops keys from the legacy state dict, so leftovers can be reported as unexpected."""

    def __init__(self, state: dict, report: LegacyLoadReport) -> None:
        self.state = dict(state)
        self.report = report

    def has(self, key: str) -> bool:
        return key in self.state

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in self.state:
            raise LegacyCheckpointError(f"missing weight {key!r} in {self.report.path}")
        value = self.state.pop(key)
        if not isinstance(value, torch.Tensor):
            raise LegacyCheckpointError(f"{key!r} should be a tensor, found {type(value).__name__}")
        if dtype is not None and value.dtype != dtype:
            raise LegacyCheckpointError(f"{key!r} should be {dtype}, found {value.dtype}")
        return value

    def scale(self, key: str) -> float:
        if key not in self.state:
            raise LegacyCheckpointError(f"missing scale {key!r} in {self.report.path}")
        value = self.state.pop(key)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise LegacyCheckpointError(
                    f"scale {key!r} must hold one value (per-tensor), found shape {tuple(value.shape)}"
                )
            value = value.reshape(()).to(torch.float32).item()
        value = float(torch.tensor(float(value), dtype=torch.float32))
        if not (value > 0 and math.isfinite(value)):
            raise LegacyCheckpointError(
                f"scale {key!r} = {value} is invalid (must be finite and > 0)"
            )
        return value

    def drop(self, key: str) -> None:
        self.state.pop(key, None)


def _unpad_transposed(
    w: torch.Tensor, out_features: int, in_features: int, key: str
) -> torch.Tensor:
    """Upstream stores INT8 linear weights as (in, out_padded); return (out, in)."""
    if w.dim() != 2 or w.shape[0] != in_features or w.shape[1] < out_features:
        raise LegacyCheckpointError(
            f"{key!r}: expected shape ({in_features}, >= {out_features}) (transposed, out padded to "
            f"a multiple of 16), found {tuple(w.shape)}"
        )
    return w.t()[:out_features].contiguous()


def _check_ratio(reader: _Reader, key: str, expected: float) -> None:
    """Cross-check a derived ratio buffer (``a`` = s_in/s_out etc.) and drop it."""
    if not reader.has(key):
        return
    found = reader.scale(key)
    if not math.isclose(found, expected, rel_tol=1e-5):
        raise LegacyCheckpointError(
            f"{key!r} = {found} disagrees with the site scales it derives from ({expected}): "
            "the checkpoint is inconsistent"
        )


def load_legacy(
    path_or_hub_id: str | os.PathLike, device: torch.device | str = "cpu"
) -> QuantizedMambaLM:
    """Build our W8A8 model from a legacy Quamba1 W8A8 checkpoint (CPU is enough).

    ``model.provenance["legacy_rules"]`` lists every compatibility rule that was applied.
    """
    directory = resolve_legacy_dir(path_or_hub_id)
    config = read_legacy_config(directory)
    report = LegacyLoadReport(str(directory))
    state = load_state_dict_safely(directory / WEIGHTS_FILE)
    model = _build(config, _Reader(state, report), report)
    model.provenance = {
        "format": "quamba-w8a8",
        "source_model": {"legacy_checkpoint": str(path_or_hub_id), "directory": str(directory)},
        "legacy_rules": report.rules,
    }
    return model.to(device)


def _build(config: dict, reader: _Reader, report: LegacyLoadReport) -> QuantizedMambaLM:
    try:
        d_model, n_layer, vocab = config["d_model"], config["n_layer"], config["vocab_size"]
    except KeyError as exc:
        raise LegacyCheckpointError(f"config.json lacks {exc.args[0]!r}") from None
    multiple = config.get("pad_vocab_size_multiple", 8)
    padded_vocab = vocab + (-vocab % multiple)
    prefix0 = "backbone.layers.0.mixer."
    a_log = reader.state.get(prefix0 + "selective_scan.A_log")
    conv_w = reader.state.get(prefix0 + "conv1d.weight")
    dt_w = reader.state.get(prefix0 + "dt_proj.weight")
    if a_log is None or conv_w is None or dt_w is None:
        missing = [
            k
            for k in ("selective_scan.A_log", "conv1d.weight", "dt_proj.weight")
            if prefix0 + k not in reader.state
        ]
        raise LegacyCheckpointError(f"missing weight(s) {[prefix0 + k for k in missing]}")
    d_inner, d_state = a_log.shape
    d_conv = conv_w.shape[-1]
    dt_rank = dt_w.shape[0]

    embedding_layer = (config.get("embedding_cfg") or {}).get("layer", "Embedding")
    lm_head_layer = (config.get("lm_head_cfg") or {}).get("layer", "Linear")
    if embedding_layer not in ("Embedding", "W8O16Embedding"):
        raise LegacyCheckpointError(
            f"embedding_cfg.layer {embedding_layer!r} is not supported yet (Embedding, W8O16Embedding)"
        )
    if lm_head_layer not in ("Linear", "W8A8B16O16Linear"):
        raise LegacyCheckpointError(
            f"lm_head_cfg.layer {lm_head_layer!r} is not supported yet (Linear, W8A8B16O16Linear)"
        )
    cfg = QuantizedConfig(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab,
        d_inner=d_inner,
        d_state=d_state,
        d_conv=d_conv,
        dt_rank=dt_rank,
        rms_norm_eps=config.get("norm_epsilon", 1e-5),
        online_hadamard=True,  # Quamba1 always runs the online Hadamard before out_proj
        embedding="int8" if embedding_layer == "W8O16Embedding" else "fp16",
        lm_head="int8" if lm_head_layer == "W8A8B16O16Linear" else "fp16",
    )
    model = QuantizedMambaLM(cfg)
    with torch.no_grad():
        _load_embedding(model, reader, cfg)
        for i, block in enumerate(model.backbone.layers):
            _load_layer(block, reader, f"backbone.layers.{i}.", cfg, report)
        _load_head(model, reader, cfg, report)
    leftovers = sorted(reader.state)
    if leftovers:
        raise LegacyCheckpointError(
            f"unexpected keys in {report.path}: {', '.join(leftovers[:12])}"
            + (" ..." if len(leftovers) > 12 else "")
        )
    for mixer in model.mixers:
        mixer.invalidate_scales()
        mixer.scales()
    return model


def _load_embedding(model: QuantizedMambaLM, reader: _Reader, cfg: QuantizedConfig) -> None:
    backbone = model.backbone
    key = "backbone.embedding.weight"
    if cfg.embedding == "int8":
        backbone.embedding_weight.copy_(reader.tensor(key, torch.int8))
        backbone.embedding_scales.copy_(
            reader.tensor("backbone.embedding.scales").to(torch.float16)
        )
    else:
        weight = reader.tensor(key)
        if weight.shape != backbone.embedding_weight.shape:
            raise LegacyCheckpointError(
                f"{key!r}: expected {tuple(backbone.embedding_weight.shape)}, found {tuple(weight.shape)}"
            )
        backbone.embedding_weight.copy_(weight.to(torch.float16))


def _load_layer(block, reader: _Reader, prefix: str, cfg: QuantizedConfig, report) -> None:
    mixer, norm = block.mixer, block.norm
    mp = prefix + "mixer."
    e, d, n, r = cfg.d_inner, cfg.d_model, cfg.d_state, cfg.dt_rank
    scales = {
        "s_in": reader.scale(prefix + "norm.output_scale"),
        "s_xz": reader.scale(mp + "conv1d.input_scale"),
        "s_u": reader.scale(mp + "conv1d.output_scale"),
        "s_xo": reader.scale(mp + "selective_scan.B_scale"),
        "s_dt": reader.scale(mp + "selective_scan.dt_scale"),
        "s_had": reader.scale(mp + "had.x_H_scale"),
        "s_h": reader.scale(mp + "selective_scan.ssm_state_scale"),
        "s_w_in": reader.scale(mp + "in_proj.b"),
        "s_w_x": reader.scale(mp + "x_proj.b"),
        "s_w_dt": reader.scale(mp + "dt_proj.b"),
        "s_w_out": reader.scale(mp + "out_proj.b"),
        "s_w_conv": reader.scale(mp + "conv1d.weight_scale"),
        "s_b_conv": reader.scale(mp + "conv1d.bias_scale"),
        "s_A": reader.scale(mp + "selective_scan.A_scale"),
        "s_D": reader.scale(mp + "selective_scan.D_scale"),
        "s_dtb": reader.scale(mp + "selective_scan.dt_bias_scale"),
    }
    # Scales stored twice must agree.
    for key, site in (
        ("selective_scan.u_scale", "s_u"),
        ("selective_scan.z_scale", "s_xz"),
        ("selective_scan.C_scale", "s_xo"),
        ("out_proj.a", "s_had"),
    ):
        value = reader.scale(mp + key)
        if value != scales[site]:
            raise LegacyCheckpointError(
                f"{mp + key} = {value} differs from {site} = {scales[site]}: the model uses one "
                "scale for both, so this checkpoint is not a Quamba1 W8A8 model"
            )
    _check_ratio(reader, mp + "in_proj.a", scales["s_in"] / scales["s_xz"])
    _check_ratio(reader, mp + "x_proj.a", scales["s_u"] / scales["s_xo"])
    _check_ratio(reader, mp + "dt_proj.a", scales["s_xo"] / scales["s_dt"])
    for name, site_in, site_w, site_out in (
        ("in_proj", "s_in", "s_w_in", "s_xz"),
        ("x_proj", "s_u", "s_w_x", "s_xo"),
        ("dt_proj", "s_xo", "s_w_dt", "s_dt"),
        ("out_proj", "s_had", "s_w_out", None),
    ):
        expected = scales[site_w] * scales[site_in] / (scales[site_out] if site_out else 1.0)
        _check_ratio(reader, mp + f"{name}.alpha", expected)
    for name, value in scales.items():
        getattr(mixer, name).fill_(value)

    norm_weight = reader.tensor(prefix + "norm.weight")
    norm.weight.copy_(norm_weight.float())
    i8 = torch.int8
    mixer.in_proj_weight.copy_(
        _unpad_transposed(reader.tensor(mp + "in_proj.weight", i8), 2 * e, d, mp + "in_proj.weight")
    )
    mixer.x_proj_weight.copy_(
        _unpad_transposed(
            reader.tensor(mp + "x_proj.weight", i8), r + 2 * n, e, mp + "x_proj.weight"
        )
    )
    mixer.dt_proj_weight.copy_(
        _unpad_transposed(reader.tensor(mp + "dt_proj.weight", i8), e, r, mp + "dt_proj.weight")
    )
    mixer.out_proj_weight.copy_(
        _unpad_transposed(reader.tensor(mp + "out_proj.weight", i8), d, e, mp + "out_proj.weight")
    )
    for target, key, shape in (
        ("conv_weight", "conv1d.weight", (e, cfg.d_conv)),
        ("conv_bias", "conv1d.bias", (e,)),
        ("A_log", "selective_scan.A_log", (e, n)),
        ("D", "selective_scan.D", (e,)),
        ("dt_bias", "selective_scan.dt_bias", (e,)),
    ):
        value = reader.tensor(mp + key, i8)
        if value.numel() != math.prod(shape):
            raise LegacyCheckpointError(
                f"{mp + key!r}: expected shape {shape}, found {tuple(value.shape)}"
            )
        getattr(mixer, target).copy_(value.reshape(shape))


def _load_head(model: QuantizedMambaLM, reader: _Reader, cfg: QuantizedConfig, report) -> None:
    norm_key = "backbone.norm_f.weight"
    model.backbone.norm_f_weight.copy_(reader.tensor(norm_key).float())
    if cfg.lm_head == "int8":
        model.s_lm_in.fill_(reader.scale("backbone.norm_f.output_scale"))
        model.s_w_lm.fill_(reader.scale("lm_head.b"))
        weight = reader.tensor("lm_head.weight", torch.int8)
        model.lm_head_weight.copy_(
            _unpad_transposed(weight, cfg.padded_vocab_size, cfg.d_model, "lm_head.weight")
        )
        reader.drop("lm_head.a")
        reader.drop("lm_head.alpha")
        return
    if reader.has("backbone.norm_f.output_scale"):
        raise LegacyCheckpointError(
            "backbone.norm_f.output_scale is present but lm_head_cfg says an FP16 Linear lm_head: "
            "the checkpoint mixes the quantized and FP16 heads"
        )
    report.apply(
        "no backbone.norm_f.output_scale with an FP16 lm_head: the final norm is a float RMSNorm "
        "(norm_cfg names one class for block norms and norm_f; only the block norms are QRMSNorm)"
    )
    weight = reader.tensor("lm_head.weight")
    if weight.shape != model.lm_head_weight.shape:
        raise LegacyCheckpointError(
            f"'lm_head.weight': expected {tuple(model.lm_head_weight.shape)}, found {tuple(weight.shape)}"
        )
    if weight.dtype != torch.float16:
        report.apply(
            f"lm_head.weight stored as {weight.dtype}: cast to float16 (upstream runs it in FP16)"
        )
    model.lm_head_weight.copy_(weight.to(torch.float16))
    if reader.has("lm_head.bias"):
        bias = reader.tensor("lm_head.bias")
        if bool(bias.any()):
            raise LegacyCheckpointError(
                "lm_head.bias is present and non-zero: Quamba1 lm_heads have no bias"
            )
        report.apply("lm_head.bias present but all zeros: dropped (bias-free FP16 lm_head)")
    else:
        report.apply("no lm_head.bias: bias-free FP16 lm_head (upstream built Linear(bias=True))")


__all__ = [
    "SCALE_NAMES",
    "LegacyCheckpointError",
    "LegacyLoadReport",
    "load_legacy",
    "load_state_dict_safely",
    "read_legacy_config",
    "resolve_legacy_dir",
]
