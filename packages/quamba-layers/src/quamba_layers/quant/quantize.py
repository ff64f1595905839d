"""``quantize(model, calibration, recipe)``: a float Mamba-1 LM -> a W8A8 QuantizedMambaLM."""

from __future__ import annotations

import torch

from quamba_layers import reference_ops as ops
from quamba_layers.quant.calibrate import calibrate
from quamba_layers.quant.data import CalibrationSet
from quamba_layers.quant.modules import QuantizedConfig, QuantizedMambaLM
from quamba_layers.quant.observers import MIN_BATCH_MAX, as_float32
from quamba_layers.quant.provenance import package_versions
from quamba_layers.quant.recipe import QuantRecipe, get_recipe
from quamba_layers.quant.rotation import rotate_model


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-tensor symmetric absmax INT8 (round half to even), as upstream: (codes, scale)."""
    scale = as_float32(max(w.abs().max().item(), MIN_BATCH_MAX) / 127.0)
    return ops.quantize_int8(w.to(torch.float32), scale, "half_even"), scale


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8 with float16 row scales (upstream's W8O16 embedding)."""
    scales = (w.abs().amax(dim=1).clamp(min=MIN_BATCH_MAX) / 127.0).to(torch.float16)
    codes = ops.round_half_even(w.float() / scales.float()[:, None]).clamp(-128, 127)
    return codes.to(torch.int8), scales


def quantized_config_for(model, recipe: QuantRecipe) -> QuantizedConfig:
    cfg = model.config
    return QuantizedConfig(
        d_model=cfg.d_model,
        n_layer=cfg.n_layer,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.padded_vocab_size,
        d_inner=cfg.d_inner,
        d_state=cfg.d_state,
        d_conv=cfg.d_conv,
        dt_rank=cfg.resolved_dt_rank,
        rms_norm_eps=cfg.rms_norm_eps,
        online_hadamard=recipe.hadamard,
        embedding="int8" if recipe.quantize_embedding else "fp16",
        lm_head="int8" if recipe.quantize_lm_head else "fp16",
    )


@torch.no_grad()
def quantize(
    model,
    calibration: CalibrationSet,
    recipe: QuantRecipe | str = "quamba",
    *,
    device: torch.device | str = "cpu",
    source: dict | None = None,
    progress: bool = True,
) -> QuantizedMambaLM:
    """Post-training W8A8 quantization of a float ``MambaLM`` (Quamba1 recipe by default).

    calibration: a :class:`CalibrationSet` (token ids in a fixed, recorded order; build one with
    ``calibration_set(...)``). recipe: a :class:`QuantRecipe` or a recipe name ("quamba", "naive").
    The result is on CPU; its ``provenance`` records source, recipe, calibration and versions.
    """
    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    samples = calibration.token_ids
    if samples.shape[0] < recipe.num_samples or samples.shape[1] < recipe.seq_len:
        recipe = recipe.with_calibration(samples.shape[0], samples.shape[1])
    rotated = rotate_model(model, hadamard=recipe.hadamard)
    observers, lm_head_observer = calibrate(
        rotated, samples, recipe, device=device, progress=progress
    )

    qcfg = quantized_config_for(model, recipe)
    qmodel = QuantizedMambaLM(qcfg)
    backbone = qmodel.backbone
    if recipe.quantize_embedding:
        codes, row_scales = quantize_rows(rotated.embedding)
        backbone.embedding_weight.copy_(codes)
        backbone.embedding_scales.copy_(row_scales)
    else:
        backbone.embedding_weight.copy_(rotated.embedding.to(torch.float16))
    if recipe.quantize_lm_head:
        codes, scale = quantize_weight(rotated.lm_head)
        qmodel.lm_head_weight.copy_(codes)
        qmodel.s_w_lm.fill_(scale)
        qmodel.s_lm_in.fill_(lm_head_observer.scale())
    else:
        qmodel.lm_head_weight.copy_(rotated.lm_head.to(torch.float16))
    for mixer, layer, obs in zip(qmodel.mixers, rotated.layers, observers):
        for target, source_w, scale_name in (
            ("in_proj_weight", layer.in_proj, "s_w_in"),
            ("x_proj_weight", layer.x_proj, "s_w_x"),
            ("dt_proj_weight", layer.dt_proj, "s_w_dt"),
            ("out_proj_weight", layer.out_proj, "s_w_out"),
            ("conv_weight", layer.conv_weight, "s_w_conv"),
            ("conv_bias", layer.conv_bias, "s_b_conv"),
            ("A_log", layer.A_log, "s_A"),
            ("D", layer.D, "s_D"),
            ("dt_bias", layer.dt_bias, "s_dtb"),
        ):
            codes, scale = quantize_weight(source_w)
            getattr(mixer, target).copy_(codes)
            getattr(mixer, scale_name).fill_(scale)
        for site, observer in obs.items():
            getattr(mixer, site).fill_(observer.scale())
        mixer.invalidate_scales()
        mixer.scales()  # validates every scale
    qmodel.provenance = {
        "format": "quamba-w8a8",
        "source_model": source or {},
        "recipe": recipe.to_dict(),
        "calibration": calibration.describe(),
        "observers_layer0": {site: o.describe() for site, o in observers[0].items()},
        "versions": package_versions(),
    }
    return qmodel
