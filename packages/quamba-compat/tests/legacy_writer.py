"""Writes checkpoints in the exact upstream Quamba1 layout from a model of our pipeline.

Independent of the loader: it follows the key layout documented in seed-system.md §5.3 and
upstream-quamba.md §2.5 (transposed INT8 weights padded to a multiple of 16, ``a``/``b``/``alpha``,
per-site scales as Python floats, norm_cfg/embedding_cfg/lm_head_cfg), plus the broken variants
that upstream and the fork produce.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _f(t) -> float:
    return float(t)


def _transposed_padded(w: torch.Tensor) -> torch.Tensor:
    """(out, in) -> a (in, out_padded) transposed view, as upstream's to(...).t() storage."""
    out_features = w.shape[0]
    pad = -out_features % 16
    if pad:
        w = torch.cat([w, torch.zeros(pad, w.shape[1], dtype=w.dtype)])
    return w.t()


def legacy_state_dict(model, variant: str = "recommended") -> dict:
    """Our QuantizedMambaLM -> upstream's state dict. variant: see write_legacy_checkpoint."""
    state: dict = {}
    cfg = model.cfg
    backbone = model.backbone
    if cfg.embedding == "int8":
        state["backbone.embedding.weight"] = backbone.embedding_weight.clone()
        state["backbone.embedding.scales"] = backbone.embedding_scales.clone()
    else:
        state["backbone.embedding.weight"] = backbone.embedding_weight.clone()
    for i, block in enumerate(backbone.layers):
        p = f"backbone.layers.{i}."
        m = block.mixer
        s_in, s_xz, s_u, s_xo = _f(m.s_in), _f(m.s_xz), _f(m.s_u), _f(m.s_xo)
        s_dt, s_had, s_h = _f(m.s_dt), _f(m.s_had), _f(m.s_h)
        state[p + "norm.weight"] = block.norm.weight.to(torch.float16)
        state[p + "norm.output_scale"] = s_in
        for name, w, s_x, s_w, s_out in (
            ("in_proj", m.in_proj_weight, s_in, _f(m.s_w_in), s_xz),
            ("x_proj", m.x_proj_weight, s_u, _f(m.s_w_x), s_xo),
            ("dt_proj", m.dt_proj_weight, s_xo, _f(m.s_w_dt), s_dt),
            ("out_proj", m.out_proj_weight, s_had, _f(m.s_w_out), None),
        ):
            a = s_x / s_out if s_out is not None else s_x
            state[p + f"mixer.{name}.weight"] = _transposed_padded(w.clone())
            state[p + f"mixer.{name}.a"] = torch.tensor([[a]], dtype=torch.float32)
            state[p + f"mixer.{name}.b"] = torch.tensor([[s_w]], dtype=torch.float32)
            state[p + f"mixer.{name}.alpha"] = a * s_w
        state[p + "mixer.conv1d.weight"] = m.conv_weight.clone()
        state[p + "mixer.conv1d.bias"] = m.conv_bias.clone()
        state[p + "mixer.conv1d.weight_scale"] = _f(m.s_w_conv)
        state[p + "mixer.conv1d.bias_scale"] = _f(m.s_b_conv)
        state[p + "mixer.conv1d.input_scale"] = s_xz
        state[p + "mixer.conv1d.output_scale"] = s_u
        ss = p + "mixer.selective_scan."
        state[ss + "dt_bias"] = m.dt_bias.clone()
        state[ss + "dt_bias_scale"] = torch.tensor(_f(m.s_dtb))
        state[ss + "A_log"] = m.A_log.clone()
        state[ss + "A_scale"] = torch.tensor(_f(m.s_A))
        state[ss + "D"] = m.D.clone()
        state[ss + "D_scale"] = torch.tensor(_f(m.s_D))
        for key, value in (
            ("u_scale", s_u),
            ("dt_scale", s_dt),
            ("B_scale", s_xo),
            ("C_scale", s_xo),
            ("z_scale", s_xz),
            ("ssm_state_scale", s_h),
        ):
            state[ss + key] = torch.tensor(value)
        state[p + "mixer.had.x_H_scale"] = s_had
    state["backbone.norm_f.weight"] = backbone.norm_f_weight.to(torch.float16)
    if cfg.lm_head == "int8":
        s_in, s_w = _f(model.s_lm_in), _f(model.s_w_lm)
        state["backbone.norm_f.output_scale"] = s_in
        state["lm_head.weight"] = _transposed_padded(model.lm_head_weight.clone())
        state["lm_head.a"] = torch.tensor([[s_in]])
        state["lm_head.b"] = torch.tensor([[s_w]])
        state["lm_head.alpha"] = s_in * s_w
    else:
        weight = model.lm_head_weight.clone()
        state["lm_head.weight"] = weight.float() if variant == "lm_head_fp32" else weight
        if variant == "lm_head_zero_bias":
            state["lm_head.bias"] = torch.zeros(weight.shape[0], dtype=torch.float16)
    return state


def legacy_config(model, layer: str = "W8A8QMamba", hybrid: bool = False) -> dict:
    cfg = model.cfg
    return {
        "d_model": cfg.d_model,
        "d_intermediate": 0,
        "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": {"layer": ["W4A8QMamba2"] * cfg.n_layer if hybrid else layer},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": False,
        # One class for block norms and norm_f: the root cause of upstream's load bugs.
        "norm_cfg": {"norm": "QRMSNorm"},
        "embedding_cfg": {"layer": "W8O16Embedding" if cfg.embedding == "int8" else "Embedding"},
        "lm_head_cfg": {"layer": "W8A8B16O16Linear" if cfg.lm_head == "int8" else "Linear"},
        **({"is_hybrid": True} if hybrid else {}),
    }


def write_legacy_checkpoint(
    model, directory: Path, variant: str = "recommended", **config_kw
) -> Path:
    """variant: "recommended" (W8A8 without H2T: no norm_f.output_scale, no lm_head.bias),
    "lm_head_fp32", "lm_head_zero_bias"; H2T variants follow the model's own config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(legacy_state_dict(model, variant), directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(legacy_config(model, **config_kw)))
    return directory
